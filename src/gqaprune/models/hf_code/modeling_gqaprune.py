"""Pruned LLaMA-family decoders with a different shape in every layer (written by gqaprune).

transformers 5 refuses a config whose ``num_attention_heads`` does not divide ``hidden_size``, and a
standard config holds one head count and one MLP width for all layers. A pruned checkpoint therefore
keeps the dense model's (valid) numbers in the standard keys and records the real per-layer geometry
in ``config.gqaprune_layers``: one entry per kept decoder layer::

    {"source_layer": 12, "num_key_value_heads": 6, "intermediate_size": 11264}

``num_key_value_heads == 0`` means the layer's attention was pruned away (the residual passes
through); ``intermediate_size == 0`` likewise for its MLP. Optional ``"o_proj_bias": true`` /
``"down_proj_bias": true`` give that projection a bias the dense family does not have (output
compensation stores the removed channels' mean contribution there). The query heads of a layer are
``num_key_value_heads * (num_attention_heads // num_key_value_heads of the dense config)``, so the
Q:KV ratio, head_dim and RoPE are those of the dense model.

The classes below build the family's normal HF model and then resize its projections before the
weights are loaded, so the result is a plain torch module: no masks, hooks or patched forwards.
This file and ``gqaprune_layout.py`` (the one definition of the module tree and of a group) depend on
torch and transformers only, so a checkpoint that carries both loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .gqaprune_layout import (
    ATTN,
    MLP,
    EmptyAttention,
    EmptyMLP,
    decoder_layers,
    head_dim,
    q_per_kv,
    renumber_cache_slots,
    resize_block,
)

__all__ = ["EmptyAttention", "EmptyMLP", "PrunedLlamaForCausalLM", "PrunedMistralForCausalLM",
           "PrunedQwen2ForCausalLM", "apply_layer_geometry", "renumber_cache_slots"]


def apply_layer_geometry(model: nn.Module, layer_specs: list[dict]) -> None:
    """Resize the decoder layers of ``model`` to ``layer_specs`` (see the module docstring)."""
    config = model.config
    layers = decoder_layers(model)
    if len(layer_specs) != len(layers):
        raise ValueError(f"gqaprune_layers has {len(layer_specs)} entries for {len(layers)} decoder layers")
    ratio, dim = q_per_kv(config), head_dim(config)
    for layer, spec in zip(layers, layer_specs, strict=True):
        resize_block(layer, ATTN, int(spec["num_key_value_heads"]), ratio, dim, bool(spec.get("o_proj_bias")))
        resize_block(layer, MLP, int(spec["intermediate_size"]), ratio, dim, bool(spec.get("down_proj_bias")))
    renumber_cache_slots(layers)


class _PerLayerGeometry:
    """Mixin: build the family's dense model, then give each layer its pruned shape."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_layer_geometry(self, config.gqaprune_layers)


class PrunedLlamaForCausalLM(_PerLayerGeometry, LlamaForCausalLM):
    """LlamaForCausalLM with per-layer KV heads and MLP widths."""


class PrunedQwen2ForCausalLM(_PerLayerGeometry, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with per-layer KV heads and MLP widths."""


class PrunedMistralForCausalLM(_PerLayerGeometry, MistralForCausalLM):
    """MistralForCausalLM with per-layer KV heads and MLP widths."""

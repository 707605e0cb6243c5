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
This file depends on torch and transformers only, so it can be loaded with ``trust_remote_code=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class EmptyAttention(nn.Module):
    """An attention block whose groups were all pruned: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Return zeros shaped like the input and no attention weights, as HF attention modules do."""
        return torch.zeros_like(hidden_states), None


class EmptyMLP(nn.Module):
    """An MLP block whose channels were all pruned: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return zeros shaped like the input."""
        return torch.zeros_like(hidden_states)


def _resized(linear: nn.Linear, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A fresh Linear of the new shape with the old one's bias setting (or ``bias``), dtype and device."""
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=bias or linear.bias is not None, device=w.device,
                     dtype=w.dtype)


def renumber_cache_slots(layers: nn.ModuleList) -> None:
    """Give the attention blocks that still exist consecutive KV-cache slots 0..A-1.

    HF caches ask slot 0 for the sequence length, so slot numbers must not skip pruned attention.
    """
    slot = 0
    for layer in layers:
        if not isinstance(layer.self_attn, EmptyAttention):
            layer.self_attn.layer_idx = slot
            slot += 1


def apply_layer_geometry(model: nn.Module, layer_specs: list[dict]) -> None:
    """Resize the projections of ``model.model.layers`` to ``layer_specs`` (see the module docstring)."""
    config = model.config
    layers = model.model.layers
    if len(layer_specs) != len(layers):
        raise ValueError(f"gqaprune_layers has {len(layer_specs)} entries for {len(layers)} decoder layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_per_kv = config.num_attention_heads // config.num_key_value_heads
    hidden = config.hidden_size
    for layer, spec in zip(layers, layer_specs, strict=True):
        kv, inter = int(spec["num_key_value_heads"]), int(spec["intermediate_size"])
        attn = layer.self_attn
        if kv == 0:
            layer.self_attn = EmptyAttention()
        else:
            q_out, kv_out = kv * q_per_kv * head_dim, kv * head_dim
            if kv != config.num_key_value_heads:
                attn.q_proj = _resized(attn.q_proj, hidden, q_out)
                attn.k_proj = _resized(attn.k_proj, hidden, kv_out)
                attn.v_proj = _resized(attn.v_proj, hidden, kv_out)
            if kv != config.num_key_value_heads or spec.get("o_proj_bias"):
                attn.o_proj = _resized(attn.o_proj, q_out, hidden, bias=bool(spec.get("o_proj_bias")))
        mlp = layer.mlp
        if inter == 0:
            layer.mlp = EmptyMLP()
        else:
            if inter != config.intermediate_size:
                mlp.gate_proj = _resized(mlp.gate_proj, hidden, inter)
                mlp.up_proj = _resized(mlp.up_proj, hidden, inter)
            if inter != config.intermediate_size or spec.get("down_proj_bias"):
                mlp.down_proj = _resized(mlp.down_proj, inter, hidden, bias=bool(spec.get("down_proj_bias")))
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

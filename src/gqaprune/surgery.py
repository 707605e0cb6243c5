"""Surgery: slice a model's weights by a plan into a smaller, normal torch module, and save it.

The result has no masks, hooks or patched forwards: projections are replaced by smaller
``nn.Linear`` modules holding the kept rows/columns, an emptied attention or MLP block becomes a
module that returns zeros (the residual passes through), and a layer that lost both blocks is
removed from the layer list. The saved checkpoint is safetensors + a config + the tokenizer; when the
layers end up with different shapes, the config records them (``gqaprune_layers``) and the
checkpoint carries ``modeling_gqaprune.py`` for ``trust_remote_code=True`` loading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .adapters import FamilyAdapter, Geometry, get_adapter
from .artifacts import atomic_dir
from .checkpoint import save_model
from .groups import layer_shapes
from .hf_code import gqaprune_layout as layout
from .hf_code import modeling_gqaprune as hf_code
from .schema import ATTN, MLP, LayerKeep

#: files saved next to a non-uniform checkpoint so it loads with trust_remote_code=True
REMOTE_CODE_FILES = (Path(hf_code.__file__), Path(layout.__file__))

__all__ = ["LayerKeep", "SurgeryReport", "prune_attention", "prune_mlp", "prune_model", "save_pruned"]


@dataclass
class SurgeryReport:
    """What :func:`prune_model` did: kept layers (original indices) and per-layer geometry."""

    kept_layers: list[int]
    removed_layers: list[int]
    layer_specs: list[dict] = field(default_factory=list)
    uniform: bool = False


def prune_attention(layer: nn.Module, keep: Sequence[int], adapter: FamilyAdapter, geometry: Geometry) -> None:
    """Keep only attention groups ``keep`` (KV heads with their query heads) of ``layer``, in place."""
    layout.slice_block(layer, ATTN, list(keep), geometry.q_per_kv, geometry.head_dim)


def prune_mlp(layer: nn.Module, keep: Sequence[int], adapter: FamilyAdapter, geometry: Geometry | None = None
              ) -> None:
    """Keep only SwiGLU channels ``keep`` of ``layer``'s MLP, in place."""
    layout.slice_block(layer, MLP, list(keep), 1, 1)


def _source_layers(config, n: int) -> list[int]:
    """Original layer index of each current layer (an already-pruned model records them)."""
    specs = getattr(config, "gqaprune_layers", None)
    return [int(s["source_layer"]) for s in specs] if specs else list(range(n))


def prune_model(model: nn.Module, keep: Mapping[int, LayerKeep],
                replacements: Mapping[tuple[int, str], nn.Linear] | None = None) -> SurgeryReport:
    """Apply a plan to ``model`` in place and update its config; returns what was kept.

    ``keep`` maps a current layer index to the groups it keeps; layers not in ``keep`` are left as
    they are. A layer keeping no attention group and no MLP channel is removed outright.
    ``replacements`` maps (layer, 'attn' | 'mlp') to a refitted output projection over the kept inputs
    (see :mod:`gqaprune.compensation`), installed after slicing.
    """
    config = model.config
    adapter = get_adapter(config)
    geometry = adapter.geometry(config)
    layers = adapter.layers(model)
    sources = _source_layers(config, len(layers))
    for i, k in keep.items():
        if not 0 <= i < len(layers):
            raise ValueError(f"plan names layer {i}, the model has {len(layers)} layers")
        prune_attention(layers[i], sorted(k.attn), adapter, geometry)
        prune_mlp(layers[i], sorted(k.mlp), adapter)
    for (i, kind), linear in (replacements or {}).items():
        name = layout.OUTPUT[kind].name
        old = layout.projection(layers[i], kind, name)
        if tuple(old.weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"replacement {name} of layer {i} has shape {tuple(linear.weight.shape)}, "
                             f"the pruned layer needs {tuple(old.weight.shape)}")
        setattr(adapter.block(layers[i], kind), name, linear)

    shapes = layer_shapes(model, adapter, geometry)
    kept = [s.layer for s in shapes if s.attn_groups or s.mlp_channels]
    removed = [sources[s.layer] for s in shapes if not (s.attn_groups or s.mlp_channels)]
    if not kept:
        raise ValueError("the plan removes every decoder layer")
    adapter.set_layers(model, [layers[i] for i in kept])
    specs = []
    for s in shapes:
        if s.layer not in set(kept):
            continue
        spec = {"source_layer": sources[s.layer], "num_key_value_heads": s.attn_groups,
                "intermediate_size": s.mlp_channels}
        # output-projection biases the family does not have (added by bias compensation)
        for kind, n, family_bias in ((ATTN, s.attn_groups, geometry.o_bias), (MLP, s.mlp_channels, geometry.mlp_bias)):
            output = layout.OUTPUT[kind].name
            if n and not family_bias and layout.projection(layers[s.layer], kind, output).bias is not None:
                spec[f"{output}_bias"] = True
        specs.append(spec)
    uniform = _set_config_geometry(config, specs, geometry, adapter, kept)
    return SurgeryReport(kept_layers=[sources[i] for i in kept], removed_layers=removed, layer_specs=specs,
                         uniform=uniform)


def _set_config_geometry(config, specs: list[dict], geometry: Geometry, adapter: FamilyAdapter,
                         kept: list[int]) -> bool:
    """Write the pruned geometry into ``config``; True when a plain standard config describes it.

    A standard config is possible when every layer has the same (non-zero) KV heads and MLP width and
    the resulting head count divides hidden_size (transformers 5 validates that). Otherwise the dense
    head counts stay in the standard keys and ``gqaprune_layers`` holds the truth.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != len(kept):
        config.layer_types = [layer_types[i] for i in kept]
        if len(set(layer_types)) > 1 and any(s["num_key_value_heads"] == 0 for s in specs):
            raise NotImplementedError(
                "emptying an attention block of a model that mixes sliding-window and full attention layers "
                "would misalign its KV-cache layer types; freeze those layers or use a lower ratio"
            )
    config.num_hidden_layers = len(specs)
    kvs = {s["num_key_value_heads"] for s in specs}
    widths = {s["intermediate_size"] for s in specs}
    heads = next(iter(kvs)) * geometry.q_per_kv
    extra_bias = any(s.get("o_proj_bias") or s.get("down_proj_bias") for s in specs)
    uniform = len(kvs) == 1 and len(widths) == 1 and heads > 0 and 0 not in widths and not extra_bias and (
        geometry.hidden_size % heads == 0
    )
    if uniform:
        config.num_key_value_heads = next(iter(kvs))
        config.num_attention_heads = heads
        config.intermediate_size = next(iter(widths))
        config.head_dim = geometry.head_dim
        for key in ("gqaprune_layers", "auto_map"):
            if hasattr(config, key):
                delattr(config, key)
    else:
        config.gqaprune_layers = specs
        config.auto_map = {"AutoModelForCausalLM": f"modeling_gqaprune.{adapter.pruned_class}"}
    return uniform


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, info: Mapping | None = None) -> Path:
    """Save a (pruned) model as safetensors + config + tokenizer (+ modeling code when needed).

    ``info`` (JSON-serialisable provenance: source fingerprint, plan params) is stored in the config as
    ``gqaprune_info``. The weights are streamed tensor by tensor from the model's device
    (:func:`gqaprune.checkpoint.save_model`). Written to a temporary folder and renamed into place
    (never through an existing file, which may be a link into the DVC cache).
    """
    if info is not None:
        model.config.gqaprune_info = json.loads(json.dumps(dict(info), sort_keys=True))
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "gqaprune_layers", None):
            for file in REMOTE_CODE_FILES:
                (tmp / file.name).write_bytes(file.read_bytes())
    return Path(out_dir)

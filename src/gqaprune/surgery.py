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
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import FamilyAdapter, Geometry, get_adapter
from .groups import layer_shapes
from .hf_code import modeling_gqaprune as hf_code
from .hf_code.modeling_gqaprune import EmptyAttention, EmptyMLP, renumber_cache_slots

REMOTE_CODE_FILE = Path(hf_code.__file__)


@dataclass
class LayerKeep:
    """Which groups of one layer survive: indices into the layer's *current* groups, ascending."""

    attn: list[int]
    mlp: list[int]


@dataclass
class SurgeryReport:
    """What :func:`prune_model` did: kept layers (original indices) and per-layer geometry."""

    kept_layers: list[int]
    removed_layers: list[int]
    layer_specs: list[dict] = field(default_factory=list)
    uniform: bool = False


def _take(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only ``rows`` (output features) and/or ``cols`` (input features) of ``linear``."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _rows_of(groups: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of whole groups of ``width`` consecutive rows: [g*width, (g+1)*width) for each g."""
    g = torch.as_tensor(list(groups), dtype=torch.long)
    return (g[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def prune_attention(layer: nn.Module, keep: Sequence[int], adapter: FamilyAdapter, geometry: Geometry) -> None:
    """Keep only attention groups ``keep`` (KV heads with their query heads) of ``layer``, in place."""
    if isinstance(adapter.attention(layer), EmptyAttention):
        if keep:
            raise ValueError("cannot keep groups of an attention block that is already empty")
        return
    q, k, v, o = adapter.attn_projections(layer)
    current = k.out_features // geometry.head_dim
    if list(keep) == list(range(current)):
        return
    if not keep:
        layer.self_attn = EmptyAttention()
        return
    d, r = geometry.head_dim, geometry.q_per_kv
    q_rows, kv_rows = _rows_of(keep, r * d), _rows_of(keep, d)
    attn = adapter.attention(layer)
    attn.q_proj, attn.k_proj, attn.v_proj = _take(q, rows=q_rows), _take(k, rows=kv_rows), _take(v, rows=kv_rows)
    attn.o_proj = _take(o, cols=q_rows)


def prune_mlp(layer: nn.Module, keep: Sequence[int], adapter: FamilyAdapter) -> None:
    """Keep only SwiGLU channels ``keep`` of ``layer``'s MLP, in place."""
    if isinstance(adapter.mlp(layer), EmptyMLP):
        if keep:
            raise ValueError("cannot keep channels of an MLP block that is already empty")
        return
    gate, up, down = adapter.mlp_projections(layer)
    if list(keep) == list(range(gate.out_features)):
        return
    if not keep:
        layer.mlp = EmptyMLP()
        return
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    mlp = adapter.mlp(layer)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _take(gate, rows=idx), _take(up, rows=idx), _take(down, cols=idx)


def _source_layers(config, n: int) -> list[int]:
    """Original layer index of each current layer (an already-pruned model records them)."""
    specs = getattr(config, "gqaprune_layers", None)
    return [int(s["source_layer"]) for s in specs] if specs else list(range(n))


def prune_model(model: nn.Module, keep: Mapping[int, LayerKeep],
                replacements: Mapping[tuple[int, str], nn.Linear] | None = None) -> SurgeryReport:
    """Apply a plan to ``model`` in place and update its config; returns what was kept.

    ``keep`` maps a current layer index to the groups it keeps; layers not in ``keep`` are left as
    they are. A layer keeping no attention group and no MLP channel is removed outright.
    ``replacements`` maps (layer, 'o' | 'down') to a refitted output projection over the kept inputs
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
    for (i, which), linear in (replacements or {}).items():
        block = adapter.attention(layers[i]) if which == "o" else adapter.mlp(layers[i])
        old = block.o_proj if which == "o" else block.down_proj
        if tuple(old.weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"replacement {which}_proj of layer {i} has shape {tuple(linear.weight.shape)}, "
                             f"the pruned layer needs {tuple(old.weight.shape)}")
        setattr(block, "o_proj" if which == "o" else "down_proj", linear)

    shapes = layer_shapes(model, adapter, geometry)
    kept = [s.layer for s in shapes if s.attn_groups or s.mlp_channels]
    removed = [sources[s.layer] for s in shapes if not (s.attn_groups or s.mlp_channels)]
    if not kept:
        raise ValueError("the plan removes every decoder layer")
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    renumber_cache_slots(model.model.layers)
    specs = []
    for s in shapes:
        if s.layer not in set(kept):
            continue
        spec = {"source_layer": sources[s.layer], "num_key_value_heads": s.attn_groups,
                "intermediate_size": s.mlp_channels}
        # output-projection biases the family does not have (added by bias compensation)
        if s.attn_groups and not geometry.o_bias and adapter.attn_projections(layers[s.layer])[3].bias is not None:
            spec["o_proj_bias"] = True
        if s.mlp_channels and not geometry.mlp_bias and adapter.mlp_projections(layers[s.layer])[2].bias is not None:
            spec["down_proj_bias"] = True
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
    ``gqaprune_info``. Written to a temporary folder and renamed into place.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if info is not None:
        model.config.gqaprune_info = json.loads(json.dumps(dict(info)))
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if getattr(model.config, "gqaprune_layers", None):
        shutil.copyfile(REMOTE_CODE_FILE, tmp / REMOTE_CODE_FILE.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir

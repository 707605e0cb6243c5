"""Surgery: slice a model's weights by a plan into a smaller, normal torch module, and save it.

The result has no masks, hooks or patched forwards: projections are replaced by smaller
``nn.Linear`` modules holding the kept rows/columns, an emptied attention or MLP block becomes a
module that returns zeros (the residual passes through), and a layer that lost both blocks is
removed from the layer list. The saved checkpoint is safetensors + a config + the tokenizer; when the
layers end up with different shapes, the config records them (``gqaprune_layers``) and the
checkpoint carries ``modeling_gqaprune.py`` for ``trust_remote_code=True`` loading.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gqaprune.models.adapters import FamilyAdapter, Geometry, get_adapter
from gqaprune.models.checkpoint import model_tensors, save_model
from gqaprune.models.groups import layer_shapes
from gqaprune.models.hf_code import gqaprune_layout as layout
from gqaprune.models.hf_code import modeling_gqaprune as hf_code
from gqaprune.models.loading import meta_model
from gqaprune.models.units import ATTN, MLP, LayerKeep
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.files import atomic_dir
from gqaprune.runtime.placement import full_tensor, gathered, plain_linear

#: files saved next to a non-uniform checkpoint so it loads with trust_remote_code=True
REMOTE_CODE_FILES = (Path(hf_code.__file__), Path(layout.__file__))

__all__ = ["LayerKeep", "PrunedLayout", "SurgeryReport", "prune_attention", "prune_mlp", "prune_model",
           "pruned_layout", "pruned_tensors", "save_pruned"]


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
    (see :mod:`gqaprune.pruning.compensation`), installed after slicing.
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


@dataclass
class PrunedLayout:
    """What a pruned checkpoint will hold, computed on the meta device (no memory, any model size).

    ``model`` is the pruned model on the meta device (its config is the checkpoint's config), ``report``
    what :func:`prune_model` did, ``sources[j]`` the current index of the layer that becomes layer j.
    """

    model: nn.Module
    report: SurgeryReport
    sources: list[int]


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers still in it), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _refit_specs(replacements) -> dict[tuple[int, str], tuple[int, int, bool, torch.dtype]]:
    """(out, in, has bias, dtype) of every refit: from :class:`~gqaprune.pruning.compensation.Refits` or a dict
    of Linears."""
    specs = getattr(replacements, "specs", None)
    if specs is not None:
        return dict(specs)
    return {k: (lin.out_features, lin.in_features, lin.bias is not None, lin.weight.dtype)
            for k, lin in (replacements or {}).items()}


def pruned_layout(model: nn.Module, keep: Mapping[int, LayerKeep] | None = None, replacements=None) -> PrunedLayout:
    """:func:`prune_model` of ``model`` (any placement, or a peft model: its base) run on a meta-device copy.

    The pruned config, the report and every tensor's name, shape and dtype, exactly as one process
    pruning in place would have them, without touching ``model`` or holding any weight.
    """
    base = _base(model)
    adapter = get_adapter(base.config)
    meta = meta_model(copy.deepcopy(base.config), dtype=next(base.parameters()).dtype)
    layers, dense = adapter.layers(meta), adapter.layers(base)
    if len(layers) != len(dense):
        raise ValueError(f"the config describes {len(layers)} decoder layers, the model has {len(dense)}")
    for i, layer in enumerate(layers):
        layer.gqaprune_source = i
    if keep or replacements:
        refits = {key: nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)
                  for key, (n_out, n_in, bias, dtype) in _refit_specs(replacements).items()}
        report = prune_model(meta, keep or {}, refits)
    else:
        report = SurgeryReport(kept_layers=_source_layers(meta.config, len(layers)), removed_layers=[],
                               uniform=not getattr(meta.config, "gqaprune_layers", None))
    return PrunedLayout(meta, report, [layer.gqaprune_source for layer in adapter.layers(meta)])


def _proxy(module: nn.Module, full: Mapping[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A plain module tree shaped like ``module`` holding the gathered tensors ``full`` (by local name).

    Linear layers become ``nn.Linear``, a peft LoRA layer the ``nn.Linear`` of its merged weight, an
    emptied block stays empty, anything else a container of its direct parameters: what
    :func:`gqaprune.models.hf_code.gqaprune_layout.slice_block` needs, with the original's state_dict names.
    """
    if isinstance(module, layout.EmptyAttention | layout.EmptyMLP):
        return type(module)()
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
        return _merged_lora(module, full, prefix)
    if isinstance(module, nn.Linear):
        return plain_linear(full[prefix + "weight"], full.get(prefix + "bias"))
    out = nn.Module()
    for name, _ in module.named_parameters(recurse=False):
        out.register_parameter(name, nn.Parameter(full[prefix + name], requires_grad=False))
    for name, child in module.named_children():
        out.add_module(name, _proxy(child, full, prefix + name + "."))
    return out


def _merged_lora(module: nn.Module, full: Mapping[str, torch.Tensor], prefix: str) -> nn.Linear:
    """The ``nn.Linear`` of a peft LoRA layer with its adapters merged, as ``merge_and_unload(safe_merge=True)``:
    the (gathered) base weight plus peft's own ``get_delta_weight`` of every active adapter."""
    base = module.base_layer
    if not isinstance(base, nn.Linear):
        raise NotImplementedError(f"{prefix}: LoRA on a {type(base).__name__} is not merged here")
    weight = full[prefix + "base_layer.weight"].clone()
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or module.lora_bias.get(name):
            raise NotImplementedError(f"{prefix}: LoRA variants (DoRA...) and LoRA biases are not merged here")
        weight += module.get_delta_weight(name).to(weight.dtype)
    if not torch.isfinite(weight).all():
        raise ValueError(f"NaNs detected in the merged weights of {prefix.rstrip('.')}: the adapter seems broken")
    return plain_linear(weight, full.get(prefix + "base_layer.bias"))


def _refit_of(replacements, key: tuple[int, str], ctx: DistContext) -> nn.Linear | None:
    """The refit ``key`` where it is needed (collective for :class:`~gqaprune.pruning.compensation.Refits` on
    N ranks)."""
    if replacements is None:
        return None
    if hasattr(replacements, "everywhere"):
        return replacements.everywhere(key, ctx) if key in replacements.owners else None
    return replacements.get(key)


def _pruned_layer(layer: nn.Module, source: int, keep: LayerKeep | None, replacements, geometry: Geometry,
                  ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The tensors of one pruned layer, by local name, on the main rank (None elsewhere).

    Every rank takes part in gathering the dense layer and in fetching its refits; the main rank
    slices a plain copy with :func:`prune_attention` / :func:`prune_mlp` and installs the refits.
    """
    full = gathered(layer)
    refits = {kind: _refit_of(replacements, (source, kind), ctx) for kind in (ATTN, MLP)}
    if not ctx.is_main:
        return None
    proxy = _proxy(layer, full)
    if keep is not None:
        prune_attention(proxy, sorted(keep.attn), None, geometry)
        prune_mlp(proxy, sorted(keep.mlp), None)
    for kind, linear in refits.items():
        if linear is not None:
            name = layout.OUTPUT[kind].name
            old = layout.projection(proxy, kind, name)
            if tuple(old.weight.shape) != tuple(linear.weight.shape):
                raise ValueError(f"replacement {name} of layer {source} has shape {tuple(linear.weight.shape)}, "
                                 f"the pruned layer needs {tuple(old.weight.shape)}")
            layout.block(proxy, kind).register_module(name, linear)
    return proxy.state_dict()


def pruned_tensors(model: nn.Module, layout_: PrunedLayout, keep: Mapping[int, LayerKeep] | None = None,
                   replacements=None, ctx: DistContext | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) of the pruned checkpoint in order, built one decoder layer at a time from ``model``.

    Collective on N ranks (every rank iterates it); the tensors are real on the main rank only (None
    elsewhere). A sharded model is gathered one parameter of the root or one decoder layer at a time,
    so no rank ever holds the whole model; ``model`` itself is left untouched.
    """
    ctx = ctx or single_process()
    base = _base(model)
    adapter = get_adapter(base.config)
    geometry = adapter.geometry(base.config)
    dense_layers = adapter.layers(base)
    dense = {**dict(base.named_buffers()), **dict(base.named_parameters())}
    names = {id(m): n for n, m in layout_.model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in adapter.layers(layout_.model)]
    current: tuple[int, dict | None] = (-1, None)
    for name, planned in model_tensors(layout_.model):
        j = next((j for j, p in enumerate(prefixes) if name.startswith(p)), None)
        if j is None:
            if name not in dense:
                raise RuntimeError(f"{name} of the pruned checkpoint is not a tensor of the model (LoRA on the "
                                   "embeddings or the head is not merged here)")
            tensor = full_tensor(dense[name].detach())  # collective when sharded
        else:
            if current[0] != j:
                current = (-1, None)  # free the previous layer before gathering the next
                source = layout_.sources[j]
                current = (j, _pruned_layer(dense_layers[source], source, (keep or {}).get(source), replacements,
                                            geometry, ctx))
            tensor = None if current[1] is None else current[1].get(name[len(prefixes[j]):])
        if ctx.is_main and (tensor is None or tuple(tensor.shape) != tuple(planned.shape)
                            or tensor.dtype != planned.dtype):
            got = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise RuntimeError(f"pruned tensor {name} is {got}, the pruned config needs "
                               f"{tuple(planned.shape)} {planned.dtype}")
        yield name, tensor if ctx.is_main else None


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, info: Mapping | None = None,
                keep: Mapping[int, LayerKeep] | None = None, replacements=None, ctx: DistContext | None = None,
                max_shard_bytes: int = 5 << 30, layout_: PrunedLayout | None = None) -> Path:
    """Save ``model`` pruned by ``keep`` (default: as it is) as safetensors + config + tokenizer (+ modeling code).

    ``replacements`` are the refitted output projections (:func:`gqaprune.pruning.compensation.compensate`).
    ``model`` may be replicated, FSDP2-sharded or a peft model (its LoRA layers are merged, as
    ``merge_and_unload(safe_merge=True)`` would); it is left untouched: the pruned tensors are built
    one decoder layer at a time (:func:`pruned_tensors`) and streamed to disk
    (:func:`gqaprune.models.checkpoint.save_model`), so one decoder layer is the most that is ever gathered.
    ``info`` (JSON-serialisable provenance: source fingerprint, plan params) is stored in the config as
    ``gqaprune_info``. ``ctx``: every rank calls it; the main rank writes. Written to a temporary
    folder and renamed into place (never through an existing file, which may be a link into the DVC
    cache). Returns ``out_dir``.
    """
    ctx = ctx or single_process()
    layout_ = layout_ or pruned_layout(model, keep, replacements)
    config = layout_.model.config
    if info is not None:
        config.gqaprune_info = json.loads(json.dumps(dict(info), sort_keys=True))
    tensors = pruned_tensors(model, layout_, keep, replacements, ctx)
    if ctx.is_main:
        with atomic_dir(out_dir) as tmp:
            save_model(_base(model), tmp, max_shard_bytes, tensors=tensors, config=config)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if getattr(config, "gqaprune_layers", None):
                for file in REMOTE_CODE_FILES:
                    (tmp / file.name).write_bytes(file.read_bytes())
    else:
        for _ in tensors:  # take part in every gather
            pass
    ctx.barrier()  # on return the checkpoint is in place for every rank
    return Path(out_dir)

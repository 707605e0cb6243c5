"""The one model loader: a checkpoint (dense, pruned, a reference to a folder, or a hub id) in memory.

:func:`load_model` is the only way the toolkit loads a model. It looks the family adapter up once and
takes one of three paths:

* a local safetensors checkpoint, one process or replicated on N ranks: the architecture is built
  on the meta device (no memory, no initialisation) and the tensors are read memory-mapped straight
  onto the device, cast one at a time (:func:`_assemble`);
* ``placement: shard`` on N ranks (FSDP2): built on the meta device, sharded per decoder layer, each
  rank allocates and reads only its rows of every tensor (:func:`_load_sharded`), so a 70B model is
  never whole in one process;
* anything else (a hub id, ``.bin`` weights, remote code): ``from_pretrained``.

Pruned checkpoints written by this package (``gqaprune_layers`` in their config) are built with the
package's own copy of their modeling code, so they need no ``trust_remote_code``. Tied embeddings are
re-tied and the rotary buffers (not stored in checkpoints) rebuilt through the family adapter.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from gqaprune.errors import InputError, UnsupportedModelError
from gqaprune.models.adapters import FamilyAdapter, get_adapter
from gqaprune.models.sources import (
    check_model_folder,
    classify_source,
    resolve_weights,
    safetensors_files,
    weight_files,
)
from gqaprune.runtime.devices import resolve_device, torch_dtype
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import choose_placement, is_dtensor, local_rows, shard_model

log = logging.getLogger(__name__)


def _check_config_file(file: Path) -> None:
    """Refuse, naming ``file`` and the fix, what transformers would refuse with a raw error or a question:
    a family this toolkit cannot prune (never advising to run remote code) and heads that do not divide
    the hidden size."""
    import json

    from gqaprune.models.adapters import ADAPTERS

    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{file} is not valid JSON ({' '.join(str(e).split())}); restore the model's config.json"
                         ) from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(f"model_type {model_type!r} ({file}) is not supported; supported families: "
                                    f"{', '.join(sorted(ADAPTERS))} (gqaprune prunes these decoders only)")
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and (heads <= 0 or hidden % heads):
        raise UnsupportedModelError(f"{file}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
                                    "the model cannot be built: fix config.json")


def load_config(source: str | Path, trust_remote_code: bool = False):
    """The model config of a folder or hub id (no weights); a bad local config.json is named in one line."""
    from transformers import AutoConfig

    file = Path(source) / "config.json"
    local = file.is_file()
    if local:
        _check_config_file(file)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # also huggingface_hub's StrictDataclassError (a validator of the config class)
        if not local or not (isinstance(e, ValueError | TypeError | KeyError) or "Validation" in type(e).__name__):
            raise
        raise InputError(f"{file} is not a usable config: {' '.join(str(e).split())[:300]}; fix config.json") from None


def load_tokenizer(source: str | Path):
    """The tokenizer saved with a checkpoint folder (or of a hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def meta_model(config, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's architecture on the meta device: shapes and names, no memory (a 70B costs nothing).

    ``dtype``: the parameters' dtype (default: the float32 that ``from_config`` uses).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        if getattr(config, "gqaprune_layers", None):
            return get_adapter(config).pruned_model_class()._from_config(config, **kwargs)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def load_model(source: str | os.PathLike, dtype: str = "float32", device: str | torch.device = "auto",
               ctx: DistContext | None = None, placement: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model of ``source`` in eval mode: a local checkpoint folder (or a reference to one) or a hub id.

    One process: on ``device`` ('auto': CUDA when present). Several (``ctx``): on each rank's device,
    replicated or FSDP2-sharded as :func:`gqaprune.runtime.placement.choose_placement` decides for
    ``placement``; ``model.gqaprune_placement`` records the choice. Cheap checks (the folder, its
    config and weight files) come before any weight is read.
    """
    ctx = ctx or single_process()
    kind, resolved = classify_source(str(source), key="model")
    local = kind == "local"
    spec = str(source) if local else resolved  # a folder as given: its configs record the path they came from
    weights = resolve_weights(spec) if local else None  # a reference: its source, checked unchanged
    if local and weights == Path(spec):
        check_model_folder(spec, key="model")
    config = load_config(spec, trust_remote_code)
    adapter = get_adapter(config)
    target = ctx.device if ctx.is_distributed else resolve_device(device)
    chosen = "replicate"
    if ctx.is_distributed:
        meta = meta_model(config, trust_remote_code, dtype=torch_dtype(dtype))
        weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
        chosen = choose_placement(placement, weight_bytes, ctx)
        log.info("%s: %s, %s (%.2f GiB of weights)", ctx, Path(spec).name, chosen, weight_bytes / 2**30)
    if chosen == "shard":
        model = _load_sharded(meta, adapter, weights, ctx)
    elif local and not trust_remote_code and safetensors_files(weights):
        model = _assemble(config, adapter, weights, dtype, torch.device(target), generation_dir=Path(spec))
    else:
        model = _from_pretrained(config, adapter, weights or spec, dtype, torch.device(target), trust_remote_code)
    model.gqaprune_placement = chosen
    return model.eval()


def _from_pretrained(config, adapter: FamilyAdapter, source, dtype: str, device: torch.device,
                     trust_remote_code: bool) -> nn.Module:
    """``from_pretrained`` onto ``device`` (hub ids, ``.bin`` weights, remote code)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype)}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}
    if getattr(config, "gqaprune_layers", None):
        model = adapter.pruned_model_class().from_pretrained(source, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    return model.to(device)


def _assemble(config, adapter: FamilyAdapter, folder: Path, dtype: str, device: torch.device,
              generation_dir: Path | None = None) -> nn.Module:
    """Build the architecture on the meta device and assign the checkpoint's tensors, read onto ``device``.

    Tensors are cast to ``dtype`` one at a time; refuses a checkpoint that lacks a parameter.
    """
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    want = torch_dtype(dtype)
    model = meta_model(config)
    expected = set(dict(model.named_parameters()))  # tied weights under their first name only
    state: dict[str, torch.Tensor] = {}
    if device.type == "cuda" and not torch.cuda.is_initialized():
        t0 = time.perf_counter()
        torch.empty(0, device=device)  # the process's CUDA context, timed apart from the read
        log.info("CUDA context created in %.2f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for file in safetensors_files(folder):
        for name, tensor in load_file(str(file), device=str(device)).items():
            if name in expected:
                state[name] = tensor.to(want) if tensor.is_floating_point() else tensor
    t_read = time.perf_counter() - t0
    missing = sorted(expected - set(state))
    if missing:
        raise InputError(f"the weight files of {folder} lack {len(missing)} parameters of the model "
                         f"(e.g. {missing[0]}); the checkpoint is incomplete")
    model.load_state_dict(state, strict=False, assign=True)
    _finish(model, adapter, device, folder)
    config.dtype = want
    source = generation_dir or folder
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    # where a load's seconds go (the read includes a first CUDA use's context creation)
    log.info("loaded %s: tensors read onto %s in %.2f s, model assembled in %.2f s", folder.name, device, t_read,
             time.perf_counter() - t0 - t_read)
    return model


def _finish(model: nn.Module, adapter: FamilyAdapter, device, folder: Path) -> None:
    """Re-tie the embeddings, rebuild the rotary buffers, and refuse anything left on the meta device."""
    adapter.tie_weights(model)
    adapter.reset_rotary(model, device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"{folder}: tensors {left[:3]} were not loaded (not in the checkpoint)")


def _load_sharded(model: nn.Module, adapter: FamilyAdapter, folder: Path, ctx: DistContext) -> nn.Module:
    """Shard the meta-device ``model`` (FSDP2), allocate this rank's rows and read them from ``folder``."""
    rotary = {id(b) for b in adapter.rotary(model).buffers()}
    others = [name for name, b in model.named_buffers() if id(b) not in rotary]
    if others:  # only the rotary buffers are rebuilt: anything else would stay uninitialised
        raise NotImplementedError(f"sharded loading cannot initialise the buffers {others[:3]}")
    shard_model(model, adapter.layers(model), ctx)
    model.to_empty(device=ctx.device)
    _finish(model, adapter, ctx.device, folder)
    _read_rows(model, folder, ctx)
    return model


def _read_rows(model: nn.Module, folder: Path, ctx: DistContext) -> None:
    """Fill the allocated parameters from the safetensors of ``folder``: a sharded one with this rank's rows."""
    from safetensors import safe_open

    files = weight_files(folder)
    params = dict(model.named_parameters())  # tied weights once
    missing = sorted(set(params) - set(files))
    if missing:
        raise InputError(f"the weights of {folder} lack {len(missing)} parameters of the model (e.g. {missing[0]})")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for file, names in sorted(by_file.items()):
            with safe_open(str(file), "pt", device="cpu") as f:
                for name in names:
                    p, sl = params[name], f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if tuple(p.shape) != shape:
                        raise InputError(f"{name} is {shape} in {file}, the model needs {tuple(p.shape)}")
                    if not is_dtensor(p):
                        p.copy_(sl[:])
                        continue
                    if len(p.placements) != 1 or not p.placements[0].is_shard(0):
                        raise NotImplementedError(f"{name}: only Shard(0) placements load, got {p.placements}")
                    local = p.to_local()
                    start, stop = local_rows(shape[0], ctx.world_size, ctx.rank)
                    if local.shape[0] != stop - start:
                        raise RuntimeError(f"{name}: this rank holds {local.shape[0]} rows, expected rows "
                                           f"{start}:{stop} of {shape[0]}")
                    if stop > start:
                        local.copy_(sl[start:stop])

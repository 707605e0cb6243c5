"""Where a model lives on N ranks: replicated, or FSDP2-sharded and loaded row by row from safetensors.

Two placements (``distributed.placement``):

* ``replicate`` -- every rank holds the whole model on its device (``from_pretrained`` straight onto
  it); no communication inside a forward. The only placement of one process.
* ``shard`` -- FSDP2 (``fully_shard``) per decoder layer plus the root (embeddings, final norm,
  lm_head): every weight is a DTensor split by rows (``Shard(0)``) over the ranks, each layer is
  all-gathered just before it runs and freed after it (LLaMA-3-70B, 141 GB in bf16, on 4 x 139 GiB).
* ``auto`` -- ``replicate`` when the weights take at most half of one rank's memory (its GPU, or the
  available RAM divided by the ranks of the host), else ``shard``.

A sharded model is never whole in one process (:func:`load_model`): it is built from its config on
the meta device (no memory), ``fully_shard`` is applied, ``to_empty`` allocates each rank's rows, the
rotary buffers are computed again (:meth:`~gqaprune.adapters.FamilyAdapter.rotary`; checkpoints do not
hold them), and each rank reads only its rows of every tensor with ``safe_open(f).get_slice(name)``
(the ``torch.chunk`` row split of FSDP2). The weights are read through
:func:`gqaprune.modelio.resolve_weights`, so a prepared model that references a local folder works.

The library functions read any placement through :func:`full_tensor` (a collective all-gather for a
sharded parameter, the tensor itself otherwise) and run sharded ranks in lock-step
(:meth:`gqaprune.distributed.DistContext.split_units`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .distributed import DistContext, single_process
from .errors import InputError
from .modelio import load_causal_lm, load_config, meta_model, resolve_device, resolve_weights, torch_dtype, weight_files

log = logging.getLogger("gqaprune")

PLACEMENTS = ("auto", "replicate", "shard")

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = ()  # type: ignore[assignment,misc]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds DTensor parameters (FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: all-gathered when it is a DTensor (collective), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` whole, by local name (collective when sharded: every rank calls it).

    Scope it to one decoder layer: the gathered tensors are a full copy of that layer.
    """
    return {name: full_tensor(p.detach()) for name, p in module.named_parameters()}


def no_grad_mode(ctx: DistContext):
    """The no-gradient context of forward passes: ``inference_mode`` in one process, ``no_grad`` on several
    (FSDP2 reuses its unsharded parameters, which must stay usable by autograd after the block, and the
    sums a pass accumulates are reduced in place afterwards: neither may be an inference tensor)."""
    return torch.no_grad() if ctx.is_distributed else torch.inference_mode()


def whole_linear(linear: nn.Linear) -> nn.Linear:
    """``linear`` itself, or a plain ``nn.Linear`` holding its gathered weight (and bias) when sharded (collective)."""
    if not isinstance(linear.weight, DTensor):
        return linear
    bias = linear.bias
    return plain_linear(full_tensor(linear.weight.detach()), None if bias is None else full_tensor(bias.detach()))


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] (and ``bias``) as they are: no copy, no initialisation."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def local_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``Shard(0)`` tensor that ``rank`` holds (``torch.chunk``, as FSDP2 splits)."""
    chunk = -(-rows // world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def device_memory_bytes(ctx: DistContext) -> int:
    """Memory one rank may use: its GPU's total memory, or (CPU) the available RAM / ranks on this host."""
    if ctx.device is not None and torch.device(ctx.device).type == "cuda":
        return int(torch.cuda.get_device_properties(ctx.device).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // max(ctx.local_world_size, 1)
    except OSError:
        pass
    return 1 << 62


def choose_placement(requested: str, weight_bytes: int, ctx: DistContext, fraction: float = 0.5) -> str:
    """``replicate`` or ``shard`` for weights of ``weight_bytes``; one process always replicates.

    ``auto``: replicate when the weights take at most ``fraction`` of one rank's memory
    (:func:`device_memory_bytes`; the rest is for activations, one projection's gradient, Gram
    matrices), else shard.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {requested!r}")
    if not ctx.is_distributed:
        return "replicate"
    if requested != "auto":
        return requested
    return "replicate" if weight_bytes <= fraction * device_memory_bytes(ctx) else "shard"


def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, norm, lm_head), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,))
    for layer in get_adapter(model.config).layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def _retie(model: nn.Module) -> None:
    """Tie the output embeddings to the input ones again when the config says so."""
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.weight = inp.weight


def reset_rotary(model: nn.Module, device) -> None:
    """Compute the rotary-embedding buffers again on ``device`` (after ``to_empty``: checkpoints do not hold
    them); refuses a model with any other buffer, which this loader would leave uninitialised."""
    rotary = get_adapter(model.config).rotary(model)
    with torch.device(device):
        fresh = type(rotary)(model.config)
    for name, buf in fresh.named_buffers():
        setattr(rotary, name, buf.to(device))
    own = {id(b) for b in rotary.buffers()}
    others = [name for name, b in model.named_buffers() if id(b) not in own]
    if others:
        raise NotImplementedError(f"sharded loading cannot initialise the buffers {others[:3]}")


def _load_rows(model: nn.Module, folder: Path, ctx: DistContext) -> None:
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
                    if not isinstance(p, DTensor):
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


def _load_sharded(model: nn.Module, source: Path, ctx: DistContext) -> nn.Module:
    """Shard the meta-device ``model``, allocate this rank's rows and read them from ``source``."""
    shard_model(model, ctx)
    model.to_empty(device=ctx.device)
    _retie(model)
    reset_rotary(model, ctx.device)
    _load_rows(model, resolve_weights(source), ctx)
    return model


def load_model(source: str | os.PathLike, dtype: str = "float32", device: str = "auto", ctx: DistContext | None = None,
               placement: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model of the local checkpoint ``source`` (dense or pruned, or a reference), in eval mode.

    One process: :func:`gqaprune.modelio.load_causal_lm` on ``device``. Several: on each rank's
    device (``ctx.device``), replicated (``load_causal_lm`` on every rank) or FSDP2-sharded (built on
    the meta device, each rank reading only its rows), as :func:`choose_placement` decides.
    ``model.gqaprune_placement`` records the choice.
    """
    ctx = ctx or single_process()
    if not ctx.is_distributed:
        model = load_causal_lm(source, dtype, trust_remote_code, device=resolve_device(device))
        model.gqaprune_placement = "replicate"
        return model.eval()
    config = load_config(source, trust_remote_code)
    meta = meta_model(config, trust_remote_code, dtype=torch_dtype(dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    chosen = choose_placement(placement, weight_bytes, ctx)
    if chosen == "replicate":
        del meta
        model = load_causal_lm(source, dtype, trust_remote_code, device=ctx.device)
    else:
        model = _load_sharded(meta, Path(source), ctx)
    model.gqaprune_placement = chosen
    log.info("%s: %s loaded, %s (%.2f GiB of weights)", ctx, Path(source).name, chosen, weight_bytes / 2**30)
    return model.eval()

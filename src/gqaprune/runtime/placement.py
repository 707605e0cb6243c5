"""Where a model's weights live on N ranks, and the primitives that read them whatever the placement.

Two placements (``distributed.placement``):

* ``replicate`` -- every rank holds the whole model on its device; no communication inside a forward.
  The only placement of one process.
* ``shard`` -- FSDP2 (``fully_shard``) per decoder layer plus the root (embeddings, final norm,
  lm_head): every weight is a DTensor split by rows (``Shard(0)``) over the ranks, each layer is
  all-gathered just before it runs and freed after it (LLaMA-3-70B, 141 GB in bf16, on 4 x 139 GiB).
* ``auto`` -- ``replicate`` when the weights take at most half of one rank's memory, else ``shard``.

The library reads any placement through :func:`full_tensor` (a collective all-gather for a sharded
parameter, the tensor itself otherwise) and runs sharded ranks in lock-step
(:meth:`gqaprune.runtime.distributed.DistContext.split_units`). Loading a model into a placement is
:func:`gqaprune.models.loading.load_model`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from gqaprune.config.choices import PLACEMENTS
from gqaprune.runtime.devices import device_memory_bytes
from gqaprune.runtime.distributed import DistContext


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard). ``torch.distributed.tensor`` costs seconds to import and
    only a sharded model needs it: until something imported it, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds DTensor parameters (FSDP2)."""
    return any(is_dtensor(p) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: all-gathered when it is a DTensor (collective), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


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
    if not is_dtensor(linear.weight):
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


def choose_placement(requested: str, weight_bytes: int, ctx: DistContext, fraction: float = 0.5) -> str:
    """``replicate`` or ``shard`` for weights of ``weight_bytes``; one process always replicates.

    ``auto``: replicate when the weights take at most ``fraction`` of one rank's memory
    (:func:`gqaprune.runtime.devices.device_memory_bytes`; the rest is for activations, one projection's
    gradient, Gram matrices), else shard.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {requested!r}")
    if not ctx.is_distributed:
        return "replicate"
    if requested != "auto":
        return requested
    memory = device_memory_bytes(ctx.device, ctx.local_world_size)
    return "replicate" if weight_bytes <= fraction * memory else "shard"


def shard_model(model: nn.Module, layers: nn.ModuleList, ctx: DistContext) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer of ``layers``, then the root (embeddings, norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model

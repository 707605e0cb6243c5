"""Output compensation: refit o_proj / down_proj on the kept inputs so the block's output moves least.

After pruning, a block writes ``y = x_K W_K^T`` instead of ``y = x W^T`` (x: the projection's input
over calibration tokens, K: kept columns). Two corrections, both from one forward pass of the
dense model over the calibration samples:

* ``bias`` (FLAP): add the removed columns' mean contribution as a bias,
  ``b = mean(x_R) W_R^T``; the module gains a bias of ``hidden`` parameters.
* ``lstsq``: re-solve the kept weights by ridge-regularised least squares so ``x_K W'^T`` best
  reproduces the dense output ``x W^T``::

      W'^T = (G_KK + lam I)^-1 (G_K: W^T + lam W_K^T),   G = x^T x  (Gram over calibration tokens)

  with ``lam = (ridge + |K| / tokens) * mean(diag(G_KK))``, pulling towards the original weights where
  the data says little; the ``|K| / tokens`` term grows the ridge when there are few calibration
  tokens per fitted dimension (512 tokens for 1,536 channels over-fits badly without it). No
  parameter is added, so a uniform plan still saves a standard config.

Only the input Gram matrices ``[in, in]`` (float64, plus the input sums for ``bias``) of the layers
being pruned are held, on the model's device (a GPU builds them with its float64 matrix units and
solves there too: no host copies); :func:`compensate` gathers them in chunks of layers under a memory
budget (LLaMA-3-8B: 1.6 GiB per down_proj Gram, all 32 layers in one pass on an H200), one forward
pass over the calibration samples per chunk. The solve is a Cholesky factorisation of the
regularised Gram (symmetric positive definite), with a general solve as the fallback.

On N ranks (``ctx``) the calibration batches are split over the ranks and each refit has an owner
rank (round robin): the ranks' partial statistics are added up into the owner, which gathers the
dense weight (a sharded one is all-gathered by every rank) and solves; the refits stay with their
owners (:class:`Refits`) until the checkpoint writer fetches them, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.errors import NonFiniteError
from gqaprune.models.adapters import get_adapter
from gqaprune.models.hf_code import gqaprune_layout as layout
from gqaprune.models.hf_code.gqaprune_layout import OUTPUT, group_indices, unit_width
from gqaprune.models.units import ATTN, KINDS, MLP, LayerKeep
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import is_sharded, no_grad_mode, whole_linear

METHODS = ("none", "bias", "lstsq")

__all__ = ["METHODS", "InputStats", "Refits", "collect_stats", "compensate", "compensated_outputs", "refit"]


class InputStats:
    """Accumulate sum_t x_t x_t^T ([in, in]) and sum_t x_t ([in]) in float64 at a module's input.

    Each batch's products are formed in float64 on a GPU (its float64 units are fast) and in float32
    on a CPU (twice float64's speed there; a batch sums at most a few thousand tokens, far within
    float32's precision next to the ridge), then added to the float64 sums.
    """

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` ([..., in], any float dtype, on any device)."""
        dtype = torch.float64 if x.device.type == "cuda" else torch.float32
        x = x.detach().reshape(-1, x.shape[-1]).to(dtype)  # [tokens, in]
        gram, total = (x.T @ x).double(), x.sum(0).double()
        if self.gram is None:
            self.gram, self.total = gram, total
        else:
            self.gram += gram
            self.total += total
        self.tokens += x.shape[0]

    def reduce(self, ctx: DistContext, size: int, device, dst: int | None = None) -> None:
        """Add up the ranks' statistics (``size`` inputs, zeros where a rank saw no token) into rank ``dst``
        (None: into every rank). No-op on one process."""
        if not ctx.is_distributed:
            return
        if self.gram is None:
            self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
            self.total = torch.zeros(size, dtype=torch.float64, device=device)
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        for t in (self.gram, self.total, tokens):
            if dst is None:
                ctx.all_reduce_(t)
            else:
                ctx.reduce_to_(t, dst)
        self.tokens = int(tokens.item())


class Refits(dict):
    """Refitted output projections by (layer, kind): the ones this rank holds (all of them in one process).

    ``owners`` maps every refit to the rank that solved and holds it, ``specs`` to its (out features,
    in features, has bias, dtype); both are the same on every rank.
    """

    def __init__(self):
        super().__init__()
        self.owners: dict[tuple[int, str], int] = {}
        self.specs: dict[tuple[int, str], tuple[int, int, bool, torch.dtype]] = {}

    def everywhere(self, key: tuple[int, str], ctx: DistContext | None = None) -> nn.Linear:
        """Refit ``key`` on every rank: broadcast from its owner (collective; one process: the refit itself)."""
        ctx = ctx or single_process()
        if not ctx.is_distributed:
            return self[key]
        owner = self.owners[key]
        out_f, in_f, bias, dtype = self.specs[key]
        if ctx.rank == owner:
            lin = self[key]
        else:
            lin = nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=dtype).to_empty(device=ctx.device)
        with torch.no_grad():
            ctx.broadcast_(lin.weight, owner)
            if bias:
                ctx.broadcast_(lin.bias, owner)
        return lin.requires_grad_(False)


def _targets(model: nn.Module, keep: Mapping[int, LayerKeep]) -> list[tuple[tuple[int, str], nn.Linear, torch.Tensor]]:
    """(key, output projection, kept input columns) of every partially pruned block of ``keep``, in order."""
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    layers = adapter.layers(model)
    out = []
    for i, k in keep.items():
        for kind, kept_groups in ((ATTN, k.attn), (MLP, k.mlp)):
            current = layout.group_count(layers[i], kind, geometry.head_dim)
            if not 0 < len(kept_groups) < current:
                continue  # untouched or emptied: nothing to refit
            width = unit_width(OUTPUT[kind].unit, geometry.q_per_kv, geometry.head_dim)
            out.append(((i, kind), layout.projection(layers[i], kind, OUTPUT[kind].name),
                        group_indices(sorted(kept_groups), width)))
    return out


def _owners(keys, ctx: DistContext, start: int = 0) -> dict[tuple[int, str], int]:
    """Round robin: the n-th refit is solved by rank (start + n) mod world size."""
    return {key: (start + n) % ctx.world_size for n, key in enumerate(keys)}


def collect_stats(model: nn.Module, samples: torch.Tensor, layers: Sequence[int], batch_size: int = 8,
                  progress: bool = True, ctx: DistContext | None = None,
                  owners: Mapping[tuple[int, str], int] | None = None) -> dict[tuple[int, str], InputStats]:
    """Input statistics of each block's output projection (o_proj, down_proj) for ``layers``.

    Keys are (layer, kind). One forward pass over ``samples`` [n, seq] in micro-batches of
    ``batch_size``. ``ctx`` (default: one process): the micro-batches are split over the ranks and each
    statistic is added up into the rank ``owners`` names for it (the others keep partial sums), or into
    every rank when ``owners`` is None.
    """
    ctx = ctx or single_process()
    adapter = get_adapter(model.config)
    all_layers = adapter.layers(model)
    stats: dict[tuple[int, str], InputStats] = {}
    sizes: dict[tuple[int, str], int] = {}
    device = next(model.parameters()).device
    counting = [True]  # False for a lock-step repeat on a sharded model: run, not counted

    def hook(st: InputStats):
        return lambda module, args: st.update(args[0]) if counting[0] else None

    with ExitStack() as stack, no_grad_mode(ctx):
        for i in layers:
            for kind in KINDS:
                if layout.is_empty(all_layers[i], kind):
                    continue
                stats[(i, kind)] = InputStats()
                output = layout.projection(all_layers[i], kind, OUTPUT[kind].name)
                sizes[(i, kind)] = output.in_features
                stack.callback(output.register_forward_pre_hook(hook(stats[(i, kind)])).remove)
        batches = ctx.batches(samples.shape[0], batch_size, lockstep=is_sharded(model))
        for rows, active in tqdm(batches, desc="compensation stats", disable=not (progress and ctx.is_main)):
            counting[0] = active
            model(input_ids=samples[rows].to(device), use_cache=False)
    for key in sorted(stats):
        stats[key].reduce(ctx, sizes[key], device, None if owners is None else owners.get(key, 0))
    return stats


def layer_stats_bytes(model: nn.Module, layer: int) -> int:
    """Bytes of the float64 Gram matrices that :func:`collect_stats` holds for one layer."""
    block = get_adapter(model.config).layers(model)[layer]
    return 8 * sum(layout.projection(block, kind, OUTPUT[kind].name).in_features ** 2
                   for kind in KINDS if not layout.is_empty(block, kind))


def default_stats_budget(device: torch.device) -> int:
    """Bytes the Gram matrices of one pass may take: on a GPU a quarter of its memory (at most what is free,
    less 2 GiB for the forward pass), else 8 GiB of host memory.

    More chunks only cost more forward passes over the calibration samples (about a second each for an
    8B model on a GPU), so the budget keeps the stage's peak well under the card's size: LLaMA-3-8B
    (1.75 GiB of float64 Grams per layer) takes 3 passes on an 80 GB card instead of holding 56 GiB.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(min(total // 4, free - (2 << 30)), 1 << 30)
    return 8 << 30


def compensate(model: nn.Module, keep: Mapping[int, LayerKeep], samples: torch.Tensor, method: str,
               ridge: float = 1e-2, batch_size: int = 8, max_stats_bytes: int | None = None,
               progress: bool = True, ctx: DistContext | None = None) -> Refits:
    """Refitted output projections for ``keep`` on the dense ``model``, statistics gathered in chunks.

    Layers are grouped so each chunk's Gram matrices fit in ``max_stats_bytes`` (default:
    :func:`default_stats_budget` of the model's device; on N ranks the budget of each rank, which
    holds its partial sums of the whole chunk); each chunk costs one forward pass over ``samples``.
    Returns the :class:`Refits` that :func:`gqaprune.pruning.surgery.prune_model` / ``save_pruned`` install.
    ``ctx``: on N ranks each refit is solved by one owner rank (round robin), which receives the
    added-up statistics; the refits stay with their owners (:meth:`Refits.everywhere` fetches one).
    """
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    ctx = ctx or single_process()
    out = Refits()
    if method == "none" or not keep:
        return out
    if max_stats_bytes is None:
        max_stats_bytes = default_stats_budget(next(model.parameters()).device)
    chunks, current, used = [], [], 0
    for layer in sorted(keep):
        size = layer_stats_bytes(model, layer)
        if current and used + size > max_stats_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(layer)
        used += size
    chunks.append(current)
    for chunk in chunks:
        part = {i: keep[i] for i in chunk}
        owners = _owners([key for key, _, _ in _targets(model, part)], ctx, start=len(out.owners))
        stats = collect_stats(model, samples, chunk, batch_size, progress, ctx, owners)
        refits = compensated_outputs(model, part, stats, method, ridge, ctx, start=len(out.owners))
        out.update(refits)
        out.owners.update(refits.owners)
        out.specs.update(refits.specs)
        del stats
    return out


def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for a symmetric positive definite ``a`` (Cholesky; LU if it is not numerically PD)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.solve(a, b)


def refit(linear: nn.Linear, kept: torch.Tensor, stats: InputStats, method: str, ridge: float) -> nn.Linear:
    """A Linear over the kept input columns ``kept`` with refitted weights (and bias for 'bias').

    Computed in float64 on the statistics' device, returned in the projection's dtype and device.
    """
    device = stats.gram.device
    w = linear.weight.detach().to(device=device, dtype=torch.float64)  # [out, in] of the dense projection
    kept = kept.to(device)
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=device)
    removed[kept] = False
    w_k = w[:, kept]
    bias = None
    if method == "bias":
        mean = stats.total / max(stats.tokens, 1)  # [in]
        bias = w[:, removed] @ mean[removed]  # [out]
    else:  # lstsq
        g_k = stats.gram[kept]  # [|K|, in]
        g_kk = g_k[:, kept]
        lam = (ridge + len(kept) / max(stats.tokens, 1)) * g_kk.diagonal().mean().clamp_min(1e-12)
        g_kk.diagonal().add_(lam)
        # argmin_W' |X_K W'^T - X W^T|^2 + lam |W' - W_K|^2 = W_K + (G_KK + lam)^-1 G_KR W_R^T: only the
        # removed columns' product is formed ([|K|, |R|] @ [|R|, out], |R| << in), not G_K. @ W^T
        w_k = w_k + _solve_spd(g_kk, g_k[:, removed] @ w[:, removed].T).T
    if linear.bias is not None:
        bias = linear.bias.detach().to(device=device, dtype=torch.float64) + (bias if bias is not None else 0)
    if not torch.isfinite(w_k).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise NonFiniteError("least-squares compensation produced non-finite weights; the calibration "
                             "activations are degenerate (check surgery.ridge and the calibration data)")
    # skip_init: no random initialisation of weights that are overwritten at once
    new = torch.nn.utils.skip_init(nn.Linear, len(kept), w.shape[0], bias=bias is not None,
                                   device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w_k)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def compensated_outputs(model: nn.Module, keep: Mapping[int, LayerKeep], stats, method: str,
                        ridge: float = 1e-2, ctx: DistContext | None = None, start: int = 0) -> Refits:
    """New output projections (key (layer, kind)) for the partially pruned blocks of ``keep`` (dense model in).

    ``ctx``: on N ranks the n-th refit is solved by rank (start + n) mod N, which must hold its added-up
    statistics (:func:`collect_stats` with the same owners); every rank takes part in gathering a
    sharded weight.
    """
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    ctx = ctx or single_process()
    out = Refits()
    if method == "none":
        return out
    targets = [t for t in _targets(model, keep) if t[0] in stats]
    owners = _owners([key for key, _, _ in targets], ctx, start)
    for key, output, cols in targets:
        dense = whole_linear(output)  # gathered when sharded (collective)
        out.owners[key] = owners[key]
        out.specs[key] = (dense.out_features, len(cols), dense.bias is not None or method == "bias",
                          dense.weight.dtype)
        if ctx.rank == owners[key]:
            out[key] = refit(dense, cols, stats[key], method, ridge)
        del dense
    return out

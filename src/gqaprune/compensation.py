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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .errors import NonFiniteError
from .hf_code import gqaprune_layout as layout
from .hf_code.gqaprune_layout import OUTPUT, group_indices, unit_width
from .schema import ATTN, KINDS, MLP, LayerKeep

METHODS = ("none", "bias", "lstsq")

__all__ = ["METHODS", "InputStats", "collect_stats", "compensate", "compensated_outputs", "refit"]


class InputStats:
    """Accumulate sum_t x_t x_t^T ([in, in]) and sum_t x_t ([in]) in float64 at a module's input."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` ([..., in], any float dtype, on any device)."""
        x = x.detach().reshape(-1, x.shape[-1]).double()  # [tokens, in]
        if self.gram is None:
            self.gram = x.T @ x
            self.total = x.sum(0)
        else:
            self.gram.addmm_(x.T, x)
            self.total += x.sum(0)
        self.tokens += x.shape[0]

    def __call__(self, module, args) -> None:
        """Forward pre-hook: accumulate the module's input."""
        self.update(args[0])


def collect_stats(model: nn.Module, samples: torch.Tensor, layers: Sequence[int], batch_size: int = 8,
                  progress: bool = True, reduce: Callable[[torch.Tensor], None] | None = None
                  ) -> dict[tuple[int, str], InputStats]:
    """Input statistics of each block's output projection (o_proj, down_proj) for ``layers``.

    Keys are (layer, kind). One forward pass over ``samples`` [n, seq] in micro-batches of
    ``batch_size``. ``reduce`` (in-place sum over processes) is applied to every statistic at the end
    when the samples are split across ranks.
    """
    adapter = get_adapter(model.config)
    all_layers = adapter.layers(model)
    stats: dict[tuple[int, str], InputStats] = {}
    device = next(model.parameters()).device
    with ExitStack() as stack, torch.inference_mode():
        for i in layers:
            for kind in KINDS:
                if layout.is_empty(all_layers[i], kind):
                    continue
                stats[(i, kind)] = InputStats()
                output = layout.projection(all_layers[i], kind, OUTPUT[kind].name)
                stack.callback(output.register_forward_pre_hook(stats[(i, kind)]).remove)
        for start in tqdm(range(0, samples.shape[0], batch_size), desc="compensation stats", disable=not progress):
            model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
    if reduce is not None:
        for st in stats.values():
            if st.gram is not None:
                reduce(st.gram)
                reduce(st.total)
            tokens = torch.tensor([float(st.tokens)], dtype=torch.float64, device=device)
            reduce(tokens)
            st.tokens = int(tokens.item())
    return stats


def _stats_bytes(model: nn.Module, layer: int) -> int:
    """Bytes of the float64 Gram matrices that :func:`collect_stats` holds for one layer."""
    block = get_adapter(model.config).layers(model)[layer]
    return 8 * sum(layout.projection(block, kind, OUTPUT[kind].name).in_features ** 2
                   for kind in KINDS if not layout.is_empty(block, kind))


def default_stats_budget(device: torch.device) -> int:
    """Bytes the Gram matrices may take: most of the free GPU memory, else 8 GiB of host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free * 0.8) - (2 << 30), 1 << 30)  # 2 GiB headroom for the forward pass
    return 8 << 30


def compensate(model: nn.Module, keep: Mapping[int, LayerKeep], samples: torch.Tensor, method: str,
               ridge: float = 1e-2, batch_size: int = 8, max_stats_bytes: int | None = None,
               progress: bool = True, reduce: Callable[[torch.Tensor], None] | None = None
               ) -> dict[tuple[int, str], nn.Linear]:
    """Refitted output projections for ``keep`` on the dense ``model``, statistics gathered in chunks.

    Layers are grouped so each chunk's Gram matrices fit in ``max_stats_bytes`` (default:
    :func:`default_stats_budget` of the model's device); each chunk costs one forward pass over
    ``samples``. Returns the ``replacements`` that :func:`gqaprune.surgery.prune_model` installs.
    """
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    out: dict[tuple[int, str], nn.Linear] = {}
    if method == "none" or not keep:
        return out
    if max_stats_bytes is None:
        max_stats_bytes = default_stats_budget(next(model.parameters()).device)
    chunks, current, used = [], [], 0
    for layer in sorted(keep):
        size = _stats_bytes(model, layer)
        if current and used + size > max_stats_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(layer)
        used += size
    chunks.append(current)
    for chunk in chunks:
        stats = collect_stats(model, samples, chunk, batch_size, progress, reduce)
        out.update(compensated_outputs(model, {i: keep[i] for i in chunk}, stats, method, ridge))
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
        g_kk = stats.gram[kept][:, kept]
        lam = (ridge + len(kept) / max(stats.tokens, 1)) * g_kk.diagonal().mean().clamp_min(1e-12)
        rhs = stats.gram[kept] @ w.T + lam * w_k.T  # [|K|, out]
        g_kk.diagonal().add_(lam)
        w_k = _solve_spd(g_kk, rhs).T
    if linear.bias is not None:
        bias = linear.bias.detach().to(device=device, dtype=torch.float64) + (bias if bias is not None else 0)
    if not torch.isfinite(w_k).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise NonFiniteError("least-squares compensation produced non-finite weights; the calibration "
                             "activations are degenerate (check surgery.ridge and the calibration data)")
    new = nn.Linear(len(kept), w.shape[0], bias=bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w_k)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def compensated_outputs(model: nn.Module, keep: Mapping[int, LayerKeep], stats, method: str,
                        ridge: float = 1e-2) -> dict[tuple[int, str], nn.Linear]:
    """New output projections (key (layer, kind)) for the partially pruned blocks of ``keep`` (dense model in)."""
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    layers = adapter.layers(model)
    out: dict[tuple[int, str], nn.Linear] = {}
    if method == "none":
        return out
    for i, k in keep.items():
        for kind, kept_groups in ((ATTN, k.attn), (MLP, k.mlp)):
            if (i, kind) not in stats:
                continue
            current = layout.group_count(layers[i], kind, geometry.head_dim)
            if not 0 < len(kept_groups) < current:
                continue  # untouched or emptied: nothing to refit
            width = unit_width(OUTPUT[kind].unit, geometry.q_per_kv, geometry.head_dim)
            cols = group_indices(sorted(kept_groups), width)
            output = layout.projection(layers[i], kind, OUTPUT[kind].name)
            out[(i, kind)] = refit(output, cols, stats[(i, kind)], method, ridge)
    return out

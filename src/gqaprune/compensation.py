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
being pruned are held; :func:`compensate` gathers them in chunks of layers under a memory budget
(LLaMA-3-8B: 1.6 GiB per down_proj Gram), one forward pass over the calibration samples per chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .hf_code.modeling_gqaprune import EmptyAttention, EmptyMLP
from .surgery import LayerKeep, _rows_of

METHODS = ("none", "bias", "lstsq")


class _InputStats:
    """Accumulate sum_t x_t x_t^T and sum_t x_t (float64) at a module's input."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
        g, s = x.T @ x, x.sum(0)
        self.gram = g if self.gram is None else self.gram + g
        self.total = s if self.total is None else self.total + s
        self.tokens += x.shape[0]


def collect_stats(model: nn.Module, samples: torch.Tensor, layers: list[int], batch_size: int = 8,
                  progress: bool = True) -> dict[tuple[int, str], _InputStats]:
    """Input statistics of o_proj ('o') and down_proj ('down') for ``layers``, from forward passes."""
    adapter = get_adapter(model.config)
    all_layers = adapter.layers(model)
    stats: dict[tuple[int, str], _InputStats] = {}
    device = next(model.parameters()).device
    with ExitStack() as stack, torch.inference_mode():
        for i in layers:
            layer = all_layers[i]
            if not isinstance(adapter.attention(layer), EmptyAttention):
                stats[(i, "o")] = _InputStats()
                h = adapter.attn_projections(layer)[3].register_forward_pre_hook(stats[(i, "o")])
                stack.callback(h.remove)
            if not isinstance(adapter.mlp(layer), EmptyMLP):
                stats[(i, "down")] = _InputStats()
                h = adapter.mlp_projections(layer)[2].register_forward_pre_hook(stats[(i, "down")])
                stack.callback(h.remove)
        for start in tqdm(range(0, samples.shape[0], batch_size), desc="compensation stats", disable=not progress):
            model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
    return stats


def _stats_bytes(model: nn.Module, layer: int) -> int:
    """Bytes of the float64 Gram matrices that :func:`collect_stats` holds for one layer."""
    adapter = get_adapter(model.config)
    block = adapter.layers(model)[layer]
    size = 0
    if not isinstance(adapter.attention(block), EmptyAttention):
        size += adapter.attn_projections(block)[3].in_features ** 2
    if not isinstance(adapter.mlp(block), EmptyMLP):
        size += adapter.mlp_projections(block)[2].in_features ** 2
    return 8 * size


def compensate(model: nn.Module, keep: Mapping[int, LayerKeep], samples: torch.Tensor, method: str,
               ridge: float = 1e-2, batch_size: int = 8, max_stats_bytes: int = 8 << 30,
               progress: bool = True) -> dict[tuple[int, str], nn.Linear]:
    """Refitted output projections for ``keep`` on the dense ``model``, statistics gathered in chunks.

    Layers are grouped so each chunk's Gram matrices fit in ``max_stats_bytes``; each chunk costs one
    forward pass over ``samples``. Returns the ``replacements`` that :func:`gqaprune.surgery.prune_model`
    installs.
    """
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    out: dict[tuple[int, str], nn.Linear] = {}
    if method == "none" or not keep:
        return out
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
        stats = collect_stats(model, samples, chunk, batch_size, progress)
        out.update(compensated_outputs(model, {i: keep[i] for i in chunk}, stats, method, ridge))
        del stats
    return out


def _refit(linear: nn.Linear, kept: torch.Tensor, st: _InputStats, method: str, ridge: float) -> nn.Linear:
    """A Linear over the kept input columns with refitted weights (and bias for 'bias')."""
    w = linear.weight.detach().double().cpu()  # [out, in] of the dense projection
    gram, total = st.gram.cpu(), st.total.cpu()
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[kept] = False
    w_k = w[:, kept]
    bias = None
    if method == "bias":
        mean = total / max(st.tokens, 1)  # [in]
        bias = w[:, removed] @ mean[removed]  # [out]
    else:  # lstsq
        g_kk = gram[kept][:, kept]
        lam = (ridge + len(kept) / max(st.tokens, 1)) * g_kk.diagonal().mean().clamp_min(1e-12)
        rhs = gram[kept] @ w.T + lam * w_k.T  # [|K|, out]
        w_k = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype), rhs).T
    if linear.bias is not None:
        bias = linear.bias.detach().double().cpu() + (bias if bias is not None else 0)
    new = nn.Linear(len(kept), w.shape[0], bias=bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w_k)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def compensated_outputs(model: nn.Module, keep: Mapping[int, LayerKeep], stats, method: str,
                        ridge: float = 1e-2) -> dict[tuple[int, str], nn.Linear]:
    """New o_proj / down_proj modules for the partially pruned blocks of ``keep`` (dense model in)."""
    if method not in METHODS:
        raise ValueError(f"compensation must be one of {list(METHODS)}, got {method!r}")
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    layers = adapter.layers(model)
    out: dict[tuple[int, str], nn.Linear] = {}
    if method == "none":
        return out
    for i, k in keep.items():
        if (i, "o") in stats and 0 < len(k.attn) < geometry.num_kv_heads:
            cols = _rows_of(sorted(k.attn), geometry.q_per_kv * geometry.head_dim)
            out[(i, "o")] = _refit(adapter.attn_projections(layers[i])[3], cols, stats[(i, "o")], method, ridge)
        if (i, "down") in stats and 0 < len(k.mlp) < adapter.mlp_projections(layers[i])[2].in_features:
            cols = torch.as_tensor(sorted(k.mlp), dtype=torch.long)
            out[(i, "down")] = _refit(adapter.mlp_projections(layers[i])[2], cols, stats[(i, "down")], method,
                                      ridge)
    return out


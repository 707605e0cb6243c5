"""Several pruned variants of one dense model, measured against it layer by layer on shared passes.

The allocate stage compares candidate plans by how close each pruned model stays to the dense one
on held-out windows. Pruning a full copy of the model per candidate costs a copy, a statistics pass
and a full forward each, and holds two models at once (an 8B model in float64 statistics did not
fit one 80 GB GPU). Here the candidates advance together, one decoder layer at a time:

* the dense calibration stream ``[n_samples, T, H]`` runs through dense layer ``l``; hooks on its
  output projections gather the Gram matrices that the least-squares / bias refits of layer ``l``
  need (once, shared by every candidate that prunes that block);
* the dense held-out stream runs through dense layer ``l`` (the reference);
* each candidate's held-out stream runs through *its* layer ``l``: a structural copy of the dense
  layer whose pruned projections are sliced, with the refitted output projection installed (the
  unpruned weights are shared, not copied); a layer the candidate removes is skipped.

After the last layer the final norm and the LM head give, per held-out token, the dense model's
next-token distribution (computed once, shared) and each candidate's: KL(dense || candidate) and the
candidate's NLL, per window (nats). Memory: the dense model, the streams (calibration, dense
held-out, one held-out stream per candidate, in the model's dtype) and one layer's statistics.
The result for a candidate equals pruning a copy of the model with the same refits and evaluating it
(tests/test_selection.py), up to float summation order.

Statistics are those of :class:`gqaprune.pruning.compensation.InputStats`; they can be kept
(``keep_stats``) so a second call on other windows (successive halving) skips the calibration stream.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn

from gqaprune.models.adapters import get_adapter
from gqaprune.models.hf_code import gqaprune_layout as layout
from gqaprune.models.hf_code.gqaprune_layout import OUTPUT, group_indices, unit_width
from gqaprune.models.units import ATTN, KINDS, MLP, LayerKeep
from gqaprune.pruning.compensation import InputStats, refit
from gqaprune.pruning.sequential_refit import layer_inputs

__all__ = ["CandidateScores", "evaluate_candidates", "pruned_layer"]

StatsCache = dict[tuple[int, str], InputStats]


class CandidateScores(dict):
    """Per candidate name: ``{"kl": [n_windows] float64, "nll": [n_windows] float64}`` (per-window means, nats)."""


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own child table: replacing a child of the copy leaves ``module`` intact,
    while the children themselves (and every weight) stay shared."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    return new


def pruned_layer(layer: nn.Module, keep: LayerKeep, refits: Mapping[str, nn.Linear], q_per_kv: int, head_dim: int
                 ) -> nn.Module | None:
    """Dense decoder ``layer`` pruned to ``keep`` with the refitted output projections ``refits`` (by kind)
    installed; None when it keeps nothing (the layer is removed). ``layer`` is not modified."""
    if not keep.attn and not keep.mlp:
        return None
    new = _structural_copy(layer)
    for kind, kept in ((ATTN, keep.attn), (MLP, keep.mlp)):
        if list(kept) == list(range(layout.group_count(layer, kind, head_dim))):
            continue  # untouched block: shared as it is
        layout.set_block(new, kind, _structural_copy(layout.block(layer, kind)))
        ratio, dim = (q_per_kv, head_dim) if kind == ATTN else (1, 1)
        layout.slice_block(new, kind, sorted(kept), ratio, dim)
        if kind in refits:
            setattr(layout.block(new, kind), OUTPUT[kind].name, refits[kind])
    return new


def _partial(layer: nn.Module, keep: LayerKeep, kind: str, head_dim: int) -> list[int] | None:
    """The kept groups of ``kind`` when the block is partly pruned (refit needed), else None."""
    kept = keep.attn if kind == ATTN else keep.mlp
    return sorted(kept) if 0 < len(kept) < layout.group_count(layer, kind, head_dim) else None


def _layer_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Grams:
    """Forward pre-hooks that add each batch's inputs of chosen output projections into InputStats."""

    def __init__(self):
        self.stats: StatsCache = {}

    def hook(self, key: tuple[int, str]):
        st = self.stats.setdefault(key, InputStats())
        return lambda module, args: st.update(args[0])


@torch.inference_mode()
def evaluate_candidates(dense: nn.Module, keeps: Mapping[str, Mapping[int, LayerKeep]], calibration: torch.Tensor,
                        heldout: torch.Tensor, method: str = "lstsq", ridge: float = 1e-2, batch_size: int = 8,
                        stats: StatsCache | None = None, keep_stats: bool = False, head_chunk: int = 512,
                        refit_memo: dict | None = None) -> tuple[CandidateScores, StatsCache | None]:
    """KL(dense || candidate) and NLL per held-out window for every candidate plan, on shared layer passes.

    Args:
        dense: the dense model (unchanged).
        keeps: candidate name -> its plan's kept groups per layer (``Plan.keep``).
        calibration: ``[n, T]`` token ids the refits are fitted on (as surgery fits them).
        heldout: ``[m, T']`` held-out windows the candidates are measured on.
        method: ``lstsq``, ``bias`` or ``none`` (output compensation, as surgery applies it).
        stats: statistics of an earlier call (``keep_stats``) to reuse; the calibration stream is skipped.
        keep_stats: return the statistics of every refitted block (memory: their Gram matrices).
        refit_memo: a dict the refitted output projections are kept in (key: layer, kind, kept groups) and
            taken from; give the same dict to a later call with the same ``stats`` to skip their solves.
            Without it the refits are still shared by the candidates that keep the same groups of a layer.

    Returns:
        (scores by candidate, the statistics or None).
    """
    adapter = get_adapter(dense.config)
    geometry = adapter.geometry(dense.config)
    layers = adapter.layers(dense)
    need = {(i, kind) for keep in keeps.values() for i, k in keep.items() for kind in KINDS
            if method != "none" and _partial(layers[i], k, kind, geometry.head_dim) is not None}
    cal_stream = cal_kwargs = None
    if stats is None or not need <= set(stats):
        stats = {}
        cal_stream, cal_kwargs = layer_inputs(dense, calibration, batch_size)
    ho_stream, ho_kwargs = layer_inputs(dense, heldout, batch_size)
    streams = {name: [h.clone() for h in ho_stream] for name in keeps}
    kept_stats: StatsCache = dict(stats)
    for i, layer in enumerate(layers):
        if cal_stream is not None:  # the dense calibration stream, with this layer's statistics on the way
            grams = _Grams()
            with ExitStack() as stack:
                for kind in KINDS:
                    if (i, kind) in need:
                        proj = layout.projection(layer, kind, OUTPUT[kind].name)
                        stack.callback(proj.register_forward_pre_hook(grams.hook((i, kind))).remove)
                for b, h in enumerate(cal_stream):
                    cal_stream[b] = _layer_out(layer(h, **cal_kwargs[i][b]))
            layer_stats = grams.stats
        else:
            layer_stats = {key: st for key, st in stats.items() if key[0] == i}
        for b, h in enumerate(ho_stream):
            ho_stream[b] = _layer_out(layer(h, **ho_kwargs[i][b]))
        # a refit depends only on the layer's statistics and the kept groups: candidates that keep the same
        # groups of this layer share it (and a later round reuses it through refit_memo)
        memo = refit_memo if refit_memo is not None else {}
        for name, keep in keeps.items():
            k = keep.get(i)
            if k is None:
                variant = layer
            else:
                refits = {}
                for kind in KINDS:
                    kept = _partial(layer, k, kind, geometry.head_dim)
                    if kept is None or method == "none":
                        continue
                    key = (i, kind, tuple(kept))
                    if key not in memo:
                        width = unit_width(OUTPUT[kind].unit, geometry.q_per_kv, geometry.head_dim)
                        output = layout.projection(layer, kind, OUTPUT[kind].name)
                        memo[key] = refit(output, group_indices(kept, width), layer_stats[(i, kind)], method, ridge)
                    refits[kind] = memo[key]
                variant = pruned_layer(layer, k, refits, geometry.q_per_kv, geometry.head_dim)
            if variant is not None:
                for b, h in enumerate(streams[name]):
                    streams[name][b] = _layer_out(variant(h, **ho_kwargs[i][b]))
        if keep_stats:
            kept_stats.update(layer_stats)
        if refit_memo is None:
            memo.clear()  # this layer's refits are installed in the candidates' variants, no longer needed
    scores = _criteria(adapter.final_norm(dense), adapter.lm_head(dense), heldout, ho_stream, streams, head_chunk)
    return scores, (kept_stats if keep_stats else None)


def _criteria(norm: nn.Module, head: nn.Module, windows: torch.Tensor, dense_stream: Sequence[torch.Tensor],
              streams: Mapping[str, Sequence[torch.Tensor]], head_chunk: int) -> CandidateScores:
    """Per-window mean KL(dense || candidate) and NLL from the final hidden states (logits ``head_chunk`` rows
    at a time in float32; the dense distribution computed once per chunk and shared by the candidates)."""
    n, t = windows.shape
    out = CandidateScores({name: {"kl": torch.empty(n, dtype=torch.float64),
                                  "nll": torch.empty(n, dtype=torch.float64)} for name in streams})
    start = 0
    for b, hd in enumerate(dense_stream):
        nb = hd.shape[0]
        labels = windows[start:start + nb, 1:].reshape(-1).to(hd.device)
        rows = nb * (t - 1)
        dense_rows = norm(hd)[:, :-1].reshape(rows, -1)
        cand_rows = {name: norm(s[b])[:, :-1].reshape(rows, -1) for name, s in streams.items()}
        kl = {name: torch.empty(rows, dtype=torch.float32, device=hd.device) for name in streams}
        nll = {name: torch.empty(rows, dtype=torch.float32, device=hd.device) for name in streams}
        for r in range(0, rows, head_chunk):
            lq = F.log_softmax(head(dense_rows[r:r + head_chunk]).float(), dim=-1)  # [c, V] dense
            q = lq.exp()
            for name, h in cand_rows.items():
                lp = F.log_softmax(head(h[r:r + head_chunk]).float(), dim=-1)
                kl[name][r:r + head_chunk] = (q * (lq - lp)).sum(-1)
                nll[name][r:r + head_chunk] = -lp.gather(-1, labels[r:r + head_chunk, None]).squeeze(-1)
        for name in streams:
            out[name]["kl"][start:start + nb] = kl[name].view(nb, t - 1).double().mean(1).cpu()
            out[name]["nll"][start:start + nb] = nll[name].view(nb, t - 1).double().mean(1).cpu()
        start += nb
    return out


def paired_worse(a: torch.Tensor, b: torch.Tensor, z: float = 2.0) -> bool:
    """Whether per-window values ``a`` are worse (higher) than ``b`` by more than ``z`` standard errors of the
    paired difference (the same windows)."""
    d = (a - b).double()
    if len(d) < 2:
        return False
    se = float(d.std(unbiased=True)) / math.sqrt(len(d))
    return float(d.mean()) > z * max(se, 1e-12)

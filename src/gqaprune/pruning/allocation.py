"""Choose the allocation (plan settings) for a ratio by a criterion measured on held-out calibration windows.

No single fixed allocation is best at every ratio: on SmolLM2, pure importance (``temperature 0``)
is best at 10-30 % removed and the layer-wise similarity prior (``temperature 1, tau inf``) at 50 %.
Rather than asking the user to switch, :func:`select_allocation` builds every candidate plan at the
requested ratio, prunes a copy of the dense model with each (with the given compensation), and
measures it on held-out calibration windows (:func:`gqaprune.data.windows.heldout_windows`: calibration text
that neither the scores nor the compensation saw; never an evaluation split):

* ``kl``:  mean over tokens of KL(dense || pruned) of the next-token distributions (nats);
* ``nll``: mean next-token negative log-likelihood of the held-out text (nats).

The candidate with the lowest criterion wins. Both are computed in the same pass and reported in
the returned table, so the choice of criterion can be audited on held-out data too.

The table of candidates is data (:data:`DEFAULT_CANDIDATES`): prior settings that the plan already
supports, from pure importance to strong layer-wise priors, plus a uniform per-layer allocation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gqaprune.config.choices import ALLOCATION_CANDIDATES, DEFAULT_ALLOCATION_CANDIDATES
from gqaprune.config.sections import PlanConfig
from gqaprune.models.modules import decoder_and_head
from gqaprune.pruning.plan import Plan, build_plan

CRITERIA = ("kl", "nll")

__all__ = ["ALL_CANDIDATES", "CRITERIA", "DEFAULT_CANDIDATES", "Candidate", "DenseReference", "Selection",
           "heldout_criteria", "select_allocation"]


@dataclass(frozen=True)
class Candidate:
    """One allocation to try: a name and PlanConfig overrides (the ratio comes from the caller)."""

    name: str
    plan: dict = field(default_factory=dict)


#: The default candidate allocations (all with Taylor importance, per-kind prior normalisation).
DEFAULT_CANDIDATES: tuple[Candidate, ...] = tuple(Candidate(name, dict(ALLOCATION_CANDIDATES[name]))
                                                   for name in DEFAULT_ALLOCATION_CANDIDATES)
#: Every named candidate (the defaults and the ones a user may add).
ALL_CANDIDATES: tuple[Candidate, ...] = tuple(Candidate(name, dict(plan))
                                               for name, plan in ALLOCATION_CANDIDATES.items())


@dataclass
class DenseReference:
    """The dense model's final hidden states on the held-out windows, to recompute its logits by chunks."""

    windows: torch.Tensor  # [n, T] token ids
    hidden: torch.Tensor  # [n, T - 1, H] final (normed) hidden states at the predicting positions
    head: nn.Module  # the dense lm_head


@torch.inference_mode()
def dense_reference(dense: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> DenseReference:
    """Run the dense model once over the held-out windows and keep its final hidden states."""
    decoder, head = decoder_and_head(dense, strict=True)
    device = next(dense.parameters()).device
    parts = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        parts.append(decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].detach())
    return DenseReference(windows=windows, hidden=torch.cat(parts), head=head)


@torch.inference_mode()
def heldout_criteria(model: nn.Module, ref: DenseReference, batch_size: int = 8, head_chunk: int = 512
                     ) -> dict[str, float]:
    """``{"kl": mean KL(dense || model), "nll": mean NLL, "kl_se", "nll_se"}`` over the held-out tokens (nats).

    Standard errors are over windows (per-window means). Logits are formed ``head_chunk`` rows at a
    time in float32 from the final hidden states of both models.
    """
    was_training = model.training
    model.eval()
    decoder, head = decoder_and_head(model, strict=True)
    device = next(model.parameters()).device
    n, t = ref.windows.shape
    kl_w = torch.empty(n, dtype=torch.float64)
    nll_w = torch.empty(n, dtype=torch.float64)
    try:
        for start in range(0, n, batch_size):
            ids = ref.windows[start:start + batch_size].to(device)
            b = ids.shape[0]
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(b * (t - 1), -1)
            hd = ref.hidden[start:start + b].reshape(b * (t - 1), -1)
            labels = ids[:, 1:].reshape(-1)
            kl = torch.empty(b * (t - 1), dtype=torch.float32)
            nll = torch.empty(b * (t - 1), dtype=torch.float32)
            for r in range(0, b * (t - 1), head_chunk):
                lp = F.log_softmax(head(h[r:r + head_chunk]).float(), dim=-1)  # [c, V]
                lq = F.log_softmax(ref.head(hd[r:r + head_chunk]).float(), dim=-1)  # dense
                kl[r:r + head_chunk] = (lq.exp() * (lq - lp)).sum(-1).cpu()
                nll[r:r + head_chunk] = -lp.gather(-1, labels[r:r + head_chunk, None]).squeeze(-1).cpu()
            kl_w[start:start + b] = kl.view(b, t - 1).double().mean(1)
            nll_w[start:start + b] = nll.view(b, t - 1).double().mean(1)
    finally:
        model.train(was_training)

    def se(x: torch.Tensor) -> float:
        return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

    return {"kl": float(kl_w.mean()), "nll": float(nll_w.mean()), "kl_se": se(kl_w), "nll_se": se(nll_w)}


@dataclass
class Selection:
    """The outcome of :func:`select_allocation`."""

    choice: Candidate
    config: PlanConfig  # the chosen candidate's full plan config at the requested ratio
    plan: Plan  # its plan
    table: pd.DataFrame  # one row per candidate: name, settings, kl, nll (+ SEs), params_removed, seconds
    criterion: str
    model: nn.Module | None = None  # the chosen pruned model (when keep_model)


PruneFn = Callable[[nn.Module, Plan], nn.Module]


def select_allocation(
    dense: nn.Module,
    scores: pd.DataFrame,
    similarity: pd.DataFrame | None,
    counts,
    num_layers: int,
    base: PlanConfig,
    heldout: torch.Tensor | DenseReference,
    prune: PruneFn | None = None,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    criterion: str = "kl",
    batch_size: int = 8,
    keep_model: bool = False,
    log: Callable[[dict], None] | None = None,
    audit: dict[str, DenseReference] | None = None,
    *,
    calibration: torch.Tensor | None = None,
    method: str = "lstsq",
    ridge: float = 1e-2,
    window_groups: Sequence[str] | None = None,
    halving: bool = True,
    z: float = 2.0,
) -> Selection:
    """Build each candidate's plan at ``base.ratio``, prune the dense model with it, keep the best by ``criterion``.

    Two ways to prune a candidate:

    * ``prune=None`` (the pipeline's way): one-shot compensation (``method``, ``ridge``, fitted on
      ``calibration`` as surgery fits it), every candidate measured on shared layer-by-layer passes
      (:func:`gqaprune.pruning.layerwise_eval.evaluate_candidates`; no model copy). With ``halving``
      the candidates are first measured on a third of the held-out windows (every third window, the
      corpora interleaved); those worse than the best by more than ``z`` standard errors of the paired
      per-window difference are dropped, and only the rest are measured on the other windows.
      ``window_groups`` names the corpus of each window (reported as ``<corpus>_kl`` / ``_nll``).
    * ``prune(dense, plan) -> pruned copy`` (any pruner, e.g. sequential refits): each candidate is
      pruned and evaluated in turn on every window (``audit``: more held-out sets, reported only).

    Args:
        dense: the dense model (unchanged).
        scores, similarity, counts, num_layers: the plan's inputs (:func:`gqaprune.pruning.plan.build_plan`).
        base: plan settings shared by all candidates (ratio, importance, freezing, alignment...); each
            candidate's overrides replace those keys.
        heldout: held-out calibration windows ``[n, T]`` (or a ready :class:`DenseReference` with ``prune``).
        candidates: allocations to try; a candidate whose plan cannot be built (e.g. it needs the
            similarity table and there is none) is skipped and reported with its error.
        criterion: ``"kl"`` (to the dense model) or ``"nll"`` (of the held-out text).
        keep_model: also return the chosen pruned model (``prune`` only).

    Returns:
        :class:`Selection`; its table has one row per candidate (criteria over the windows it was
        measured on, their number, and whether it was dropped early).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if not candidates:
        raise ValueError("no candidate allocation to choose from")
    rows, plans = {}, {}
    for cand in candidates:
        row = {"candidate": cand.name, **{k: cand.plan.get(k) for k in ("strategy", "temperature", "tau")}}
        try:
            config = replace(base, **cand.plan)
            plans[cand.name] = (cand, config, build_plan(scores, similarity, counts, num_layers, config))
        except ValueError as exc:  # PlanError: e.g. no similarity table for a prior
            row["error"] = str(exc)
        rows[cand.name] = row
    if not plans:
        raise ValueError(f"no candidate could be planned: {[r.get('error') for r in rows.values()]}")
    if prune is None:
        best, model = _streamed(dense, plans, rows, calibration, heldout, method, ridge, batch_size, criterion,
                                window_groups, halving, z, log), None
    else:
        best, model = _one_by_one(dense, plans, rows, heldout, prune, batch_size, criterion, keep_model, log, audit)
    table = pd.DataFrame(list(rows.values()))
    table["chosen"] = table["candidate"] == best
    cand, config, plan = plans[best]
    return Selection(choice=cand, config=config, plan=plan, table=table, criterion=criterion, model=model)


def _summary(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error over windows) of per-window values."""
    se = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def _streamed(dense, plans, rows, calibration, heldout, method, ridge, batch_size, criterion, window_groups,
              halving, z, log) -> str:
    """Every plan measured on shared layer passes (successive halving); fills ``rows``; the chosen name."""
    from gqaprune.pruning.compensation import default_stats_budget
    from gqaprune.pruning.layerwise_eval import evaluate_candidates, paired_worse

    if isinstance(heldout, DenseReference):
        heldout = heldout.windows
    if calibration is None and method != "none":
        raise ValueError("one-shot compensation needs the calibration samples it is fitted on")
    n = heldout.shape[0]
    groups = list(window_groups) if window_groups is not None else ["all"] * n
    order = sorted(range(n), key=lambda i: (groups[:i + 1].count(groups[i]), groups.index(groups[i])))  # interleaved
    first = sorted(order[0::3]) if halving and n >= 6 else list(range(n))
    rest = sorted(set(range(n)) - set(first))
    keeps = {name: plan.keep for name, (_, _, plan) in plans.items()}
    # the statistics of every layer are kept for the second round only where they fit (an 8B model's float64
    # Grams take 57 GB): otherwise the second round passes the calibration samples through the model again
    keep = bool(rest) and _stats_bytes(dense) <= default_stats_budget(next(dense.parameters()).device)
    memo = {} if keep else None  # the refits too are kept where the statistics are (they are smaller)
    got, stats = evaluate_candidates(dense, keeps, calibration, heldout[first], method, ridge, batch_size,
                                     keep_stats=keep, refit_memo=memo)
    values = {name: {k: v for k, v in got[name].items()} for name in keeps}
    windows = {name: list(first) for name in keeps}
    best = min(keeps, key=lambda name: float(values[name][criterion].mean()))
    survivors = [name for name in keeps
                 if name == best or not paired_worse(values[name][criterion], values[best][criterion], z)]
    if rest and len(survivors) > 1:
        more, _ = evaluate_candidates(dense, {name: keeps[name] for name in survivors}, calibration, heldout[rest],
                                      method, ridge, batch_size, stats=stats, refit_memo=memo)
        for name in survivors:
            values[name] = {k: torch.cat([values[name][k], more[name][k]]) for k in values[name]}
            windows[name] = first + rest
    for name, (_, _, plan) in plans.items():
        row = rows[name]
        for key in ("kl", "nll"):
            row[key], row[f"{key}_se"] = _summary(values[name][key])
        for g in dict.fromkeys(groups):
            mine = [j for j, w in enumerate(windows[name]) if groups[w] == g]
            if window_groups is not None and mine:
                row[f"{g}_kl"] = float(values[name]["kl"][mine].mean())
                row[f"{g}_nll"] = float(values[name]["nll"][mine].mean())
        row.update(windows=len(windows[name]), dropped_early=name not in survivors,
                   params_removed=plan.analysis["params_removed"], removed_layers=len(plan.analysis["removed_layers"]))
        if log is not None:
            log(row)
    return min(survivors, key=lambda name: rows[name][criterion])


def _stats_bytes(model: nn.Module) -> int:
    """Bytes of the float64 Gram matrices of every layer's output projections (an upper bound of what the
    candidates' refits need)."""
    from gqaprune.pruning.compensation import layer_stats_bytes

    return sum(layer_stats_bytes(model, i) for i in range(model.config.num_hidden_layers))


def _one_by_one(dense, plans, rows, heldout, prune, batch_size, criterion, keep_model, log, audit):
    """Each plan pruned by ``prune`` and measured on every window in turn; fills ``rows``; (chosen, model)."""
    ref = heldout if isinstance(heldout, DenseReference) else dense_reference(dense, heldout, batch_size)
    best = None
    for name, (_, _, plan) in plans.items():
        t0 = time.perf_counter()
        row = rows[name]
        model = prune(dense, plan)
        values = heldout_criteria(model, ref, batch_size)
        for extra_name, extra in (audit or {}).items():
            v = heldout_criteria(model, extra, batch_size)
            row.update({f"{extra_name}_kl": v["kl"], f"{extra_name}_nll": v["nll"]})
        row.update(values, windows=ref.windows.shape[0], dropped_early=False,
                   params_removed=plan.analysis["params_removed"],
                   removed_layers=len(plan.analysis["removed_layers"]), seconds=round(time.perf_counter() - t0, 1))
        if log is not None:
            log(row)
        if best is None or values[criterion] < best[0]:
            best = (values[criterion], name, model if keep_model else None)
        del model
    return best[1], best[2]


def oneshot_pruner(stats, method: str = "lstsq", ridge: float = 1e-2) -> PruneFn:
    """``prune(dense, plan)`` with one-shot compensation from precomputed dense statistics."""
    from gqaprune.pruning.compensation import compensated_outputs
    from gqaprune.pruning.surgery import prune_model

    def prune(dense: nn.Module, plan: Plan) -> nn.Module:
        model = copy.deepcopy(dense)
        replacements = compensated_outputs(model, plan.keep, stats or {}, method, ridge)
        prune_model(model, plan.keep, replacements)
        return model

    return prune


def sequential_pruner(samples: torch.Tensor, ridge: float = 1e-2, target: str = "dense", batch_size: int = 8,
                      progress: bool = False) -> PruneFn:
    """``prune(dense, plan)`` with layer-by-layer refitting
    (:func:`gqaprune.pruning.sequential_refit.sequential_prune`)."""
    from gqaprune.pruning.sequential_refit import sequential_prune

    def prune(dense: nn.Module, plan: Plan) -> nn.Module:
        return sequential_prune(dense, plan.keep, samples, ridge, target, batch_size, progress)[0]

    return prune

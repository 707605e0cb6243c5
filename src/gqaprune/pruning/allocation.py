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

from gqaprune.config.choices import ALLOCATION_CANDIDATES
from gqaprune.config.sections import PlanConfig
from gqaprune.models.modules import decoder_and_head
from gqaprune.pruning.plan import Plan, build_plan

CRITERIA = ("kl", "nll")

__all__ = ["CRITERIA", "DEFAULT_CANDIDATES", "Candidate", "DenseReference", "Selection", "heldout_criteria",
           "select_allocation"]


@dataclass(frozen=True)
class Candidate:
    """One allocation to try: a name and PlanConfig overrides (the ratio comes from the caller)."""

    name: str
    plan: dict = field(default_factory=dict)


#: The default candidate allocations (all with Taylor importance, per-kind prior normalisation).
DEFAULT_CANDIDATES: tuple[Candidate, ...] = tuple(Candidate(name, dict(plan))
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
    prune: PruneFn,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    criterion: str = "kl",
    batch_size: int = 8,
    keep_model: bool = False,
    log: Callable[[dict], None] | None = None,
    audit: dict[str, DenseReference] | None = None,
) -> Selection:
    """Build each candidate's plan at ``base.ratio``, prune a copy with ``prune``, keep the best by ``criterion``.

    Args:
        dense: the dense model (unchanged).
        scores, similarity, counts, num_layers: the plan's inputs (:func:`gqaprune.pruning.plan.build_plan`).
        base: plan settings shared by all candidates (ratio, importance, freezing, alignment...); each
            candidate's overrides replace those keys.
        heldout: held-out calibration windows ``[n, T]`` (or a ready :class:`DenseReference`).
        prune: ``prune(dense, plan) -> pruned model`` (a copy; e.g. one-shot least squares from
            precomputed statistics, or :func:`gqaprune.pruning.sequential_refit.sequential_prune`).
        candidates: allocations to try; a candidate whose plan cannot be built (e.g. it needs the
            similarity table and there is none) is skipped and reported with its error.
        criterion: ``"kl"`` (to the dense model) or ``"nll"`` (of the held-out text).
        keep_model: also return the chosen pruned model (saves pruning it again).
        audit: more held-out sets (e.g. other corpora's calibration splits); each candidate's KL and NLL
            on them are reported as ``<name>_kl`` / ``<name>_nll`` columns, never used for the choice.

    Returns:
        :class:`Selection`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if not candidates:
        raise ValueError("no candidate allocation to choose from")
    ref = heldout if isinstance(heldout, DenseReference) else dense_reference(dense, heldout, batch_size)
    rows, best = [], None
    for cand in candidates:
        t0 = time.perf_counter()
        row = {"candidate": cand.name, **{k: cand.plan.get(k) for k in ("strategy", "temperature", "tau")}}
        try:
            config = replace(base, **cand.plan)
            plan = build_plan(scores, similarity, counts, num_layers, config)
        except ValueError as exc:  # PlanError: e.g. no similarity table for a prior
            rows.append({**row, "error": str(exc)})
            continue
        model = prune(dense, plan)
        values = heldout_criteria(model, ref, batch_size)
        for name, extra in (audit or {}).items():
            v = heldout_criteria(model, extra, batch_size)
            row.update({f"{name}_kl": v["kl"], f"{name}_nll": v["nll"]})
        row.update(values, params_removed=plan.analysis["params_removed"],
                   removed_layers=len(plan.analysis["removed_layers"]), seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
        if log is not None:
            log(row)
        if best is None or values[criterion] < best[0]:
            best = (values[criterion], cand, config, plan, model if keep_model else None)
        del model
    if best is None:
        raise ValueError(f"no candidate could be planned: {[r.get('error') for r in rows]}")
    table = pd.DataFrame(rows)
    table["chosen"] = table["candidate"] == best[1].name
    return Selection(choice=best[1], config=best[2], plan=best[3], table=table, criterion=criterion, model=best[4])


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

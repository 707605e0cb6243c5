"""H-GSP: the hierarchical global structural pruning plan.

Every group of every non-frozen layer competes in one ranking::

    S_base  = importance / cost                       (importance per parameter)
    prior   = layer importance     if layer importance < tau   (layer-dominant layer)
              own block importance otherwise                   (block-dominant layer)
    S_final = S_base * ln(1 + prior) ** temperature            (temperature 0: M = 1)

and the lowest S_final are removed until the removed parameters reach ``ratio`` of the model's
parameters. ``ratio`` counts *all* parameters, embeddings and lm_head included (tied embeddings
once); the analysis reports the ratio over the prunable (decoder projection) parameters too.

Granularity: an attention group is one unit; MLP channels of a layer are taken lowest-first in
units of ``mlp_align`` channels, so every layer keeps a multiple of ``mlp_align`` channels (kernels
on GPUs run far slower on odd widths, SPEC.md). Units are taken in score order while they fit the
budget, skipping those that would overshoot, so the plan lands below the target by less than the
smallest unit's cost.

``epsilon``: a block left with fewer than ``epsilon`` of its groups is removed entirely and the
rest of the plan re-balanced (the highest-scored removals elsewhere are given back) so the target
still holds. A layer whose attention and MLP are both emptied is removed.

Options beyond SPEC.md (both measured on SmolLM2, see benchmarks/QUALITY.md):

* ``prior_norm="kind"`` (default) divides B = ln(1 + prior) by its mean over the layers for each
  kind (attention, MLP) before raising it to T. Attention blocks turn the residual stream far less
  than MLP blocks (1 - cos ~0.01 vs ~0.03), so the literal ``"none"`` multiplies every attention
  group by a ~3x smaller factor and empties attention wholesale; ``"kind"`` keeps the layer-wise
  shaping of the prior without that cross-kind bias.
* ``normalize="standardize"`` z-scores S_base within each block (layer x kind) before the global
  ranking, as FLAP does; ``"none"`` (default) ranks raw importance per parameter.

``strategy="uniform"`` removes the same fraction of attention groups and of MLP channels in every
non-frozen layer (the lowest-scored ones), the fraction chosen so the budget is met, then tops up
to the exact target with the lowest-scored remaining units (the LLM-Pruner / Wanda-sp allocation).

``strategy="layer"`` instead removes whole layers, least important (layer importance) first, the
number of layers whose parameters come closest to the target (the original's layer_pruning.py,
ShortGPT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from gqaprune.config.choices import METRICS, NORMALIZATIONS, PRIOR_NORMS, STRATEGIES
from gqaprune.config.rules import PlanError
from gqaprune.config.sections import PlanConfig
from gqaprune.models.units import ATTN, MLP, LayerKeep, ParamCounts

__all__ = ["NORMALIZATIONS", "PRIOR_NORMS", "STRATEGIES", "Plan", "PlanConfig", "PlanError", "build_plan",
           "check_target"]


@dataclass
class Plan:
    """A plan: the annotated group table, per-layer summary, what to keep and the analysis."""

    table: pd.DataFrame
    layers: pd.DataFrame
    keep: dict[int, LayerKeep]
    analysis: dict


def check_target(config: PlanConfig, counts: ParamCounts, num_layers: int, layer_costs: np.ndarray) -> int:
    """Validate settings and return the target in parameters; refuse unreachable targets with numbers."""
    config.validate()
    frozen = frozen_mask(num_layers, config)
    if frozen.all():
        raise PlanError(f"all {num_layers} layers are frozen (freeze_first_n_layers="
                        f"{config.freeze_first_n_layers}, freeze_last_n_layers={config.freeze_last_n_layers})")
    target = int(round(config.ratio * counts.total))
    available = int(layer_costs[~frozen].sum())
    if target > available:
        raise PlanError(
            f"plan.ratio={config.ratio} asks to remove {target:,} of {counts.total:,} parameters, but only "
            f"{available:,} are prunable outside the frozen layers ({available / counts.total:.1%} of the model); "
            "lower the ratio or freeze fewer layers" + ("" if config.prune_attention else
                                                       " (or set plan.prune_attention: true)")
        )
    return target


def frozen_mask(num_layers: int, config: PlanConfig) -> np.ndarray:
    """[num_layers] bool, True for frozen layers."""
    idx = np.arange(num_layers)
    return (idx < config.freeze_first_n_layers) | (idx >= num_layers - config.freeze_last_n_layers)


def resolve_tau(config: PlanConfig, layer_importance: np.ndarray) -> float:
    """tau as given, or the 25th percentile of layer importance when unset."""
    if config.tau is not None:
        return float(config.tau)
    return float(np.percentile(layer_importance, 25))


def _priors(table: pd.DataFrame, sim: pd.DataFrame | None, config: PlanConfig, num_layers: int):
    """Per-group prior and multiplier M, per-layer mode, and tau (None without similarity)."""
    if config.temperature == 0 or sim is None:
        if config.temperature > 0:
            raise PlanError("plan.temperature > 0 needs the similarity table (layer/block importance)")
        ones = np.ones(len(table))
        return np.full(len(table), np.nan), ones, np.array(["none"] * num_layers), None
    sim = sim.set_index("layer").reindex(range(num_layers))
    if sim.isna().any().any():
        raise PlanError("the similarity table does not cover every layer of the scored model")
    layer_imp = sim["layer_importance"].to_numpy()
    tau = resolve_tau(config, layer_imp)
    layer_dominant = layer_imp < tau
    layers = table["layer"].to_numpy()
    is_attn = (table["kind"] == ATTN).to_numpy()
    block_imp = np.where(is_attn, sim["attn_importance"].to_numpy()[layers], sim["mlp_importance"].to_numpy()[layers])
    prior = np.where(layer_dominant[layers], layer_imp[layers], block_imp)
    prior = np.clip(prior, 0.0, None)  # 1 - cos is >= 0 up to rounding
    base = np.log1p(prior)
    if config.prior_norm == "kind":
        for kind_mask in (is_attn, ~is_attn):
            per_layer = pd.Series(base[kind_mask]).groupby(layers[kind_mask]).first()
            scale = per_layer.mean() if len(per_layer) else 1.0
            base[kind_mask] = base[kind_mask] / max(scale, 1e-12)
    multiplier = base ** config.temperature
    mode = np.where(layer_dominant, "layer", "block")
    return prior, multiplier, mode, tau


def _units(table: pd.DataFrame, eligible: np.ndarray, align: int):
    """Group the eligible rows into pruning units; returns (unit id per row or -1, unit cost, unit score).

    Attention groups are one unit each; a layer's MLP channels are sorted by score and cut into
    consecutive runs of ``align`` channels (the last run of a layer may be shorter only if the width
    is not a multiple of ``align``).
    """
    unit_of = np.full(len(table), -1, dtype=np.int64)
    score = table["score"].to_numpy()
    cost = table["cost"].to_numpy()
    rows = np.flatnonzero(eligible)
    attn_rows = rows[(table["kind"].to_numpy()[rows] == ATTN)]
    unit_of[attn_rows] = np.arange(len(attn_rows))
    next_id = len(attn_rows)
    mlp = table.iloc[rows][table["kind"].to_numpy()[rows] == MLP]
    for _, block in mlp.groupby("layer", sort=True):
        r = block.index.to_numpy()
        order = r[np.lexsort((block["index"].to_numpy(), score[r]))]  # ascending score, ties by index
        chunks = np.arange(len(order)) // align
        unit_of[order] = next_id + chunks
        next_id += int(chunks[-1]) + 1
    valid = unit_of >= 0
    unit_cost = np.bincount(unit_of[valid], weights=cost[valid], minlength=next_id)
    unit_sum = np.bincount(unit_of[valid], weights=score[valid], minlength=next_id)
    unit_n = np.bincount(unit_of[valid], minlength=next_id)
    return unit_of, unit_cost.astype(np.int64), unit_sum / np.maximum(unit_n, 1)


def _fill(order: np.ndarray, unit_cost: np.ndarray, target: int, forced: np.ndarray) -> np.ndarray:
    """Take ``forced`` units, then units in ``order`` while they fit under ``target``; returns a bool mask."""
    taken = forced.copy()
    removed = int(unit_cost[taken].sum())
    smallest = int(unit_cost.min()) if len(unit_cost) else 0
    for u in order:
        if taken[u]:
            continue
        if target - removed < smallest:
            break
        c = int(unit_cost[u])
        if removed + c <= target:
            taken[u] = True
            removed += c
    return taken


def _collapse_blocks(table: pd.DataFrame, pruned: np.ndarray, epsilon: float) -> set[tuple[int, str]]:
    """Blocks that keep some but fewer than ``epsilon`` of their groups."""
    if epsilon <= 0:
        return set()
    frame = pd.DataFrame({"layer": table["layer"], "kind": table["kind"].astype(str), "kept": ~pruned})
    stats = frame.groupby(["layer", "kind"]).agg(total=("kept", "size"), kept=("kept", "sum"))
    low = stats[(stats["kept"] > 0) & (stats["kept"] < epsilon * stats["total"])]
    return {(int(layer), kind) for layer, kind in low.index}


def build_plan(scores: pd.DataFrame, similarity: pd.DataFrame | None, counts: ParamCounts, num_layers: int,
               config: PlanConfig) -> Plan:
    """Compute the plan from a scored group table (``score_groups``) and the similarity table."""
    config.validate()
    if config.importance not in scores.columns:
        raise PlanError(f"the importance table has no {config.importance!r} column "
                        f"(it has {[c for c in scores.columns if c in METRICS]}); score with that metric")
    table = scores[["layer", "kind", "index", "cost", config.importance]].rename(
        columns={config.importance: "importance"}).reset_index(drop=True)
    if not np.isfinite(table["importance"]).all():
        raise PlanError(f"the {config.importance!r} importance column holds NaN or infinite values")
    layer_costs = np.bincount(table["layer"], weights=table["cost"], minlength=num_layers)
    # plan.prune_attention: false keeps every attention group (the group strategies only see MLP channels)
    kept_kind = (table["kind"] != MLP).to_numpy() if not config.prune_attention and config.strategy != "layer" \
        else np.zeros(len(table), dtype=bool)
    prunable = np.bincount(table["layer"][~kept_kind], weights=table["cost"][~kept_kind], minlength=num_layers)
    target = check_target(config, counts, num_layers, prunable)
    frozen = frozen_mask(num_layers, config)
    table["frozen"] = frozen[table["layer"].to_numpy()]
    table["protected"] = kept_kind
    prior, multiplier, mode, tau = _priors(table, similarity, config, num_layers)
    table["prior"] = prior
    table["score"] = _base_scores(table, config) * multiplier

    if config.strategy == "layer":
        if similarity is None:
            raise PlanError("plan.strategy 'layer' needs the similarity table (layer importance)")
        pruned = _layer_removal(table, similarity, layer_costs, frozen, target)
    elif config.strategy == "uniform":
        pruned = _uniform_select(table, config, target)
    else:
        pruned = _hgsp_select(table, config, target)
    table["pruned"] = pruned
    return _finish(table.drop(columns="protected"), counts, num_layers, config, target, tau, mode)


def _base_scores(table: pd.DataFrame, config: PlanConfig) -> np.ndarray:
    """S_base = importance / cost, optionally standardised within each block (layer x kind)."""
    base = (table["importance"] / table["cost"]).to_numpy(dtype=np.float64)
    if config.normalize == "standardize":
        keys = table["layer"].astype(np.int64).to_numpy() * 2 + (table["kind"] == MLP).to_numpy()
        frame = pd.Series(base).groupby(keys)
        std = frame.transform("std").fillna(0.0).to_numpy()
        base = (base - frame.transform("mean").to_numpy()) / np.where(std > 0, std, 1.0)
    return base


def _uniform_select(table: pd.DataFrame, config: PlanConfig, target: int) -> np.ndarray:
    """Same fraction of groups per layer and kind (lowest scores first), then an exact top-up."""
    eligible = ~(table["frozen"].to_numpy() | table["protected"].to_numpy())
    unit_of, unit_cost, unit_score = _units(table, eligible, config.mlp_align)
    valid = unit_of >= 0
    # per block: its units in ascending score order
    blocks: dict[tuple[int, str], list[int]] = {}
    unit_block = {}
    layers, kinds = table["layer"].to_numpy(), table["kind"].astype(str).to_numpy()  # numpy: no per-row pandas
    for row in np.flatnonzero(valid):
        unit_block.setdefault(int(unit_of[row]), (int(layers[row]), str(kinds[row])))
    for u in sorted(unit_block, key=lambda u: (unit_score[u], u)):
        blocks.setdefault(unit_block[u], []).append(u)

    def take(fraction: float) -> np.ndarray:
        taken = np.zeros(len(unit_cost), dtype=bool)
        for units in blocks.values():
            taken[units[: int(round(fraction * len(units)))]] = True
        return taken

    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on the fraction: removed parameters grow with it
        mid = (lo + hi) / 2
        if unit_cost[take(mid)].sum() <= target:
            lo = mid
        else:
            hi = mid
    order = np.lexsort((np.arange(len(unit_cost)), unit_score))
    taken = _fill(order, unit_cost, target, take(lo))
    pruned = np.zeros(len(table), dtype=bool)
    pruned[valid] = taken[unit_of[valid]]
    return pruned


def _hgsp_select(table: pd.DataFrame, config: PlanConfig, target: int) -> np.ndarray:
    """Global selection over units with epsilon collapse and re-balancing."""
    eligible = ~(table["frozen"].to_numpy() | table["protected"].to_numpy())
    unit_of, unit_cost, unit_score = _units(table, eligible, config.mlp_align)
    n_units = len(unit_cost)
    # deterministic order: ascending score, ties by unit id (itself ordered by layer/kind/index)
    order = np.lexsort((np.arange(n_units), unit_score))
    valid = unit_of >= 0
    collapsed: set[tuple[int, str]] = set()
    layer_kind = list(zip(table["layer"].to_numpy(), table["kind"].astype(str).to_numpy(), strict=True))
    while True:
        forced = np.zeros(n_units, dtype=bool)
        if collapsed:
            in_collapsed = np.array([lk in collapsed for lk in layer_kind]) & valid
            forced[unit_of[in_collapsed]] = True
        taken = _fill(order, unit_cost, target, forced)
        pruned = np.zeros(len(table), dtype=bool)
        pruned[valid] = taken[unit_of[valid]]
        new = _collapse_blocks(table, pruned, config.epsilon) - collapsed
        if not new:
            return pruned
        collapsed |= new


def _layer_removal(table, similarity, layer_costs, frozen, target) -> np.ndarray:
    """Remove the least important whole layers whose summed cost comes closest to the target."""
    imp = similarity.set_index("layer")["layer_importance"].reindex(range(len(layer_costs))).to_numpy()
    candidates = [i for i in np.lexsort((np.arange(len(imp)), imp)) if not frozen[i]]
    removed, best, best_gap = 0, 0, target
    for n, layer in enumerate(candidates, start=1):
        removed += layer_costs[layer]
        if abs(target - removed) < best_gap:
            best, best_gap = n, abs(target - removed)
    drop = set(candidates[:best])
    return table["layer"].isin(drop).to_numpy()


def _finish(table, counts: ParamCounts, num_layers: int, config: PlanConfig, target: int, tau, mode) -> Plan:
    """Derive keep lists, the per-layer summary and the analysis from the pruned flags."""
    keep: dict[int, LayerKeep] = {}
    rows = []
    for layer in range(num_layers):
        sub = table[table["layer"] == layer]
        kept = {kind: sorted(sub.loc[(sub["kind"] == kind) & ~sub["pruned"], "index"].astype(int).tolist())
                for kind in (ATTN, MLP)}
        total = {kind: int((sub["kind"] == kind).sum()) for kind in (ATTN, MLP)}
        if any(len(kept[k]) != total[k] for k in (ATTN, MLP)):
            keep[layer] = LayerKeep(attn=kept[ATTN], mlp=kept[MLP])
        layer_removed = total[ATTN] + total[MLP] > 0 and not kept[ATTN] and not kept[MLP]
        rows.append({
            "layer": layer, "mode": str(mode[layer]), "frozen": bool(sub["frozen"].any()),
            "attn_groups": total[ATTN], "attn_kept": len(kept[ATTN]),
            "mlp_channels": total[MLP], "mlp_kept": len(kept[MLP]),
            "attn_removed": total[ATTN] > 0 and not kept[ATTN],
            "mlp_removed": total[MLP] > 0 and not kept[MLP],
            "layer_removed": layer_removed,
            "params_removed": int(sub.loc[sub["pruned"], "cost"].sum()),
        })
    layers = pd.DataFrame(rows)
    # a removed layer also takes its norms, which belong to no group
    group_removed = int(table.loc[table["pruned"], "cost"].sum())
    removed = group_removed + int(layers["layer_removed"].sum()) * counts.layer_extra
    analysis = {
        "config": asdict(config),
        "tau_used": tau,
        "params_before": counts.total,
        "params_after": counts.total - removed,
        "embedding_params": counts.embeddings,
        "prunable_params_before": counts.prunable,
        "prunable_params_after": counts.prunable - group_removed,
        "target_params_removed": target,
        "params_removed": removed,
        "ratio_total": removed / counts.total,
        "ratio_prunable": group_removed / counts.prunable,
        "ratio_counts_embeddings": True,
        "groups_removed": {k: int(((table["kind"] == k) & table["pruned"]).sum()) for k in (ATTN, MLP)},
        "removed_layers": layers.loc[layers["layer_removed"], "layer"].astype(int).tolist(),
        "removed_attention_blocks": layers.loc[layers["attn_removed"], "layer"].astype(int).tolist(),
        "removed_mlp_blocks": layers.loc[layers["mlp_removed"], "layer"].astype(int).tolist(),
        "per_layer": {
            int(r.layer): {"attn_kept": int(r.attn_kept), "attn_groups": int(r.attn_groups),
                           "mlp_kept": int(r.mlp_kept), "mlp_channels": int(r.mlp_channels), "mode": r.mode}
            for r in layers.itertuples()
        },
    }
    return Plan(table=table, layers=layers, keep=keep, analysis=analysis)

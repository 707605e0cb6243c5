"""Stage ``plan``: the H-GSP plan (plan.json), the global group table, layer summary, pruning_analysis.json.

Torch-free: the planner works on the score and similarity tables alone. It refuses tables computed
for another model than the one prepare recorded, or on other calibration samples than those in
``artifacts/calibration``, and an allocation chosen on other tables, before writing anything;
``plan.json`` records the ids of everything it was made from.
"""

from __future__ import annotations

import dataclasses
import logging

from gqaprune.config.loading import coerce_fields
from gqaprune.config.sections import Params, PlanConfig
from gqaprune.models.units import ParamCounts
from gqaprune.pipeline.artifacts import (
    ArtifactMismatchError,
    StageOutputs,
    check_fingerprint,
    read_table,
    write_csv,
    write_table,
)
from gqaprune.pipeline.inputs import check_inputs, input_ids, model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.plots import plot_kept_fraction
from gqaprune.pipeline.stages import ALLOCATE_DIR, PLAN_DIR, SCORES, SIMILARITY
from gqaprune.pruning.plan import build_plan
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import read_json, write_json

log = logging.getLogger("gqaprune")


def _selected_config(params: Params, fp: str) -> tuple[PlanConfig, str]:
    """The plan section with the allocation the allocate stage chose, and its name (refused when made for
    another model or ratio)."""
    allocation = read_json(ALLOCATE_DIR / "allocation.json")
    check_fingerprint(allocation, fp, f"allocation choice {ALLOCATE_DIR / 'allocation.json'}")
    check_inputs(allocation.get("inputs"), f"allocation choice {ALLOCATE_DIR / 'allocation.json'}", "allocate",
                 ("model", "calibration", "scores", "similarity"), required=False)
    if allocation.get("mode") != params.allocate.mode:
        raise ArtifactMismatchError(f"{ALLOCATE_DIR / 'allocation.json'} was made with allocate.mode="
                                    f"{allocation.get('mode')}, not {params.allocate.mode}; re-run allocate")
    if allocation.get("ratio") != params.plan.ratio:
        raise ArtifactMismatchError(f"the allocation in {ALLOCATE_DIR / 'allocation.json'} was chosen for plan.ratio="
                                    f"{allocation.get('ratio')}, not {params.plan.ratio}; re-run allocate")
    overrides = coerce_fields(PlanConfig, allocation.get("overrides") or {}, "allocation")
    config = dataclasses.replace(params.plan, **overrides)
    config.validate()
    # an automatic choice was made for the other plan settings too (the ratio, the importance, freezing...)
    chosen_with = coerce_fields(PlanConfig, allocation.get("plan") or {}, "allocation")
    if allocation.get("mode") == "auto" and chosen_with and chosen_with != {
            k: v for k, v in dataclasses.asdict(config).items() if k in chosen_with}:
        raise ArtifactMismatchError(f"the allocation in {ALLOCATE_DIR / 'allocation.json'} was chosen for other "
                                    "plan settings than the plan section's; re-run allocate")
    chosen = allocation.get("chosen") or "fixed"
    if chosen != "fixed":
        log.info("plan: allocation %s chosen by allocate (%s)", chosen, overrides)
    return config, chosen


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Plan from the scores (and similarity, when the settings use it) of the prepared model."""
    timer = Timer()
    fp = model_meta()["fingerprint"]
    cfg, allocation = _selected_config(params, fp)
    scores, meta = read_table(SCORES)
    check_fingerprint(meta, fp, f"importance table {SCORES}")
    check_inputs(meta.get("inputs"), f"importance table {SCORES}", "score", ("model", "calibration"))
    used = ["scores", "allocation"]
    sim = None
    if cfg.needs_similarity:
        sim, sim_meta = read_table(SIMILARITY)
        check_fingerprint(sim_meta, fp, f"similarity table {SIMILARITY}")
        check_inputs(sim_meta.get("inputs"), f"similarity table {SIMILARITY}", "similarity", ("model", "calibration"))
        used.append("similarity")
    counts = ParamCounts(**meta["param_counts"])
    result = build_plan(scores, sim, counts, int(meta["num_layers"]), cfg)
    keep = {str(layer): dataclasses.asdict(k) for layer, k in result.keep.items()}
    inputs = {"model": fp, "calibration": meta["inputs"]["calibration"], **input_ids(*used)}
    plan_doc = {"fingerprint": fp, "inputs": inputs, "allocation": allocation, "params": dataclasses.asdict(cfg),
                "keep": keep}
    write_json(out(PLAN_DIR / "plan.json"), plan_doc)
    table = result.table.copy()
    table["kind"] = table["kind"].astype(str)
    write_table(out(PLAN_DIR / "global_group_table.parquet"), table, {"fingerprint": fp})
    write_csv(out(PLAN_DIR / "global_group_table.csv"), table)
    write_csv(out(PLAN_DIR / "layer_summary.csv"), result.layers)
    write_json(out(PLAN_DIR / "pruning_analysis.json"), {**result.analysis, "allocation": allocation,
                                                         "fingerprint": fp})
    plot_kept_fraction(result.layers, out)
    a = result.analysis
    stage_metrics(out, "plan", timer, {
        "params_before": a["params_before"], "params_after": a["params_after"],
        "ratio_total": round(a["ratio_total"], 5), "ratio_prunable": round(a["ratio_prunable"], 5),
        "removed_layers": len(a["removed_layers"]),
    })
    log.info("plan: remove %s of %s parameters (%.2f%% total, %.2f%% prunable)", f"{a['params_removed']:,}",
             f"{a['params_before']:,}", 100 * a["ratio_total"], 100 * a["ratio_prunable"])

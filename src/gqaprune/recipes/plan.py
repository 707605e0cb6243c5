"""Stage ``plan``: the H-GSP plan (plan.json), the global group table, layer summary, pruning_analysis.json.

Torch-free: the planner works on the score and similarity tables alone. It refuses tables computed
for another model than the one prepare recorded, before writing anything.
"""

from __future__ import annotations

import dataclasses
import logging

from ..artifacts import StageOutputs, check_fingerprint, read_table, write_csv, write_json, write_table
from ..distributed import DistContext
from ..params import Params
from ..plan import build_plan
from ..plots import plot_kept_fraction
from ..schema import ParamCounts
from . import PLAN_DIR, SCORES, SIMILARITY
from .records import Timer, model_meta, stage_metrics

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Plan from the scores (and similarity, when the settings use it) of the prepared model."""
    timer = Timer()
    cfg = params.plan
    fp = model_meta()["fingerprint"]
    scores, meta = read_table(SCORES)
    check_fingerprint(meta, fp, f"importance table {SCORES}")
    sim = None
    if cfg.needs_similarity:
        sim, sim_meta = read_table(SIMILARITY)
        check_fingerprint(sim_meta, fp, f"similarity table {SIMILARITY}")
    counts = ParamCounts(**meta["param_counts"])
    result = build_plan(scores, sim, counts, int(meta["num_layers"]), cfg)
    keep = {str(layer): dataclasses.asdict(k) for layer, k in result.keep.items()}
    plan_doc = {"fingerprint": fp, "params": dataclasses.asdict(cfg), "keep": keep}
    write_json(out(PLAN_DIR / "plan.json"), plan_doc)
    table = result.table.copy()
    table["kind"] = table["kind"].astype(str)
    write_table(out(PLAN_DIR / "global_group_table.parquet"), table, {"fingerprint": fp})
    write_csv(out(PLAN_DIR / "global_group_table.csv"), table)
    write_csv(out(PLAN_DIR / "layer_summary.csv"), result.layers)
    write_json(out(PLAN_DIR / "pruning_analysis.json"), {**result.analysis, "fingerprint": fp})
    plot_kept_fraction(result.layers, out)
    a = result.analysis
    stage_metrics(out, "plan", timer, {
        "params_before": a["params_before"], "params_after": a["params_after"],
        "ratio_total": round(a["ratio_total"], 5), "ratio_prunable": round(a["ratio_prunable"], 5),
        "removed_layers": len(a["removed_layers"]),
    })
    log.info("plan: remove %s of %s parameters (%.2f%% total, %.2f%% prunable)", f"{a['params_removed']:,}",
             f"{a['params_before']:,}", 100 * a["ratio_total"], 100 * a["ratio_prunable"])

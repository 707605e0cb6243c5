"""Stage ``score``: importance of every group, all requested metrics in one pass, one Parquet table."""

from __future__ import annotations

import dataclasses

from gqaprune.config.sections import Params
from gqaprune.pipeline.artifacts import StageOutputs, write_table
from gqaprune.pipeline.inputs import load_dense_and_calibration
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import SCORES
from gqaprune.pruning.importance import score_groups
from gqaprune.runtime.distributed import DistContext


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Score the dense model on the calibration samples; the table records model and params."""
    timer = Timer()
    s = params.score
    model, fp, meta, samples, cal_meta = load_dense_and_calibration(params, s, ctx, timer)
    with timer.phase("score"):
        table = score_groups(model, samples, metrics=s.metrics, gradient_batch_size=s.gradient_batch_size,
                             gradient_checkpointing=s.gradient_checkpointing, ctx=ctx)
    if not ctx.is_main:  # every rank has the table; the main rank writes it
        return
    provenance = {"fingerprint": fp, "inputs": {"model": fp, "calibration": cal_meta["id"]},
                  "params": dataclasses.asdict(s), "calibration": cal_meta,
                  "param_counts": meta["params"], "num_layers": meta["geometry"]["num_layers"]}
    write_table(out(SCORES), table, provenance)
    stage_metrics(out, "score", timer, {"groups": len(table)}, ctx)

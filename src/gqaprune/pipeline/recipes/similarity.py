"""Stage ``similarity``: layer and block importance (1 - cos), one Parquet table and its plot."""

from __future__ import annotations

import dataclasses

from gqaprune.config.sections import Params
from gqaprune.pipeline.artifacts import StageOutputs, write_table
from gqaprune.pipeline.inputs import load_dense_and_calibration
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.plots import plot_importance
from gqaprune.pipeline.stages import SIMILARITY
from gqaprune.pruning.similarity import block_similarity
from gqaprune.runtime.distributed import DistContext


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Forward passes of the dense model over the calibration samples."""
    timer = Timer()
    s = params.similarity
    model, fp, _, samples, cal_meta = load_dense_and_calibration(params, s, ctx, timer)
    with timer.phase("similarity"):
        table = block_similarity(model, samples, batch_size=s.batch_size, ctx=ctx)
    if not ctx.is_main:  # every rank has the table; the main rank writes it
        return
    with timer.phase("write"):
        write_table(out(SIMILARITY), table, {"fingerprint": fp, "inputs": {"model": fp, "calibration": cal_meta["id"]},
                                             "params": dataclasses.asdict(s), "calibration": cal_meta})
        plot_importance(table, out)
    stage_metrics(out, "similarity", timer, ctx=ctx)

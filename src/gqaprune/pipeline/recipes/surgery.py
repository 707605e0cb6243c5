"""Stage ``surgery``: slice the dense model by the plan, refit output projections, save the checkpoint.

The plan must have been made for the prepared model and (when the refit uses them) the calibration
samples in ``artifacts/calibration``. The checkpoint's ``gqaprune_model.json`` records its own
fingerprint and the ids it was made from (dense model, plan, calibration): what finetune, evaluate and
export check.
"""

from __future__ import annotations

import dataclasses
import logging

from gqaprune.config.sections import Params
from gqaprune.export.model_card import card_for_checkpoint, write_model_card
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.units import LayerKeep
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import (
    check_inputs,
    input_ids,
    load_calibration,
    load_dense,
    write_checkpoint_record,
)
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import MODEL_DIR, PLAN_DIR, PRUNED_DIR
from gqaprune.pruning.compensation import compensate
from gqaprune.pruning.surgery import pruned_layout, save_pruned
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import read_json

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Apply plan.json to the prepared model (it must be the model the plan was made for).

    The dense model is left as it is: the pruned checkpoint is built one decoder layer at a time
    (on N ranks gathered on the main rank, which writes it; the refits solved by their owner ranks).
    """
    from transformers import AutoTokenizer

    timer = Timer()
    s = params.surgery
    doc = read_json(PLAN_DIR / "plan.json")
    reads = ("model",) if s.compensation == "none" else ("model", "calibration")
    check_inputs(doc.get("inputs"), f"plan {PLAN_DIR / 'plan.json'}", "score, similarity, allocate and plan", reads)
    inputs = input_ids(*reads, "plan")
    with timer.phase("load"):
        model, fp, meta = load_dense(params, s, ctx)
    keep = {int(layer): LayerKeep(**k) for layer, k in doc["keep"].items()}
    replacements, done = None, None
    if s.compensation == "sequential":
        model, done = _sequential(model, keep, fp, s, ctx, timer)
        keep = {}  # the model is pruned already: it is saved as it is
    elif s.compensation != "none":
        samples, _ = load_calibration(fp)
        with timer.phase("compensation"):
            replacements = compensate(model, keep, samples, s.compensation, s.ridge, s.batch_size, ctx=ctx)
        log.info("compensation %s: refitted %d output projections", s.compensation, len(replacements.owners))
    layout = pruned_layout(model, keep, replacements)  # on the meta device: config, report, shapes
    report = done or layout.report
    adapter = get_adapter(layout.model.config)
    counts = parameter_counts(layout.model, adapter, adapter.geometry(layout.model.config))
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    info = {"source_fingerprint": fp, "plan": doc["params"], "allocation": doc.get("allocation"),
            "surgery": dataclasses.asdict(s),
            "removed_layers": report.removed_layers,
            "params_before": meta["params"]["total"], "params_after": counts.total}
    with timer.phase("save"):
        save_pruned(model, tokenizer, out(PRUNED_DIR), info, keep, replacements, ctx, layout_=layout)
    if ctx.is_main:
        with timer.phase("fingerprint"):
            write_checkpoint_record(out(PRUNED_DIR), inputs)
        write_model_card(out(PRUNED_DIR), card_for_checkpoint(out(PRUNED_DIR), base_model=meta.get("base_model")
                                                              or "unknown", kind="pruned", name=PRUNED_DIR.name))
    log.info("pruned model: %s parameters, %d layers (removed %s), standard config: %s",
             f"{counts.total:,}", len(report.kept_layers), report.removed_layers, report.uniform)
    if ctx.is_main:
        stage_metrics(out, "surgery", timer, {"params_after": counts.total, "layers_after": len(report.kept_layers)},
                      ctx)


def _sequential(model, keep: dict, fp: str, s, ctx: DistContext, timer: Timer):
    """(The dense model pruned by ``keep`` with layer-by-layer compensation, its report); one process."""
    from gqaprune.errors import InputError
    from gqaprune.pruning.sequential_refit import sequential_prune

    if ctx.is_distributed:
        raise InputError("surgery.compensation: sequential runs on one process; use lstsq on several")
    samples, _ = load_calibration(fp)
    with timer.phase("compensation"):
        return sequential_prune(model, keep, samples, s.ridge, batch_size=s.batch_size, progress=False)

"""Stage ``surgery``: slice the dense model by the plan, refit output projections, save the checkpoint."""

from __future__ import annotations

import dataclasses
import logging

from ..adapters import get_adapter
from ..artifacts import ArtifactMismatchError, StageOutputs, read_json
from ..compensation import compensate
from ..groups import parameter_counts
from ..params import Params
from ..schema import LayerKeep
from ..surgery import prune_model, save_pruned
from . import MODEL_DIR, PLAN_DIR, PRUNED_DIR
from .common import load_calibration, load_dense
from .records import Timer, stage_metrics

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs) -> None:
    """Apply plan.json to the prepared model (it must be the model the plan was made for)."""
    from transformers import AutoTokenizer

    timer = Timer()
    s = params.surgery
    doc = read_json(PLAN_DIR / "plan.json")
    with timer.phase("load"):
        model, fp, meta = load_dense(s.dtype, s.device)
    if doc.get("fingerprint") != fp:
        raise ArtifactMismatchError(f"plan {PLAN_DIR / 'plan.json'} was made for model {doc.get('fingerprint')}, "
                                    f"not for {MODEL_DIR} ({fp}); re-run score and plan")
    keep = {int(layer): LayerKeep(**k) for layer, k in doc["keep"].items()}
    replacements = {}
    if s.compensation != "none":
        samples, _ = load_calibration(fp)
        with timer.phase("compensation"):
            replacements = compensate(model, keep, samples, s.compensation, s.ridge, s.batch_size)
        log.info("compensation %s: refitted %d output projections", s.compensation, len(replacements))
    with timer.phase("slice"):
        report = prune_model(model, keep, replacements)
    adapter = get_adapter(model.config)
    counts = parameter_counts(model, adapter, adapter.geometry(model.config))
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    info = {"source_fingerprint": fp, "plan": doc["params"], "surgery": dataclasses.asdict(s),
            "removed_layers": report.removed_layers,
            "params_before": meta["params"]["total"], "params_after": counts.total}
    with timer.phase("save"):
        save_pruned(model, tokenizer, out(PRUNED_DIR), info)
    log.info("pruned model: %s parameters, %d layers (removed %s), standard config: %s",
             f"{counts.total:,}", len(report.kept_layers), report.removed_layers, report.uniform)
    stage_metrics(out, "surgery", timer, {"params_after": counts.total, "layers_after": len(report.kept_layers)})

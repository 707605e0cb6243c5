"""Stage ``allocate``: choose the allocation for ``plan.ratio`` on held-out calibration windows.

With ``allocate.mode: auto`` every candidate allocation is planned at the requested ratio and the
dense model is pruned with each, compensated as ``surgery`` will, all candidates advancing together
layer by layer (:mod:`gqaprune.pruning.layerwise_eval`; no model copy); the candidate closest to the
dense model on the held-out windows of every configured corpus wins (``allocate.criterion``), after a
first round on a third of the windows drops the clearly worse ones. ``allocation.json`` records the
effective plan settings (the plan section with the winner's overrides applied), which the plan stage
applies, so ``plan`` itself stays a pure table-to-plan step. ``fixed`` records the plan section as
written. The artifact holds the choice and every candidate's criterion values (no timings: those are
metrics).
"""

from __future__ import annotations

import dataclasses
import logging

from gqaprune.config.choices import ALLOCATION_CANDIDATES
from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.models.units import ParamCounts
from gqaprune.pipeline.artifacts import ArtifactMismatchError, StageOutputs, check_fingerprint, read_table, write_csv
from gqaprune.pipeline.inputs import check_inputs, input_ids, model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import ALLOCATE_DIR, SCORES, SIMILARITY
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import write_json

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Write artifacts/allocate/allocation.json (and candidates.csv with every candidate's values)."""
    timer = Timer()
    sel = params.allocate
    fp = model_meta()["fingerprint"]
    reads = () if sel.mode == "fixed" else ("calibration", "heldout", "scores", "similarity")
    doc = {"fingerprint": fp, "mode": sel.mode, "criterion": sel.criterion, "ratio": params.plan.ratio,
           "inputs": input_ids("model", *reads)}
    if sel.mode == "fixed":
        write_json(out(ALLOCATE_DIR / "allocation.json"), {**doc, "chosen": "fixed",
                                                        "plan": dataclasses.asdict(params.plan), "overrides": {}})
        write_csv(out(ALLOCATE_DIR / "candidates.csv"), _empty_table())
        stage_metrics(out, "allocate", timer, {"mode": "fixed"})
        return
    if params.surgery.compensation == "sequential":
        raise InputError("allocate.mode: auto prunes each candidate with one-shot compensation; with "
                         "surgery.compensation: sequential set allocate.mode: fixed")
    scores, meta = read_table(SCORES)
    check_fingerprint(meta, fp, f"importance table {SCORES}")
    check_inputs(meta.get("inputs"), f"importance table {SCORES}", "score", ("model", "calibration"))
    sim, sim_meta = read_table(SIMILARITY)
    check_fingerprint(sim_meta, fp, f"similarity table {SIMILARITY}")
    check_inputs(sim_meta.get("inputs"), f"similarity table {SIMILARITY}", "similarity", ("model", "calibration"))
    chosen = _choose(params, scores, sim, ParamCounts(**meta["param_counts"]), int(meta["num_layers"]), fp, timer)
    write_json(out(ALLOCATE_DIR / "allocation.json"), {**doc, "chosen": chosen["name"], "plan": chosen["plan"],
                                                    "overrides": chosen["overrides"], "candidates": chosen["rows"]})
    write_csv(out(ALLOCATE_DIR / "candidates.csv"), chosen["table"])
    log.info("allocate: %s (%s %.4f)", chosen["name"], sel.criterion, chosen["value"])
    stage_metrics(out, "allocate", timer, {"mode": "auto", "chosen": chosen["name"],
                                         sel.criterion: round(chosen["value"], 5)})


def _choose(params: Params, scores, sim, counts: ParamCounts, num_layers: int, fp: str, timer: Timer) -> dict:
    """Measure the candidates on the dense model; the chosen one's name, effective plan and the table."""
    import torch

    from gqaprune.pipeline.inputs import load_calibration, load_dense, load_heldout
    from gqaprune.pruning.allocation import Candidate, select_allocation

    sel, s = params.allocate, params.surgery
    _check_memory(params, counts)
    with timer.phase("load"):
        dense, model_fp, _ = load_dense(params, sel, _one_process())
        if model_fp != fp:
            raise ArtifactMismatchError("the model changed while allocate ran; re-run prepare")
        samples, _ = load_calibration(fp)
        heldout, groups = load_heldout(fp)
    candidates = [Candidate(name, dict(ALLOCATION_CANDIDATES[name])) for name in sel.candidates]
    with timer.phase("candidates"), torch.inference_mode():
        result = select_allocation(dense, scores, sim, counts, num_layers, params.plan, heldout, None, candidates,
                                   sel.criterion, sel.batch_size, log=lambda row: log.info("candidate %s", row),
                                   calibration=samples, method=s.compensation, ridge=s.ridge,
                                   window_groups=groups)
    table = result.table
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in table.to_dict("records")]
    value = float(table.loc[table["chosen"], sel.criterion].iloc[0])
    return {"name": result.choice.name, "overrides": dict(result.choice.plan),
            "plan": dataclasses.asdict(result.config), "rows": rows, "table": table, "value": value}


def _check_memory(params: Params, counts: ParamCounts) -> None:
    """Refuse, before loading, a model that the layer-by-layer candidate passes cannot hold on the device.

    What the stage holds: the dense weights, the calibration stream, the dense and every candidate's
    held-out stream (all ``[windows, seq_len, hidden]`` in the model's dtype), one layer's float64 Gram
    matrices and a chunk of LM-head logits; the statistics kept between the two halving rounds are
    only kept when they fit.
    """
    import torch

    from gqaprune.pipeline.inputs import model_meta
    from gqaprune.runtime.devices import available_host_bytes, resolve_device, torch_dtype

    sel, c = params.allocate, params.calibrate
    geometry = model_meta()["geometry"]
    hidden, inter, vocab = geometry["hidden_size"], geometry["intermediate_size"], geometry["vocab_size"]
    width = torch.tensor([], dtype=torch_dtype(sel.dtype)).element_size()
    heldout = c.heldout_windows * (2 if c.heldout_datasets == "auto" else max(len(c.heldout_datasets), 1))
    streams = (c.n_samples + heldout * (2 + len(sel.candidates))) * c.seq_len * hidden * width
    need = counts.total * width + streams + 8 * (inter ** 2 + hidden ** 2) * 2 + 4 * 512 * vocab * 4
    device = resolve_device(sel.device)
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else available_host_bytes()
    if need > 0.9 * have:
        where = str(device) if device.type == "cuda" else "this host's available memory"
        raise InputError(f"allocate.mode: auto needs about {need / 2**30:.1f} GiB ({counts.total:,} parameters in "
                         f"{sel.dtype} plus the candidates' held-out streams), more than {where} "
                         f"({have / 2**30:.1f} GiB); set allocate.dtype: bfloat16, fewer allocate.candidates or "
                         "calibrate.heldout_windows, or allocate.mode: fixed")


def _one_process():
    from gqaprune.runtime.distributed import single_process

    return single_process()


def _empty_table():
    import pandas as pd

    return pd.DataFrame(columns=["candidate", "kl", "nll", "chosen"])

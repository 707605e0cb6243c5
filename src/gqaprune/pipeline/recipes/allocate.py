"""Stage ``allocate``: choose the allocation for ``plan.ratio`` on held-out calibration windows.

With ``allocate.mode: auto`` every candidate allocation is planned at the requested ratio, a copy
of the dense model is pruned with it and compensated as ``surgery`` will (one-shot statistics
gathered once), and the candidate whose pruned copy is closest to the dense model on the held-out
windows of every configured corpus wins (``allocate.criterion``). The plan stage applies the choice, so
``plan`` itself stays a pure table-to-plan step. ``fixed`` records the plan section as written.
The artifact holds the choice and every candidate's criterion values (no timings: those are metrics).
"""

from __future__ import annotations

import logging

from gqaprune.config.choices import ALLOCATION_CANDIDATES
from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.models.units import ParamCounts
from gqaprune.pipeline.artifacts import ArtifactMismatchError, StageOutputs, check_fingerprint, read_table, write_csv
from gqaprune.pipeline.inputs import model_meta
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
    doc = {"fingerprint": fp, "mode": sel.mode, "criterion": sel.criterion, "ratio": params.plan.ratio}
    if sel.mode == "fixed":
        write_json(out(ALLOCATE_DIR / "allocation.json"), {**doc, "chosen": "fixed", "plan": {}})
        write_csv(out(ALLOCATE_DIR / "candidates.csv"), _empty_table())
        stage_metrics(out, "allocate", timer, {"mode": "fixed"})
        return
    if params.surgery.compensation == "sequential":
        raise InputError("allocate.mode: auto prunes each candidate with one-shot compensation; with "
                         "surgery.compensation: sequential set allocate.mode: fixed")
    scores, meta = read_table(SCORES)
    check_fingerprint(meta, fp, f"importance table {SCORES}")
    sim, sim_meta = read_table(SIMILARITY)
    check_fingerprint(sim_meta, fp, f"similarity table {SIMILARITY}")
    chosen = _choose(params, scores, sim, ParamCounts(**meta["param_counts"]), int(meta["num_layers"]), fp, timer)
    write_json(out(ALLOCATE_DIR / "allocation.json"), {**doc, "chosen": chosen["name"], "plan": chosen["plan"],
                                                    "candidates": chosen["rows"]})
    write_csv(out(ALLOCATE_DIR / "candidates.csv"), chosen["table"])
    log.info("allocate: %s (%s %.4f)", chosen["name"], sel.criterion, chosen["value"])
    stage_metrics(out, "allocate", timer, {"mode": "auto", "chosen": chosen["name"],
                                         sel.criterion: round(chosen["value"], 5)})


def _choose(params: Params, scores, sim, counts: ParamCounts, num_layers: int, fp: str, timer: Timer) -> dict:
    """Run the candidates on the dense model; the chosen one's name, plan overrides and the table."""
    import torch

    from gqaprune.pipeline.inputs import load_calibration, load_dense, load_heldout
    from gqaprune.pruning.allocation import Candidate, oneshot_pruner, select_allocation
    from gqaprune.pruning.compensation import collect_stats

    sel, s = params.allocate, params.surgery
    _check_fits_one_device(counts, sel)
    with timer.phase("load"):
        dense, model_fp, _ = load_dense(params, sel, _one_process())
        if model_fp != fp:
            raise ArtifactMismatchError("the model changed while allocate ran; re-run prepare")
        samples, _ = load_calibration(fp)
        heldout = load_heldout(fp)
    with timer.phase("statistics"):
        layers = list(range(num_layers))
        stats = collect_stats(dense, samples, layers, s.batch_size, progress=False) if s.compensation != "none" else {}
    candidates = [Candidate(name, dict(ALLOCATION_CANDIDATES[name])) for name in sel.candidates]
    with timer.phase("candidates"), torch.inference_mode():
        result = select_allocation(dense, scores, sim, counts, num_layers, params.plan, heldout,
                                   oneshot_pruner(stats, s.compensation, s.ridge), candidates, sel.criterion,
                                   sel.batch_size, log=lambda row: log.info("candidate %s", row))
    table = result.table.drop(columns=[c for c in ("seconds",) if c in result.table.columns])
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in table.to_dict("records")]
    value = float(table.loc[table["chosen"], sel.criterion].iloc[0])
    return {"name": result.choice.name, "plan": dict(result.choice.plan), "rows": rows, "table": table,
            "value": value}


def _check_fits_one_device(counts: ParamCounts, sel) -> None:
    """Refuse, before loading, a model whose two copies (dense + a pruned candidate) cannot fit one GPU."""
    import torch

    from gqaprune.runtime.devices import resolve_device, torch_dtype

    device = resolve_device(sel.device)
    if device.type != "cuda":
        return
    need = 2 * counts.total * torch.tensor([], dtype=torch_dtype(sel.dtype)).element_size()
    total = torch.cuda.get_device_properties(device).total_memory
    if need > 0.9 * total:
        raise InputError(f"allocate.mode: auto holds the dense model and a pruned copy on one GPU ({need / 2**30:.0f} "
                         f"GiB), more than {device} has ({total / 2**30:.0f} GiB); set allocate.mode: fixed (and the "
                         "plan section) for this model")


def _one_process():
    from gqaprune.runtime.distributed import single_process

    return single_process()


def _empty_table():
    import pandas as pd

    return pd.DataFrame(columns=["candidate", "kl", "nll", "chosen"])

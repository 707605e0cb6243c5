"""Torch-free helpers of the stage recipes: the dense model's record, stage timing and metrics."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..artifacts import ArtifactMismatchError, StageOutputs, read_json, write_json
from ..errors import InputError
from . import METRICS_DIR, MODEL_DIR, MODEL_INFO

MODEL_RECORD = "gqaprune_model.json"  # inside artifacts/model: the fingerprint, to match model.json


log = logging.getLogger("gqaprune")


class Timer:
    """Wall time of a stage and of its phases, for its metrics file (timings are metrics, never artifacts)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def seconds(self) -> float:
        """Seconds since the timer started, rounded to 0.01."""
        return round(time.perf_counter() - self.start, 2)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of the stage (load, compute, write...); logged and kept for the metrics."""
        start = time.perf_counter()
        yield
        self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 2)
        log.info("%s: %.2f s", name, self.phases[name])


def stage_metrics(out: StageOutputs, stage: str, timer: Timer, extra: dict | None = None, ctx=None) -> None:
    """Write ``metrics/<stage>.json``: wall time, peak GPU memory (when a GPU was used) and stage figures.

    On N processes (``ctx``) the main rank's figures, and ``processes``: N.
    """
    metrics = {"wall_time_s": timer.seconds()}
    if timer.phases:
        metrics["phases_s"] = dict(timer.phases)
    torch = sys.modules.get("torch")  # only a stage that imported torch can have used a GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if ctx is not None and ctx.is_distributed:
        metrics["processes"] = ctx.world_size
    write_json(out(METRICS_DIR / f"{stage}.json"), {**metrics, **(extra or {})})


def model_meta() -> dict:
    """The dense model's record written by prepare, checked against the model folder it describes."""
    meta = read_json(MODEL_INFO)
    record = MODEL_DIR / MODEL_RECORD
    if not record.is_file():
        raise InputError(f"{MODEL_DIR} has no {MODEL_RECORD}; it was not written by prepare: re-run prepare")
    inside = read_json(record)
    if inside.get("fingerprint") != meta.get("fingerprint"):
        raise ArtifactMismatchError(f"{MODEL_INFO} describes model {meta.get('fingerprint')} but {MODEL_DIR} holds "
                                    f"{inside.get('fingerprint')}; re-run prepare")
    return meta

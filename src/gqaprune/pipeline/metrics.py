"""Stage timings and the metrics files ``dvc exp show`` reads (timings are metrics, never artifacts)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gqaprune.errors import NonFiniteError
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.stages import METRICS_DIR
from gqaprune.runtime.files import write_json

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


def finite_perplexities(result: dict, model: str, dtype: str) -> dict:
    """``result`` (dataset -> perplexity figures) checked: a NaN or infinite perplexity fails, naming the
    dataset and the fix (an overflow of float16: bfloat16 or float32); a standard error that one window
    cannot give (NaN) becomes None, so the metrics stay valid JSON."""
    for name, r in result.items():
        if not math.isfinite(r["ppl"]):
            overflow = dtype == "float16"
            fix = ("the computation overflowed in float16: set evaluate.dtype: bfloat16 or float32" if overflow
                   else "the model's outputs are not finite: re-run the stage that wrote it, or try evaluate.dtype: "
                   "float32")
            raise NonFiniteError(f"the {model} model's perplexity on {name} is {r['ppl']} with evaluate.dtype: "
                                 f"{dtype}; {fix}")
        if r.get("log_ppl_se") is not None and not math.isfinite(r["log_ppl_se"]):
            r["log_ppl_se"] = None
    return result

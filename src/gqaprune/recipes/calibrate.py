"""Stage ``calibrate``: tokenised calibration windows ``[n_samples, seq_len]`` with their provenance."""

from __future__ import annotations

import logging

from ..artifacts import StageOutputs, atomic_path
from ..corpora import get_corpus
from ..data import calibration_samples
from ..distributed import DistContext
from ..params import Params
from . import CALIBRATION_DIR, CORPORA_DIR, MODEL_DIR
from .records import Timer, model_meta, stage_metrics

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Draw the calibration samples from the corpora snapshot with the dense model's tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    timer = Timer()
    c = params.calibrate
    fp = model_meta()["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    samples = calibration_samples(tokenizer, c.dataset, None, c.n_samples, c.seq_len, c.seed, data_dir=CORPORA_DIR)
    meta = {"dataset": c.dataset, "split": get_corpus(c.dataset).calibration_split, "n_samples": str(c.n_samples),
            "seq_len": str(c.seq_len), "seed": str(c.seed), "fingerprint": fp}
    with atomic_path(out(CALIBRATION_DIR / "samples.safetensors")) as tmp:
        save_file({"input_ids": samples.contiguous()}, str(tmp), metadata=dict(sorted(meta.items())))
    log.info("calibration: %d x %d tokens of %s/%s", c.n_samples, c.seq_len, c.dataset, meta["split"])
    stage_metrics(out, "calibrate", timer, {"calibration_tokens": samples.numel()})

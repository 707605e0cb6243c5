"""Stage ``calibrate``: calibration windows ``[n_samples, seq_len]`` and held-out calibration windows.

``samples.safetensors`` holds the windows that scoring, similarity and compensation fit on;
``heldout.safetensors`` holds, per corpus of ``calibrate.heldout_datasets``, windows of that corpus'
calibration split sharing no token with the samples: what ``allocate`` chooses the allocation on.
Neither ever touches an evaluation split.
"""

from __future__ import annotations

import logging

from gqaprune.config.corpora import get_corpus
from gqaprune.config.sections import Params
from gqaprune.data.windows import calibration_samples, heldout_windows
from gqaprune.models.checkpoint import write_safetensors
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import CALIBRATION_DIR, CORPORA_DIR, MODEL_DIR
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import atomic_path

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Draw the calibration samples and held-out windows from the corpora snapshot with the model's tokenizer."""
    from transformers import AutoTokenizer

    timer = Timer()
    c = params.calibrate
    fp = model_meta()["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    samples = calibration_samples(tokenizer, c.dataset, None, c.n_samples, c.seq_len, c.seed, data_dir=CORPORA_DIR)
    meta = {"dataset": c.dataset, "split": get_corpus(c.dataset).calibration_split, "n_samples": str(c.n_samples),
            "seq_len": str(c.seq_len), "seed": str(c.seed), "fingerprint": fp}
    with atomic_path(out(CALIBRATION_DIR / "samples.safetensors")) as tmp:
        write_safetensors([("input_ids", samples.contiguous())], tmp, meta)
    heldout = {}
    for name in c.heldout_datasets if c.heldout_windows else []:
        # the calibration samples' windows are excluded from the corpus they were drawn from
        excluded = c.n_samples if name == c.dataset else 0
        heldout[name] = heldout_windows(tokenizer, name, None, c.heldout_windows, c.seq_len, excluded, c.seq_len,
                                        c.seed, data_dir=CORPORA_DIR).contiguous()
    held_meta = {"datasets": ",".join(heldout), "windows": str(c.heldout_windows), "seq_len": str(c.seq_len),
                 "fingerprint": fp}
    with atomic_path(out(CALIBRATION_DIR / "heldout.safetensors")) as tmp:
        write_safetensors(list(heldout.items()), tmp, held_meta)
    log.info("calibration: %d x %d tokens of %s/%s; held-out: %d windows of %s", c.n_samples, c.seq_len, c.dataset,
             meta["split"], c.heldout_windows, ", ".join(heldout) or "none")
    stage_metrics(out, "calibrate", timer, {"calibration_tokens": samples.numel(),
                                            "heldout_tokens": sum(w.numel() for w in heldout.values())})

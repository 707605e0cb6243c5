"""Stage ``calibrate``: calibration windows ``[n_samples, seq_len]`` and held-out calibration windows.

``samples.safetensors`` holds the windows that scoring, similarity and compensation fit on, drawn from
the calibration splits of the corpora of ``calibrate.mix`` by weight (``auto``: the model's own uses,
its chat template's instruction records beside plain text when it has one); ``heldout.safetensors``
holds, per corpus of ``calibrate.heldout_datasets`` (``auto``: the mix's), windows of that corpus'
calibration split sharing no token with the samples: what ``allocate`` chooses the allocation on and
what distillation never trains on. Neither ever touches an evaluation split or a held-out
instruction record. The resolved mix is recorded in both files' metadata.
"""

from __future__ import annotations

import json
import logging

from gqaprune.config.sections import Params
from gqaprune.data.windows import heldout_windows, mixed_calibration_samples, resolve_mix
from gqaprune.models.checkpoint import write_safetensors
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import check_seq_len, model_meta
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
    check_seq_len(MODEL_DIR, c.seq_len, "calibrate.seq_len")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    mix = resolve_mix(c.mix, tokenizer)
    samples, counts = mixed_calibration_samples(tokenizer, mix, c.n_samples, c.seq_len, c.seed, CORPORA_DIR)
    meta = {"mix": json.dumps(mix), "counts": json.dumps(counts), "n_samples": str(c.n_samples),
            "seq_len": str(c.seq_len), "seed": str(c.seed), "fingerprint": fp}
    with atomic_path(out(CALIBRATION_DIR / "samples.safetensors")) as tmp:
        write_safetensors([("input_ids", samples.contiguous())], tmp, meta)
    heldout = {}
    for name in (list(mix) if c.heldout_datasets == "auto" else c.heldout_datasets) if c.heldout_windows else []:
        # the calibration samples' windows are excluded from the corpus they were drawn from
        heldout[name] = heldout_windows(tokenizer, name, None, c.heldout_windows, c.seq_len, counts.get(name, 0),
                                        c.seq_len, c.seed, data_dir=CORPORA_DIR).contiguous()
    held_meta = {"datasets": ",".join(heldout), "windows": str(c.heldout_windows), "seq_len": str(c.seq_len),
                 "mix": json.dumps(mix), "fingerprint": fp}
    with atomic_path(out(CALIBRATION_DIR / "heldout.safetensors")) as tmp:
        write_safetensors(list(heldout.items()), tmp, held_meta)
    log.info("calibration: %d x %d tokens of %s; held-out: %d windows of %s", c.n_samples, c.seq_len,
             ", ".join(f"{k} {n}" for k, n in counts.items()), c.heldout_windows, ", ".join(heldout) or "none")
    stage_metrics(out, "calibrate", timer, {"calibration_tokens": samples.numel(),
                                            "heldout_tokens": sum(w.numel() for w in heldout.values())})

"""What the model-loading stage recipes share: the dense model, calibration samples, the data folder."""

from __future__ import annotations

import torch

from ..artifacts import check_fingerprint
from ..distributed import DistContext
from ..errors import InputError
from ..params import Params
from ..placement import load_model
from . import CALIBRATION_DIR, MODEL_DIR
from .records import model_meta


def load_dense(params: Params, section, ctx: DistContext):
    """(model in eval mode, fingerprint, record) of the dense model from prepare, in ``section``'s dtype on its
    device (on N ranks: each rank's device, replicated or sharded as ``distributed.placement`` says)."""
    meta = model_meta()
    model = load_model(MODEL_DIR, section.dtype, section.device, ctx, params.distributed.placement)
    return model, meta["fingerprint"], meta


def load_dense_and_calibration(params: Params, section, ctx: DistContext, timer):
    """(model, fingerprint, record, samples, calibration metadata), timed as the stage's ``load`` phase."""
    with timer.phase("load"):
        model, fp, meta = load_dense(params, section, ctx)
        samples, cal_meta = load_calibration(fp)
    return model, fp, meta, samples, cal_meta


def load_calibration(expected_fingerprint: str) -> tuple[torch.Tensor, dict]:
    """Calibration samples [n, seq_len] and their metadata; refuses samples made for another model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = CALIBRATION_DIR / "samples.safetensors"
    if not path.is_file():
        raise InputError(f"{path} does not exist; run the calibrate stage first")
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in sorted((f.metadata() or {}).items()) if k != "format"}  # "format": the file's
    check_fingerprint(meta, expected_fingerprint, f"calibration samples {path}")
    return load_file(str(path))["input_ids"], meta


def load_heldout(expected_fingerprint: str) -> torch.Tensor:
    """The held-out calibration windows of every configured corpus, concatenated ``[n, seq_len]``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = CALIBRATION_DIR / "heldout.safetensors"
    if not path.is_file():
        raise InputError(f"{path} does not exist; run the calibrate stage first")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    check_fingerprint(meta, expected_fingerprint, f"held-out windows {path}")
    windows = load_file(str(path))
    if not windows:
        raise InputError(f"{path} holds no windows; set calibrate.heldout_windows > 0 (select.allocation: auto "
                         "chooses on them) or select.allocation: fixed")
    return torch.cat([windows[name] for name in meta["datasets"].split(",")])

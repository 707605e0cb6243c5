"""What the model-loading stage recipes share: the dense model, calibration samples, the data folder."""

from __future__ import annotations

import torch

from ..artifacts import check_fingerprint
from ..errors import InputError
from ..modelio import load_causal_lm, resolve_device
from . import CALIBRATION_DIR, MODEL_DIR
from .records import model_meta


def load_dense(dtype: str, device: str):
    """(model in eval mode on ``device``, fingerprint, record) of the dense model from prepare."""
    meta = model_meta()
    model = load_causal_lm(MODEL_DIR, dtype=dtype, device=resolve_device(device)).eval()
    return model, meta["fingerprint"], meta


def load_calibration(expected_fingerprint: str) -> tuple[torch.Tensor, dict]:
    """Calibration samples [n, seq_len] and their metadata; refuses samples made for another model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = CALIBRATION_DIR / "samples.safetensors"
    if not path.is_file():
        raise InputError(f"{path} does not exist; run the calibrate stage first")
    with safe_open(str(path), "pt") as f:
        meta = dict(sorted((f.metadata() or {}).items()))
    check_fingerprint(meta, expected_fingerprint, f"calibration samples {path}")
    return load_file(str(path))["input_ids"], meta

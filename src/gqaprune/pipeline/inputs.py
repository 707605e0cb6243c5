"""What the stages read from earlier stages: the dense model's record, the model, calibration and held-out windows.

Each reader checks that what it reads was made for the prepared model (its fingerprint) and names the
stage to re-run when not. Torch-free at import: the plan stage reads the model's record without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.pipeline.artifacts import ArtifactMismatchError, check_fingerprint
from gqaprune.pipeline.stages import CALIBRATION_DIR, MODEL_DIR, MODEL_INFO
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import read_json

if TYPE_CHECKING:
    import torch

MODEL_RECORD = "gqaprune_model.json"  # inside artifacts/model: the fingerprint, to match model.json


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


def load_dense(params: Params, section, ctx: DistContext):
    """(model in eval mode, fingerprint, record) of the dense model from prepare, in ``section``'s dtype on its
    device (on N ranks: each rank's device, replicated or sharded as ``distributed.placement`` says)."""
    from gqaprune.models.loading import load_model

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
        raise InputError(f"{path} holds no windows; set calibrate.heldout_windows > 0 (allocate.mode: auto "
                         "chooses on them) or allocate.mode: fixed")
    import torch

    return torch.cat([windows[name] for name in meta["datasets"].split(",")])

"""What the stages read from earlier stages, and the identity of each: records, ids, the checks.

Identities: a model is its fingerprint (``model``: the dense model of ``artifacts/model.json``;
``pruned``: the checkpoint surgery wrote, recorded in its ``gqaprune_model.json``); a small artifact is
the sha256 of its bytes (:func:`input_ids`). Every artifact records the ids of what it was made from
(``inputs``), and every reader checks the recorded ids of what it reads too with :func:`check_inputs`,
naming the stage to re-run, so a stale or mixed result is refused in direct runs and under DVC alike.

Also here: the source model's identity (the ``source`` stage and prepare; a source inside the
pipeline's own outputs is refused before anything is touched) and the context-length check. Torch-free
at import: the plan stage reads the model's record without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.pipeline.artifacts import ArtifactMismatchError, check_fingerprint, check_made_from
from gqaprune.pipeline.stages import (
    ALLOCATE_DIR,
    CALIBRATION_DIR,
    DENSE_PPL,
    FINETUNE_DIR,
    LOG_DIR,
    MODEL_DIR,
    MODEL_INFO,
    PLAN_DIR,
    PRUNED_DIR,
    SCORES,
    SIMILARITY,
    STAGES,
)
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import FileDigests, content_id, read_json, write_json

if TYPE_CHECKING:
    import torch

MODEL_RECORD = "gqaprune_model.json"  # inside a checkpoint folder: its fingerprint and what it was made from
SOURCE_DIGESTS = LOG_DIR / "source-digests.json"  # sha256 per file, keyed on its stat (not an output)


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
    return load_file(str(path))["input_ids"], {**meta, "id": content_id(path)}


def load_heldout(expected_fingerprint: str) -> tuple[torch.Tensor, list[str]]:
    """The held-out calibration windows of every configured corpus, concatenated ``[n, seq_len]``, and the
    corpus of each window."""
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

    names = meta["datasets"].split(",")
    return torch.cat([windows[name] for name in names]), [n for n in names for _ in range(len(windows[n]))]


# --- identities: what each artifact was made from -------------------------------------------------------
#: small artifacts identified by the sha256 of their bytes: name -> (file, the stage that writes it)
ARTIFACT_FILES = {
    "calibration": (CALIBRATION_DIR / "samples.safetensors", "calibrate"),
    "heldout": (CALIBRATION_DIR / "heldout.safetensors", "calibrate"),
    "scores": (SCORES, "score"),
    "similarity": (SIMILARITY, "similarity"),
    "allocation": (ALLOCATE_DIR / "allocation.json", "allocate"),
    "plan": (PLAN_DIR / "plan.json", "plan"),
    "finetune": (FINETUNE_DIR / "status.json", "finetune"),
    "dense_ppl": (DENSE_PPL, "evaluate_dense"),
}
_MODELS = {"model": (MODEL_INFO, "dense model"), "pruned": (PRUNED_DIR, "pruned model")}


def checkpoint_record(folder: Path, stage: str) -> dict:
    """The record (``gqaprune_model.json``: fingerprint, inputs) of a checkpoint folder that ``stage`` wrote."""
    path = Path(folder) / MODEL_RECORD
    if not path.is_file():
        raise InputError(f"{folder} has no {MODEL_RECORD}: it was not written by this version's {stage} stage; "
                         f"re-run {stage}")
    return read_json(path)


def write_checkpoint_record(folder: Path, inputs: Mapping[str, str]) -> str:
    """Fingerprint the checkpoint written in ``folder`` and record it with the ids it was made from; returns it."""
    from gqaprune.models.fingerprint import fingerprint_files
    from gqaprune.models.loading import load_config

    fp = fingerprint_files(folder, load_config(folder))
    write_json(Path(folder) / MODEL_RECORD, {"fingerprint": fp, "inputs": dict(inputs)}, sort_keys=True)
    return fp


def _current_id(name: str) -> str:
    if name == "model":
        return model_meta()["fingerprint"]
    if name == "pruned":
        return checkpoint_record(PRUNED_DIR, "surgery")["fingerprint"]
    path, stage = ARTIFACT_FILES[name]
    if not path.is_file():
        raise InputError(f"{path} does not exist; run the {stage} stage first")
    return content_id(path)


def input_ids(*names: str) -> dict[str, str]:
    """The current id of each named input (``model``, ``pruned`` or a key of :data:`ARTIFACT_FILES`):
    what an artifact records under ``inputs`` to say what it was made from."""
    return {name: _current_id(name) for name in names}


def check_inputs(recorded: Mapping | None, what: str, rerun: str, reads: Iterable[str], required: bool = True
                 ) -> None:
    """Refuse ``what`` when an input it was made from (``recorded``: its ``inputs``) is not the one there now.

    Only the inputs in ``reads`` are compared (those the reader uses too). ``required``: an artifact that
    records none of them was made by an older version and is refused; ``rerun`` names the fix.
    """
    recorded = recorded or {}
    names = [name for name in reads if name in recorded]
    if required and not names:
        raise ArtifactMismatchError(f"{what} does not record what it was made from (an older gqaprune wrote it); "
                                    f"re-run {rerun}")
    for name in names:
        where, label = _MODELS.get(name) or (ARTIFACT_FILES[name][0], name.replace("_", " "))
        check_made_from(what, recorded[name], _current_id(name), rerun, of=label, current_is=f"{where} now holds")


# --- the source model --------------------------------------------------------------------------------
def check_outside_outputs(spec: str, folder: Path, key: str = "prepare.model") -> None:
    """Refuse a model folder that lies inside an output of the pipeline (or holds one), before anything is
    touched: re-running the pipeline replaces it, and prepare itself would delete it."""
    from gqaprune.models.sources import REFERENCE_FILE

    folder = folder.resolve()
    for stage in STAGES.values():
        for out in stage.outs:
            place = out.resolve()
            if folder != place and place not in folder.parents and folder not in place.parents:
                continue
            if folder in place.parents and folder != place:
                raise InputError(f"{key}: {spec} holds {out}, an output of stage {stage.name}; give a model "
                                 "folder outside the project's outputs")
            ref = folder / REFERENCE_FILE
            if ref.is_file():
                target = read_json(ref)["path"]
                fix = f"it references {target}: run with -S {key}={target}"
            else:
                copy = f"../{folder.name}-source"
                fix = (f"copy it out first: cp -rL {spec} {copy}, then run with -S {key}={copy} (or set it in "
                       "params.yaml)")
            raise InputError(f"{key}: {spec} lies inside {out}, an output of stage {stage.name} that re-running the "
                             f"pipeline replaces (prepare would delete it); {fix}")


def source_identity(spec: str) -> dict:
    """What ``prepare.model`` names, by content: a local folder's resolved path and the digest of its files
    (hashed again only where a file's stat changed: ``artifacts/logs/source-digests.json``), the embedded
    file's digest, a hub id and its revision. Byte-identical when nothing changed."""
    from gqaprune.models.sources import classify_source, describe_source

    kind, resolved = classify_source(spec)
    if kind == "local":
        check_outside_outputs(spec, Path(resolved))
    digests = FileDigests(SOURCE_DIGESTS)
    identity = describe_source(kind, resolved, digests)
    digests.save()
    return identity


def check_seq_len(folder: Path, seq_len: int, key: str) -> None:
    """Refuse a window longer than the model's ``max_position_embeddings`` (read from its config.json)."""
    config = Path(folder) / "config.json"
    limit = read_json(config).get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        raise InputError(f"{key}={seq_len} is longer than the model's context, max_position_embeddings={limit} "
                         f"({config}); set {key} to at most {limit}")


def dense_settings(e) -> dict:
    """The ``evaluate`` settings a dense baseline is measured with (``metrics/dense.json`` records them and
    ``evaluate`` refuses a baseline whose settings differ from its own: ratios need equal conditions), the
    version of the generation prompt set included."""
    from gqaprune.data.prompts import PROMPT_SET_VERSION

    return {"seq_len": e.seq_len, "dtype": e.dtype, "spread": e.spread, "max_tokens": e.max_tokens,
            "datasets": sorted(e.datasets), "tasks": list(e.tasks), "task_limit": e.task_limit,
            "task_num_fewshot": e.task_num_fewshot, "humaneval_problems": e.humaneval_problems,
            "humaneval_max_new_tokens": e.humaneval_max_new_tokens, "instruction_dataset": e.instruction_dataset,
            "instruction_records": e.instruction_records, "instruction_max_length": e.instruction_max_length,
            "generation_max_new_tokens": e.generation_max_new_tokens, "prompt_set": PROMPT_SET_VERSION}

"""Stage ``prepare``: the dense model (converted, downloaded, copied or referenced), its record, the corpora.

Cheap checks come first (the model source, which must lie outside the pipeline's outputs, its config
and weight files, the data folder and every corpus file), so a bad input fails in seconds, before any
weight is read or any output touched. ``model.json`` records the source's identity by content (as the
``source`` stage computes it). A local (or downloaded)
folder of safetensors already in ``prepare.dtype`` is referenced instead of copied: a 70B model is not
duplicated on disk. The fingerprint is computed from the weight files (every value, rounded to
bfloat16), which also refuses NaN / infinite weights; parameter counts come from the architecture
built on the meta device, so no stage here needs the model in memory except a dtype conversion.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gqaprune import __version__
from gqaprune.config.sections import Params
from gqaprune.data.sources import DATA_DIR_ENV, snapshot_corpora
from gqaprune.errors import InputError
from gqaprune.models.adapters import get_adapter
from gqaprune.models.checkpoint import save_model
from gqaprune.models.fingerprint import fingerprint_files
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_config, load_model, load_tokenizer, meta_model
from gqaprune.models.sources import (
    base_model_id,
    check_model_folder,
    classify_source,
    convert_embedded,
    download,
    stored_dtypes,
    write_reference,
)
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import MODEL_RECORD, SOURCE_DIGESTS, source_identity
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import CORPORA_DIR, MODEL_DIR, MODEL_INFO
from gqaprune.runtime.devices import SAFETENSORS_DTYPES
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import FileDigests, write_json
from gqaprune.runtime.hub import hub_reachable

log = logging.getLogger("gqaprune")


def _check_data_dir(params: Params) -> str | None:
    """The corpora mirror ($GQAPRUNE_DATA_DIR wins over data.data_dir); refuses a mirror that does not
    exist when the hub cannot stand in for it."""
    mirror = os.environ.get(DATA_DIR_ENV) or params.data.data_dir
    if mirror is not None and not Path(mirror).is_dir():
        if not hub_reachable():
            raise InputError(f"data.data_dir (or $GQAPRUNE_DATA_DIR) {Path(mirror).absolute()} does not exist and "
                             "the Hugging Face hub is not reachable; point it at the corpora folder")
        log.warning("data folder %s does not exist; corpora come from the hub", mirror)
    return mirror


def corpora_used(params: Params) -> list[str]:
    """Every corpus a later stage may read: the calibration and recovery mixes (``auto``: both mixes of
    :mod:`gqaprune.config.choices`, the tokenizer decides later), the held-out corpora, the evaluation
    corpora and the instruction records the evaluate stages score."""
    from gqaprune.config.choices import AUTO_MIX_CHAT, AUTO_MIX_PLAIN

    def mix(value) -> list[str]:
        return [*AUTO_MIX_CHAT, *AUTO_MIX_PLAIN] if value == "auto" else list(value)

    c, f, e = params.calibrate, params.finetune, params.evaluate
    names = [*mix(c.mix), *e.datasets]
    if c.heldout_windows and c.heldout_datasets != "auto":
        names += c.heldout_datasets
    if f.enabled:
        names += mix(f.mix)
    if e.instruction_records:
        names.append(e.instruction_dataset)
    return sorted(set(names))


def run(params: Params, out: StageOutputs, ctx: DistContext | None = None) -> None:
    """Write the dense model folder, its record (model.json) and the corpora snapshot."""
    timer = Timer()
    p = params.prepare
    identity = source_identity(p.model)  # refuses a source inside the pipeline's outputs, before anything else
    kind, spec = classify_source(p.model)
    source = None
    if kind == "local":
        source = Path(spec)
        headers = check_model_folder(source)
        config = load_config(source, p.trust_remote_code)
        get_adapter(config)  # an unsupported family fails here, before any weight is read
    mirror = _check_data_dir(params)
    with timer.phase("corpora"):
        names = corpora_used(params)
        written = snapshot_corpora(sorted(set(names)), out(CORPORA_DIR), mirror)

    model_dir = out(MODEL_DIR)
    if kind == "embedded":
        log.info("converting the embedded SmolLM2-135M-Instruct GGUF to safetensors")
        convert_embedded(model_dir)
        source, headers = None, check_model_folder(model_dir)
    elif kind == "hub":
        log.info("downloading %s", spec)
        source = download(spec)
        headers = check_model_folder(source)
    config = load_config(source or model_dir, p.trust_remote_code)
    reference = (source is not None and headers and not p.copy_local
                 and stored_dtypes(headers) == {SAFETENSORS_DTYPES[p.dtype]})
    if reference:
        with timer.phase("fingerprint"):
            fp = fingerprint_files(source, config)
        log.info("referencing %s (safetensors already in %s; not copied)", source, p.dtype)
        write_reference(source, model_dir, fp, FileDigests(SOURCE_DIGESTS))
    else:
        if source is not None:  # convert the dtype (or other weight formats) into a copy
            log.info("loading %s as %s", source, p.dtype)
            model = load_model(source, p.dtype, "cpu", trust_remote_code=p.trust_remote_code)
            tokenizer = load_tokenizer(source)
            save_model(model, model_dir)
            tokenizer.save_pretrained(model_dir)
            del model
        with timer.phase("fingerprint"):
            fp = fingerprint_files(model_dir, config)
    write_json(model_dir / MODEL_RECORD, {"fingerprint": fp})

    adapter = get_adapter(config)
    geometry = adapter.geometry(config)
    counts = parameter_counts(meta_model(config, p.trust_remote_code), adapter, geometry)
    info = {"source": p.model, "source_identity": {k: v for k, v in identity.items() if k != "files"},
            "base_model": base_model_id(kind, spec, config), "fingerprint": fp,
            "geometry": geometry.to_dict(), "params": counts.to_dict(), "referenced": bool(reference),
            "corpora": written, "gqaprune_version": __version__}
    write_json(out(MODEL_INFO), info)
    log.info("model %s: %s parameters, fingerprint %s", p.model, f"{counts.total:,}", fp)
    stage_metrics(out, "prepare", timer, {"params_total": counts.total, "referenced": bool(reference)})

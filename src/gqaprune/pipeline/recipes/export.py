"""Stage ``export``: the recovered (or pruned) model as GGUF for llama.cpp, quantised copies, a model card.

Checked before any work: the source checkpoint exists, llama-cpp-python is importable when a
quantised file is asked for. The main file keeps the exact pruned MLP widths; the quantised files are
made from a temporary export whose MLP widths are padded with zero channels (outputs unchanged) to a
multiple of ``export.ffn_multiple``, because llama.cpp quantises a matrix only when its rows fill
whole blocks. The model card (README.md) carries the evaluate stage's perplexities.
"""

from __future__ import annotations

import logging

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.export.gguf import export_gguf
from gqaprune.export.llama_cpp import llama_cpp_module, quantize_gguf
from gqaprune.export.model_card import card_for_checkpoint, write_model_card
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import EXPORT_DIR, FINETUNE_DIR, METRICS_DIR, PRUNED_DIR
from gqaprune.runtime.files import read_json, remove_path, write_json

log = logging.getLogger("gqaprune")


def _source(params: Params):
    """(checkpoint folder, card kind) that ``export.source`` names; refuses one that was not made."""
    wanted = params.export.source
    merged = FINETUNE_DIR / "merged"
    if wanted == "finetuned" or (wanted == "auto" and merged.is_dir()):
        if not merged.is_dir():
            raise InputError(f"export.source is 'finetuned' but {merged} does not exist (finetune.enabled and "
                             "finetune.merge make it); use export.source: pruned")
        return merged, "finetuned"
    if not (PRUNED_DIR / "config.json").is_file():
        raise InputError(f"{PRUNED_DIR} holds no checkpoint; run surgery first")
    return PRUNED_DIR, "pruned"


def run(params: Params, out: StageOutputs, ctx=None) -> None:
    """Write artifacts/export/: model-<dtype>.gguf, model-<type>.gguf per quantisation, README.md, export.json."""
    timer = Timer()
    x = params.export
    target = out(EXPORT_DIR)
    target.mkdir(parents=True, exist_ok=True)
    if not x.enabled:
        write_json(target / "export.json", {"enabled": False})
        stage_metrics(out, "export", timer, {"enabled": False})
        return
    source, kind = _source(params)
    if x.quantize:
        llama_cpp_module()  # fails now, with the install command, rather than after the export
    evaluation = read_json(METRICS_DIR / "evaluate.json")
    files: dict[str, int] = {}
    with timer.phase("export"):
        report = export_gguf(source, target / f"model-{x.dtype}.gguf", x.dtype, name=f"{source.name}-{kind}")
    files[f"model-{x.dtype}.gguf"] = report.file_bytes
    if x.quantize:
        padded = target / ".padded.gguf"
        with timer.phase("quantize"):
            export_gguf(source, padded, x.dtype, name=f"{source.name}-{kind}", ffn_multiple=x.ffn_multiple)
            for qtype in x.quantize:
                path = quantize_gguf(padded, target / f"model-{qtype}.gguf", qtype)
                files[path.name] = path.stat().st_size
            remove_path(padded)
    base = x.base_model or model_meta().get("base_model") or "unknown"
    write_model_card(target, card_for_checkpoint(source, base_model=base, kind=kind, metrics=evaluation,
                                                 gguf_files=files, name=f"{source.name}-{kind}"))
    write_json(target / "export.json", {"enabled": True, "source": str(source), "kind": kind, "arch": report.arch,
                                        "files": files, "placeholders": report.placeholders,
                                        "warnings": report.warnings, "tokenizer_pre": report.tokenizer_pre})
    for warning in report.warnings:
        log.warning("export: %s", warning)
    log.info("export: %s as %s (%s)", source, report.arch, ", ".join(f"{f} {b / 2**20:.1f} MiB"
                                                                    for f, b in files.items()))
    stage_metrics(out, "export", timer, {"enabled": True, "arch": report.arch,
                                         "mib": {f: round(b / 2**20, 2) for f, b in files.items()}})

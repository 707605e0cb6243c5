"""Stage ``export``: the recovered (or pruned) model as GGUF for llama.cpp, quantised copies, a model card.

Checked before any work: the source checkpoint exists, llama-cpp-python is importable when a
quantised file is asked for. The main file keeps the exact pruned MLP widths; the quantised files are
made from a temporary export whose MLP widths are padded with zero channels (outputs unchanged) to a
multiple of ``export.ffn_multiple``, because llama.cpp quantises a matrix only when its rows fill
whole blocks. The model card (README.md) carries the evaluate stage's perplexities
(``artifacts/evaluation/results.json``, which holds no timings). Refused before any work: results
evaluated on another checkpoint than the one exported, a recovered model trained from another pruned
model, and a ``model.json`` (whose base model the card names) of another model than the pruned one was
made from.
"""

from __future__ import annotations

import logging

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.export.gguf import export_gguf
from gqaprune.export.llama_cpp import llama_cpp_module, quantize_gguf
from gqaprune.export.model_card import card_for_checkpoint, write_model_card
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import check_inputs, checkpoint_record, model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import EXPORT_DIR, FINETUNE_DIR, GENERATIONS, PRUNED_DIR, RESULTS
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


def _check_belongs(params: Params, kind: str) -> dict:
    """The evaluation results, checked to describe the checkpoint exported (and the card's base model to be
    the dense model it was pruned from)."""
    pruned = checkpoint_record(PRUNED_DIR, "surgery")
    if params.export.base_model is None:  # the card names model.json's base model
        check_inputs(pruned.get("inputs"), f"pruned model {PRUNED_DIR} (its card would name the base model of "
                     "artifacts/model.json)", "the stages after prepare (dvc repro), or prepare its model again",
                     ("model",))
    evaluation = read_json(RESULTS)
    check_inputs(evaluation.get("inputs"), f"evaluation {RESULTS}", "evaluate",
                 ("pruned", "finetune") if kind == "finetuned" else ("pruned",))
    if kind == "finetuned":
        check_inputs(read_json(FINETUNE_DIR / "status.json").get("inputs"), f"recovered model {FINETUNE_DIR}",
                     "finetune", ("pruned",))
        if "finetune" not in evaluation.get("inputs", {}):
            raise InputError(f"{RESULTS} holds no perplexity of the recovered model {FINETUNE_DIR / 'merged'}; "
                             "re-run evaluate")
    return evaluation


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
    evaluation = _check_belongs(params, kind)
    if x.quantize:
        llama_cpp_module()  # fails now, with the install command, rather than after the export
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
    generations = None
    if GENERATIONS.is_file():  # the side-by-side continuations travel with the card that links them
        (target / GENERATIONS.name).write_bytes(GENERATIONS.read_bytes())
        generations = GENERATIONS.name
    write_model_card(target, card_for_checkpoint(source, base_model=base, kind=kind, metrics=evaluation,
                                                 gguf_files=files, name=f"{source.name}-{kind}",
                                                 generations=generations))
    write_json(target / "export.json", {"enabled": True, "source": str(source), "kind": kind, "arch": report.arch,
                                        "files": files, "placeholders": report.placeholders,
                                        "warnings": report.warnings, "tokenizer_pre": report.tokenizer_pre})
    for warning in report.warnings:
        log.warning("export: %s", warning)
    log.info("export: %s as %s (%s)", source, report.arch, ", ".join(f"{f} {b / 2**20:.1f} MiB"
                                                                    for f, b in files.items()))
    stage_metrics(out, "export", timer, {"enabled": True, "arch": report.arch,
                                         "mib": {f: round(b / 2**20, 2) for f, b in files.items()}})

"""Command line: ``gqaprune <stage>`` runs one pipeline stage outside DVC; ``gqaprune ppl`` evaluates a model.

Every stage command reads its section of params.yaml; ``--set section.key=value`` overrides a value
for this run only (the same syntax as ``dvc exp run -S``). The DVC stages in ``stages/`` run the same
code (:mod:`gqaprune.pipeline.runner`). Errors are one line on stderr and a non-zero exit code; ``--debug`` (or
``GQAPRUNE_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gqaprune.pipeline.runner import debugging, execute, help_text, report_error
from gqaprune.pipeline.stages import STAGES

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-S", help="Override one value, e.g. -S plan.ratio=0.3 (repeatable).")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Print the traceback of a failure.")]


def _make_stage(name: str) -> None:
    """Register ``gqaprune <name>`` with help text listing the params it reads."""

    def command(params: ParamsOption = Path("params.yaml"), set_: SetOption = None, debug: DebugOption = False
                ) -> None:
        raise typer.Exit(execute(name, None, params, set_ or [], debug))

    command.__doc__ = help_text(STAGES[name])
    app.command(name.replace("_", "-"))(command)


for _name in STAGES:
    _make_stage(_name)


@app.command()
def ppl(
    model: Annotated[str, typer.Argument(help="Model folder (dense or pruned) or hub id.")],
    datasets: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="wikitext2, ptb, c4 (repeat).")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 128,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on evaluated tokens per dataset (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    data_dir: Annotated[str | None, typer.Option(
        help="Local corpora mirror (default: $GQAPRUNE_DATA_DIR, else params.yaml's data.data_dir, relative to "
             "params.yaml, as the stages read it).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    params: ParamsOption = Path("params.yaml"),
    debug: DebugOption = False,
) -> None:
    """Perplexity of a model on the named corpora (LLM-Pruner protocol), printed as JSON."""
    import json

    try:
        from gqaprune.evaluation.perplexity import perplexity
        from gqaprune.models.loading import load_model, load_tokenizer

        data_dir = _ppl_data_dir(data_dir, params)
        m, tokenizer = load_model(model, dtype, device), load_tokenizer(model)
        out = {}
        for name in datasets or ["wikitext2"]:
            r = perplexity(m, tokenizer, dataset=name, seq_len=seq_len, batch_size=batch_size,
                           max_tokens=max_tokens, data_dir=data_dir)
            out[name] = {"ppl": r.ppl, "tokens": r.n_tokens, "windows": r.n_windows, "capped": r.capped,
                         "split": r.split, "seq_len": r.seq_len}
    except Exception as exc:  # noqa: BLE001 - one line, as for the stages
        raise typer.Exit(report_error(exc, None, debugging(debug))) from None
    typer.echo(json.dumps(out, indent=2))


def _ppl_data_dir(data_dir: str | None, params: Path) -> str | None:
    """The mirror ``gqaprune ppl`` reads: ``--data-dir``, else $GQAPRUNE_DATA_DIR, else the params file's
    ``data.data_dir`` resolved against the params file (as the stages resolve it); None: the hub."""
    import os

    from gqaprune.data.sources import DATA_DIR_ENV

    if data_dir is not None or os.environ.get(DATA_DIR_ENV) or not params.is_file():
        return data_dir
    from gqaprune.config.loading import load_params, with_data_dir_resolved

    return with_data_dir_resolved(load_params(params), params).data.data_dir


@app.command("export-gguf")
def export_gguf_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (dense, pruned or LoRA-merged).")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    dtype: Annotated[str, typer.Option(help="f32, f16 or bf16 for the 2-D weights.")] = "f16",
    quantize: Annotated[list[str] | None, typer.Option(
        "--quantize", "-q", help="Also write <out stem>-<TYPE>.gguf with llama.cpp's quantiser (Q8_0, Q4_K_M).")
    ] = None,
    ffn_multiple: Annotated[int, typer.Option(
        help="Quantised files: pad MLP widths with zero channels to a multiple of this (llama.cpp blocks).")] = 32,
    debug: DebugOption = False,
) -> None:
    """Write a checkpoint as GGUF for llama.cpp (per-layer shapes as the `deci` architecture), with its tokenizer."""
    import json

    try:
        from gqaprune.export.gguf import export_gguf
        from gqaprune.export.llama_cpp import llama_cpp_module, quantize_gguf

        if quantize:
            llama_cpp_module()
        report = export_gguf(model, out, dtype)
        written = {str(out): report.file_bytes}
        if quantize:
            padded = out.with_name(f".{out.stem}.padded.gguf")
            export_gguf(model, padded, dtype, ffn_multiple=ffn_multiple)
            try:
                for qtype in quantize:
                    path = quantize_gguf(padded, out.with_name(f"{out.stem}-{qtype}.gguf"), qtype)
                    written[str(path)] = path.stat().st_size
            finally:
                padded.unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - one line, as for the stages
        raise typer.Exit(report_error(exc, None, debugging(debug))) from None
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(json.dumps({"arch": report.arch, "files": written, "placeholders": report.placeholders}, indent=2))

"""Command line: ``gqaprune <stage>`` runs one pipeline stage outside DVC; ``gqaprune ppl`` evaluates a model.

Every stage command reads its section of params.yaml; ``--set section.key=value`` overrides a value
for this run only (the same syntax as ``dvc exp run -S``). The DVC stages in ``stages/`` call these
same commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import params as P

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

STAGE_HELP = {
    "prepare": ("Convert or download the dense model into artifacts/model and snapshot the corpora "
                "into data/corpora.", [P.PrepareParams, P.DataParams]),
    "calibrate": ("Draw tokenised calibration samples from the calibration split.", [P.CalibrateParams]),
    "score": ("Score every attention group and MLP channel (magnitude, wanda, taylor, taylor_2nd).",
              [P.ScoreParams]),
    "similarity": ("Layer and block importance, 1 - cos(input, output), from forward passes.",
                   [P.SimilarityParams]),
    "plan": ("Build the H-GSP plan, the global group table and pruning_analysis.json.", [P.PlanConfig]),
    "surgery": ("Slice the dense model by the plan and save the pruned checkpoint.", [P.SurgeryParams]),
    "finetune": ("LoRA recovery fine-tuning of the pruned model on instruction data.", [P.FinetuneParams]),
    "evaluate_dense": ("Perplexity of the dense model (cached across experiments).", [P.EvaluateParams]),
    "evaluate": ("Perplexity of the pruned and finetuned models next to the dense one.", [P.EvaluateParams]),
}

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-S", help="Override one value, e.g. -S plan.ratio=0.3 (repeatable).")]


def _make_stage(name: str, summary: str, sections: list) -> None:
    """Register ``gqaprune <name>`` with help text listing the params it reads."""
    keys = "\n\n".join(f"{_section_key(cls)}: {P.describe(cls)}" for cls in sections)

    def command(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
        from .pipeline import run_stage

        run_stage(name, P.load_params(params, set_ or []))

    command.__doc__ = f"{summary}\n\nParams read:\n\n{keys}"
    app.command(name.replace("_", "-"))(command)


def _section_key(cls) -> str:
    """The params.yaml section holding ``cls``."""
    import dataclasses

    return next(f.name for f in dataclasses.fields(P.Params) if f.type == cls.__name__ or f.type is cls)


for _name, (_summary, _sections) in STAGE_HELP.items():
    _make_stage(_name, _summary, _sections)


@app.command()
def ppl(
    model: Annotated[str, typer.Argument(help="Model folder (dense or pruned) or hub id.")],
    datasets: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="wikitext2, ptb, c4 (repeat).")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 128,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on evaluated tokens per dataset (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    data_dir: Annotated[str | None, typer.Option(help="Local corpora mirror (default: $GQAPRUNE_DATA_DIR).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
) -> None:
    """Perplexity of a model on the named corpora (LLM-Pruner protocol), printed as JSON."""
    import json

    from .evaluation import perplexity
    from .modelio import load_model

    m, tokenizer = load_model(model, dtype=dtype, device=device)
    out = {}
    for name in datasets or ["wikitext2"]:
        r = perplexity(m, tokenizer, dataset=name, seq_len=seq_len, batch_size=batch_size,
                       max_tokens=max_tokens, data_dir=data_dir)
        out[name] = {"ppl": r.ppl, "tokens": r.n_tokens, "windows": r.n_windows, "capped": r.capped,
                     "split": r.split, "seq_len": r.seq_len}
    typer.echo(json.dumps(out, indent=2))


def stage_main(name: str) -> None:
    """Entry point of ``stages/<name>.py``: run the stage command with the process's arguments."""
    import sys

    app(args=[name.replace("_", "-"), *sys.argv[1:]], prog_name=f"stages/{name}.py")

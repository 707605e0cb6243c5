"""What pruned models can still do: calibration mixes x strategies x ratios, measured by the evaluate stages' suite.

    # SmolLM2 (embedded), the calibration-mix study and the task table of the strategies at 20 % and 50 %
    python benchmarks/tasks_quality.py run --model artifacts/model --out benchmarks/results/tasks_smollm2 \\
        --mix text=wikitext2:1 --mix chat=wikitext2:1,alpaca:1 --mix chat+code=wikitext2:1,alpaca:1,code:1 \\
        --strategies auto,llm-pruner,flap,wanda-sp,shortgpt --ratios 0.2,0.5 --humaneval 0
    # a code model (README "Measured results" says where it comes from): HumanEval is the signal
    python benchmarks/tasks_quality.py run --model /models/qwen2.5-coder-0.5b-instruct --out ... --humaneval 20 ...
    python benchmarks/tasks_quality.py markdown --out benchmarks/results/tasks_smollm2 --out ...  # into QUALITY.md

``run``: per mix, the calibration samples (the pipeline's ``calibrate.mix`` rule, 64 x 128 tokens), the
held-out windows of the mix's corpora, the scores, layer similarity and compensation statistics; per ratio
and strategy a pruned copy (``auto``: the allocate stage's choice on those held-out windows, one-shot least
squares; the peers as :mod:`gqaprune.pruning.peer_methods` define them); every model is measured with
:func:`gqaprune.evaluation.suite.evaluate_model` (perplexity, held-out instruction NLL, generation health,
HumanEval) against the dense model's continuations. ``--recover lora:STEPS`` also recovers each ``auto``
row with LoRA on the mix (the finetune stage's data rule). Rows go to ``rows.jsonl`` as they finish;
the greedy continuations to ``texts.jsonl``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from gqaprune.config.recovery_and_evaluation import EvaluateParams, FinetuneConfig, FinetuneParams
from gqaprune.config.sections import PlanConfig
from gqaprune.data.windows import heldout_windows, mixed_calibration_samples, mixed_text_windows, recovery_data
from gqaprune.evaluation.suite import evaluate_model, retention, scalars
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_model, load_tokenizer
from gqaprune.pruning.allocation import DEFAULT_CANDIDATES, select_allocation
from gqaprune.pruning.compensation import collect_stats
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.peer_methods import STRATEGIES, prune_copy
from gqaprune.pruning.similarity import block_similarity

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
BEGIN, END = "<!-- tasks:begin -->", "<!-- tasks:end -->"


@app.callback()
def _commands() -> None:
    """Task quality benchmark: run, markdown."""


def _mix(text: str) -> tuple[str, dict[str, float]]:
    """``name=corpus:weight,corpus:weight`` -> (name, mix)."""
    name, _, spec = text.partition("=")
    return name, {k: float(w) for k, _, w in (part.partition(":") for part in spec.split(","))}


def _write(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def _lora(model, tokenizer, mix: dict, steps: int, data_dir: str, seq_len: int):
    """LoRA on the recovery mix (the finetune stage's data rule), merged back into ``model``."""
    from gqaprune.recovery.lora import finetune_lora, merge_adapter

    records, windows = recovery_data(tokenizer, mix, seq_len, data_dir)
    config = FinetuneConfig(max_steps=steps, epochs=100.0, max_length=seq_len)
    return merge_adapter(finetune_lora(model, tokenizer, records, config, text_windows=windows)).eval()


def _distill(model, teacher, tokenizer, mix: dict, steps: int, data_dir: str, seq_len: int, exclude):
    """Distillation from the dense ``teacher`` on windows of the recovery mix (the finetune stage's
    ``method: distill`` with its default settings and ``max_steps=steps``)."""
    from gqaprune.recovery.distill import distill, distill_settings

    windows = mixed_text_windows(tokenizer, mix, seq_len, data_dir, exclude)
    return distill(model, teacher, windows, distill_settings(FinetuneParams(max_steps=steps))).eval()


RECOVERIES = {"lora": "LoRA", "distill": "distill"}  # --recover method -> its name in the rows


def _recoveries(recover: str) -> list[tuple[str, int]]:
    """``lora:10,distill:20`` -> [("lora", 10), ("distill", 20)]; an unknown method or a bad count stops the run."""
    out = []
    for item in filter(None, recover.split(",")):
        method, _, steps = item.partition(":")
        if method not in RECOVERIES or not steps.isdigit() or int(steps) < 1:
            raise typer.BadParameter(f"{item!r}: expected METHOD:STEPS with METHOD one of {sorted(RECOVERIES)}",
                                     param_hint="--recover")
        out.append((method, int(steps)))
    return out


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Dense model folder.")] = "artifacts/model",
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("benchmarks/results/tasks_smollm2"),
    data_dir: Annotated[str, typer.Option(help="Local corpora mirror.")] = "../shared/data",
    mix: Annotated[list[str], typer.Option(help="name=corpus:weight,... (repeatable).")] = ("text=wikitext2:1",),
    strategies: Annotated[str, typer.Option(help="auto and peer strategies.")] = "auto",
    ratios: Annotated[str, typer.Option(help="Ratios of all parameters.")] = "0.2",
    humaneval: Annotated[int, typer.Option(help="HumanEval problems (0: off).")] = 0,
    instruction_records: Annotated[int, typer.Option(help="Held-out instruction records.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Perplexity tokens per corpus.")] = 4096,
    recover: Annotated[str, typer.Option(
        help="lora:STEPS / distill:STEPS, comma-separated, to recover the auto rows too ('' off).")] = "",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
) -> None:
    """Every mix x ratio x strategy, measured with the evaluate stages' suite."""
    recoveries = _recoveries(recover)  # checked before any model is loaded
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_model(model, device="cpu"), load_tokenizer(model)
    adapter = get_adapter(dense.config)
    geometry, counts = adapter.geometry(dense.config), parameter_counts(dense, adapter, adapter.geometry(dense.config))
    e = EvaluateParams(datasets=["wikitext2", "ptb", "c4"], max_tokens=max_tokens, humaneval_problems=humaneval,
                       instruction_records=instruction_records)
    meta = {"model": model, "params": counts.total, "started": time.strftime("%Y-%m-%d %H:%M"), "humaneval": humaneval,
            "instruction_records": instruction_records, "max_tokens": max_tokens, "threads": threads}
    done = _done(out, meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()
    if ("-", "dense", 0.0) in done:  # a resumed run: the dense figures and texts as recorded
        ref = done[("-", "dense", 0.0)]
        texts = next(json.loads(line)["texts"] for line in (out / "texts.jsonl").read_text().splitlines()
                     if json.loads(line)["strategy"] == "dense")
        dense_result = {"generation": {"texts": texts}}
    else:
        dense_result = evaluate_model(dense, tokenizer, e, data_dir)
        ref = scalars(dense_result)
        _write(out / "rows.jsonl", {"mix": "-", "strategy": "dense", "ratio": 0.0, **ref,
                                    "s": time.perf_counter() - t0})
        _write(out / "texts.jsonl", {"mix": "-", "strategy": "dense", "ratio": 0.0,
                                     "texts": dense_result.get("generation", {}).get("texts")})
    for name, weights in (_mix(m) for m in mix):
        samples, got = mixed_calibration_samples(tokenizer, weights, 64, 128, 0, data_dir)
        held = torch.cat([heldout_windows(tokenizer, c, None, 16, 128, got.get(c, 0), 128, 0, data_dir=data_dir)
                          for c in weights])
        scores = score_groups(dense, samples, progress=False)
        sim = block_similarity(dense, samples, progress=False)
        stats = collect_stats(dense, samples, list(range(geometry.num_layers)), progress=False)
        for ratio in (float(r) for r in ratios.split(",")):
            for strategy in strategies.split(","):
                auto = strategy in ("auto", "auto-keep-attn")
                if not auto and (name, strategy, ratio) in done:
                    continue
                t0 = time.perf_counter()
                if auto:
                    # auto-keep-attn: the loop study's variant, every attention group scored above any channel
                    table = _attention_kept(scores) if strategy == "auto-keep-attn" else scores
                    sel = select_allocation(dense, table, sim, counts, geometry.num_layers,
                                            PlanConfig(ratio=ratio, temperature=0.0), held, None, DEFAULT_CANDIDATES,
                                            calibration=samples)
                    pruned, _ = prune_copy(dense, table, sim, counts, geometry.num_layers,
                                           STRATEGIES["ours"], ratio, stats, plan_overrides=sel.choice.plan)
                    label = f"{strategy} ({sel.choice.name})"
                else:
                    pruned, _ = prune_copy(dense, scores, sim, counts, geometry.num_layers, STRATEGIES[strategy],
                                           ratio, stats)
                    label = strategy
                for method, steps in [("none", 0), *(recoveries if auto else [])]:
                    row_name = f"{label} + {RECOVERIES[method]} {steps}" if steps else label
                    if (name, row_name, ratio) in done:
                        continue
                    # each recovery starts from the pruned model (a copy: both merge into the model they train)
                    if method == "lora":
                        m = _lora(copy.deepcopy(pruned), tokenizer, weights, steps, data_dir, 128)
                    elif method == "distill":
                        m = _distill(copy.deepcopy(pruned), dense, tokenizer, weights, steps, data_dir, 128, held)
                    else:
                        m = pruned
                    result = evaluate_model(m, tokenizer, e, data_dir, reference=dense_result)
                    row = {"mix": name, "strategy": row_name, "ratio": ratio}
                    s = scalars(result)
                    _write(out / "rows.jsonl", {**row, **s, "retention": retention(s, ref),
                                                "s": time.perf_counter() - t0})
                    _write(out / "texts.jsonl", {**row, "texts": result.get("generation", {}).get("texts")})
                    print(json.dumps({**row, "retention": retention(s, ref)}), flush=True)


def _attention_kept(scores):
    """The score table with every attention group above every MLP channel in every metric (so that a plan
    removes MLP channels only, as long as the ratio can be met by them)."""
    table = scores.copy()
    metrics = [c for c in ("magnitude", "wanda", "taylor", "taylor_2nd", "fluctuation") if c in table.columns]
    attn = table["kind"] == "attn"
    top = (table[metrics].abs().max() * 1e3 + 1.0).to_numpy()  # [metrics]
    table.loc[attn, metrics] = top[None, :].repeat(int(attn.sum()), axis=0)
    return table


def _done(out: Path, meta: dict) -> dict[tuple, dict]:
    """Rows already recorded in ``out`` by a run of the same model and settings, by (mix, strategy, ratio)."""
    old = out / "meta.json"
    if not (out / "rows.jsonl").exists() or not old.exists():
        return {}
    same = ("model", "humaneval", "instruction_records", "max_tokens")
    before = json.loads(old.read_text())
    if any(before.get(k) != meta[k] for k in same):
        raise SystemExit(f"{out} holds rows of other settings ({before}); give another --out")
    meta["started"] = before["started"]
    return {(r["mix"], r["strategy"], r["ratio"]): r for r in _rows(out)}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]


def table(folder: Path) -> list[str]:
    """The Markdown table of one results folder: every row's figures and what it keeps of the dense model's."""
    meta = json.loads((folder / "meta.json").read_text())
    rows = _rows(folder)
    dense = next(r for r in rows if r["strategy"] == "dense")
    has_he = bool(meta["humaneval"])
    head = ["mix", "removed", "strategy", "WikiText-2 ppl", "instruction NLL", "loop rate",
            "loops: instructions / code", "distinct-2", "agreement", *(["HumanEval"] if has_he else [])]
    lines = [f"### `{folder.name}`", "",
             f"Model `{meta['model']}` ({meta['params']:,} parameters), {meta['started']}: perplexity on "
             f"{meta['max_tokens']:,} spread tokens per corpus, NLL of {meta['instruction_records']} held-out "
             "instruction answers under the chat template (x dense), greedy generation health on the fixed "
             f"prompt set (loop rate in points over dense){', HumanEval pass@1 on the first ' if has_he else ''}"
             f"{meta['humaneval'] if has_he else ''}{' problems (% of dense)' if has_he else ''}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g, keep = r.get("generation", {}), r.get("retention", {})
        cells = [r["mix"], f"{r['ratio']:.0%}" if r["ratio"] else "-", r["strategy"],
                 f"{r['ppl']['wikitext2']:.2f}" + (f" ({keep['ppl_x_dense']['wikitext2']:.2f}x)" if keep else ""),
                 f"{r['instruction_nll']:.3f}" + (f" ({keep['instruction_nll_x_dense']:.3f}x)" if keep else ""),
                 f"{100 * g.get('loop_rate', 0):.0f} %" + (f" ({100 * keep['loop_rate_minus_dense']:+.0f})"
                                                           if keep else ""),
                 f"{100 * g.get('loop_rate_instructions', 0):.0f} % / {100 * g.get('loop_rate_code', 0):.0f} %",
                 f"{g.get('distinct_2', 0):.2f}", f"{g['agreement']:.2f}" if "agreement" in g else "1.00"]
        if has_he:
            h = r.get("humaneval", {})
            pct = keep.get("humaneval_pct_of_dense") if keep else None
            cells.append(f"{h.get('passed', 0)}/{h.get('problems', 0)}" + (f" ({pct:.0f} %)" if pct is not None
                                                                            else ""))
        lines.append("| " + " | ".join(cells) + " |")
    del dense
    return lines


def generations(folder: Path, strategy_prefix: str = "auto", ratio: float = 0.2, limit: int = 3) -> list[str]:
    """A few greedy continuations side by side: dense, and the last row of ``folder`` at ``ratio`` whose strategy
    starts with ``strategy_prefix`` (the recovered ``auto`` row when there is one), instruction prompts first."""
    from gqaprune.data.prompts import CODE_PROMPTS, INSTRUCTION_PROMPTS
    from gqaprune.evaluation.generation import side_by_side_markdown

    rows = [json.loads(line) for line in (folder / "texts.jsonl").read_text().splitlines() if line.strip()]
    dense = next(r for r in rows if r["strategy"] == "dense")["texts"]
    picked = [r for r in rows if r["strategy"].startswith(strategy_prefix) and abs(r["ratio"] - ratio) < 1e-9]
    if not dense or not picked:
        return []
    mine = picked[-1]
    prompts = [*INSTRUCTION_PROMPTS[:limit], *CODE_PROMPTS[:1]]
    doc = side_by_side_markdown(prompts, [*dense["instructions"][:limit], *dense["code"][:1]],
                                [*mine["texts"]["instructions"][:limit], *mine["texts"]["code"][:1]],
                                f"Side by side: dense and {mine['strategy']} at {ratio:.0%} ({mine['mix']} mix)")
    # two levels down, so the document's headings nest under this section's
    return [("##" + line) if line.startswith("#") else line for line in doc.splitlines()]


@app.command()
def markdown(
    out: Annotated[list[Path], typer.Option(help="Results folders (one table each).")],
    doc: Annotated[Path, typer.Option(help="The document whose tasks section is rewritten.")] = Path(
        "benchmarks/QUALITY.md"),
) -> None:
    """Rewrite the tasks section of QUALITY.md (between its markers) from the recorded rows."""
    body = ["## What the pruned models can still do (task table)", "",
            "Made by `benchmarks/tasks_quality.py` (commands in its docstring).", ""]
    for folder in out:
        body += table(folder) + [""]
    if out:
        body += ["Greedy continuations (128 new tokens, no stop sequence) from the first results folder: the "
                 "first three instruction prompts and one code opening.", ""]
        body += generations(out[0]) + [""]
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join([BEGIN, *body, END])
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    app()

"""Side-by-side quality benchmark: every strategy at several ratios on one model, same data.

    python benchmarks/quality.py --model artifacts/model --data-dir ../shared/data \
        --out benchmarks/results/quality_smollm2

Scores (all metrics), layer/block similarity and compensation statistics are computed once on the
same calibration samples; each strategy is then planned to the same exact parameter budget, pruned,
and evaluated on WikiText-2 / PTB / C4 with the same capped windows. The rows at ``--lora-ratio`` are
also evaluated after an identical short LoRA recovery. Writes ``results.csv``, ``results.md`` and
``ppl_vs_ratio.png`` into ``--out`` (rows are appended as they finish, so a cut run keeps its rows).
Runs the same on a GPU with an 8B model folder (``--device cuda --dtype bfloat16``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from gqaprune.adapters import get_adapter
from gqaprune.compensation import collect_stats
from gqaprune.data import calibration_samples, load_instructions
from gqaprune.evaluation import perplexity
from gqaprune.finetune import FinetuneConfig, finetune_lora, merge_adapter
from gqaprune.groups import parameter_counts
from gqaprune.importance import METRICS, score_groups
from gqaprune.modelio import load_model
from gqaprune.similarity import block_similarity
from gqaprune.strategies import PEERS, STRATEGIES, VARIANTS, prune_copy

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _ppl(model, tokenizer, datasets, seq_len, tokens, batch, data_dir) -> dict:
    """Perplexity per dataset (capped windows) and the tokens evaluated."""
    out = {}
    for name in datasets:
        r = perplexity(model, tokenizer, dataset=name, seq_len=seq_len, batch_size=batch, max_tokens=tokens,
                       data_dir=data_dir)
        out[name] = r.ppl
        out[f"{name}_tokens"] = r.n_tokens
    return out


@app.command()
def main(
    model: Annotated[str, typer.Option(help="Dense model folder or hub id.")] = "artifacts/model",
    out: Annotated[Path, typer.Option(help="Output folder for results.csv / .md / .png.")] = Path(
        "benchmarks/results/quality_smollm2"),
    data_dir: Annotated[str, typer.Option(help="Local corpora mirror.")] = "../shared/data",
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios of all parameters.")] = "0.1,0.2,0.3,0.5",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies (default: all).")] = ",".join(STRATEGIES),
    variant_ratios: Annotated[str, typer.Option(help="Ratios at which ablations / T-tau variants run.")] = "0.2,0.3",
    n_samples: Annotated[int, typer.Option(help="Calibration samples (wikitext2 validation).")] = 64,
    seq_len: Annotated[int, typer.Option(help="Calibration and evaluation window length.")] = 128,
    eval_tokens: Annotated[int, typer.Option(help="Evaluated tokens per dataset (capped windows).")] = 4096,
    datasets: Annotated[str, typer.Option(help="Evaluation corpora.")] = "wikitext2,ptb,c4",
    lora_ratio: Annotated[float, typer.Option(help="Ratio whose rows also get LoRA recovery (<=0: none).")] = 0.2,
    lora_steps: Annotated[int, typer.Option(help="LoRA optimizer steps for each recovered row.")] = 10,
    gradient_batch_size: Annotated[int, typer.Option(help="Micro-batch of the Taylor scoring pass.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Evaluation windows per forward.")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
) -> None:
    """Run every strategy at every ratio and write the comparison table."""
    out.mkdir(parents=True, exist_ok=True)
    names = [s for s in strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    eval_sets = [d for d in datasets.split(",") if d]
    started = time.perf_counter()
    dense, tokenizer = load_model(model, dtype=dtype, device=device)
    adapter = get_adapter(dense.config)
    geometry = adapter.geometry(dense.config)
    counts = parameter_counts(dense, adapter, geometry)
    samples = calibration_samples(tokenizer, "wikitext2", None, n_samples, seq_len, 0, data_dir=data_dir)
    t0 = time.perf_counter()
    scores = score_groups(dense, samples, metrics=METRICS, gradient_batch_size=gradient_batch_size)
    sim = block_similarity(dense, samples)
    stats = collect_stats(dense, samples, list(range(geometry.num_layers)))
    prep_s = time.perf_counter() - t0
    dense_ppl = _ppl(dense, tokenizer, eval_sets, seq_len, eval_tokens, batch_size, data_dir)
    meta = {"model": model, "params_total": counts.total,
            "calibration": f"wikitext2/validation {n_samples} x {seq_len}",
            "calibration_tokens": samples.numel(), "eval_tokens_per_dataset": eval_tokens, "seq_len": seq_len,
            "datasets": eval_sets, "dense": dense_ppl, "scoring_s": round(prep_s, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    records = [pd.DataFrame([{"strategy": "dense", "ratio": 0.0, "stage": "pruned", "params": counts.total,
                              **dense_ppl}]).iloc[0].to_dict()]
    records_path = out / "results.csv"
    variant_set = {float(r) for r in variant_ratios.split(",") if r}
    lora_records = load_instructions("alpaca", "train", data_dir=data_dir) if lora_ratio > 0 else []
    for ratio in [float(r) for r in ratios.split(",") if r]:
        for name in names:
            if name in VARIANTS and ratio not in variant_set:
                continue
            t = time.perf_counter()
            pruned, plan = prune_copy(dense, scores, sim, counts, geometry.num_layers, STRATEGIES[name], ratio,
                                      stats=stats)
            row = {"strategy": name, "ratio": ratio, "stage": "pruned",
                   "params": parameter_counts(pruned, get_adapter(pruned.config), geometry).total,
                   **_ppl(pruned, tokenizer, eval_sets, seq_len, eval_tokens, batch_size, data_dir),
                   "removed_layers": len(plan.analysis["removed_layers"]),
                   "seconds": round(time.perf_counter() - t, 1)}
            records.append(row)
            print(json.dumps(row), flush=True)
            if abs(ratio - lora_ratio) < 1e-9 and (name == "ours" or name in PEERS):
                cfg = FinetuneConfig(max_steps=lora_steps, epochs=1, batch_size=4, max_length=128, seed=0)
                tuned = merge_adapter(finetune_lora(pruned, tokenizer, lora_records, cfg))
                row = {**row, "stage": "lora", **_ppl(tuned, tokenizer, eval_sets, seq_len, eval_tokens, batch_size,
                                                      data_dir)}
                records.append(row)
                print(json.dumps(row), flush=True)
            del pruned
            _write(records, records_path, out, meta)
    meta["total_s"] = round(time.perf_counter() - started, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    _write(records, records_path, out, meta)


def _write(records: list[dict], csv_path: Path, out: Path, meta: dict) -> None:
    """CSV of all rows, a Markdown table with ratios to dense, and the plot."""
    frame = pd.DataFrame(records)
    frame.to_csv(csv_path, index=False)
    dense = meta["dense"]
    lines = [f"Model `{meta['model']}` ({meta['params_total']:,} parameters). Calibration: {meta['calibration']} "
             f"({meta['calibration_tokens']:,} tokens). Evaluation: first {meta['eval_tokens_per_dataset']:,} tokens "
             f"of each corpus, seq_len {meta['seq_len']}. Ratios are of all parameters (embeddings included).", "",
             "| ratio | strategy | stage | params | " + " | ".join(f"{d} (x dense)" for d in meta["datasets"]) + " |",
             "|---|---|---|---:|" + "---:|" * len(meta["datasets"])]
    for r in frame.to_dict("records"):
        cells = " | ".join(f"{r[d]:.2f} ({r[d] / dense[d]:.2f}x)" for d in meta["datasets"])
        lines.append(f"| {r['ratio']:.0%} | {r['strategy']} | {r['stage']} | {int(r['params']):,} | {cells} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(frame, out / "ppl_vs_ratio.png", meta["datasets"][0], dense[meta["datasets"][0]])


def _plot(frame: pd.DataFrame, path: Path, dataset: str, dense: float) -> None:
    """Perplexity / dense vs ratio, one line per strategy (log scale), pruned rows only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pruned = frame[(frame["stage"] == "pruned") & (frame["strategy"] != "dense")]
    for name, rows in pruned.groupby("strategy"):
        rows = rows.sort_values("ratio")
        ax.plot(rows["ratio"] * 100, rows[dataset] / dense, marker="o", label=name,
                linewidth=2.5 if name == "ours" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(f"{dataset} perplexity / dense")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    app()

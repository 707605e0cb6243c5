"""QUALITY.md from the quality benchmark's recorded rows (``python benchmarks/quality.py markdown``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer

DEFAULT_OUT = Path("benchmarks/results/quality3_smollm2")
Out = Annotated[Path, typer.Option(help="Results folder of a finished `run`.")]


def read_results(out: Path, kind: str = "results") -> pd.DataFrame:
    """All runs' rows of one kind (``results_<tag>.csv``), dense once."""
    frames = [pd.read_csv(f) for f in sorted(out.glob(f"{kind}_*.csv"))]
    frame = pd.concat(frames, ignore_index=True)
    if "strategy" in frame:
        frame = frame.drop_duplicates(subset=["strategy", "ratio"], keep="first")
    return frame


def best_other(frame: pd.DataFrame, ratio: float, datasets: list[str]) -> str:
    """The non-auto row with the lowest mean log-perplexity over ``datasets`` at ``ratio``, among the rows that
    are not the auto model itself (a fixed strategy whose plan auto chose gives identical figures)."""
    cols = [f"{d}_logppl" for d in datasets]
    at = frame[frame["ratio"] == ratio]
    rows = at[~at["strategy"].str.startswith("auto") & (at["strategy"] != "dense")]
    auto = at[at["strategy"] == "auto"]
    if len(auto):
        same = np.isclose(rows[cols].to_numpy(), auto[cols].to_numpy()[0], rtol=0, atol=1e-9).all(axis=1)
        rows = rows[~same] if (~same).any() else rows
    score = rows[cols].mean(axis=1)
    return str(rows.loc[score.idxmin(), "strategy"])


def _cell(r, d: str, dense: dict, bold: bool = False) -> str:
    if d not in r or pd.isna(r[d]):
        return "-"
    text = f"{r[d]:.2f} ({r[d] / dense[d]:.2f}x) ±{r[f'{d}_se']:.3f}"
    return f"**{text}**" if bold else text


def _paired(windows: pd.DataFrame, a: str, b: str, ratio: float, d: str) -> tuple[float, float]:
    """Mean and SE over windows of NLL(a) - NLL(b) (nats), same windows."""
    def get(s):
        row = windows[(windows["strategy"] == s) & (windows["ratio"] == ratio) & (windows["dataset"] == d)]
        if not len(row) and s.startswith("auto-"):  # the twin that is auto itself was not evaluated again
            return get("auto")
        return np.asarray(row["nll"].iloc[0], dtype=np.float64)

    xa, xb = get(a), get(b)
    if len(xa) != len(xb):  # a cheap row: every k-th of the same windows
        k = max(len(xa), len(xb)) // min(len(xa), len(xb))
        xa, xb = (xa[::k], xb) if len(xa) > len(xb) else (xa, xb[::k])
    x = xa - xb
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def markdown(
    out: Out = DEFAULT_OUT,
    doc: Annotated[Path, typer.Option(help="The Markdown file written.")] = Path("benchmarks/QUALITY.md"),
    notes: Annotated[Path, typer.Option(help="Hand-written text placed before the generated tables.")] = Path(
        "benchmarks/quality_notes.md"),
) -> None:
    """Regenerate QUALITY.md: the notes, then every table from the recorded results."""
    frame = read_results(out)
    meta = json.loads(sorted(out.glob("meta_*.json"))[0].read_text())
    datasets = meta["datasets"]
    dense = frame[frame["strategy"] == "dense"].iloc[0]
    windows = pd.concat([pd.read_parquet(f) for f in sorted(out.glob("windows_*.parquet"))], ignore_index=True)
    windows = windows.drop_duplicates(subset=["strategy", "ratio", "dataset"], keep="first")
    lines = [notes.read_text().rstrip() if notes.exists() else "# Quality benchmark", ""]
    lines += ["## Generated tables", "",
              f"Model `{meta['model']}` ({meta['params_total']:,} parameters); calibration {meta['calibration']}; "
              f"held-out {meta['heldout']}; selection criterion `{meta['criterion']}`. Evaluation: "
              f"{meta['eval_windows']} windows of {meta['seq_len']} tokens spread evenly over each whole test split "
              f"(of {', '.join(f'{d} {n:,}' for d, n in meta['full_windows'].items())} windows), weights in "
              f"{meta['eval_dtype']}. Cells: perplexity (x dense) ±SE of the log-perplexity (nats, over windows); "
              "bold: lowest of the ratio.", ""]
    lines += ["### Every strategy at every ratio", "",
              "| ratio | strategy | params | " + " | ".join(datasets) + " |",
              "|---|---|---:|" + "---:|" * len(datasets),
              "| 0% | dense | {:,} | ".format(int(dense["params"])) + " | ".join(
                  f"{dense[d]:.2f} ±{dense[f'{d}_se']:.3f}" for d in datasets) + " |"]
    ratios = sorted(r for r in frame["ratio"].unique() if r > 0)
    verdicts = []
    for ratio in ratios:
        rows = frame[(frame["ratio"] == ratio)].copy()
        rows["_mean"] = rows[[f"{d}_logppl" for d in datasets]].mean(axis=1)
        rows = rows.sort_values("_mean")
        best = {d: rows[f"{d}_logppl"].min() for d in datasets}
        for r in rows.to_dict("records"):
            name = r["strategy"] + (f" ({r['choice']}, {r['compensation']})" if str(r.get("choice", "nan")) != "nan"
                                    else "")
            cells = " | ".join(_cell(r, d, dense, r[f"{d}_logppl"] == best[d]) for d in datasets)
            lines.append(f"| {ratio:.0%} | {name} | {int(r['params']):,} | {cells} |")
        auto = rows[rows["strategy"] == "auto"].iloc[0]
        # the target: auto against every other strategy (its own compensation twin excluded)
        others = rows[~rows["strategy"].isin(["auto", "auto-sequential"])]
        for d in datasets:
            o = others.loc[others[f"{d}_logppl"].idxmin()]
            diff, se = _paired(windows, "auto", o["strategy"], ratio, d)
            gap = auto[f"{d}_logppl"] - o[f"{d}_logppl"]
            ok = gap <= 0 or gap <= o[f"{d}_se"]
            verdicts.append(f"| {ratio:.0%} | {d} | {auto[d]:.2f} ±{auto[f'{d}_se']:.3f} | {o['strategy']} "
                            f"{o[d]:.2f} ±{o[f'{d}_se']:.3f} | {diff:+.3f} ±{se:.3f} | "
                            f"{'met' if ok else 'not met'} |")
    lines += ["", "### Target: the default (auto) against the best other strategy", "",
              "Best other = the lowest of the peers and our fixed variants on that corpus. Paired difference = mean "
              "over the same windows of NLL(auto) - NLL(other), nats, ±its SE. Met = auto lower, or higher by at "
              "most one SE of the best other row's log-perplexity.", "",
              "| ratio | corpus | auto | best other | paired diff (nats) | target |", "|---|---|---:|---:|---:|---|",
              *verdicts]
    sel_files = sorted(out.glob("selection_*.csv"))
    if sel_files:
        sel = pd.concat([pd.read_csv(f) for f in sel_files], ignore_index=True)
        sel = sel.drop_duplicates(subset=["ratio", "candidate"], keep="first").sort_values(["ratio"], kind="stable")
        lines += ["", "### Allocation selection on held-out calibration windows (one-shot least squares)", "",
                  "KL: mean KL(dense || pruned) per token on the held-out windows of all three corpora's calibration "
                  "splits together (the criterion, as the `allocate` stage); per-corpus columns: KL on each "
                  "corpus's windows alone. Chosen: lowest KL (bold).", "",
                  "| ratio | candidate | KL (all) | NLL (all) | wikitext2 KL | ptb KL | c4 KL | s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for ratio, g in sel.groupby("ratio"):
            for r in g.to_dict("records"):
                name = f"**{r['candidate']}**" if r["chosen"] else r["candidate"]
                lines.append(f"| {ratio:.0%} | {name} | {r['kl']:.4f} ±{r['kl_se']:.4f} | {r['nll']:.4f} | "
                             f"{r['wikitext2_kl']:.4f} | {r['ptb_kl']:.4f} | {r['c4_kl']:.4f} | {r['seconds']:.0f} |")
        auto_rows = frame[frame["strategy"].isin(["auto", "auto-sequential"])]
        if "auto-sequential" in set(auto_rows["strategy"]):
            lines += ["", "### Sequential vs one-shot compensation (the chosen plan, same calibration data)", "",
                      "Held-out KL on the three corpora's held-out calibration windows; test: paired difference "
                      "of the log-perplexities, sequential - one-shot (`auto-sequential` minus `auto`, nats, on "
                      "the windows both were evaluated on).", "",
                      "| ratio | KL one-shot | KL sequential | " + " | ".join(f"{d} diff (nats)" for d in datasets)
                      + " |", "|---|---:|---:|" + "---:|" * len(datasets)]
            for ratio, g in auto_rows.groupby("ratio"):
                kl = g.set_index("strategy")["heldout_kl"]
                diffs = []
                for d in datasets:
                    m, se = _paired(windows, "auto-sequential", "auto", ratio, d)
                    diffs.append(f"{m:+.3f} ±{se:.3f}")
                lines.append(f"| {ratio:.0%} | {kl['auto']:.4f} | {kl['auto-sequential']:.4f} | "
                             + " | ".join(diffs) + " |")
    if (out / "sequential_targets.csv").exists():
        st = pd.read_csv(out / "sequential_targets.csv")
        lines += ["", "### Sequential targets on the three corpora's calibration splits (`sequential_targets.py`)", "",
                  "Held-out KL(dense || pruned) on 16 windows each of WikiText-2 validation, PTB train and C4 "
                  "calibration (no test text); same plan (the default's allocation at that ratio).", "",
                  "| ratio | plan | compensation | wikitext2 KL | ptb KL | c4 KL | mean KL | s |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in st.to_dict("records"):
            mean = (r["wikitext2_kl"] + r["ptb_kl"] + r["c4_kl"]) / 3
            lines.append(f"| {r['ratio']:.0%} | {r['plan']} | {r['compensation']} | {r['wikitext2_kl']:.4f} | "
                         f"{r['ptb_kl']:.4f} | {r['c4_kl']:.4f} | {mean:.4f} | {r['seconds']:.0f} |")
    rec_files = sorted(out.glob("recovery*.csv"))
    rec_files = [f for f in rec_files if not f.name.startswith("recovery_curve")]
    if rec_files:
        rec = pd.concat([pd.read_csv(f) for f in rec_files], ignore_index=True)
        if "device" not in rec:
            rec["device"] = "cpu"
        rec["device"] = rec["device"].fillna("cpu")
        # each recovery run appends the untrained baseline again: keep one per device
        rec = rec.drop_duplicates(subset=["method", "device", "budget_s"], keep="first")
        lines += ["", "### Recovery at equal wall time", "",
                  "| ratio | method | device | budget s | trained s | steps | held-out KL | "
                  + " | ".join(datasets) + " |",
                  "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(datasets)]
        for r in rec.to_dict("records"):
            lines.append(f"| {r['ratio']:.0%} | {r['method']} | {r['device']} | {r['budget_s']:.0f} | "
                         f"{r['train_s']:.0f} | {int(r['steps'])} | {r['heldout_kl']:.4f} | "
                         + " | ".join(_cell(r, d, dense) for d in datasets) + " |")
    if (out / "full.csv").exists():
        full_rows = pd.read_csv(out / "full.csv")
        ds = [d for d in datasets if f"{d}_logppl" in full_rows]
        fdense = full_rows[full_rows["strategy"] == "dense"]
        lines += ["", "### Full test sets (every window)", "",
                  "| ratio | strategy | " + " | ".join(f"{d} (windows)" for d in ds) + " |",
                  "|---|---|" + "---:|" * len(ds)]
        for r in full_rows.sort_values("ratio", kind="stable").to_dict("records"):
            cells = []
            for d in ds:
                if pd.isna(r.get(f"{d}_logppl")):
                    cells.append("")
                    continue
                rel = ""
                if len(fdense) and not pd.isna(fdense.iloc[0].get(d)):
                    rel = f" ({r[d] / fdense.iloc[0][d]:.2f}x)"
                cells.append(f"{r[d]:.2f}{rel} ±{r[f'{d}_se']:.3f} ({int(r[f'{d}_windows']):,})")
            lines.append(f"| {r['ratio']:.0%} | {r['strategy']} | " + " | ".join(cells) + " |")
    speed = out / "eval_speed.json"
    if speed.exists():
        sp = json.loads(speed.read_text())
        setup = sp.pop("_setup")
        lines += ["", "### Evaluation speed (CPU, 2 shared cores)", "",
                  f"{setup['windows']} windows x {setup['seq_len']} tokens of WikiText-2 test per variant and round, "
                  f"{setup['rounds']} interleaved rounds, median; load average at the end {setup['load_avg']}.", "",
                  "| variant | tokens/s (median) | per round | log-ppl - first variant's |", "|---|---:|---|---:|"]
        for name, v in sp.items():
            lines.append(f"| {name} | {v['tok_s_median']:.0f} | {', '.join(f'{x:.0f}' for x in v['tok_s'])} | "
                         f"{v['log_ppl_minus_first']:+.2e} |")
    # the task table (benchmarks/tasks_quality.py markdown) lives between its markers: kept as it is
    begin, end = "<!-- tasks:begin -->", "<!-- tasks:end -->"
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        lines += ["", text[text.index(begin):text.index(end) + len(end)]]
    doc.write_text("\n".join(lines) + "\n")


"""Writes ``benchmarks/PERFORMANCE.md`` from the JSON files of ``benchmarks/stage_times.py`` (and of
``benchmarks/allocation_speed.py``: the allocate stage's choices before and now).

    python benchmarks/performance.py benchmarks/results/performance/cpu_smollm2.json \\
        benchmarks/results/performance/cpu_qwen2.5-coder-0.5b.json \\
        benchmarks/results/performance/h100_llama3-8b.json benchmarks/results/performance/allocation_smollm2.json

Per run: one row per stage (process wall time, the stage's own timer, what the process spent outside it:
interpreter start, imports, params; peak resident memory; peak GPU memory), the totals the speed issue names,
each beside its target, and on a GPU the floors measured in the same run (the plain model's forward and
forward+backward throughput). The text around the tables is ``benchmarks/performance_notes.md``; the
several-GPU figures are quoted from ``DISTRIBUTED.md`` (no 4-GPU machine was lent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: the speed issue's targets: (label, value of a run, limit, unit); a run's kind picks its list
TARGETS = {
    "cpu-small": [("default pipeline (all stages)", lambda r: r["pipeline_process_s"], 360, "s"),
                  ("allocate", lambda r: _stage(r, "allocate")["process_s"], 60, "s")],
    "cpu-0.5b": [("default pipeline (all stages)", lambda r: r["pipeline_process_s"], 720, "s"),
                 ("peak resident memory", lambda r: r["peak_rss_gib"], 8 / 1.073741824, "GiB")],
    "gpu": [("score to checkpoint, in-stage", lambda r: r["score_to_checkpoint_in_stage_s"], 35, "s"),
            ("pipeline without finetune, wall", lambda r: r["pipeline_without_finetune_process_s"], 150, "s"),
            ("allocate time", lambda r: _stage(r, "allocate")["process_s"], 60, "s"),
            ("allocate GPU memory", lambda r: _stage(r, "allocate")["peak_gpu_gib"] or 0.0, 40, "GiB"),
            ("surgery GPU memory", lambda r: _stage(r, "surgery")["peak_gpu_gib"] or 0.0, 60, "GiB"),
            ("largest start-up outside the stage timer", lambda r: max(_outside(x) for x in r["rows"]), 3, "s")],
}


def _stage(run: dict, name: str) -> dict:
    return next(r for r in run["rows"] if r["stage"] == name)


def _outside(row: dict) -> float:
    """Seconds of the stage process outside the stage's own timer (interpreter, imports, params, exit)."""
    return max(0.0, row["process_s"] - (row["in_stage_s"] or 0.0))


def kind(doc: dict, run: dict) -> str:
    """Which target list applies: a GPU run, a 0.5B-class CPU run, or the small CPU default."""
    if doc["machine"].get("gpu"):
        return "gpu"
    params = run["model"]["params"] if isinstance(run["model"], dict) else _stage(run, "prepare")["metrics"].get(
        "params_total", 0)
    return "cpu-0.5b" if params > 3e8 else "cpu-small"


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _phases(row: dict) -> str:
    phases = row["metrics"].get("phases_s") or {}
    seconds = row["metrics"].get("seconds") or {}
    if seconds and isinstance(next(iter(seconds.values())), dict):  # evaluate: per model
        seconds = {f"{m} {k}": v for m, d in seconds.items() for k, v in d.items()}
    parts = {**phases, **seconds}
    return ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if isinstance(v, (int, float)))


def floors(run: dict) -> list[str]:
    """The GPU floors of the run and what they imply for the stages that read tokens."""
    got = run["model"].get("floors") if isinstance(run["model"], dict) else None
    if not got:
        return []
    fwd, fb = got["forward_tok_s"], got["forward_backward_tok_s"]
    lines = [f"Floors measured in the same run on the plain random model ({got['batch']} x {got['seq_len']} "
             f"tokens, bf16): forward {fwd:,} tokens/s, forward + backward (every weight's gradient) {fb:,} "
             "tokens/s.", ""]
    calib = _stage(run, "calibrate")["metrics"].get("calibration_tokens")
    score = _stage(run, "score")["metrics"].get("phases_s", {}).get("score")
    if calib and score:
        lines.append(f"* score: {calib:,} calibration tokens, the forward+backward floor {calib / fb:.1f} s; "
                     f"the scoring phase took {score:.1f} s ({score / (calib / fb):.2f}x).")
    ev = _stage(run, "evaluate_dense")["metrics"]
    tokens = sum((ev.get("tokens_evaluated") or {}).values()) if ev.get("tokens_evaluated") else None
    ppl = (ev.get("seconds") or {}).get("ppl")
    if tokens and ppl:
        lines.append(f"* evaluate_dense perplexity: {tokens:,} tokens, the forward floor {tokens / fwd:.1f} s; "
                     f"took {ppl:.1f} s.")
    return lines + [""]


def table(doc: dict, run: dict) -> list[str]:
    """The Markdown of one run: header, stage rows, totals, targets."""
    m = doc["machine"]
    device = (f"{m['gpus']} x {m['gpu']} ({m['gpu_mib'] / 1024:.0f} GiB), {m['cores']} CPU cores" if m.get("gpu")
              else f"CPU {m['cpu']}, {m['cores']} cores, {m['memory_mib'] / 1024:.0f} GiB")
    model = run["model"] if isinstance(run["model"], str) else f"random weights, {run['model']['params']:,} params"
    lines = [f"### {run['name']} on {device}", "",
             f"{doc['started']}, commit `{m.get('commit')}`, torch {m['torch']}, transformers {m['transformers']}; "
             f"model: {model}.", "", "```bash", f"python benchmarks/stage_times.py {' '.join(doc['argv'])}", "```", "",
             "| stage | process s | in-stage s | outside s | peak RSS GiB | peak GPU GiB | phases (s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in run["rows"]:
        lines.append(f"| {r['stage']} | {_fmt(r['process_s'])} | {_fmt(r['in_stage_s'])} | {_fmt(_outside(r))} | "
                     f"{_fmt(r['peak_rss_gib'], 2)} | {_fmt(r['peak_gpu_gib'], 2)} | {_phases(r)} |")
    missing = run.get("incomplete")
    if missing:  # a run stopped before its last stages: the totals below are lower bounds
        lines += ["", f"Not run to the end: {', '.join(missing)} did not finish (the machine was needed for the "
                      "quality runs); the totals below cover the stages above only, so they are lower bounds."]
    perturbed = run.get("perturbed") or {}
    if perturbed:  # stages timed under foreign load: their times are not measurements; totals without them
        lines += ["", "Not measurements (the machine was shared): " + "; ".join(
            f"`{stage}` {why}" for stage, why in perturbed.items()) + ". Their figures other than time are valid; "
            "the totals below leave their times out, so they are lower bounds."]
        clean = [r for r in run["rows"] if r["stage"] not in perturbed]
        run = {**run, "pipeline_process_s": sum(r["process_s"] for r in clean),
               "pipeline_without_finetune_process_s": sum(r["process_s"] for r in clean if r["stage"] != "finetune")}
    lines += ["", f"Pipeline {run['pipeline_process_s']:.1f} s of process time "
                  f"({run['pipeline_without_finetune_process_s']:.1f} s without finetune); score to checkpoint "
                  f"{run['score_to_checkpoint_in_stage_s']:.1f} s in-stage.", "",
              "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for label, value, limit, unit in TARGETS[kind(doc, run)]:
        got = value(run)
        lower_bound = bool(missing or perturbed)  # some stages' times are left out of the totals
        bound = ">= " if lower_bound else ""
        met = "no" if got > limit else ("not known" if lower_bound else "yes")
        lines.append(f"| {label} | {bound}{got:,.1f} {unit} | {limit:,.1f} {unit} | {met} |")
    return lines + [""] + floors(run)


def allocation_table(doc: dict, path: Path) -> list[str]:
    """The allocate stage's choice per ratio, before (one pruned copy per candidate, all six) and now (the
    default candidates on shared layer passes), from a ``benchmarks/allocation_speed.py`` JSON file."""
    lines = [f"### allocate, before and now: {path.name}", "",
             f"{doc['started']}, {doc['threads']} threads, {doc['heldout_windows']} held-out windows.", "",
             "| ratio | chosen before | chosen now | same | before s | now s | KL of the choice (before / now) |",
             "|---:|---|---|---|---:|---:|---|"]
    for row in doc["rows"]:
        now, before = row["now"], row.get("before")
        if before is None:
            chosen = now["chosen"]
            lines.append(f"| {row['ratio']:.0%} | | {chosen} | | | {now['s']:.1f} | {now['kl'][chosen]} |")
            continue
        lines.append(f"| {row['ratio']:.0%} | {before['chosen']} | {now['chosen']} | "
                     f"{'yes' if before['chosen'] == now['chosen'] else 'no'} | {before['s']:.1f} | {now['s']:.1f} | "
                     f"{before['kl'][before['chosen']]} / {now['kl'][now['chosen']]} |")
    return lines + [""]


def render(paths: list[Path]) -> str:
    """PERFORMANCE.md: the notes, then every run of every JSON file (stage_times or allocation_speed)."""
    notes = (HERE / "performance_notes.md").read_text().rstrip()
    body = [notes, "", "## Generated tables", "",
            f"Made by `python benchmarks/performance.py {' '.join(str(p) for p in paths)}`.", ""]
    for path in paths:
        doc = json.loads(path.read_text())
        if "runs" not in doc:
            body += allocation_table(doc, path)
            continue
        for run in doc["runs"]:
            body += table(doc, run)
    return "\n".join(body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    """Render the given JSON files into benchmarks/PERFORMANCE.md."""
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        raise SystemExit("usage: python benchmarks/performance.py RESULT.json [...]")
    (HERE / "PERFORMANCE.md").write_text(render(paths))


if __name__ == "__main__":
    main()

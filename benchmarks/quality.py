"""Side-by-side quality benchmark: every strategy at several ratios on one model, same data.

    python benchmarks/quality.py run --model artifacts/model --data-dir ../shared/data \
        --out benchmarks/results/quality3_smollm2           # all rows, spread windows (the table)
    python benchmarks/quality.py full --out ...             # default and best other row, all windows
    python benchmarks/quality.py recovery --out ...         # distillation vs LoRA at equal wall time
    python benchmarks/quality.py markdown --out ...         # QUALITY.md from the recorded rows

``run``: scores (all metrics), layer/block similarity and one-shot compensation statistics are
computed once on the same calibration samples (WikiText-2 validation); held-out calibration windows
(the same split, no token shared with the calibration samples; plus PTB-train and C4-calibration
windows for the criterion study) are drawn once. At every ratio:

* ``auto`` (the pipeline's default, ``allocate.mode: auto``) chooses its allocation among
  :data:`gqaprune.pruning.allocation.DEFAULT_CANDIDATES` by KL to the dense model on the held-out windows of
  all three corpora's calibration splits together, as the ``allocate`` stage does, and prunes it with
  one-shot least-squares compensation (``surgery.compensation: lstsq``). The candidate table (KL and
  NLL on every held-out set) is recorded in ``selection.csv``. ``auto-sequential`` is the same plan
  with sequential (layer-by-layer) compensation, for the comparison of the two on the same data.
* every peer and variant of ``--strategies`` is planned to the same budget and pruned.

Every row is evaluated on ``--eval-windows`` windows of ``seq_len`` tokens spread evenly over each
whole test split, with the standard error of each log-perplexity; the per-window NLLs are kept in
``windows.parquet`` for paired comparisons. Rows are appended to ``results.csv`` as they finish.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import typer
from quality_report import DEFAULT_OUT, best_other, markdown, read_results

from gqaprune.config.choices import METRICS
from gqaprune.config.sections import PlanConfig
from gqaprune.data.windows import calibration_samples, corpus_token_ids, heldout_windows
from gqaprune.evaluation.perplexity import eval_windows, window_nlls
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_model, load_tokenizer
from gqaprune.pruning.allocation import (
    DEFAULT_CANDIDATES,
    dense_reference,
    heldout_criteria,
    oneshot_pruner,
    select_allocation,
    sequential_pruner,
)
from gqaprune.pruning.compensation import collect_stats
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.peer_methods import STRATEGIES, prune_copy
from gqaprune.pruning.similarity import block_similarity

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _commands() -> None:
    """Quality benchmark: run (the table), full (all windows), recovery, markdown."""

# options shared by the commands (one definition each)
Model = Annotated[str, typer.Option(help="Dense model folder.")]
DataDir = Annotated[str, typer.Option(help="Local corpora mirror.")]
EvalDtype = Annotated[str, typer.Option(help="float32 | bfloat16: dtype of the evaluated copies.")]
Threads = Annotated[int, typer.Option(help="torch threads (1 is fastest on a shared 2-core machine).")]
BatchSize = Annotated[int, typer.Option(help="Evaluation windows per forward.")]
Datasets = Annotated[str, typer.Option(help="Evaluation corpora.")]
Out = Annotated[Path, typer.Option(help="Results folder (for the later commands: of a finished `run`).")]
Ratios = Annotated[str, typer.Option(help="Comma-separated ratios of all parameters.")]
Device = Annotated[str, typer.Option(help="cpu | cuda (on 2 CPU cores the full test sets take ~30 min per model).")]

DEFAULT_STRATEGIES = "ours,hgsp-T1-tauinf,magnitude-sp,wanda-sp,llm-pruner,flap,shortgpt"
EVAL_SPLIT = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
CAL_SPLIT = {"wikitext2": "validation", "ptb": "train", "c4": "calibration"}


class Evaluator:
    """Token windows of each test split (spread or all) and per-window NLLs of a model on them."""

    def __init__(self, tokenizer, datasets, seq_len, n_windows, data_dir, batch_size):
        self.windows = {}
        self.n_full = {}
        for name in datasets:
            ids = corpus_token_ids(tokenizer, name, EVAL_SPLIT[name], data_dir=data_dir)
            w, n_full = eval_windows(ids, seq_len, None if n_windows is None else n_windows * seq_len, spread=True)
            self.windows[name], self.n_full[name] = w, n_full
        self.batch_size = batch_size

    def __call__(self, model, every: int = 1) -> dict[str, np.ndarray]:
        """Per-window NLLs on every window, or on every ``every``-th one (a subset of the same windows)."""
        return {name: window_nlls(model, w[::every], self.batch_size).numpy() for name, w in self.windows.items()}


def _caster(name: str):
    """Cast a model (in place) to the evaluation dtype; float32 leaves it as it is."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    return lambda model: model if dtype == torch.float32 else model.to(dtype)


def _summary(nlls: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, x in nlls.items():
        out[name] = math.exp(float(x.mean()))
        out[f"{name}_logppl"] = float(x.mean())
        out[f"{name}_se"] = float(x.std(ddof=1) / math.sqrt(len(x)))
        out[f"{name}_windows"] = len(x)
    return out


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV, rewriting it whole so rows with new columns keep a right header."""
    frame = pd.DataFrame(rows)
    if path.exists():
        frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
    frame.to_csv(path, index=False)


def _save_windows(path: Path, key: dict, nlls: dict[str, np.ndarray]) -> None:
    rows = [{**key, "dataset": name, "nll": x.tolist()} for name, x in nlls.items()]
    frame = pd.DataFrame(rows)
    if path.exists():
        frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
    frame.to_parquet(path, index=False)


def _setup(model, data_dir, n_samples, seq_len, gradient_batch_size, heldout_n):
    dense, tokenizer = load_model(model, device="cpu"), load_tokenizer(model)
    adapter = get_adapter(dense.config)
    geometry = adapter.geometry(dense.config)
    counts = parameter_counts(dense, adapter, geometry)
    samples = calibration_samples(tokenizer, "wikitext2", None, n_samples, seq_len, 0, data_dir=data_dir)
    held = {"wikitext2": heldout_windows(tokenizer, "wikitext2", None, heldout_n, seq_len, n_samples, seq_len, 0,
                                         data_dir=data_dir)}
    for name in ("ptb", "c4"):  # the other corpora's calibration splits, as calibrate.heldout_datasets
        held[name] = heldout_windows(tokenizer, name, None, heldout_n, seq_len, 0, seq_len, 0, data_dir=data_dir)
    return dense, tokenizer, geometry, counts, samples, held


@app.command()
def run(
    model: Model = "artifacts/model",
    out: Out = DEFAULT_OUT,
    data_dir: DataDir = "../shared/data",
    ratios: Ratios = "0.1,0.2,0.3,0.4,0.5",
    strategies: Annotated[str, typer.Option(help="Peers and variants besides auto.")] = DEFAULT_STRATEGIES,
    n_samples: Annotated[int, typer.Option(help="Calibration samples (wikitext2 validation).")] = 64,
    seq_len: Annotated[int, typer.Option(help="Calibration and evaluation window length.")] = 128,
    eval_windows_n: Annotated[int, typer.Option("--eval-windows", help="Windows per corpus, spread.")] = 128,
    heldout_n: Annotated[int, typer.Option("--heldout-windows", help="Held-out windows per corpus.")] = 16,
    criterion: Annotated[str, typer.Option(help="kl | nll (held-out selection criterion).")] = "kl",
    datasets: Datasets = "wikitext2,ptb,c4",
    gradient_batch_size: Annotated[int, typer.Option(help="Taylor scoring micro-batch (params.yaml: 4).")] = 4,
    batch_size: BatchSize = 16,
    eval_dtype: EvalDtype = "bfloat16",
    threads: Threads = 1,
    tag: Annotated[str, typer.Option(help="Suffix of this run's files (several runs can share --out).")] = "main",
    cheap: Annotated[str, typer.Option(help="Strategies evaluated on every 4th window only (hopeless peers; "
                                            "'twin' = auto's other compensation).")] = "magnitude-sp,wanda-sp,twin",
    reuse_scores: Annotated[bool, typer.Option(help="Load scores/similarity from --out when present.")] = False,
    dense_eval: Annotated[bool, typer.Option(help="Evaluate the dense model (a second run can skip it).")] = True,
    auto: Annotated[bool, typer.Option(help="Run the adaptive default (a run of peers only can skip it).")] = True,
) -> None:
    """Every strategy and the adaptive default at every ratio, on windows spread over the test splits."""
    torch.set_num_threads(threads)
    cast = _caster(eval_dtype)
    out.mkdir(parents=True, exist_ok=True)
    names = [s for s in strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    files = {k: out / f"{k}_{tag}.{ext}" for k, ext in
             (("results", "csv"), ("windows", "parquet"), ("selection", "csv"), ("meta", "json"))}
    for f in files.values():
        f.unlink(missing_ok=True)
    started = time.perf_counter()
    dense, tokenizer, geometry, counts, samples, held = _setup(model, data_dir, n_samples, seq_len,
                                                               gradient_batch_size, heldout_n)
    t0 = time.perf_counter()
    if reuse_scores and (out / "scores.parquet").exists():
        scores, sim = pd.read_parquet(out / "scores.parquet"), pd.read_parquet(out / "similarity.parquet")
    else:
        scores = score_groups(dense, samples, metrics=METRICS, gradient_batch_size=gradient_batch_size)
        sim = block_similarity(dense, samples)
    stats = collect_stats(dense, samples, list(range(geometry.num_layers)))
    import copy

    dense_eval = cast(copy.deepcopy(dense))
    refs = {name: dense_reference(dense_eval, w) for name, w in held.items()}
    refs["all"] = dense_reference(dense_eval, torch.cat(list(held.values())))  # what the choice is made on
    prep_s = time.perf_counter() - t0
    if not (reuse_scores and (out / "scores.parquet").exists()):
        scores.to_parquet(out / "scores.parquet", index=False)
        sim.to_parquet(out / "similarity.parquet", index=False)
    (out / "plans").mkdir(exist_ok=True)
    evaluator = Evaluator(tokenizer, [d for d in datasets.split(",") if d], seq_len, eval_windows_n, data_dir,
                          batch_size)
    t = time.perf_counter()
    nll = evaluator(dense_eval) if dense_eval else {n: np.full(2, np.nan) for n in evaluator.windows}
    eval_s = time.perf_counter() - t
    meta = {"model": model, "params_total": counts.total,
            "calibration": f"wikitext2/validation {n_samples} x {seq_len}", "n_samples": n_samples,
            "heldout": f"{heldout_n} x {seq_len} per corpus (wikitext2 validation, disjoint from calibration; "
                       "ptb train; c4 calibration half); the criterion is measured on all of them together",
            "criterion": criterion, "seq_len": seq_len, "eval_windows": eval_windows_n,
            "full_windows": evaluator.n_full, "datasets": list(evaluator.windows), "scoring_s": round(prep_s, 1),
            "dense_eval_tokens_per_s": round(sum(w.numel() for w in evaluator.windows.values()) / eval_s, 1),
            "torch_threads": torch.get_num_threads(), "eval_dtype": eval_dtype}
    dense_row = {"strategy": "dense", "ratio": 0.0, "params": counts.total, **_summary(nll)}
    meta["dense"] = dense_row
    files["meta"].write_text(json.dumps(meta, indent=2))
    if dense_eval:
        _append(files["results"], [dense_row])
        _save_windows(files["windows"], {"strategy": "dense", "ratio": 0.0}, nll)
    base_plan = dict(STRATEGIES["ours"].plan)
    cheap_set = {c for c in cheap.split(",") if c}
    for ratio in [float(r) for r in ratios.split(",") if r]:
        if auto:
            _auto_rows(ratio, dense, scores, sim, counts, geometry, base_plan, refs, stats, samples, criterion, cast,
                       evaluator, files, out, cheap_set)
        _strategy_rows(ratio, names, dense, scores, sim, counts, geometry, stats, refs, cast, evaluator, files,
                       cheap_set)
    meta["total_s"] = round(time.perf_counter() - started, 1)
    files["meta"].write_text(json.dumps(meta, indent=2))


def _auto_rows(ratio, dense, scores, sim, counts, geometry, base_plan, refs, stats, samples, criterion, cast,
               evaluator, files, out, cheap_set) -> None:
    """The adaptive default at one ratio: selection, compensation choice, evaluated rows."""
    if True:
        # --- the adaptive default ---------------------------------------------------------------
        t = time.perf_counter()

        def log(row, ratio=ratio):
            print(json.dumps({"ratio": ratio, **{k: v for k, v in row.items() if k != "error"}}), flush=True)

        sel = select_allocation(dense, scores, sim, counts, geometry.num_layers,
                                PlanConfig(ratio=ratio, **base_plan), refs["all"],
                                lambda d, p: cast(oneshot_pruner(stats)(d, p)), DEFAULT_CANDIDATES, criterion, log=log,
                                audit={k: v for k, v in refs.items() if k != "all"})
        select_s = time.perf_counter() - t
        table = sel.table.copy()
        table["ratio"] = ratio
        _append(files["selection"], table.to_dict("records"))
        # the chosen plan with one-shot (the default) and with sequential compensation, compared on the same data
        t = time.perf_counter()
        oneshot = cast(oneshot_pruner(stats)(dense, sel.plan))
        seq = cast(sequential_pruner(samples, progress=False)(dense, sel.plan))
        seq_s = time.perf_counter() - t
        kl = {"oneshot": heldout_criteria(oneshot, refs["all"])["kl"],
              "sequential": heldout_criteria(seq, refs["all"])["kl"]}
        (out / "plans" / f"auto_{ratio:g}.json").write_text(json.dumps({
            "ratio": ratio, "choice": sel.choice.name, "plan": sel.choice.plan, "compensation": "oneshot",
            "keep": {str(k): {"attn": v.attn, "mlp": v.mlp} for k, v in sel.plan.keep.items()}}, default=str))
        rows = []
        for label, m, comp in (("auto", oneshot, "oneshot"), ("auto-sequential", seq, "sequential")):
            t = time.perf_counter()
            nll = evaluator(m, 4 if label != "auto" and "twin" in cheap_set else 1)
            row = {"strategy": label, "ratio": ratio,
                   "params": parameter_counts(m, get_adapter(m.config), geometry).total, **_summary(nll),
                   "choice": sel.choice.name, "compensation": comp, "heldout_kl": kl[comp],
                   "select_s": round(select_s, 1), "sequential_s": round(seq_s, 1),
                   "eval_s": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            _save_windows(files["windows"], {"strategy": label, "ratio": ratio}, nll)
        _append(files["results"], rows)
        del oneshot, seq


def _strategy_rows(ratio, names, dense, scores, sim, counts, geometry, stats, refs, cast, evaluator, files,
                   cheap_set) -> None:
    """Every named peer / variant at one ratio."""
    if True:
        # --- peers and variants -----------------------------------------------------------------
        for name in names:
            t = time.perf_counter()
            pruned, plan = prune_copy(dense, scores, sim, counts, geometry.num_layers, STRATEGIES[name], ratio,
                                      stats=stats)
            pruned = cast(pruned)
            kl = heldout_criteria(pruned, refs["all"])["kl"]
            nll = evaluator(pruned, 4 if name in cheap_set else 1)
            row = {"strategy": name, "ratio": ratio,
                   "params": parameter_counts(pruned, get_adapter(pruned.config), geometry).total, **_summary(nll),
                   "heldout_kl": kl, "removed_layers": len(plan.analysis["removed_layers"]),
                   "seconds": round(time.perf_counter() - t, 1)}
            print(json.dumps(row), flush=True)
            _append(files["results"], [row])
            _save_windows(files["windows"], {"strategy": name, "ratio": ratio}, nll)
            del pruned


def _rebuild(out: Path, model: str, data_dir: str, ratio: float, strategy: str, seq_len: int = 128,
             device: str = "cpu"):
    """The pruned model of one recorded row (``auto`` from its saved plan, a strategy from the saved scores)."""
    meta = json.loads(sorted(out.glob("meta_*.json"))[0].read_text())
    dense, tokenizer = load_model(model, device=device), load_tokenizer(model)
    geometry = get_adapter(dense.config).geometry(dense.config)
    samples = calibration_samples(tokenizer, "wikitext2", None, meta["n_samples"], seq_len, 0, data_dir=data_dir)
    if strategy.startswith("auto"):
        from gqaprune.models.units import LayerKeep

        doc = json.loads((out / "plans" / f"auto_{ratio:g}.json").read_text())
        keep = {int(k): LayerKeep(**v) for k, v in doc["keep"].items()}
        comp = {"auto-sequential": "sequential"}.get(strategy, doc["compensation"])
        plan = type("P", (), {"keep": keep})()
        if comp == "sequential":
            pruned = sequential_pruner(samples, progress=False)(dense, plan)
        else:
            stats = collect_stats(dense, samples, sorted(keep), progress=False)
            pruned = oneshot_pruner(stats)(dense, plan)
    else:
        counts = parameter_counts(dense, get_adapter(dense.config), geometry)
        scores = pd.read_parquet(out / "scores.parquet")
        sim = pd.read_parquet(out / "similarity.parquet")
        stats = collect_stats(dense, samples, list(range(geometry.num_layers)), progress=False) \
            if STRATEGIES[strategy].compensation != "none" else None
        pruned, _ = prune_copy(dense, scores, sim, counts, geometry.num_layers, STRATEGIES[strategy], ratio,
                               stats=stats)
    return dense, tokenizer, pruned, samples


@app.command()
def full(
    model: Model = "artifacts/model",
    out: Out = DEFAULT_OUT,
    data_dir: DataDir = "../shared/data",
    ratios: Ratios = "0.1,0.2,0.3,0.4,0.5",
    dense_eval: Annotated[bool, typer.Option(help="Evaluate the dense model first (the reference).")] = True,
    auto: Annotated[bool, typer.Option(help="Evaluate auto too (a later run can add best-other rows only).")] = True,
    datasets: Datasets = "wikitext2,ptb,c4",
    eval_dtype: EvalDtype = "bfloat16",
    threads: Threads = 1,
    batch_size: BatchSize = 16,
    device: Device = "cpu",
) -> None:
    """The dense model, then the default (auto) and the best other row of each ratio, on every window of the
    test splits; one row each in ``full.csv``."""
    torch.set_num_threads(threads)
    cast = _caster(eval_dtype)
    frame = read_results(out)
    names = [d for d in datasets.split(",") if d]

    def evaluate(strategy: str, ratio: float, t: float, tokenizer, evaluated) -> None:
        nll = Evaluator(tokenizer, names, 128, None, data_dir, batch_size)(cast(evaluated))
        row = {"strategy": strategy, "ratio": ratio, **_summary(nll), "seconds": round(time.perf_counter() - t, 1),
               "eval_dtype": eval_dtype, "device": device}
        print(json.dumps(row), flush=True)
        _append(out / "full.csv", [row])

    if dense_eval:
        t = time.perf_counter()
        dense, tokenizer = load_model(model, device=device), load_tokenizer(model)
        evaluate("dense", 0.0, t, tokenizer, dense)
        del dense
    for ratio in [float(r) for r in ratios.split(",") if r]:
        for strategy in ("auto",) * auto + (best_other(frame, ratio, ["wikitext2", "ptb", "c4"]),):
            t = time.perf_counter()
            dense, tokenizer, pruned, _ = _rebuild(out, model, data_dir, ratio, strategy, device=device)
            del dense
            evaluate(strategy, ratio, t, tokenizer, pruned)
            del pruned


@app.command()
def recovery(
    model: Model = "artifacts/model",
    out: Out = DEFAULT_OUT,
    data_dir: DataDir = "../shared/data",
    ratio: Annotated[float, typer.Option(help="Ratio whose auto model is recovered.")] = 0.2,
    seconds: Annotated[float, typer.Option(help="Wall-time budget of each recovery method.")] = 600.0,
    methods: Annotated[str, typer.Option(help="distill-full, distill-lora, lora-instructions.")] =
        "distill-full,distill-lora,lora-instructions",
    lr: Annotated[float, typer.Option(help="Distillation peak learning rate (full).")] = 1e-4,
    eval_windows_n: Annotated[int, typer.Option("--eval-windows", help="Windows per corpus, spread.")] = 128,
    datasets: Datasets = "wikitext2,ptb,c4",
    eval_dtype: EvalDtype = "bfloat16",
    threads: Threads = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda (the issue's budget is CPU time; cuda shows how many "
                                             "steps closing the gap takes).")] = "cpu",
) -> None:
    """Recovery of the auto model at ``ratio``: distillation vs instruction LoRA at equal wall time."""
    import copy

    from gqaprune.data.sources import load_instructions
    from gqaprune.recovery.distill import DistillConfig, distill
    from gqaprune.recovery.lora import FinetuneConfig, finetune_lora, merge_adapter

    torch.set_num_threads(threads)
    cast = _caster(eval_dtype)
    meta = json.loads(sorted(out.glob("meta_*.json"))[0].read_text())
    dense, tokenizer, pruned, samples = _rebuild(out, model, data_dir, ratio, "auto", device=device)
    seq_len = 128
    tag = "" if device == "cpu" else f"_{device}"  # a GPU run's curves and rows beside the CPU ones
    held = heldout_windows(tokenizer, "wikitext2", None, 16, seq_len, meta["n_samples"], seq_len, 0, data_dir=data_dir)
    ref = dense_reference(dense, held)
    # distillation text: every window of the calibration splits of WikiText-2 and C4, minus the held-out ones
    text = []
    for name in ("wikitext2", "c4"):
        ids = corpus_token_ids(tokenizer, name, CAL_SPLIT[name], data_dir=data_dir)
        text.append(ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len))
    text = torch.cat(text)
    held_rows = {tuple(r.tolist()) for r in held}
    text = text[torch.tensor([tuple(r.tolist()) not in held_rows for r in text])]
    evaluator = Evaluator(tokenizer, [d for d in datasets.split(",") if d], seq_len, eval_windows_n, data_dir, 16)
    records = load_instructions("alpaca", "train", data_dir=data_dir)
    for method in [m for m in methods.split(",") if m]:
        student = copy.deepcopy(pruned)
        curve: list[dict] = []
        t = time.perf_counter()
        if method.startswith("distill"):
            mode = method.split("-", 1)[1]
            cfg = DistillConfig(mode=mode, lr=lr if mode == "full" else 1e-3, max_seconds=seconds, batch_size=8)
            student = distill(student, dense, text, cfg, log=lambda s, loss, lr_, el, curve=curve: curve.append(
                {"step": s, "loss": loss, "t": el}))
        elif method == "lora-instructions":
            # the pipeline's LoRA recipe; steps set so that it runs for the same wall time
            probe = copy.deepcopy(pruned)
            t_probe = time.perf_counter()
            merge_adapter(finetune_lora(probe, tokenizer, records, FinetuneConfig(max_steps=3, epochs=1, batch_size=4,
                                                                                  max_length=128, seed=0)))
            per_step = (time.perf_counter() - t_probe) / 3
            steps = max(1, int((seconds - (time.perf_counter() - t)) / per_step))
            tuned = finetune_lora(student, tokenizer, records, FinetuneConfig(
                max_steps=steps, epochs=100, batch_size=4, max_length=128, seed=0),
                log=lambda s, loss, lr_, curve=curve: curve.append({"step": s, "loss": loss}))
            student = merge_adapter(tuned)
        else:
            raise typer.BadParameter(f"unknown method {method}")
        train_s = time.perf_counter() - t
        student = cast(student)
        kl = heldout_criteria(student, ref)["kl"]
        nll = evaluator(student)
        row = {"method": method, "ratio": ratio, "budget_s": seconds, "train_s": round(train_s, 1),
               "steps": len(curve), "heldout_kl": kl, **_summary(nll), "device": device}
        print(json.dumps(row), flush=True)
        _append(out / f"recovery{tag}.csv", [row])
        pd.DataFrame(curve).assign(method=method).to_csv(out / f"recovery_curve_{method}{tag}.csv", index=False)
        del student
    base = cast(copy.deepcopy(pruned))
    row = {"method": "none", "ratio": ratio, "budget_s": 0, "train_s": 0, "steps": 0,
           "heldout_kl": heldout_criteria(base, ref)["kl"], **_summary(evaluator(base)), "device": device}
    _append(out / f"recovery{tag}.csv", [row])


app.command()(markdown)

if __name__ == "__main__":
    app()

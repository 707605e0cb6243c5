"""Stage recipes: what each pipeline stage reads, computes and writes (the stages are thin wrappers).

Layout (all under ``artifacts/`` unless said otherwise; every path is a DVC output)::

    data/corpora/                      prepare      corpora snapshot in the local-mirror layout
    artifacts/model/                   prepare      dense model, safetensors + tokenizer
    artifacts/model.json               prepare      fingerprint, geometry, parameter counts
    artifacts/calibration/             calibrate    samples.safetensors [n, seq_len] + meta
    artifacts/scores/importance.parquet score       one row per group, one column per metric
    artifacts/similarity/similarity.parquet         layer / attn / mlp importance
    artifacts/plan/                    plan         plan.json, global_group_table.{csv,parquet},
                                                    layer_summary.csv, pruning_analysis.json
    artifacts/pruned/                  surgery      pruned checkpoint
    artifacts/finetune/                finetune     adapter/, merged/ (when asked)
    metrics/*.json, plots/*            metrics and plots for ``dvc exp show`` / ``dvc plots``
    artifacts/logs/<stage>.log         every stage's log

Every artifact records the model fingerprint and the params that made it; a stage refuses inputs
whose fingerprints disagree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .adapters import get_adapter
from .artifacts import (
    ArtifactMismatchError,
    atomic_path,
    check_fingerprint,
    read_json,
    read_table,
    write_csv,
    write_json,
    write_table,
)
from .data import CALIBRATION_SPLIT, DATA_DIR_ENV, calibration_samples, snapshot_corpora
from .groups import ParamCounts, parameter_counts
from .modelio import convert_embedded, fingerprint, load_causal_lm, load_model, resolve_device
from .params import Params

log = logging.getLogger("gqaprune")

CORPORA_DIR = Path("data/corpora")  # the snapshot prepare writes; every later stage reads it
MODEL_DIR = Path("artifacts/model")
MODEL_INFO = Path("artifacts/model.json")
CALIBRATION_DIR = Path("artifacts/calibration")
SCORES = Path("artifacts/scores/importance.parquet")
SIMILARITY = Path("artifacts/similarity/similarity.parquet")
PLAN_DIR = Path("artifacts/plan")
PRUNED_DIR = Path("artifacts/pruned")
FINETUNE_DIR = Path("artifacts/finetune")
LOG_DIR = Path("artifacts/logs")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")


@contextmanager
def stage_logging(stage: str):
    """Log to ``artifacts/logs/<stage>.log`` and stderr for the duration of a stage; times it."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(LOG_DIR / f"{stage}.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(f"[{stage}] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        yield
    except Exception:
        log.exception("stage %s failed", stage)
        raise
    finally:
        log.info("stage %s took %.1f s", stage, time.perf_counter() - start)
        root.removeHandler(handler)
        root.removeHandler(console)
        handler.close()


def _stage_time(stage: str, seconds: float, extra: dict | None = None) -> None:
    """Write ``metrics/<stage>.json`` with the wall time and any stage metrics."""
    write_json(METRICS_DIR / f"{stage}.json", {"wall_time_s": round(seconds, 2), **(extra or {})})


def _model_meta() -> dict:
    """The dense model's record written by prepare."""
    return read_json(MODEL_INFO)


# --- prepare -----------------------------------------------------------------------------------
def prepare(params: Params) -> None:
    """Dense model folder (+ record) and the corpora snapshot."""
    t0 = time.perf_counter()
    p = params.prepare
    if p.model == "embedded":
        log.info("converting the embedded SmolLM2-135M-Instruct GGUF to safetensors")
        convert_embedded(MODEL_DIR)
    else:
        log.info("loading %s", p.model)
        model, tokenizer = load_model(p.model, dtype=p.dtype, trust_remote_code=p.trust_remote_code)
        tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import shutil

        shutil.rmtree(MODEL_DIR, ignore_errors=True)
        tmp.rename(MODEL_DIR)
    model = load_causal_lm(MODEL_DIR)
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    counts = parameter_counts(model, adapter, geometry)
    names = {params.calibrate.dataset, *params.evaluate.datasets}
    if params.finetune.enabled:
        names.add(params.finetune.dataset)
    # the environment variable wins over params.yaml, so CI or a user can point at another mirror
    mirror = os.environ.get(DATA_DIR_ENV) or params.data.data_dir
    written = snapshot_corpora(sorted(names), CORPORA_DIR, mirror)
    info = {"source": p.model, "fingerprint": fingerprint(model), "geometry": geometry.to_dict(),
            "params": counts.to_dict(), "corpora": written, "gqaprune_version": __version__}
    write_json(MODEL_INFO, info)
    log.info("model %s: %s parameters, fingerprint %s", p.model, f"{counts.total:,}", info["fingerprint"])
    _stage_time("prepare", time.perf_counter() - t0, {"params_total": counts.total})


# --- calibrate ---------------------------------------------------------------------------------
def calibrate(params: Params) -> None:
    """Tokenised calibration samples ``[n_samples, seq_len]`` as safetensors with provenance."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    c = params.calibrate
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    samples = calibration_samples(tokenizer, c.dataset, None, c.n_samples, c.seq_len, c.seed,
                                  data_dir=CORPORA_DIR)
    meta = {"dataset": c.dataset, "split": CALIBRATION_SPLIT[c.dataset], "n_samples": str(c.n_samples),
            "seq_len": str(c.seq_len), "seed": str(c.seed), "fingerprint": _model_meta()["fingerprint"]}
    CALIBRATION_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(CALIBRATION_DIR / "samples.safetensors") as tmp:
        save_file({"input_ids": samples.contiguous()}, str(tmp), metadata=meta)
    log.info("calibration: %d x %d tokens of %s/%s", c.n_samples, c.seq_len, c.dataset, meta["split"])
    _stage_time("calibrate", time.perf_counter() - t0, {"calibration_tokens": samples.numel()})


def load_calibration(expected_fingerprint: str) -> tuple[torch.Tensor, dict]:
    """Calibration samples and their metadata; refuses samples made for another model."""
    path = CALIBRATION_DIR / "samples.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the calibrate stage first")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    check_fingerprint(meta, expected_fingerprint, f"calibration samples {path}")
    return load_file(str(path))["input_ids"], meta


def _load_dense(dtype: str, device: str):
    """The dense model from prepare, checked against its recorded fingerprint."""
    model = load_causal_lm(MODEL_DIR, dtype=dtype).to(resolve_device(device)).eval()
    meta = _model_meta()
    return model, meta["fingerprint"], meta


# --- score / similarity --------------------------------------------------------------------------
def score(params: Params) -> None:
    """Importance of every group, all requested metrics, one Parquet table."""
    from .importance import score_groups

    t0 = time.perf_counter()
    s = params.score
    model, fp, meta = _load_dense(s.dtype, s.device)
    samples, cal_meta = load_calibration(fp)
    table = score_groups(model, samples, metrics=s.metrics, gradient_batch_size=s.gradient_batch_size,
                         gradient_checkpointing=s.gradient_checkpointing)
    provenance = {"fingerprint": fp, "params": dataclasses.asdict(s), "calibration": cal_meta,
                  "param_counts": meta["params"], "num_layers": meta["geometry"]["num_layers"]}
    write_table(SCORES, table, provenance)
    _stage_time("score", time.perf_counter() - t0, {"groups": len(table)})


def similarity(params: Params) -> None:
    """Layer and block importance (1 - cos), one Parquet table."""
    from .similarity import block_similarity

    t0 = time.perf_counter()
    s = params.similarity
    model, fp, _ = _load_dense(s.dtype, s.device)
    samples, cal_meta = load_calibration(fp)
    table = block_similarity(model, samples, batch_size=s.batch_size)
    write_table(SIMILARITY, table, {"fingerprint": fp, "params": dataclasses.asdict(s), "calibration": cal_meta})
    plot_importance(table)
    _stage_time("similarity", time.perf_counter() - t0)


# --- plan ----------------------------------------------------------------------------------------
def plan(params: Params) -> None:
    """The H-GSP plan: plan.json, group table (CSV + Parquet), layer summary, pruning_analysis.json."""
    from .plan import build_plan

    t0 = time.perf_counter()
    cfg = params.plan
    scores, meta = read_table(SCORES)
    sim = None
    if cfg.needs_similarity:
        sim, sim_meta = read_table(SIMILARITY)
        check_fingerprint(sim_meta, meta["fingerprint"], f"similarity table {SIMILARITY}")
    counts = ParamCounts(**meta["param_counts"])
    result = build_plan(scores, sim, counts, int(meta["num_layers"]), cfg)
    keep = {str(layer): dataclasses.asdict(k) for layer, k in result.keep.items()}
    PLAN_DIR.mkdir(parents=True, exist_ok=True)
    plan_doc = {"fingerprint": meta["fingerprint"], "params": dataclasses.asdict(cfg), "keep": keep}
    write_json(PLAN_DIR / "plan.json", plan_doc)
    table = result.table.copy()
    table["kind"] = table["kind"].astype(str)
    write_table(PLAN_DIR / "global_group_table.parquet", table, {"fingerprint": meta["fingerprint"]})
    write_csv(PLAN_DIR / "global_group_table.csv", table)
    write_csv(PLAN_DIR / "layer_summary.csv", result.layers)
    analysis = {**result.analysis, "fingerprint": meta["fingerprint"],
                "timings_s": {"plan": round(time.perf_counter() - t0, 3)}}
    write_json(PLAN_DIR / "pruning_analysis.json", analysis)
    plot_kept_fraction(result.layers)
    a = result.analysis
    _stage_time("plan", time.perf_counter() - t0, {
        "params_before": a["params_before"], "params_after": a["params_after"],
        "ratio_total": round(a["ratio_total"], 5), "ratio_prunable": round(a["ratio_prunable"], 5),
        "removed_layers": len(a["removed_layers"]),
    })
    log.info("plan: remove %s of %s parameters (%.2f%% total, %.2f%% prunable)", f"{a['params_removed']:,}",
             f"{a['params_before']:,}", 100 * a["ratio_total"], 100 * a["ratio_prunable"])


# --- surgery -------------------------------------------------------------------------------------
def surgery(params: Params) -> None:
    """Slice the dense model by the plan and save the pruned checkpoint."""
    from transformers import AutoTokenizer

    from .compensation import compensate
    from .surgery import LayerKeep, prune_model, save_pruned

    t0 = time.perf_counter()
    s = params.surgery
    doc = read_json(PLAN_DIR / "plan.json")
    model, fp, meta = _load_dense(s.dtype, s.device)
    if doc["fingerprint"] != fp:
        raise ArtifactMismatchError(f"plan {PLAN_DIR / 'plan.json'} was made for model {doc['fingerprint']}, "
                                    f"not for {MODEL_DIR} ({fp}); re-run score and plan")
    keep = {int(layer): LayerKeep(**k) for layer, k in doc["keep"].items()}
    replacements = {}
    if s.compensation != "none":
        samples, _ = load_calibration(fp)
        replacements = compensate(model, keep, samples, s.compensation, s.ridge, s.batch_size)
        log.info("compensation %s: refitted %d output projections", s.compensation, len(replacements))
    report = prune_model(model, keep, replacements)
    model = model.cpu()
    adapter = get_adapter(model.config)
    counts = parameter_counts(model, adapter, adapter.geometry(model.config))
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    info = {"source_fingerprint": fp, "plan": doc["params"], "surgery": dataclasses.asdict(s),
            "removed_layers": report.removed_layers,
            "params_before": meta["params"]["total"], "params_after": counts.total}
    save_pruned(model, tokenizer, PRUNED_DIR, info)
    log.info("pruned model: %s parameters, %d layers (removed %s), standard config: %s",
             f"{counts.total:,}", len(report.kept_layers), report.removed_layers, report.uniform)
    _stage_time("surgery", time.perf_counter() - t0, {"params_after": counts.total,
                                                       "layers_after": len(report.kept_layers)})


# --- finetune ------------------------------------------------------------------------------------
def finetune(params: Params) -> None:
    """LoRA recovery on instruction data; saves the adapter (and the merged model when asked)."""
    import shutil

    from transformers import AutoTokenizer

    from .data import load_instructions
    from .finetune import FinetuneConfig, finetune_lora, merge_adapter, save_adapter
    from .surgery import save_pruned

    t0 = time.perf_counter()
    f = params.finetune
    shutil.rmtree(FINETUNE_DIR, ignore_errors=True)
    FINETUNE_DIR.mkdir(parents=True, exist_ok=True)
    loss_rows: list[dict] = []
    if not f.enabled:
        write_json(FINETUNE_DIR / "status.json", {"enabled": False})
        write_csv(PLOTS_DIR / "finetune_loss.csv", pd.DataFrame(columns=["step", "loss", "lr"]))
        _stage_time("finetune", time.perf_counter() - t0, {"enabled": False})
        return
    model = load_causal_lm(PRUNED_DIR, dtype=f.dtype).to(resolve_device(f.device))
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    records = load_instructions(f.dataset, "train", data_dir=CORPORA_DIR)
    base_fields = {fld.name for fld in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in dataclasses.asdict(f).items() if k in base_fields})

    def record(step: int, loss: float, lr: float) -> None:
        loss_rows.append({"step": step, "loss": loss, "lr": lr})

    peft_model = finetune_lora(model, tokenizer, records, config, log=record)
    save_adapter(peft_model, FINETUNE_DIR / "adapter")
    if f.merge:
        merged = merge_adapter(peft_model)
        info = dict(getattr(merged.config, "gqaprune_info", None) or {}, finetune=dataclasses.asdict(f))
        save_pruned(merged, tokenizer, FINETUNE_DIR / "merged", info)
    write_json(FINETUNE_DIR / "status.json", {"enabled": True, "steps": len(loss_rows)})
    losses = pd.DataFrame(loss_rows)
    write_csv(PLOTS_DIR / "finetune_loss.csv", losses)
    plot_finetune_loss(losses)
    _stage_time("finetune", time.perf_counter() - t0, {
        "enabled": True, "steps": len(loss_rows),
        "final_loss": round(float(losses["loss"].iloc[-5:].mean()), 4) if len(losses) else None,
    })


# --- evaluate ------------------------------------------------------------------------------------
def _perplexities(model, tokenizer, params: Params) -> dict:
    """Perplexity per dataset with the evaluated token counts and whether they were capped."""
    from .evaluation import perplexity

    e = params.evaluate
    out = {}
    for name in e.datasets:
        r = perplexity(model, tokenizer, dataset=name, seq_len=e.seq_len, batch_size=e.batch_size,
                       max_tokens=e.max_tokens, data_dir=CORPORA_DIR)
        out[name] = {"ppl": round(r.ppl, 4), "tokens": r.n_tokens, "capped": r.capped, "split": r.split}
        log.info("%s/%s: ppl %.3f over %d tokens%s", name, r.split, r.ppl, r.n_tokens,
                 " (capped)" if r.capped else "")
    return out


def evaluate_dense(params: Params) -> None:
    """Perplexity of the dense model (its own stage, so experiments reuse it from the DVC cache)."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    e = params.evaluate
    model, _, _ = _load_dense(e.dtype, e.device)
    result = _perplexities(model, AutoTokenizer.from_pretrained(MODEL_DIR), params)
    write_json(METRICS_DIR / "dense.json", {"seq_len": e.seq_len, "ppl": result,
                                             "wall_time_s": round(time.perf_counter() - t0, 2)})


def evaluate(params: Params) -> None:
    """Perplexity of the pruned and (when finetuned) recovered models, next to the dense baseline."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    e = params.evaluate
    dense = read_json(METRICS_DIR / "dense.json")
    analysis = read_json(PLAN_DIR / "pruning_analysis.json")
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    device = resolve_device(e.device)
    pruned = load_causal_lm(PRUNED_DIR, dtype=e.dtype).to(device).eval()
    results = {"dense": dense["ppl"], "pruned": _perplexities(pruned, tokenizer, params)}
    status = read_json(FINETUNE_DIR / "status.json")
    if status.get("enabled"):
        merged = FINETUNE_DIR / "merged"
        if merged.is_dir():
            tuned = load_causal_lm(merged, dtype=e.dtype).to(device).eval()
        else:
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(pruned, FINETUNE_DIR / "adapter").eval()
        results["finetuned"] = _perplexities(tuned, tokenizer, params)
    adapter = get_adapter(pruned.config)
    params_after = parameter_counts(pruned, adapter, adapter.geometry(pruned.config)).total
    metrics = {
        "seq_len": e.seq_len,
        "params_before": analysis["params_before"],
        "params_after": params_after,  # the real checkpoint: bias compensation adds a few parameters
        "ratio_total": round(analysis["ratio_total"], 5),
        "ratio_prunable": round(analysis["ratio_prunable"], 5),
        "ppl": {model: {name: r["ppl"] for name, r in per.items()} for model, per in results.items()},
        "ppl_ratio_to_dense": {
            model: {name: round(r["ppl"] / results["dense"][name]["ppl"], 4) for name, r in per.items()
                    if name in results["dense"]}
            for model, per in results.items() if model != "dense"
        },
        "tokens_evaluated": {name: r["tokens"] for name, r in results["pruned"].items()},
        "capped": any(r["capped"] for r in results["pruned"].values()),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    write_json(METRICS_DIR / "evaluate.json", metrics)


# --- plots (PNG images: they render offline in `dvc plots show`) ---------------------------------
def _save_png(fig, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _figure(title: str, xlabel: str, ylabel: str):
    """A new matplotlib figure and axes with labels (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_kept_fraction(layers: pd.DataFrame) -> None:
    """Per-layer kept fraction of attention groups and MLP channels (CSV + PNG)."""
    frame = pd.DataFrame({
        "layer": layers["layer"],
        "attn_kept_fraction": layers["attn_kept"] / layers["attn_groups"].clip(lower=1),
        "mlp_kept_fraction": layers["mlp_kept"] / layers["mlp_channels"].clip(lower=1),
    })
    write_csv(PLOTS_DIR / "kept_fraction.csv", frame)
    fig, ax = _figure("kept fraction per layer", "layer", "kept fraction")
    width = 0.4
    ax.bar(frame["layer"] - width / 2, frame["attn_kept_fraction"], width, label="attention groups")
    ax.bar(frame["layer"] + width / 2, frame["mlp_kept_fraction"], width, label="MLP channels")
    ax.set_ylim(0, 1.05)
    ax.legend()
    _save_png(fig, PLOTS_DIR / "kept_fraction.png")


def plot_importance(sim: pd.DataFrame) -> None:
    """Layer and block importance (1 - cos) per layer (CSV + PNG)."""
    write_csv(PLOTS_DIR / "layer_importance.csv", sim)
    fig, ax = _figure("layer / block importance (1 - cos)", "layer", "importance")
    for column in ("layer_importance", "attn_importance", "mlp_importance"):
        ax.plot(sim["layer"], sim[column], marker="o", label=column.replace("_", " "))
    ax.legend()
    _save_png(fig, PLOTS_DIR / "layer_importance.png")


def plot_finetune_loss(losses: pd.DataFrame) -> None:
    """LoRA training loss per optimizer step (PNG)."""
    fig, ax = _figure("LoRA recovery: training loss", "step", "loss")
    if len(losses):
        ax.plot(losses["step"], losses["loss"])
    _save_png(fig, PLOTS_DIR / "finetune_loss.png")


STAGES = {
    "prepare": prepare,
    "calibrate": calibrate,
    "score": score,
    "similarity": similarity,
    "plan": plan,
    "surgery": surgery,
    "finetune": finetune,
    "evaluate_dense": evaluate_dense,
    "evaluate": evaluate,
}


def run_stage(name: str, params: Params) -> None:
    """Run one stage by name with logging to ``artifacts/logs/<name>.log``."""
    with stage_logging(name):
        log.info("params: %s", json.dumps(dataclasses.asdict(params), default=str))
        STAGES[name](params)

"""End-to-end benchmark of the real stage commands on a random-weight model of a real shape.

For each preset it writes a random-weight model folder (bf16) with a real tokenizer, a params.yaml with
the README's GPU settings, then runs ``python stages/<stage>.py`` for every stage in order, exactly as
``dvc repro`` does, and records per stage: the process wall time (imports and model loading included),
the in-stage time and peak GPU memory from ``metrics/<stage>.json``, and the stage's figures.

    PYTHONPATH=src python benchmarks/gpu_stages.py --preset llama3-8b --preset qwen2.5-7b \\
        --tokenizer .bench_assets/tokenizer --data-dir .bench_assets/data --work /tmp/stages \\
        --out benchmarks/results/gpu_stages.json

``--preset tiny-llama-gqa4 --device cpu --ratio 0.01`` runs the same sequence on a CPU in a minute (a dry run of the
script itself). ``--nproc N`` (and ``--placement``) runs the model stages on N ranks (``distributed`` params).
Each preset's folder is deleted after its run (an 8B model and its pruned copy take ~27 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ORDER = ("prepare", "calibrate", "score", "similarity", "allocate", "plan", "surgery", "finetune", "evaluate_dense",
         "evaluate", "export")
#: the stages of the issue's table (the pipeline as it was before allocate and export were added)
CORE = ("prepare", "calibrate", "score", "similarity", "plan", "surgery", "evaluate_dense", "evaluate")


def gpu_params(model: Path, data_dir: Path, device: str, finetune_steps: int, ratio: float,
               max_tokens: int | None = None) -> dict:
    """The README's GPU settings (bf16, CUDA, large batches), every corpus evaluated in full (or capped)."""
    on_gpu = device != "cpu"
    dtype = "bfloat16" if on_gpu else "float32"
    return {
        "data": {"data_dir": str(data_dir)},
        "prepare": {"model": str(model), "dtype": dtype},
        "calibrate": {"dataset": "wikitext2", "n_samples": 128 if on_gpu else 16, "seq_len": 128, "seed": 0},
        "score": {"metrics": ["taylor", "taylor_2nd", "wanda", "magnitude", "fluctuation"],
                  "gradient_batch_size": 16 if on_gpu else 4, "dtype": dtype, "device": device},
        "similarity": {"batch_size": 32 if on_gpu else 8, "dtype": dtype, "device": device},
        "allocate": {"mode": "auto", "batch_size": 32 if on_gpu else 8, "dtype": dtype, "device": device},
        # standardised scores prune every block, so surgery refits all of them (a random model's raw
        # scores would leave most blocks whole and time a fraction of the work: SPEC.md)
        "plan": {"ratio": ratio, "importance": "taylor", "temperature": 0.0, "normalize": "standardize"},
        "surgery": {"compensation": "lstsq", "batch_size": 32 if on_gpu else 8, "dtype": dtype, "device": device},
        "finetune": {"enabled": finetune_steps > 0, "max_steps": max(finetune_steps, 1), "epochs": 1,
                     "batch_size": 8, "max_length": 256, "gradient_checkpointing": on_gpu, "dtype": dtype,
                     "device": device},
        "evaluate": {"datasets": ["wikitext2", "ptb", "c4"], "seq_len": 128, "max_tokens": max_tokens,
                     "batch_size": 64 if on_gpu else 8, "dtype": dtype, "device": device},
        # the GPU image has no llama-cpp-python: the f16 file only (quantising is timed on the CPU)
        "export": {"enabled": True, "dtype": "f16", "quantize": []},
    }


def make_model(preset: str, tokenizer_dir: Path, out: Path, device: str) -> dict:
    """A random-weight model of ``preset`` (vocab = the tokenizer's) saved with the tokenizer; returns timings."""
    import torch
    from transformers import AutoTokenizer

    from gqaprune.models.checkpoint import save_model
    from gqaprune.models.random_models import build_model

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = build_model(preset, dtype=dtype, device=device, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    built = time.perf_counter() - t0
    save_model(model, out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"params": params, "build_s": round(built, 2), "save_s": round(time.perf_counter() - t0 - built, 2)}


def run_stage(stage: str, project: Path, env: dict, logs: Path | None = None) -> dict:
    """Run ``stages/<stage>.py`` in ``project``; process wall time plus the stage's own metrics file (its log
    copied to ``logs`` when given)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
    if logs is not None:  # the stage's own log (phases, the loader's read / CUDA-context split)
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / "artifacts" / "logs" / f"{stage}.log", logs / f"{stage}.log")
    row = {"stage": stage, "process_s": round(wall, 2), "in_stage_s": metrics.get("wall_time_s"),
           "peak_gpu_gib": metrics.get("peak_gpu_mem_gib"), "metrics": metrics}
    print(json.dumps(row), flush=True)
    return row


def bench_preset(preset: str, args, env: dict) -> dict:
    """Model folder, params, every stage in order; the preset's summary."""
    work = args.work / preset
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    project.mkdir(parents=True)
    model = make_model(preset, args.tokenizer, work / "model", args.device)
    print(json.dumps({"preset": preset, "model": model}), flush=True)
    params = gpu_params(work / "model", args.data_dir.resolve(), args.device, args.finetune_steps, args.ratio,
                        args.max_tokens)
    params["distributed"] = {"nproc_per_node": args.nproc, "placement": args.placement}  # model stages on N ranks
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    rows = [run_stage(stage, project, env, args.out.parent / f"logs_{preset}") for stage in ORDER]
    total = time.perf_counter() - t0
    evaluate = json.loads((project / "metrics" / "evaluate.json").read_text())
    dense_eval = next(r for r in rows if r["stage"] == "evaluate_dense")
    tokens = sum(evaluate["tokens_evaluated"].values())
    summary = {
        "preset": preset, "model": model, "rows": rows,
        "pipeline_process_s": round(total, 2),
        "pipeline_without_finetune_process_s": round(total - next(
            r["process_s"] for r in rows if r["stage"] == "finetune"), 2),
        # the stages (before allocate and export existed), process time each
        "core_stages_process_s": round(sum(r["process_s"] for r in rows if r["stage"] in CORE), 2),
        "score_similarity_plan_surgery_in_stage_s": round(sum(
            r["in_stage_s"] for r in rows if r["stage"] in ("score", "similarity", "plan", "surgery")), 2),
        "evaluate_dense_tokens": tokens,
        "evaluate_dense_tokens_per_s": round(tokens / dense_eval["in_stage_s"], 1),
        "ppl": evaluate["ppl"],
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv=None) -> None:
    """Parse arguments, run every preset, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", required=True, help="random_models preset (repeatable)")
    ap.add_argument("--tokenizer", type=Path, default=Path("artifacts/model"), help="folder with a real tokenizer")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="corpora mirror")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gqaprune-stages"), help="scratch folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--finetune-steps", type=int, default=0, help="0: finetune disabled (records only)")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate.max_tokens (CPU dry runs)")
    ap.add_argument("--ratio", type=float, default=0.2, help="plan.ratio (a tiny model with a 49k vocabulary: 0.01)")
    ap.add_argument("--nproc", type=int, default=1, help="distributed.nproc_per_node: the model stages on N GPUs")
    ap.add_argument("--placement", default="auto", help="distributed.placement: auto | replicate | shard")
    ap.add_argument("--keep", action="store_true", help="keep each preset's folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = {"started": started, "argv": sys.argv[1:], "presets": []}
    for preset in args.preset:
        results["presets"].append(bench_preset(preset, args, env))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

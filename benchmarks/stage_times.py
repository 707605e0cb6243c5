"""Times the real stage commands, as ``dvc repro`` runs them, on a real model (CPU) or a random-weight model of a
real shape (GPU): per stage the process wall time (imports and loading included), the in-stage time and
phases from ``metrics/<stage>.json``, the peak resident memory of the stage process and the peak GPU memory.

    # the default pipeline (params.yaml as shipped) on the embedded SmolLM2, on this machine's CPU
    python benchmarks/stage_times.py --model embedded --params default \\
        --out benchmarks/results/performance/cpu_smollm2.json
    # a 0.5B model folder (README "Measured results" says where it comes from)
    python benchmarks/stage_times.py --model /path/to/qwen2.5-coder-0.5b-instruct --params default --out ...
    # the README's GPU settings on random weights of a real shape (one GPU; --nproc N for N)
    PYTHONPATH=src python benchmarks/stage_times.py --preset llama3-8b --params gpu \\
        --tokenizer .bench_assets/tokenizer --data-dir .bench_assets/data \\
        --out benchmarks/results/performance/h100_llama3-8b.json

``--preset tiny-llama-gqa4 --params gpu --device cpu --ratio 0.01`` runs the GPU sequence on a CPU in a minute (a dry
run of the script itself). ``-S section.key=value`` overrides params (repeatable). A preset's folder is deleted after
its run (an 8B model and its pruned copy take ~27 GB of disk). ``benchmarks/performance.py`` turns the JSON files
into ``benchmarks/PERFORMANCE.md``. On a machine that gets a copy of the tree, set ``GQAPRUNE_COMMIT`` to the commit
it holds (the copy's git may name an older one).
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
ORDER = ("source", "prepare", "calibrate", "score", "similarity", "allocate", "plan", "surgery", "finetune",
         "evaluate_dense", "evaluate", "export")


def gpu_params(model: Path, data_dir: Path, device: str, finetune_steps: int, ratio: float,
               max_tokens: int | None = None) -> dict:
    """The README's GPU settings (bf16, CUDA, large batches), every corpus evaluated in full (or capped)."""
    on_gpu = device != "cpu"
    dtype = "bfloat16" if on_gpu else "float32"
    return {
        "data": {"data_dir": str(data_dir)},
        "prepare": {"model": str(model), "dtype": dtype},
        "calibrate": {"mix": "auto", "n_samples": 128 if on_gpu else 16, "seq_len": 128, "seed": 0},
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
    saved = time.perf_counter() - t0 - built
    floors = measure_floors(model) if device != "cpu" else None
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"params": params, "build_s": round(built, 2), "save_s": round(saved, 2), "floors": floors}


def measure_floors(model, seq_len: int = 128, batch: int = 16, repeats: int = 3) -> dict:
    """The plain model's throughput on its device, the floors the stages are compared with (tokens/s):
    ``forward`` (no grad, batch x seq_len windows, what evaluation and similarity do) and ``forward_backward``
    (gradients of every weight, what Taylor scoring needs at least)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    def timed(step) -> float:
        step()  # warm-up: kernels chosen, allocator grown
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return batch * seq_len * repeats / (time.perf_counter() - t0)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def forward_backward():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    fwd = timed(forward)
    model.requires_grad_(True)
    fwd_bwd = timed(forward_backward)
    model.requires_grad_(False)
    return {"forward_tok_s": round(fwd), "forward_backward_tok_s": round(fwd_bwd), "seq_len": seq_len, "batch": batch}


def _machine() -> dict:
    """What the run ran on: CPU model and cores, memory, torch / transformers versions, the GPU when used."""
    import platform

    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mib=props.total_memory // 2**20, gpus=torch.cuda.device_count())
    # $GQAPRUNE_COMMIT names the code where git cannot: a device machine gets a copy of the working tree whose
    # .git may be stale (two committed H100 runs recorded an older commit than the tree they ran)
    info["commit"] = os.environ.get("GQAPRUNE_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip() or None
        except OSError:
            info["commit"] = None
    return info


def run_stage(stage: str, project: Path, env: dict, logs: Path | None = None) -> dict:
    """Run ``stages/<stage>.py`` in ``project``: process wall time, peak resident memory of the process
    (``wait4``), the stage's own metrics file (its log copied to ``logs`` when given)."""
    t0 = time.perf_counter()
    with open(project / f".{stage}.out", "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"stage {stage} failed ({code}):\n{(project / f'.{stage}.out').read_text()[-4000:]}")
    metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
    if logs is not None:  # the stage's own log (phases, the loader's read / CUDA-context split)
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / "artifacts" / "logs" / f"{stage}.log", logs / f"{stage}.log")
    row = {"stage": stage, "process_s": round(wall, 2), "in_stage_s": metrics.get("wall_time_s"),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is KiB on Linux
           "peak_gpu_gib": metrics.get("peak_gpu_mem_gib"), "metrics": metrics}
    print(json.dumps(row), flush=True)
    return row


def project_params(args, model: str) -> dict:
    """params.yaml of the run: the project's own (``default``) or the README's GPU settings (``gpu``), the model
    and data folder set, ``-S`` overrides applied."""
    if args.params == "gpu":
        params = gpu_params(Path(model), args.data_dir.resolve(), args.device, args.finetune_steps, args.ratio,
                            args.max_tokens)
        params["distributed"] = {"nproc_per_node": args.nproc, "placement": args.placement}
    else:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["data_dir"] = str(args.data_dir.resolve())
        params["prepare"]["model"] = model
    for assignment in args.set or []:
        key, value = assignment.split("=", 1)
        section, name = key.split(".")
        params.setdefault(section, {})[name] = yaml.safe_load(value)
    return params


def bench(name: str, model: str | None, args, env: dict) -> dict:
    """Model folder (a preset's is written first), params, every stage in order; the run's summary."""
    work = args.work / name
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    project.mkdir(parents=True)
    made = None
    if model is None:
        made = make_model(name, args.tokenizer, work / "model", args.device)
        print(json.dumps({"preset": name, "model": made}), flush=True)
        model = str(work / "model")
    (project / "params.yaml").write_text(yaml.safe_dump(project_params(args, model), sort_keys=False))
    t0 = time.perf_counter()
    rows = [run_stage(stage, project, env, args.out.parent / f"logs_{name}") for stage in ORDER]
    total = time.perf_counter() - t0
    by = {r["stage"]: r for r in rows}
    summary = {
        "name": name, "model": made or model, "rows": rows,
        "pipeline_process_s": round(total, 2),
        "pipeline_without_finetune_process_s": round(total - by["finetune"]["process_s"], 2),
        "score_to_checkpoint_in_stage_s": round(sum(
            by[s]["in_stage_s"] for s in ("score", "similarity", "allocate", "plan", "surgery")), 2),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
        "peak_gpu_gib": max((r["peak_gpu_gib"] or 0) for r in rows) or None,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv=None) -> None:
    """Parse arguments, run every model or preset, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="a model folder or 'embedded' (repeatable)")
    ap.add_argument("--preset", action="append", default=[], help="random_models preset (repeatable)")
    ap.add_argument("--params", choices=("default", "gpu"), default="default",
                    help="default: params.yaml as shipped; gpu: the README's GPU settings")
    ap.add_argument("--set", "-S", action="append", help="override one value, e.g. -S evaluate.max_tokens=null")
    ap.add_argument("--tokenizer", type=Path, default=Path("artifacts/model"), help="folder with a real tokenizer")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="corpora mirror")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gqaprune-stages"), help="scratch folder")
    ap.add_argument("--device", default="cuda", help="device of a preset's model and of the gpu params")
    ap.add_argument("--finetune-steps", type=int, default=0, help="gpu params: 0 disables finetune (records only)")
    ap.add_argument("--max-tokens", type=int, default=None, help="gpu params: evaluate.max_tokens")
    ap.add_argument("--ratio", type=float, default=0.2, help="gpu params: plan.ratio (tiny model, 49k vocab: 0.01)")
    ap.add_argument("--nproc", type=int, default=1, help="gpu params: distributed.nproc_per_node")
    ap.add_argument("--placement", default="auto", help="gpu params: distributed.placement")
    ap.add_argument("--keep", action="store_true", help="keep each run's folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.model and not args.preset:
        ap.error("give --model or --preset")
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:], "machine": _machine(),
               "runs": []}
    runs = [(Path(m).name if m != "embedded" else "smollm2-embedded", m) for m in args.model]
    runs += [(preset, None) for preset in args.preset]
    for name, model in runs:
        results["runs"].append(bench(name, model, args, env))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""N-rank benchmark: load, floors, scoring, similarity, surgery + save, evaluation, loading memory per rank.

Made for the issue-11 GPU runs (LLaMA-3-70B shape on 4 H200, LLaMA-3-8B shape on 1 and 2) and runs the
same on CPU (gloo) as a dry run. Every figure comes from the library calls the stages make, with a
:class:`gqaprune.runtime.distributed.DistContext` (one process: the same functions without a process group):
:func:`gqaprune.runtime.placement.load_model`, :func:`gqaprune.pruning.importance.score_groups`,
:func:`gqaprune.pruning.similarity.block_similarity`, :func:`gqaprune.pruning.compensation.compensate`,
:func:`gqaprune.pruning.surgery.save_pruned`, :func:`gqaprune.evaluation.window_nlls`. Rank 0 writes one JSON.

Write a random checkpoint of a preset once (tensor by tensor, drawn on the GPU for speed)::

    python benchmarks/dist_bench.py make --preset llama3-70b --out /dev/shm/llama3-70b --device cuda

Then (this re-runs itself under torchrun through the stages' launcher; or start it with torchrun)::

    python benchmarks/dist_bench.py run --model /dev/shm/llama3-70b --nproc 4 --placement shard \\
        --gradient-batch-size 8 --json $OUT/dist_70b.json

Sections (``--sections``, default all): ``load`` (time, CPU and GPU memory per rank), ``floor``
(forward and forward+backward tokens/s over the scoring micro-batches and split; the backward computes
parameter gradients: what scoring would cost with autograd's weight gradients), ``score`` (all five
metrics through the taps), ``similarity``, ``surgery`` (a ``--ratio`` plan from the Taylor scores,
``--compensation`` refits by their owner ranks, the checkpoint written layer by layer), ``evaluate``
(windows of ``--eval-seq`` tokens). ``--baseline`` first runs the same benchmark on one process and
puts both runs, their ratios and the largest relative difference of every score in the JSON;
``--reference-importance FILE`` (one process) also times another ``importance.py`` (e.g.
``git show a2deeca:src/gqaprune/importance.py``, the gradient-hook scorer the taps replaced) on the same
model and samples, and compares its scores.

CPU dry run (a tiny random checkpoint, 2 gloo ranks)::

    python benchmarks/dist_bench.py make --preset tiny-llama-gqa4 --out /tmp/tiny --dtype float32
    python benchmarks/dist_bench.py run --model /tmp/tiny --device cpu --dtype float32 --nproc 2 \\
        --placement shard --samples 8 --seq 32 --gradient-batch-size 2 --eval-windows 8 --json /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SECTIONS = ("load", "floor", "score", "similarity", "surgery", "evaluate")
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(ctx, device, fn):
    """(result, seconds) of ``fn()`` with every rank starting together and the device drained."""
    ctx.barrier()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    ctx.barrier()
    return out, time.perf_counter() - t0


def _status_gib(key: str) -> float:
    """A /proc/self/status figure (VmHWM, VmRSS, RssAnon, RssFile) in GiB; nan where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")


def _reset_peaks(device) -> None:
    try:  # VmHWM back to the current RSS (Linux clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory(ctx, device) -> list[dict]:
    """Every rank's CPU (peak and current RSS, anonymous and file-backed) and GPU peaks, in rank order."""
    mine = {key.lower() + "_gib": _status_gib(key) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    if device.type == "cuda":
        mine["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        mine["gpu_reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return ctx.all_gather_object(mine)


def plan_from_scores(table, ratio: float, align: int = 8) -> dict:
    """A simple plan: every layer keeps its top (1 - ratio) attention groups and MLP channels by Taylor score."""
    from gqaprune.models.units import LayerKeep

    keep = {}
    for layer, rows in table.groupby("layer"):
        attn = rows[rows["kind"] == "attn"].sort_values("taylor", ascending=False)
        mlp = rows[rows["kind"] == "mlp"].sort_values("taylor", ascending=False)
        n_attn = max(1, round(len(attn) * (1 - ratio)))
        n_mlp = max(align, int(round(len(mlp) * (1 - ratio)) // align * align))
        keep[int(layer)] = LayerKeep(attn=sorted(int(i) for i in attn["index"][:n_attn]),
                                     mlp=sorted(int(i) for i in mlp["index"][:n_mlp]))
    return keep


def floors(model, samples, ctx, device, batch: int) -> dict:
    """Forward and forward+backward (parameter gradients) tokens/s over this job's split of the micro-batches."""
    from gqaprune.runtime.placement import is_sharded

    units = ctx.split_units(math.ceil(samples.shape[0] / batch), lockstep=is_sharded(model))
    tokens = samples.numel()

    def forward():
        with torch.no_grad():
            for u, _ in units:
                model(input_ids=samples[u * batch:(u + 1) * batch].to(device), use_cache=False)

    def forward_backward():
        for u, _ in units:
            ids = samples[u * batch:(u + 1) * batch].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for p in model.parameters():
                p.grad = None

    flags = {p: p.requires_grad for p in model.parameters()}
    forward()  # warm-up (allocator, kernels, FSDP's lazy initialisation)
    _, t_f = _timed(ctx, device, forward)
    _reset_peaks(device)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        _, t_fb = _timed(ctx, device, forward_backward)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {"forward_s": t_f, "forward_tok_s": tokens / t_f, "fwd_bwd_s": t_fb, "fwd_bwd_tok_s": tokens / t_fb,
            "fwd_bwd_memory": _memory(ctx, device)}


# ----------------------------------------------------------------------------------------------- run
def bench(args, ctx) -> dict:
    from gqaprune.evaluation.perplexity import window_nlls
    from gqaprune.models.loading import load_model
    from gqaprune.pruning.compensation import compensate
    from gqaprune.pruning.importance import score_groups
    from gqaprune.pruning.similarity import block_similarity
    from gqaprune.pruning.surgery import pruned_layout, save_pruned
    from gqaprune.runtime.devices import resolve_device

    device = ctx.device if ctx.is_distributed else resolve_device(args.device)
    sections = set(args.sections)
    result: dict = {"world_size": ctx.world_size, "device": str(device), "args": vars(args),
                    "torch": torch.__version__, "imports_memory": _memory(ctx, device)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    _reset_peaks(device)
    model, t_load = _timed(ctx, device, lambda: load_model(args.model, args.dtype, args.device, ctx, args.placement))
    result["placement"] = model.gqaprune_placement
    result["load"] = {"seconds": t_load, "memory": _memory(ctx, device)}
    with torch.no_grad():  # read every weight once: an mmap-backed load is resident only once used
        local = sum(float(getattr(p, "_local_tensor", p).float().sum()) for p in model.parameters())
    result["load"]["memory_after_reading_weights"] = _memory(ctx, device)
    sums = ctx.all_gather_object(local)
    result["load"]["weight_checksum"] = sum(sums) if result["placement"] == "shard" else sums[0]
    vocab = model.config.vocab_size
    samples = torch.randint(0, vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = samples.numel()
    gbs = args.gradient_batch_size
    if "floor" in sections:
        result["floor"] = floors(model, samples, ctx, device, gbs)
    table = None
    if "score" in sections or "surgery" in sections:
        score = lambda: score_groups(model, samples, gradient_batch_size=gbs,  # noqa: E731
                                     gradient_checkpointing=args.checkpointing, progress=False, ctx=ctx)
        score_groups(model, samples[: gbs * ctx.world_size], gradient_batch_size=gbs, progress=False, ctx=ctx)
        _reset_peaks(device)
        table, t = _timed(ctx, device, score)
        result["score"] = {"seconds": t, "tok_s": tokens / t, "groups": len(table), "memory": _memory(ctx, device)}
        if args.scores_out and ctx.is_main:
            table.to_parquet(args.scores_out)
        if "floor" in result:
            result["score"]["x_fwd_bwd_floor"] = t / result["floor"]["fwd_bwd_s"]
        if args.reference_importance and not ctx.is_distributed:
            result["score_reference"] = reference_score(args, model, samples, table, device)
    if "similarity" in sections:
        _reset_peaks(device)
        _, t = _timed(ctx, device, lambda: block_similarity(model, samples, batch_size=args.batch_size,
                                                            progress=False, ctx=ctx))
        result["similarity"] = {"seconds": t, "tok_s": tokens / t, "memory": _memory(ctx, device)}
        if "floor" in result:
            result["similarity"]["x_forward_floor"] = t / result["floor"]["forward_s"]
    if "surgery" in sections:
        _reset_peaks(device)
        keep, t_plan = _timed(ctx, device, lambda: plan_from_scores(table, args.ratio))
        budget = None if args.max_stats_gib is None else int(args.max_stats_gib * GIB)
        refits, t_comp = _timed(ctx, device, lambda: compensate(
            model, keep, samples, args.compensation, batch_size=args.batch_size, max_stats_bytes=budget,
            progress=False, ctx=ctx))
        out_dir = Path(args.pruned_out)
        layout, t_layout = _timed(ctx, device, lambda: pruned_layout(model, keep, refits))
        _, t_save = _timed(ctx, device, lambda: save_pruned(
            model, None, out_dir, keep=keep, replacements=refits, ctx=ctx, max_shard_bytes=int(args.shard_gib * GIB),
            layout_=layout))
        size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) if ctx.is_main else 0
        result["surgery"] = {"plan_s": t_plan, "compensation_s": t_comp, "layout_s": t_layout, "save_s": t_save,
                             "surgery_and_save_s": t_comp + t_layout + t_save, "checkpoint_gib": size / GIB,
                             "refits": len(refits.owners), "memory": _memory(ctx, device)}
        if "score" in result:
            result["score_to_checkpoint_s"] = result["score"]["seconds"] + t_plan + t_comp + t_layout + t_save
    if "evaluate" in sections:
        gen = torch.Generator().manual_seed(2)
        windows = torch.randint(0, vocab, (args.eval_windows, args.eval_seq), generator=gen)
        window_nlls(model, windows[: args.eval_batch_size * ctx.world_size], args.eval_batch_size, ctx=ctx,
                    progress=False)  # warm-up
        _reset_peaks(device)
        _, t = _timed(ctx, device, lambda: window_nlls(model, windows, args.eval_batch_size, ctx=ctx, progress=False))
        result["evaluate"] = {"seconds": t, "tok_s": windows.numel() / t, "seq": args.eval_seq,
                              "memory": _memory(ctx, device)}
    return result


def reference_score(args, model, samples, table, device) -> dict:
    """Time another importance.py's score_groups on the same model and samples (one process); compare scores."""
    import numpy as np
    from gpu.library import load_module_copy  # benchmarks/ is on the path of this script

    ref = load_module_copy("importance_reference", Path(args.reference_importance))
    run = lambda: ref.score_groups(model, samples, gradient_batch_size=args.gradient_batch_size,  # noqa: E731
                                   gradient_checkpointing=args.checkpointing, progress=False)
    from gqaprune.runtime.distributed import single_process

    ctx = single_process()
    _reset_peaks(device)
    other, t = _timed(ctx, device, run)
    rel = {m: float(np.max(np.abs(other[m] - table[m]) / np.maximum(np.abs(table[m]), 1e-30))) for m in other.columns
           if m in table.columns and m not in ("layer", "kind", "index", "cost")}
    return {"file": str(args.reference_importance), "seconds": t, "tok_s": samples.numel() / t,
            "memory": _memory(ctx, device), "max_rel_diff_to_taps": rel}


def run(args, argv: list[str]) -> int:
    from gqaprune.config.sections import DistributedParams
    from gqaprune.runtime.distributed import launched, process_group
    from gqaprune.runtime.launch import launch

    baseline = tmp = None
    if args.baseline and not launched() and args.nproc > 1:
        tmp = Path(tempfile.mkdtemp(prefix="dist-bench-"))
        cmd = [sys.executable, __file__, "run", *_without(argv, "--baseline"), "--nproc", "1", "--placement",
               "replicate", "--json", str(tmp / "baseline.json"), "--scores-out", str(tmp / "one.parquet")]
        subprocess.run(cmd, check=True)
        baseline = json.loads((tmp / "baseline.json").read_text())
        argv = [*argv, "--scores-out", str(tmp / "ranks.parquet")]
    code = launch(DistributedParams(nproc_per_node=args.nproc, timeout_s=args.timeout), [__file__, "run", *argv])
    if code is None:  # this process is a rank (or the only process)
        if "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        with process_group(args.device, args.timeout) as ctx:
            result = bench(args, ctx)
            if ctx.is_main:
                _write(args.json, result)
        # as the stage runner does: end the rank without interpreter teardown, where a communication thread
        # still being joined can abort the process ("terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if code == 0 and baseline is not None and args.json:
        result = json.loads(Path(args.json).read_text())
        result.update(baseline_one_process=baseline, speedup=_speedups(baseline, result),
                      scores_max_rel_diff_to_one_process=_score_diffs(tmp / "one.parquet", tmp / "ranks.parquet"))
        _write(args.json, result)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return code


def _score_diffs(one: Path, many: Path) -> dict | None:
    """Largest relative difference per metric between the one-process and the N-rank score tables."""
    if not (one.is_file() and many.is_file()):
        return None
    import numpy as np
    import pandas as pd

    a, b = pd.read_parquet(one), pd.read_parquet(many)
    metrics = [m for m in a.columns if m not in ("layer", "kind", "index", "cost")]
    return {m: float(np.max(np.abs(a[m] - b[m]) / np.maximum(np.abs(a[m]), 1e-30))) for m in metrics}


def _without(argv: list[str], flag: str) -> list[str]:
    return [a for a in argv if a != flag]


def _speedups(one: dict, many: dict) -> dict:
    """seconds on one process / seconds on N, per section."""
    out = {}
    for section in ("load", "score", "similarity", "evaluate"):
        if section in one and section in many:
            out[section] = one[section]["seconds"] / many[section]["seconds"]
    if "surgery" in one and "surgery" in many:
        out["surgery"] = one["surgery"]["surgery_and_save_s"] / many["surgery"]["surgery_and_save_s"]
    if "score_to_checkpoint_s" in one and "score_to_checkpoint_s" in many:
        out["score_to_checkpoint"] = one["score_to_checkpoint_s"] / many["score_to_checkpoint_s"]
    return out


def _write(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


# ----------------------------------------------------------------------------------------------- memory
def memory(args) -> int:
    """Peak CPU RSS per rank while loading ``--model`` on the CPU, each placement in fresh processes."""
    modes = [("1 process (from_pretrained)", 1, "replicate")] + [
        (f"{placement}, {n} ranks", n, placement) for n in args.nprocs if n > 1 for placement in ("replicate", "shard")]
    rows = []
    for label, n, placement in modes:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "run", "--model", args.model, "--device", "cpu", "--dtype", args.dtype,
                   "--sections", "load", "--nproc", str(n), "--placement", placement, "--json", f.name]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res = json.loads(Path(f.name).read_text())
        base = [m["vmhwm_gib"] for m in res["imports_memory"]]
        peak = [m["vmhwm_gib"] for m in res["load"]["memory_after_reading_weights"]]
        extra = [p - b for p, b in zip(peak, base, strict=True)]
        rows.append({"mode": label, "placement": res["placement"], "rss_after_imports_gib": base,
                     "rss_peak_gib": peak, "load_peak_minus_imports_gib": extra,
                     "load_s": res["load"]["seconds"], "weight_checksum": res["load"]["weight_checksum"]})
    print("| mode | peak RSS per rank (GiB) | peak - RSS after imports | load s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {' / '.join(f'{v:.2f}' for v in r['rss_peak_gib'])} | "
              f"{' / '.join(f'{v:.2f}' for v in r['load_peak_minus_imports_gib'])} | {r['load_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make", help="write a random checkpoint of a preset, tensor by tensor")
    make.add_argument("--preset", required=True)
    make.add_argument("--out", required=True)
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    make.add_argument("--shard-gib", type=float, default=5.0)
    make.add_argument("--override", nargs="*", default=[], help="config keys, e.g. num_hidden_layers=8")
    r = sub.add_parser("run", help="the benchmark (re-runs itself under torchrun with --nproc > 1)")
    r.add_argument("--model", required=True)
    r.add_argument("--nproc", type=int, default=1)
    r.add_argument("--placement", default="auto", choices=["auto", "replicate", "shard"])
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--samples", type=int, default=128)
    r.add_argument("--seq", type=int, default=128)
    r.add_argument("--gradient-batch-size", type=int, default=8)
    r.add_argument("--checkpointing", action="store_true")
    r.add_argument("--batch-size", type=int, default=8, help="similarity / compensation batch")
    r.add_argument("--ratio", type=float, default=0.2)
    r.add_argument("--compensation", default="lstsq", choices=["none", "bias", "lstsq"])
    r.add_argument("--max-stats-gib", type=float, default=None, help="Gram budget per rank (default: free GPU memory)")
    r.add_argument("--pruned-out", default=os.path.join(tempfile.gettempdir(), "gqaprune_dist_bench_pruned"))
    r.add_argument("--shard-gib", type=float, default=5.0)
    r.add_argument("--eval-windows", type=int, default=256)
    r.add_argument("--eval-seq", type=int, default=128)
    r.add_argument("--eval-batch-size", type=int, default=8)
    r.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--json")
    r.add_argument("--baseline", action="store_true", help="also run on one process first; both in the JSON")
    r.add_argument("--reference-importance", help="another importance.py to time next to the taps (one process)")
    r.add_argument("--scores-out", help="write the score table here (Parquet); --baseline compares the two runs'")
    mem = sub.add_parser("memory", help="peak CPU RSS per rank of each loading placement (CPU ranks)")
    mem.add_argument("--model", required=True)
    mem.add_argument("--dtype", default="float32")
    mem.add_argument("--nprocs", nargs="*", type=int, default=[2, 4])
    mem.add_argument("--json")
    args = parser.parse_args(argv)

    if args.cmd == "memory":
        return memory(args)
    if args.cmd == "make":
        from gqaprune.models.random_models import write_random_checkpoint
        from gqaprune.runtime.devices import torch_dtype

        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.override)}
        t0 = time.perf_counter()
        out = write_random_checkpoint(args.out, args.preset, dtype=torch_dtype(args.dtype), device=args.device,
                                      max_shard_bytes=int(args.shard_gib * GIB), **overrides)
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        return 0
    return run(args, argv[1:])


if __name__ == "__main__":
    sys.exit(main())

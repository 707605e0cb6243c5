"""GPU benchmark of the gqaprune pipeline steps on random-weight 7-8B shapes (LLaMA-3-8B, Qwen2.5-7B).

Measures, per preset, in one process (results written as JSON after every measurement, so a run cut
short still leaves what it measured):

* floors: bf16 matmul TFLOP/s, dense forward and forward+backward tokens/s at the scoring shapes;
* importance scoring (taylor + taylor_2nd in one pass, wanda) on a short set (default 128 x 128) and
  a long set (32 x 2048) over gradient_batch_size / gradient checkpointing settings: wall time,
  tokens/s, peak GPU memory, ratio to the floor;
* similarity (block_similarity), plan (build_plan), surgery + save_pruned;
* evaluation throughput: gqaprune.evaluation.perplexity fed random token ids through its token cache
  (no corpus, no tokenizer), and the same computation written inline (batched forward over
  non-overlapping windows + float32 token NLL, one host sync at the end);
* pruned-model speed: prefill and decode tokens/s of the dense model and of plans at two ratios and
  three MLP alignments. Decode replays one CUDA-graph-captured step over a static KV cache (falls back
  to, and always also reports, eager steps).

Weights are random (``gqaprune.random_models``); token ids are uniform random. Run it with the
package on the path::

    PYTHONPATH=src python benchmarks/gpu_8b.py --preset llama3-8b --out results/gpu_8b_llama3-8b.json

CPU smoke test::

    PYTHONPATH=src python benchmarks/gpu_8b.py --preset tiny-llama-gqa4 --device cpu --tiny --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


# ----------------------------------------------------------------------------------------------- utils
class Bench:
    """Holds the device, the results dict and the time budget; writes JSON after every record."""

    def __init__(self, args, preset: str, t_start: float):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t_start = t_start
        self.results: dict = {}
        out = Path(args.out)  # one JSON per preset: <out stem>_<preset>.json
        self.out = out.with_name(f"{out.stem}_{preset}{out.suffix or '.json'}")
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.args.time_budget_s and self.elapsed() > self.args.time_budget_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clean(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def record(self, section: str, key: str, value):
        self.results.setdefault(section, {})[key] = value
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        tmp.replace(self.out)
        print(f"[{self.elapsed():7.1f}s] {section}/{key}: {_short(value)}", flush=True)

    def run(self, section: str, key: str, fn):
        """Call fn() -> dict, record it (or the error), never raise."""
        if self.over_budget():
            self.record(section, key, {"skipped": f"time budget {self.args.time_budget_s}s exceeded"})
            return None
        self.clean()
        try:
            value = fn()
        except torch.cuda.OutOfMemoryError as e:  # noqa: F841
            value = {"error": "OOM", "peak_gib": self.peak_gib()}
        except Exception as e:  # keep going: one failing measurement must not lose the others
            value = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        self.clean()
        self.record(section, key, value)
        return value


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def _short(v) -> str:
    if isinstance(v, dict):
        keep = {
            k: (round(x, 3) if isinstance(x, float) else x)
            for k, x in v.items()
            if k not in ("trace", "per_layer", "table") and not isinstance(x, (list, dict))
        }
        return json.dumps(keep, default=_json_default)[:400]
    return str(v)[:400]


def timed(bench: Bench, fn, iters: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``iters`` calls of fn after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    bench.sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        bench.sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def random_ids(bench: Bench, n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g).to(bench.device)


def load_module_copy(name: str, path: Path):
    """Import a copy of a gqaprune module from ``path`` as ``gqaprune.<name>`` (relative imports work)."""
    spec = importlib.util.spec_from_file_location(f"gqaprune.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_settings(text: str) -> list[tuple[int, bool]]:
    """'4,16,32c' -> [(4, False), (16, False), (32, True)]; 'c' = gradient checkpointing."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        out.append((int(item.rstrip("c")), item.endswith("c")))
    return out


def parse_shape(text: str) -> tuple[int, int]:
    n, s = text.lower().split("x")
    return int(n), int(s)


# ----------------------------------------------------------------------------------------------- model
def build(bench: Bench, preset: str):
    from gqaprune.random_models import build_model

    t0 = time.perf_counter()
    model = build_model(preset, seed=0, dtype=getattr(torch, bench.args.dtype), device=str(bench.device))
    bench.sync()
    return model, time.perf_counter() - t0


def grad_params(model):
    """The parameters that score_groups gives gradients to: every decoder projection (not norms)."""
    out = []
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if "norm" not in name:
                out.append(p)
    return out


def set_trainable(model, params) -> dict:
    """Give gradients to ``params`` only; returns the previous flags for :func:`restore_trainable`."""
    saved = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    return saved


def restore_trainable(saved: dict):
    for p, flag in saved.items():
        p.requires_grad_(flag)
        p.grad = None


def ckpt_enable(model):
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def ckpt_disable(model):
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()


# ----------------------------------------------------------------------------------------------- floors
def matmul_floor(bench: Bench) -> dict:
    n = bench.args.matmul_n
    dtype = getattr(torch, bench.args.dtype)
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    ts = timed(bench, lambda: a @ b, iters=10, warmup=3)
    t = median(ts)
    return {"n": n, "median_s": t, "tflops": 2 * n**3 / t / 1e12}


def forward_floor(bench: Bench, model, batch: int, seq: int) -> dict:
    ids = random_ids(bench, batch, seq, model.config.vocab_size, seed=11)
    with torch.inference_mode():
        ts = timed(bench, lambda: model(input_ids=ids, use_cache=False), iters=bench.args.floor_iters)
    t = median(ts)
    return {
        "batch": batch,
        "seq": seq,
        "median_s": t,
        "tokens_per_s": batch * seq / t,
        "peak_gib": bench.peak_gib(),
    }


def fwdbwd_floor(bench: Bench, model, batch: int, seq: int, checkpointing: bool) -> dict:
    """Dense forward + backward with gradients for the scored projections only (as score_groups)."""
    ids = random_ids(bench, batch, seq, model.config.vocab_size, seed=12)
    params = grad_params(model)
    saved = set_trainable(model, params)
    if checkpointing:
        ckpt_enable(model)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None

    try:
        ts = timed(bench, step, iters=bench.args.floor_iters)
    finally:
        if checkpointing:
            ckpt_disable(model)
        restore_trainable(saved)
    t = median(ts)
    return {
        "batch": batch,
        "seq": seq,
        "checkpointing": checkpointing,
        "median_s": t,
        "tokens_per_s": batch * seq / t,
        "peak_gib": bench.peak_gib(),
    }


# ----------------------------------------------------------------------------------------------- steps
def score_run(
    bench: Bench, module, model, samples, metrics, gbs: int, ckpt: bool, keep: dict | None = None
) -> dict:
    bench.sync()
    t0 = time.perf_counter()
    table = module.score_groups(
        model, samples, metrics=metrics, gradient_batch_size=gbs, gradient_checkpointing=ckpt, progress=False
    )
    bench.sync()
    wall = time.perf_counter() - t0
    if keep is not None:
        keep["table"] = table
    n_tokens = samples.numel()
    return {
        "metrics": list(metrics),
        "samples": list(samples.shape),
        "gradient_batch_size": gbs,
        "gradient_checkpointing": ckpt,
        "wall_s": wall,
        "tokens_per_s": n_tokens / wall,
        "peak_gib": bench.peak_gib(),
    }


def similarity_run(bench: Bench, module, model, samples, batch: int, keep: dict | None = None) -> dict:
    bench.sync()
    t0 = time.perf_counter()
    sim = module.block_similarity(model, samples, batch_size=batch, progress=False)
    bench.sync()
    wall = time.perf_counter() - t0
    if keep is not None:
        keep["table"] = sim
    return {
        "samples": list(samples.shape),
        "batch_size": batch,
        "wall_s": wall,
        "tokens_per_s": samples.numel() / wall,
        "peak_gib": bench.peak_gib(),
    }


class FakeTokenizer:
    """Just enough of a tokenizer for evaluation's token cache key (the ids are injected)."""

    name_or_path = "gqaprune-benchmark-random-ids"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1, 2, 3]}

    def __len__(self):
        return self.vocab


def eval_library(bench: Bench, model, seq: int, batch: int, n_tokens: int) -> dict:
    """gqaprune.evaluation.perplexity on random ids injected into its per-process token cache."""
    from gqaprune import data, evaluation

    tok = FakeTokenizer(model.config.vocab_size)
    dataset = "wikitext2"
    split = data.EVALUATION_SPLIT[dataset]
    root = data.resolve_data_dir(None)
    key = (evaluation._tokenizer_key(tok), dataset, split, None if root is None else str(root))
    g = torch.Generator().manual_seed(21)
    evaluation._TOKEN_CACHE[key] = torch.randint(0, model.config.vocab_size, (n_tokens + seq,), generator=g)
    kwargs = dict(dataset=dataset, seq_len=seq, batch_size=batch, max_tokens=n_tokens)
    evaluation.perplexity(model, tok, **{**kwargs, "max_tokens": seq * batch})  # warm-up
    bench.sync()
    t0 = time.perf_counter()
    res = evaluation.perplexity(model, tok, **kwargs)
    bench.sync()
    wall = time.perf_counter() - t0
    evaluation._TOKEN_CACHE.pop(key, None)
    return {
        "seq_len": seq,
        "batch_size": batch,
        "tokens": res.n_tokens,
        "wall_s": wall,
        "tokens_per_s": res.n_tokens / wall,
        "ppl": res.ppl,
        "peak_gib": bench.peak_gib(),
    }


def eval_inline(bench: Bench, model, seq: int, batch: int, n_tokens: int) -> dict:
    """The evaluation computation inline: batched windows, float32 NLL summed on device, one sync."""
    n_windows = n_tokens // seq
    ids = random_ids(bench, n_windows, seq, model.config.vocab_size, seed=22)

    def run():
        total = torch.zeros((), dtype=torch.float64, device=bench.device)
        with torch.inference_mode():
            for start in range(0, n_windows, batch):
                x = ids[start : start + batch]
                logits = model(input_ids=x, use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"
                )
                total += nll.double()
        return float(total)

    run_small = ids[:batch]
    with torch.inference_mode():
        model(input_ids=run_small, use_cache=False)  # warm-up
    bench.sync()
    t0 = time.perf_counter()
    total = run()
    bench.sync()
    wall = time.perf_counter() - t0
    return {
        "seq_len": seq,
        "batch_size": batch,
        "tokens": n_windows * seq,
        "wall_s": wall,
        "tokens_per_s": n_windows * seq / wall,
        "ppl": math.exp(total / (n_windows * (seq - 1))),
        "peak_gib": bench.peak_gib(),
    }


# ----------------------------------------------------------------------------------------------- speed
def prefill_speed(bench: Bench, model, batch: int, seq: int) -> dict:
    ids = random_ids(bench, batch, seq, model.config.vocab_size, seed=31)
    with torch.inference_mode():
        ts = timed(
            bench,
            lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1),
            iters=bench.args.prefill_iters,
            warmup=2,
        )
    t = median(ts)
    return {"batch": batch, "seq": seq, "median_s": t, "tokens_per_s": batch * seq / t}


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params else "cache"


def _set_cache_length(cache, length: int):
    for layer in getattr(cache, "layers", []):
        cl = getattr(layer, "cumulative_length", None)
        if isinstance(cl, torch.Tensor) and getattr(layer, "is_initialized", False):
            cl.fill_(length)


def decode_speed(bench: Bench, model, batch: int, ctx: int, steps: int) -> dict:
    """Per-step decode latency at context ``ctx`` over a StaticCache: CUDA graph replay and eager steps."""
    from transformers import StaticCache

    vocab = model.config.vocab_size
    kw = _cache_kwarg(model)
    max_len = ctx + steps + 16
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    prompt = random_ids(bench, batch, ctx, vocab, seed=41)
    tok = random_ids(bench, batch, 1, vocab, seed=42)
    out: dict = {"batch": batch, "context": ctx, "steps": steps, "cache": "StaticCache"}
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache})

        def step():
            return model(input_ids=tok, use_cache=True, **{kw: cache}).logits

        # eager steps (launch-bound reference)
        n_eager = min(steps, bench.args.eager_decode_steps)
        _set_cache_length(cache, ctx)
        step()
        bench.sync()
        _set_cache_length(cache, ctx)
        t0 = time.perf_counter()
        for _ in range(n_eager):
            step()
        bench.sync()
        t_eager = (time.perf_counter() - t0) / n_eager
        out.update(eager_step_s=t_eager, eager_tokens_per_s=batch / t_eager)
        if not bench.cuda:
            out["graph"] = "not on CUDA"
            return out
        try:
            _set_cache_length(cache, ctx)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            _set_cache_length(cache, ctx)
            graph.replay()
            bench.sync()
            _set_cache_length(cache, ctx)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            bench.sync()
            t_graph = start.elapsed_time(end) / 1000 / steps
            out.update(
                graph="cuda graph of one HF forward step",
                graph_step_s=t_graph,
                graph_tokens_per_s=batch / t_graph,
            )
            del graph
        except Exception as e:
            out["graph"] = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def geometry_summary(model) -> dict:
    from gqaprune.adapters import get_adapter
    from gqaprune.groups import count_parameters, layer_shapes

    adapter = get_adapter(model.config)
    geo = adapter.geometry(model.config)
    shapes = layer_shapes(model, adapter, geo)
    kv = [s.attn_groups for s in shapes]
    mlp = [s.mlp_channels for s in shapes]
    return {
        "params": count_parameters(model),
        "layers": len(shapes),
        "kv_groups": kv,
        "mlp_channels": mlp,
        "mlp_mult_of_8": all(c % 8 == 0 for c in mlp),
        "mlp_mult_of_64": all(c % 64 == 0 for c in mlp),
    }


# ----------------------------------------------------------------------------------------------- main
def bench_preset(bench: Bench, preset: str):
    args = bench.args
    from gqaprune import importance, similarity
    from gqaprune.adapters import get_adapter
    from gqaprune.groups import parameter_counts
    from gqaprune.plan import PlanConfig, build_plan
    from gqaprune.surgery import prune_model, save_pruned

    sections = set(args.sections.split(","))
    base_imp = base_sim = None
    if args.baseline_dir and Path(args.baseline_dir, "importance_head.py").exists():
        base_imp = load_module_copy("importance_head", Path(args.baseline_dir, "importance_head.py"))
        base_sim = load_module_copy("similarity_head", Path(args.baseline_dir, "similarity_head.py"))

    model, t_build = build(bench, preset)
    cfg = model.config
    adapter = get_adapter(cfg)
    geo = adapter.geometry(cfg)
    counts = parameter_counts(model, adapter, geo)
    bench.record(
        "model",
        "info",
        {
            "preset": preset,
            "build_s": t_build,
            "dtype": args.dtype,
            "params": counts.total,
            "prunable": counts.prunable,
            "geometry": {k: v for k, v in geo.__dict__.items()},
            "weights_gib": bench.peak_gib(),
        },
    )
    vocab = cfg.vocab_size
    shapes = {"short": parse_shape(args.short), "long": parse_shape(args.long)}
    samples = {k: random_ids(bench, n, s, vocab, seed=1 + i) for i, (k, (n, s)) in enumerate(shapes.items())}

    # ---- extras: gradient-reduction micro-benchmark, decode profile, uniform (alignment) prunes
    if "hookbench" in sections:
        bench.run("hookbench", "layer0", lambda: hook_bench(bench, model))
    if "decodeprofile" in sections and args.profile_out:
        for b in args.decode_batches:
            bench.run(
                "decodeprofile",
                f"dense_b{b}",
                lambda b=b: decode_profile(bench, model, b, args.decode_ctx, preset),
            )
    if "align" in sections:
        dense_speed(bench, model, args)
        alignment_speed(bench, model, preset)

    # ---- floors
    if "floors" in sections:
        bench.run("floors", "matmul", lambda: matmul_floor(bench))
        for name in ("short", "long"):
            seq = shapes[name][1]
            for b in parse_settings(getattr(args, f"fwd_{name}")):
                bench.run(
                    "floors",
                    f"fwd_{name}_b{b[0]}",
                    lambda b=b, seq=seq: forward_floor(bench, model, b[0], seq),
                )
            for b, c in parse_settings(getattr(args, f"fwdbwd_{name}")):
                bench.run(
                    "floors",
                    f"fwdbwd_{name}_b{b}{'c' if c else ''}",
                    lambda b=b, c=c, seq=seq: fwdbwd_floor(bench, model, b, seq, c),
                )

    # ---- taylor (+ taylor_2nd) and wanda
    keep_scores: dict = {}
    if "taylor" in sections:
        for name in ("short", "long"):
            for gbs, ck in parse_settings(getattr(args, f"taylor_{name}")):
                slot: dict = {}
                bench.run(
                    "taylor",
                    f"{name}_gbs{gbs}{'c' if ck else ''}",
                    lambda gbs=gbs, ck=ck, name=name, slot=slot: score_run(
                        bench, importance, model, samples[name], ["taylor", "taylor_2nd"], gbs, ck, slot
                    ),
                )
                if "table" in slot and name == "short":
                    keep_scores.setdefault("taylor", slot["table"])
            if base_imp is not None:
                for gbs, ck in parse_settings(getattr(args, f"baseline_taylor_{name}")):
                    bench.run(
                        "taylor_baseline_head",
                        f"{name}_gbs{gbs}{'c' if ck else ''}",
                        lambda gbs=gbs, ck=ck, name=name: score_run(
                            bench, base_imp, model, samples[name], ["taylor", "taylor_2nd"], gbs, ck
                        ),
                    )
    if "wanda" in sections:
        for name in ("short", "long"):
            for gbs, _ in parse_settings(getattr(args, f"wanda_{name}")):
                bench.run(
                    "wanda",
                    f"{name}_gbs{gbs}",
                    lambda gbs=gbs, name=name: score_run(
                        bench, importance, model, samples[name], ["wanda"], gbs, False
                    ),
                )
            if base_imp is not None:
                for gbs, _ in parse_settings(getattr(args, f"baseline_wanda_{name}")):
                    bench.run(
                        "wanda_baseline_head",
                        f"{name}_gbs{gbs}",
                        lambda gbs=gbs, name=name: score_run(
                            bench, base_imp, model, samples[name], ["wanda"], gbs, False
                        ),
                    )

    # ---- similarity
    keep_sim: dict = {}
    if "similarity" in sections:
        for name in ("short", "long"):
            for b, _ in parse_settings(getattr(args, f"sim_{name}")):
                slot = {}
                bench.run(
                    "similarity",
                    f"{name}_b{b}",
                    lambda b=b, name=name, slot=slot: similarity_run(
                        bench, similarity, model, samples[name], b, slot
                    ),
                )
                if "table" in slot and name == "short":
                    keep_sim.setdefault("table", slot["table"])
            if base_sim is not None:
                for b, _ in parse_settings(getattr(args, f"baseline_sim_{name}")):
                    bench.run(
                        "similarity_baseline_head",
                        f"{name}_b{b}",
                        lambda b=b, name=name: similarity_run(bench, base_sim, model, samples[name], b),
                    )

    # ---- plan
    scores = keep_scores.get("taylor")
    if scores is None:  # synthetic scores: magnitude (no data needed)
        scores = importance.score_groups(
            model, samples["short"][:1, :8], metrics=["magnitude"], progress=False
        )
        scores = scores.rename(columns={"magnitude": "taylor"})
    sim = keep_sim.get("table")
    if sim is None:
        sim = similarity.block_similarity(
            model, samples["short"][: min(8, shapes["short"][0])], progress=False
        )
    plans = {}
    if "plan" in sections or "speed" in sections or "surgery" in sections:
        for ratio in args.ratios:
            for align in args.aligns:

                def make(ratio=ratio, align=align):
                    t0 = time.perf_counter()
                    plan = build_plan(
                        scores, sim, counts, geo.num_layers, PlanConfig(ratio=ratio, mlp_align=align)
                    )
                    wall = time.perf_counter() - t0
                    plans[(ratio, align)] = plan
                    a = plan.analysis
                    return {
                        "ratio": ratio,
                        "mlp_align": align,
                        "wall_s": wall,
                        "groups": len(plan.table),
                        "ratio_total": a["ratio_total"],
                        "ratio_prunable": a["ratio_prunable"],
                        "groups_removed": a["groups_removed"],
                        "removed_layers": a["removed_layers"],
                    }

                bench.run("plan", f"r{ratio}_a{align}", make)

    # ---- speed of the dense model, then surgery (+ save for 20%/align 8) and speed of each pruned model
    if "speed" in sections and "align" not in sections:
        dense_speed(bench, model, args)
    # the default plan (20%, align 8) first: it is the one surgery + save is timed on
    order = sorted(plans, key=lambda k: (k != (0.2, 8), k[1] != 8, k))
    for ratio, align in order:
        plan = plans[(ratio, align)]
        if not ({"speed", "surgery"} & sections):
            break
        if "speed" not in sections and (ratio, align) != (0.2, 8):
            continue
        tag = f"r{ratio}_a{align}"
        holder: dict = {}

        def do_prune(plan=plan, ratio=ratio, align=align, tag=tag, holder=holder):
            t0 = time.perf_counter()
            pruned = copy.deepcopy(model)
            bench.sync()
            t_copy = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = prune_model(pruned, plan.keep)
            bench.sync()
            t_prune = time.perf_counter() - t0
            holder["model"] = pruned
            res = {
                "copy_s": t_copy,
                "prune_model_s": t_prune,
                "uniform_config": report.uniform,
                "removed_layers": report.removed_layers,
                **geometry_summary(pruned),
            }
            if "surgery" in sections and (ratio, align) == (0.2, 8):
                out_dir = Path(args.save_dir) / f"{preset}_{tag}"
                t0 = time.perf_counter()
                save_pruned(pruned, None, out_dir)
                t_save = time.perf_counter() - t0
                t0 = time.perf_counter()
                os.sync()
                t_sync = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
                res.update(
                    save_pruned_s=t_save,
                    os_sync_s=t_sync,
                    surgery_plus_save_s=t_prune + t_save,
                    saved_gib=size / GIB,
                    saved_files=sorted(f.name for f in out_dir.iterdir()),
                )
                shutil.rmtree(out_dir, ignore_errors=True)
            return res

        bench.run("surgery", tag, do_prune)
        pruned = holder.pop("model", None)
        if pruned is None or "speed" not in sections:
            pruned = None
            continue
        bench.run(
            "speed",
            f"{tag}_prefill",
            lambda pruned=pruned: prefill_speed(bench, pruned, *parse_shape(args.prefill_shape)),
        )
        for b in args.decode_batches:
            bench.run(
                "speed",
                f"{tag}_decode_b{b}",
                lambda b=b, pruned=pruned: decode_speed(bench, pruned, b, args.decode_ctx, args.decode_steps),
            )
        pruned = None  # free before the next variant
        bench.clean()

    if "eval" in sections:
        for seq, batch in args.eval_settings:
            bench.run(
                "eval",
                f"library_s{seq}_b{batch}",
                lambda seq=seq, batch=batch: eval_library(bench, model, seq, batch, args.eval_tokens),
            )
            bench.run(
                "eval",
                f"inline_s{seq}_b{batch}",
                lambda seq=seq, batch=batch: eval_inline(bench, model, seq, batch, args.eval_tokens),
            )

    # ---- profiles (a couple of micro-batches, top kernels as text)
    if "profile" in sections and args.profile_out:
        bench.run(
            "profile",
            "taylor_and_similarity",
            lambda: profile(bench, importance, similarity, model, samples["short"], preset),
        )

    model = None  # free the dense model before the next preset
    bench.clean()


# ----------------------------------------------------------------------------------------------- extras
def uniform_keep(model, kv: int, mlp: int) -> dict:
    """A keep map giving every layer the first ``kv`` attention groups and ``mlp`` MLP channels."""
    from gqaprune.surgery import LayerKeep

    return {i: LayerKeep(attn=list(range(kv)), mlp=list(range(mlp))) for i in range(len(model.model.layers))}


def hook_bench(bench: Bench, model, layer_index: int = 0) -> dict:
    """Time the per-parameter gradient reduction of one decoder layer (real shapes, random w and g).

    Variants: ``head`` (the committed hook: float copies, abs, pow, sums, a host sync per parameter),
    ``current`` (importance.py now), ``compiled`` (torch.compile of the fused reduction: what a
    one-pass kernel would cost). Reported per layer and extrapolated to one micro-batch (all layers).
    """
    from gqaprune import importance as imp
    from gqaprune.adapters import get_adapter
    from gqaprune.groups import layer_shapes

    adapter = get_adapter(model.config)
    geo = adapter.geometry(model.config)
    shape = layer_shapes(model, adapter, geo)[layer_index]
    members = imp._members(adapter.layers(model)[layer_index], adapter, shape)
    items = [(p.detach(), torch.randn_like(p) * 1e-3, red) for _, p, _, red in members]
    n_elem = sum(p.numel() for p, _, _ in items)

    def head():
        for w, g, red in items:
            wg = w.float() * g.float()
            first, second = red(wg.abs()), red(wg.pow(2))
            if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
                raise FloatingPointError

    def current():
        flags = []
        for w, g, red in items:
            wg = w.float().mul_(g)
            first, second = red.abs_and_square_sums(wg)
            flags.append(torch.isfinite(first).all() & torch.isfinite(second).all())
        return flags

    def fused_fn(w, g, groups: int, axis: str):
        wg = w.float() * g.float()
        v = wg.reshape(groups, -1) if axis == "rows" else wg.reshape(wg.shape[0], groups, -1)
        dims = (1,) if axis == "rows" else (0, 2)
        return v.abs().sum(dims), (v * v).sum(dims)

    out = {"layer_params": n_elem, "layers": len(adapter.layers(model))}
    variants = {"head": head, "current": current}
    if bench.cuda and bench.args.hookbench_compile:
        compiled = torch.compile(fused_fn, dynamic=False)
        t0 = time.perf_counter()
        for w, g, red in items:
            compiled(w, g, red.groups, red.axis)
        bench.sync()
        out["compile_s"] = time.perf_counter() - t0
        # check the fused result against the eager one
        w, g, red = items[-1]
        a = compiled(w, g, red.groups, red.axis)
        b = red.abs_and_square_sums(w.float().mul_(g))
        out["compiled_max_rel_err"] = max(
            float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()) for x, y in zip(a, b, strict=True)
        )
        variants["compiled"] = lambda: [compiled(w, g, red.groups, red.axis) for w, g, red in items]
    for name, fn in variants.items():
        ts = timed(bench, fn, iters=10, warmup=2)
        t = median(ts)
        out[name] = {
            "layer_ms": t * 1e3,
            "micro_batch_ms": t * 1e3 * out["layers"],
            "bytes_per_param_at_4TBps_equiv": t * 4.0e12 / n_elem,
        }
    return out


def decode_profile(bench: Bench, model, batch: int, ctx: int, preset: str) -> dict:
    """Kernel table of a few eager decode steps over a StaticCache (what a decode step spends)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    from transformers import StaticCache

    kw = _cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=ctx + 32)
    prompt = random_ids(bench, batch, ctx, model.config.vocab_size, seed=51)
    tok = random_ids(bench, batch, 1, model.config.vocab_size, seed=52)
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        for _ in range(2):
            model(input_ids=tok, use_cache=True, **{kw: cache})
        bench.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
        with tprofile(activities=acts) as prof:
            for _ in range(5):
                model(input_ids=tok, use_cache=True, **{kw: cache})
            bench.sync()
    sort = "cuda_time_total" if bench.cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    with Path(bench.args.profile_out).open("a") as f:
        f.write(f"===== {preset} eager decode, batch {batch}, context {ctx}, 5 steps\n{table}\n")
    return {"batch": batch, "context": ctx, "steps": 5}


def alignment_speed(bench: Bench, model, preset: str):
    """Prefill / decode of uniformly pruned copies: every layer keeps kv groups and MLP channels as given."""
    from gqaprune.surgery import prune_model

    for item in bench.args.uniform.split(","):
        kv, mlp = (int(x) for x in item.split(":"))
        tag = f"uniform_kv{kv}_mlp{mlp}"
        holder = {}

        def make(kv=kv, mlp=mlp, holder=holder):
            pruned = copy.deepcopy(model)
            report = prune_model(pruned, uniform_keep(pruned, kv, mlp))
            holder["model"] = pruned
            return {
                "kv": kv,
                "mlp": mlp,
                "uniform_config": report.uniform,
                **{
                    k: v
                    for k, v in geometry_summary(pruned).items()
                    if k in ("params", "mlp_mult_of_8", "mlp_mult_of_64")
                },
            }

        bench.run("align", f"{tag}_surgery", make)
        pruned = holder.pop("model", None)
        if pruned is None:
            continue
        bench.run(
            "align",
            f"{tag}_prefill",
            lambda pruned=pruned: prefill_speed(bench, pruned, *parse_shape(bench.args.prefill_shape)),
        )
        for b in bench.args.decode_batches:
            bench.run(
                "align",
                f"{tag}_decode_b{b}",
                lambda b=b, pruned=pruned: decode_speed(
                    bench, pruned, b, bench.args.decode_ctx, bench.args.decode_steps
                ),
            )
        pruned = None  # free before the next variant
        bench.clean()


def profile(bench: Bench, importance, similarity, model, samples, preset: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    gbs = bench.args.profile_gbs
    sub = samples[: 2 * gbs]
    texts = []
    walls = {}
    for name, fn in [
        (
            "taylor",
            lambda: importance.score_groups(
                model, sub, metrics=["taylor", "taylor_2nd"], gradient_batch_size=gbs, progress=False
            ),
        ),
        ("similarity", lambda: similarity.block_similarity(model, sub, batch_size=gbs, progress=False)),
    ]:
        fn()  # warm
        bench.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
        with tprofile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            bench.sync()
            wall = time.perf_counter() - t0
        sort = "cuda_time_total" if bench.cuda else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        walls[name] = wall
        texts.append(f"===== {preset} {name}: samples {list(sub.shape)}, batch {gbs}\n{table}\n")
    path = Path(bench.args.profile_out)
    with path.open("a") as f:
        f.write("\n".join(texts))
    return {"written": str(path), "samples": list(sub.shape), "batch": gbs, "profiled_wall_s": walls}


def environment(bench: Bench) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "device": str(bench.device),
        "argv": sys.argv,
    }
    if bench.cuda:
        p = torch.cuda.get_device_properties(bench.device)
        env.update(gpu=p.name, gpu_mem_gib=p.total_memory / GIB, sms=p.multi_processor_count)
    env["files_sha256"] = {
        name: hashlib.sha256((ROOT / "src/gqaprune" / name).read_bytes()).hexdigest()[:16]
        for name in ("importance.py", "similarity.py", "evaluation.py", "plan.py", "surgery.py")
        if (ROOT / "src/gqaprune" / name).exists()
    }
    return env


def dense_speed(bench, model, args) -> None:
    """Prefill and decode speed of the dense model (the baseline of every pruned-speed ratio)."""
    bench.run("speed", "dense_prefill", lambda: prefill_speed(bench, model, *parse_shape(args.prefill_shape)))
    for b in args.decode_batches:
        bench.run("speed", f"dense_decode_b{b}",
                  lambda b=b: decode_speed(bench, model, b, args.decode_ctx, args.decode_steps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", help="random_models preset (repeatable); default llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--out", default="benchmarks/results/gpu_8b.json", help="JSON path; the preset is appended"
    )
    p.add_argument("--sections", default="floors,taylor,wanda,similarity,profile,plan,speed,surgery,eval")
    p.add_argument("--time-budget-s", type=float, default=0, help="skip remaining measurements after this")
    p.add_argument("--baseline-dir", default="", help="folder with importance_head.py / similarity_head.py")
    p.add_argument("--short", default="128x128")
    p.add_argument("--long", default="32x2048")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--floor-iters", type=int, default=3)
    p.add_argument("--fwd-short", default="4,32,128")
    p.add_argument("--fwd-long", default="1,4,8")
    p.add_argument("--fwdbwd-short", default="4,16,32,64c")
    p.add_argument("--fwdbwd-long", default="1,2,4c")
    p.add_argument("--taylor-short", default="4,16,32,32c,64c,128c")
    p.add_argument("--taylor-long", default="1,2,4c,8c")
    p.add_argument("--baseline-taylor-short", default="4,32c")
    p.add_argument("--baseline-taylor-long", default="1")
    p.add_argument("--wanda-short", default="4,32,128")
    p.add_argument("--wanda-long", default="1,4,8")
    p.add_argument("--baseline-wanda-short", default="32")
    p.add_argument("--baseline-wanda-long", default="")
    p.add_argument("--sim-short", default="8,32")
    p.add_argument("--sim-long", default="2,8")
    p.add_argument("--baseline-sim-short", default="")
    p.add_argument("--baseline-sim-long", default="")
    p.add_argument("--profile-out", default="")
    p.add_argument("--profile-gbs", type=int, default=32)
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--aligns", default="1,8,64")
    p.add_argument("--save-dir", default="/tmp/gqaprune_bench")
    p.add_argument("--prefill-shape", default="8x2048")
    p.add_argument("--prefill-iters", type=int, default=5)
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--decode-ctx", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=100)
    p.add_argument("--eager-decode-steps", type=int, default=20)
    p.add_argument("--eval", default="128:8,128:32,2048:8", help="seq_len:batch_size pairs")
    p.add_argument("--eval-tokens", type=int, default=131072)
    p.add_argument(
        "--uniform",
        default="8:11469,8:11472,8:11520,6:11776",
        help="kv:mlp pairs for the uniform-prune alignment section",
    )
    p.add_argument("--hookbench-compile", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke test")
    args = p.parse_args(argv)
    if args.tiny:
        args.short, args.long, args.matmul_n = "8x16", "4x64", 256
        args.fwd_short, args.fwd_long, args.fwdbwd_short, args.fwdbwd_long = "4,8", "1,4", "4,8c", "1,2c"
        args.taylor_short, args.taylor_long = "2,8c", "1,2c"
        args.baseline_taylor_short, args.baseline_taylor_long = "2", "1"
        args.wanda_short, args.wanda_long, args.baseline_wanda_short = "4", "2", "4"
        args.sim_short, args.sim_long, args.baseline_sim_short = "4", "2", "4"
        args.prefill_shape, args.decode_ctx, args.decode_steps, args.eager_decode_steps = "2x64", 16, 4, 4
        args.eval, args.eval_tokens, args.floor_iters = "16:4,64:2", 512, 1
        args.profile_gbs = 2
        args.uniform = "2:95,2:88,1:64"
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.aligns = [int(x) for x in args.aligns.split(",")]
    args.decode_batches = [int(x) for x in args.decode_batches.split(",")]
    args.eval_settings = [tuple(int(v) for v in item.split(":")) for item in args.eval.split(",") if item]
    presets = args.preset or ["llama3-8b"]

    t_start = time.perf_counter()
    for preset in presets:
        bench = Bench(args, preset, t_start)
        bench.record("meta", "environment", environment(bench))
        bench_preset(bench, preset)
        bench.record("meta", "done", True)


if __name__ == "__main__":
    main()

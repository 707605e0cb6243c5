"""Inference speed: prefill and decode tokens/s of a model (dense, pruned by a plan, pruned uniformly), decode profile.

Decode replays one CUDA-graph-captured step over a static KV cache (and always also reports eager
steps; on a CPU only those).
"""

from __future__ import annotations

import inspect
import time

import torch

from .bench import Bench, PresetRun, median, parse_shape, random_ids, timed
from .pruning import prune_uniform


def model_speed(bench: Bench, section: str, tag: str, model) -> None:
    """Record ``<tag>_prefill`` (--prefill-shape), then ``<tag>_decode_b<B>`` for each of --decode-batches."""
    args = bench.args
    bench.run(section, f"{tag}_prefill", lambda: prefill_speed(bench, model, *parse_shape(args.prefill_shape)))
    for b in args.decode_batches:
        bench.run(section, f"{tag}_decode_b{b}",
                  lambda b=b: decode_speed(bench, model, b, args.decode_ctx, args.decode_steps))


def alignment_section(run: PresetRun) -> None:
    """Dense speed, then surgery and speed of uniformly pruned copies (--uniform kv:mlp pairs), section align."""
    model_speed(run.bench, "speed", "dense", run.model)
    for item in run.args.uniform.split(","):
        kv, mlp = (int(x) for x in item.split(":"))
        _uniform_variant(run, kv, mlp)


def _uniform_variant(run: PresetRun, kv: int, mlp: int) -> None:
    tag = f"uniform_kv{kv}_mlp{mlp}"
    holder: dict = {}
    run.bench.run("align", f"{tag}_surgery", lambda: prune_uniform(run.model, kv, mlp, holder))
    pruned = holder.pop("model", None)
    if pruned is None:
        return
    model_speed(run.bench, "align", tag, pruned)
    del pruned  # free before the next variant
    run.bench.clean()


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


def _prefilled(bench: Bench, model, batch: int, ctx: int, max_len: int, seeds: tuple[int, int]):
    """(step() -> logits of one decode token per sequence, the cache) after a ``ctx``-token prompt; inference mode."""
    from transformers import StaticCache

    kw = _cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    prompt = random_ids(bench, batch, ctx, model.config.vocab_size, seed=seeds[0])
    tok = random_ids(bench, batch, 1, model.config.vocab_size, seed=seeds[1])
    model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
    return (lambda: model(input_ids=tok, use_cache=True, **{kw: cache}).logits), cache


def decode_speed(bench: Bench, model, batch: int, ctx: int, steps: int) -> dict:
    """Per-step decode latency at context ``ctx`` over a StaticCache: CUDA graph replay and eager steps."""
    out: dict = {"batch": batch, "context": ctx, "steps": steps, "cache": "StaticCache"}
    with torch.inference_mode():
        step, cache = _prefilled(bench, model, batch, ctx, ctx + steps + 16, seeds=(41, 42))
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
            out.update(_graph_decode(bench, step, cache, batch, ctx, steps))
        except Exception as e:
            out["graph"] = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def _graph_decode(bench: Bench, step, cache, batch: int, ctx: int, steps: int) -> dict:
    """Capture one decode step in a CUDA graph, replay it ``steps`` times, timed with CUDA events."""
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
    del graph
    return {
        "graph": "cuda graph of one HF forward step",
        "graph_step_s": t_graph,
        "graph_tokens_per_s": batch / t_graph,
    }


def decodeprofile_section(run: PresetRun) -> None:
    """Kernel tables of eager decode steps of the dense model at each --decode-batches size (needs --profile-out)."""
    if "decodeprofile" in run.sections and run.args.profile_out:
        for b in run.args.decode_batches:
            run.bench.run("decodeprofile", f"dense_b{b}",
                          lambda b=b: decode_profile(run.bench, run.model, b, run.args.decode_ctx, run.name))


def decode_profile(bench: Bench, model, batch: int, ctx: int, preset: str) -> dict:
    """Kernel table of a few eager decode steps over a StaticCache (what a decode step spends)."""
    with torch.inference_mode():
        step, _ = _prefilled(bench, model, batch, ctx, ctx + 32, seeds=(51, 52))
        for _ in range(2):
            step()
        bench.sync()

        def five_steps():
            for _ in range(5):
                step()

        table, _ = bench.profiled(five_steps, row_limit=25)
    bench.append_profile(f"===== {preset} eager decode, batch {batch}, context {ctx}, 5 steps\n{table}\n")
    return {"batch": batch, "context": ctx, "steps": 5}

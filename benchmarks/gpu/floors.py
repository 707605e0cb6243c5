"""Floors: what the hardware and the dense model give at best (bf16 matmul, forward, forward + backward)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gqaprune.models.modules import activation_checkpointing

from .bench import Bench, PresetRun, median, parse_settings, random_ids, timed


def floors_section(run: PresetRun) -> None:
    """matmul, then per sample set: forward at each --fwd-<set> batch, forward+backward at each --fwdbwd-<set>."""
    bench, args = run.bench, run.args
    bench.run("floors", "matmul", lambda: matmul_floor(bench))
    for name in ("short", "long"):
        seq = run.shapes[name][1]
        for b, _ in parse_settings(getattr(args, f"fwd_{name}")):
            bench.run("floors", f"fwd_{name}_b{b}", lambda b=b, seq=seq: forward_floor(bench, run.model, b, seq))
        for b, c in parse_settings(getattr(args, f"fwdbwd_{name}")):
            bench.run(
                "floors",
                f"fwdbwd_{name}_b{b}{'c' if c else ''}",
                lambda b=b, c=c, seq=seq: fwdbwd_floor(bench, run.model, b, seq, c),
            )


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
    return _floor(bench, batch, seq, ts)


def fwdbwd_floor(bench: Bench, model, batch: int, seq: int, checkpointing: bool) -> dict:
    """Dense forward + backward with gradients for the scored projections only (as score_groups)."""
    ids = random_ids(bench, batch, seq, model.config.vocab_size, seed=12)
    params = grad_params(model)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None

    with _trainable_only(model, params), activation_checkpointing(model, checkpointing):
        ts = timed(bench, step, iters=bench.args.floor_iters)
    return _floor(bench, batch, seq, ts, checkpointing=checkpointing)


@contextmanager
def _trainable_only(model, params):
    """Gradients for ``params`` only for the duration of the block (the floor of a weight-gradient pass)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def _floor(bench: Bench, batch: int, seq: int, times: list[float], **extra) -> dict:
    t = median(times)
    return {
        "batch": batch,
        "seq": seq,
        **extra,
        "median_s": t,
        "tokens_per_s": batch * seq / t,
        "peak_gib": bench.peak_gib(),
    }


def grad_params(model):
    """The parameters that score_groups gives gradients to: every decoder projection (not norms)."""
    out = []
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if "norm" not in name:
                out.append(p)
    return out

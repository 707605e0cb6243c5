"""Micro-benchmark of scoring's per-parameter gradient reduction on one decoder layer (section ``hookbench``)."""

from __future__ import annotations

import time

import torch

from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import layer_shapes
from gqaprune.pruning import importance as imp

from .bench import Bench, PresetRun, median, timed


def hookbench_section(run: PresetRun) -> None:
    if "hookbench" in run.sections:
        run.bench.run("hookbench", "layer0", lambda: hook_bench(run.bench, run.model))


def hook_bench(bench: Bench, model, layer_index: int = 0) -> dict:
    """Time the per-parameter gradient reduction of one decoder layer (real shapes, random w and g).

    Variants: ``head`` (the committed hook: float copies, abs, pow, sums, a host sync per parameter),
    ``current`` (importance.py now), ``compiled`` (torch.compile of the fused reduction: what a
    one-pass kernel would cost). Reported per layer and extrapolated to one micro-batch (all layers).
    """
    adapter = get_adapter(model.config)
    shape = layer_shapes(model, adapter, adapter.geometry(model.config))[layer_index]
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

    out = {"layer_params": n_elem, "layers": len(adapter.layers(model))}
    variants = {"head": head, "current": current}
    if bench.cuda and bench.args.hookbench_compile:
        variants["compiled"] = _compiled_variant(bench, items, out)
    for name, fn in variants.items():
        t = median(timed(bench, fn, iters=10, warmup=2))
        out[name] = {
            "layer_ms": t * 1e3,
            "micro_batch_ms": t * 1e3 * out["layers"],
            "bytes_per_param_at_4TBps_equiv": t * 4.0e12 / n_elem,
        }
    return out


def _fused(w, g, groups: int, axis: str):
    wg = w.float() * g.float()
    v = wg.reshape(groups, -1) if axis == "rows" else wg.reshape(wg.shape[0], groups, -1)
    dims = (1,) if axis == "rows" else (0, 2)
    return v.abs().sum(dims), (v * v).sum(dims)


def _compiled_variant(bench: Bench, items, out: dict):
    """Compile the fused reduction for every parameter (``compile_s``), check it against the eager one."""
    compiled = torch.compile(_fused, dynamic=False)
    t0 = time.perf_counter()
    for w, g, red in items:
        compiled(w, g, red.groups, red.axis)
    bench.sync()
    out["compile_s"] = time.perf_counter() - t0
    w, g, red = items[-1]
    a = compiled(w, g, red.groups, red.axis)
    b = red.abs_and_square_sums(w.float().mul_(g))
    out["compiled_max_rel_err"] = max(
        float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()) for x, y in zip(a, b, strict=True)
    )
    return lambda: [compiled(w, g, red.groups, red.axis) for w, g, red in items]

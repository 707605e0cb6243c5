"""One preset, section by section, in the order the measurements have always been taken."""

from __future__ import annotations

import time

import torch

from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.random_models import build_model

from . import pruning, speed
from .bench import Bench, PresetRun, parse_shape, random_ids
from .floors import floors_section
from .hookbench import hookbench_section
from .library import load_baseline, profile_section, scoring_sections
from .perplexity import eval_section


def bench_preset(bench: Bench, preset: str) -> None:
    """Every selected section on one random-weight model of ``preset``; results go to ``bench``'s JSON."""
    run = open_preset(bench, preset)
    # extras first: gradient-reduction micro-benchmark, decode profile, uniform (alignment) prunes
    hookbench_section(run)
    speed.decodeprofile_section(run)
    if "align" in run.sections:
        speed.alignment_section(run)
    if "floors" in run.sections:
        floors_section(run)
    scoring_sections(run)  # taylor (+ taylor_2nd), wanda, similarity
    pruning.plan_section(run)
    pruned_speed(run)  # dense speed, surgery (+ save), speed of each pruned model
    eval_section(run)
    profile_section(run)
    run.model = None  # free the dense model before the next preset
    bench.clean()


def open_preset(bench: Bench, preset: str) -> PresetRun:
    """Build the model (recorded as model/info with its build time) and the short and long random sample sets."""
    args = bench.args
    sections = set(args.sections.split(","))
    baseline = load_baseline(args.baseline_dir)
    t0 = time.perf_counter()
    model = build_model(preset, seed=0, dtype=getattr(torch, args.dtype), device=str(bench.device))
    bench.sync()
    t_build = time.perf_counter() - t0
    adapter = get_adapter(model.config)
    geo = adapter.geometry(model.config)
    counts = parameter_counts(model, adapter, geo)
    bench.record("model", "info", {
        "preset": preset,
        "build_s": t_build,
        "dtype": args.dtype,
        "params": counts.total,
        "prunable": counts.prunable,
        "geometry": dict(geo.__dict__),
        "weights_gib": bench.peak_gib(),
    })
    shapes = {"short": parse_shape(args.short), "long": parse_shape(args.long)}
    vocab = model.config.vocab_size
    samples = {k: random_ids(bench, n, s, vocab, seed=1 + i) for i, (k, (n, s)) in enumerate(shapes.items())}
    return PresetRun(bench, preset, model, geo, counts, shapes, samples, sections, baseline)


def pruned_speed(run: PresetRun) -> None:
    """Dense prefill/decode (unless section align measured it), then each plan's surgery and pruned speed."""
    if "speed" in run.sections and "align" not in run.sections:
        speed.model_speed(run.bench, "speed", "dense", run.model)
    for key in pruning.surgery_order(run):
        _pruned_variant(run, key)


def _pruned_variant(run: PresetRun, key: tuple[float, int]) -> None:
    pruned = pruning.prune_plan(run, key)
    if pruned is None or "speed" not in run.sections:
        return
    speed.model_speed(run.bench, "speed", pruning.tag(key), pruned)
    del pruned  # free before the next variant
    run.bench.clean()

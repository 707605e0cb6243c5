"""Plan (build_plan at each ratio and MLP alignment), surgery (prune_model on a copy) and save_pruned."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from gqaprune.config.sections import PlanConfig
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import count_parameters, layer_shapes
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.plan import build_plan
from gqaprune.pruning.similarity import block_similarity
from gqaprune.pruning.surgery import prune_model, save_pruned

from .bench import GIB, PresetRun

SAVED = (0.2, 8)  # (ratio, mlp_align) of the plan whose surgery is also saved (and goes first)


def tag(key: tuple[float, int]) -> str:
    ratio, align = key
    return f"r{ratio}_a{align}"


def plan_inputs(run: PresetRun):
    """The kept taylor scores and similarity table, or stand-ins (magnitude scores, similarity of 8 samples)."""
    scores = run.kept.get("taylor")
    if scores is None:  # synthetic scores: magnitude (no data needed)
        scores = score_groups(run.model, run.samples["short"][:1, :8], metrics=["magnitude"], progress=False)
        scores = scores.rename(columns={"magnitude": "taylor"})
    sim = run.kept.get("similarity")
    if sim is None:
        sim = block_similarity(run.model, run.samples["short"][: min(8, run.shapes["short"][0])],
                                          progress=False)
    return scores, sim


def plan_section(run: PresetRun) -> None:
    """build_plan at every --ratios x --aligns; the plans are kept for surgery and speed."""
    scores, sim = plan_inputs(run)
    if not ({"plan", "speed", "surgery"} & run.sections):
        return
    for ratio in run.args.ratios:
        for align in run.args.aligns:
            run.bench.run("plan", tag((ratio, align)),
                          lambda ratio=ratio, align=align: plan_one(run, scores, sim, ratio, align))


def plan_one(run: PresetRun, scores, sim, ratio: float, align: int) -> dict:
    t0 = time.perf_counter()
    plan = build_plan(scores, sim, run.counts, run.geometry.num_layers, PlanConfig(ratio=ratio, mlp_align=align))
    wall = time.perf_counter() - t0
    run.plans[(ratio, align)] = plan
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


def surgery_order(run: PresetRun) -> list[tuple[float, int]]:
    """The plans to prune: all with section speed (SAVED first, then align 8), else SAVED alone (surgery)."""
    if not ({"speed", "surgery"} & run.sections):
        return []
    order = sorted(run.plans, key=lambda k: (k != SAVED, k[1] != 8, k))
    return order if "speed" in run.sections else [k for k in order if k == SAVED]


def prune_plan(run: PresetRun, key: tuple[float, int]):
    """Record surgery/<tag> (copy, prune_model, and for SAVED with section surgery save_pruned); the pruned copy."""
    holder: dict = {}
    run.bench.run("surgery", tag(key), lambda: _prune_copy(run, key, holder))
    return holder.pop("model", None)


def _prune_copy(run: PresetRun, key: tuple[float, int], holder: dict) -> dict:
    bench = run.bench
    t0 = time.perf_counter()
    pruned = copy.deepcopy(run.model)
    bench.sync()
    t_copy = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = prune_model(pruned, run.plans[key].keep)
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
    if "surgery" in run.sections and key == SAVED:
        res.update(save_timing(pruned, Path(run.args.save_dir) / f"{run.name}_{tag(key)}", t_prune))
    return res


def save_timing(pruned, out_dir: Path, t_prune: float) -> dict:
    """save_pruned (no tokenizer), then a separate os.sync; the folder is deleted afterwards."""
    t0 = time.perf_counter()
    save_pruned(pruned, None, out_dir)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    t_sync = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    res = dict(
        save_pruned_s=t_save,
        os_sync_s=t_sync,
        surgery_plus_save_s=t_prune + t_save,
        saved_gib=size / GIB,
        saved_files=sorted(f.name for f in out_dir.iterdir()),
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def prune_uniform(model, kv: int, mlp: int, holder: dict) -> dict:
    """A copy of ``model`` whose every layer keeps the first ``kv`` attention groups and ``mlp`` MLP channels."""
    pruned = copy.deepcopy(model)
    layers = get_adapter(pruned.config).layers(pruned)
    report = prune_model(pruned, {i: LayerKeep(attn=list(range(kv)), mlp=list(range(mlp))) for i in range(len(layers))})
    holder["model"] = pruned
    summary = geometry_summary(pruned)
    return {
        "kv": kv,
        "mlp": mlp,
        "uniform_config": report.uniform,
        **{k: summary[k] for k in ("params", "mlp_mult_of_8", "mlp_mult_of_64")},
    }


def geometry_summary(model) -> dict:
    adapter = get_adapter(model.config)
    shapes = layer_shapes(model, adapter, adapter.geometry(model.config))
    mlp = [s.mlp_channels for s in shapes]
    return {
        "params": count_parameters(model),
        "layers": len(shapes),
        "kv_groups": [s.attn_groups for s in shapes],
        "mlp_channels": mlp,
        "mlp_mult_of_8": all(c % 8 == 0 for c in mlp),
        "mlp_mult_of_64": all(c % 64 == 0 for c in mlp),
    }

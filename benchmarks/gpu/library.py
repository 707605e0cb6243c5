"""Library steps on calibration-shaped data: importance scoring (taylor, wanda), block similarity, their profile.

Each setting is one call of the library function over a whole sample set. ``--baseline-dir`` times
copies of ``importance.py`` / ``similarity.py`` (``importance_head.py``, ``similarity_head.py``, e.g.
from ``git show REV:src/gqaprune/importance.py``) next to the package's own, under ``<section>_baseline_head``.
A copy is imported as a module of the installed ``gqaprune`` package, so it must work with the
package's other modules as they are now (a copy from before a change of their interfaces fails on import).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gqaprune.pruning import importance, similarity

from .bench import Bench, PresetRun, parse_settings

TAYLOR = ["taylor", "taylor_2nd"]


def score_run(
    bench: Bench, module, model, samples, metrics, gbs: int, ckpt: bool, keep: dict | None = None
) -> dict:
    table, wall = bench.timed_call(
        lambda: module.score_groups(
            model, samples, metrics=metrics, gradient_batch_size=gbs, gradient_checkpointing=ckpt, progress=False
        )
    )
    if keep is not None:
        keep["table"] = table
    return {
        "metrics": list(metrics),
        "samples": list(samples.shape),
        "gradient_batch_size": gbs,
        "gradient_checkpointing": ckpt,
        **bench.rate(samples.numel(), wall),
    }


def similarity_run(bench: Bench, module, model, samples, batch: int, keep: dict | None = None) -> dict:
    sim, wall = bench.timed_call(lambda: module.block_similarity(model, samples, batch_size=batch, progress=False))
    if keep is not None:
        keep["table"] = sim
    return {"samples": list(samples.shape), "batch_size": batch, **bench.rate(samples.numel(), wall)}


def _taylor(bench: Bench, module, model, ids, gbs: int, ckpt: bool, keep: dict) -> dict:
    return score_run(bench, module, model, ids, TAYLOR, gbs, ckpt, keep)


def _wanda(bench: Bench, module, model, ids, gbs: int, ckpt: bool, keep: dict) -> dict:
    return score_run(bench, module, model, ids, ["wanda"], gbs, False)  # no backward: checkpointing is moot


def _similarity(bench: Bench, module, model, ids, batch: int, ckpt: bool, keep: dict) -> dict:
    return similarity_run(bench, module, model, ids, batch, keep)


# one sweep per section: (section, module name, option prefix, key of a (size, checkpointing) setting, measurement)
SWEEPS = (
    ("taylor", "importance", "taylor", lambda size, ckpt: f"gbs{size}{'c' if ckpt else ''}", _taylor),
    ("wanda", "importance", "wanda", lambda size, ckpt: f"gbs{size}", _wanda),
    ("similarity", "similarity", "sim", lambda size, ckpt: f"b{size}", _similarity),
)


def scoring_sections(run: PresetRun) -> None:
    """taylor (+ taylor_2nd), wanda, similarity; each over the short then the long set, baseline copies after.

    The first table of the short set that taylor and similarity produce is kept for the plan section.
    """
    own = {"importance": importance, "similarity": similarity}
    for section, module, option, key, measure in SWEEPS:
        if section not in run.sections:
            continue
        for name in ("short", "long"):
            keep = run.kept if name == "short" else None
            _sweep(run, section, own[module], f"{option}_{name}", name, key, measure, keep)
            if run.baseline is not None:
                base = run.baseline[module]
                _sweep(run, f"{section}_baseline_head", base, f"baseline_{option}_{name}", name, key, measure, None)


def _sweep(run: PresetRun, section: str, module, option: str, name: str, key, measure, keep: dict | None) -> None:
    """One measurement per setting of ``--<option>`` on sample set ``name``; keep[section] = the first table."""
    bench = run.bench
    for size, ckpt in parse_settings(getattr(run.args, option)):
        slot: dict = {}
        bench.run(
            section,
            f"{name}_{key(size, ckpt)}",
            lambda size=size, ckpt=ckpt, slot=slot: measure(
                bench, module, run.model, run.samples[name], size, ckpt, slot
            ),
        )
        if keep is not None and "table" in slot:
            keep.setdefault(section, slot["table"])


def load_baseline(baseline_dir: str) -> dict | None:
    """The copies in ``baseline_dir`` as {"importance": module, "similarity": module}, or None without them."""
    if not (baseline_dir and Path(baseline_dir, "importance_head.py").exists()):
        return None
    return {
        "importance": load_module_copy("importance_head", Path(baseline_dir, "importance_head.py")),
        "similarity": load_module_copy("similarity_head", Path(baseline_dir, "similarity_head.py")),
    }


def load_module_copy(name: str, path: Path):
    """Import a copy of a gqaprune module from ``path`` as ``gqaprune.<name>`` (relative imports work)."""
    spec = importlib.util.spec_from_file_location(f"gqaprune.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def profile_section(run: PresetRun) -> None:
    """Kernel tables of taylor scoring and of similarity on a couple of micro-batches (needs --profile-out)."""
    if "profile" in run.sections and run.args.profile_out:
        run.bench.run("profile", "taylor_and_similarity", lambda: profile(run.bench, run.model, run.samples["short"],
                                                                           run.name))


def profile(bench: Bench, model, samples, preset: str) -> dict:
    gbs = bench.args.profile_gbs
    sub = samples[: 2 * gbs]
    texts = []
    walls = {}
    for name, fn in [
        ("taylor", lambda: importance.score_groups(model, sub, metrics=TAYLOR, gradient_batch_size=gbs,
                                                   progress=False)),
        ("similarity", lambda: similarity.block_similarity(model, sub, batch_size=gbs, progress=False)),
    ]:
        fn()  # warm
        bench.sync()
        table, walls[name] = bench.profiled(fn, row_limit=30)
        texts.append(f"===== {preset} {name}: samples {list(sub.shape)}, batch {gbs}\n{table}\n")
    path = bench.append_profile("\n".join(texts))
    return {"written": str(path), "samples": list(sub.shape), "batch": gbs, "profiled_wall_s": walls}

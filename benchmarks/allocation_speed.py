"""The allocate stage's choice, two ways on the same inputs: one pruned copy per candidate (before) and the
candidates advancing together layer by layer with successive halving (now).

    python benchmarks/allocation_speed.py --project /path/to/a/prepared/project --ratios 0.1,0.2,0.3,0.4,0.5 \\
        --out benchmarks/results/performance/allocation_smollm2.json

``--project``: a project folder after ``calibrate``, ``score`` and ``similarity`` (its ``artifacts/``). For each
ratio both ways choose on the project's held-out windows with one-shot least squares: before, among all six
named candidates, one pruned copy each (the stage as it was); now, among the four default ones. The JSON
records each way's choice, every candidate's KL and the wall time of each way (the one-copy way includes
its statistics pass; the layer-by-layer way gathers its statistics on the way).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    """Parse arguments, run both ways at every ratio, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-before", action="store_true", help="only the layer-by-layer way")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    os.chdir(args.project)
    from gqaprune.config.sections import PlanConfig
    from gqaprune.models.loading import load_model
    from gqaprune.models.units import ParamCounts
    from gqaprune.pipeline.artifacts import read_table
    from gqaprune.pipeline.inputs import load_calibration, load_heldout, model_meta
    from gqaprune.pipeline.stages import MODEL_DIR, SCORES, SIMILARITY
    from gqaprune.pruning.allocation import ALL_CANDIDATES, DEFAULT_CANDIDATES, oneshot_pruner, select_allocation
    from gqaprune.pruning.compensation import collect_stats

    fp = model_meta()["fingerprint"]
    scores, meta = read_table(SCORES)
    sim, _ = read_table(SIMILARITY)
    counts, layers = ParamCounts(**meta["param_counts"]), int(meta["num_layers"])
    dense = load_model(MODEL_DIR, "float32", "cpu")
    samples, _ = load_calibration(fp)
    heldout, groups = load_heldout(fp)
    result = {"project": str(args.project), "started": time.strftime("%Y-%m-%d %H:%M %Z"),
              "threads": torch.get_num_threads(), "heldout_windows": len(heldout), "rows": []}
    for ratio in (float(r) for r in args.ratios.split(",")):
        base = PlanConfig(ratio=ratio, temperature=0.0)
        row = {"ratio": ratio}
        with torch.inference_mode():
            t0 = time.perf_counter()
            now = select_allocation(dense, scores, sim, counts, layers, base, heldout, None, DEFAULT_CANDIDATES,
                                    calibration=samples, window_groups=groups)
            row["now"] = {"s": round(time.perf_counter() - t0, 1), "chosen": now.choice.name,
                          "kl": dict(zip(now.table["candidate"], now.table["kl"].round(5), strict=True)),
                          "windows": dict(zip(now.table["candidate"], now.table["windows"], strict=True))}
            if not args.skip_before:
                t0 = time.perf_counter()
                stats = collect_stats(dense, samples, list(range(layers)), progress=False)
                before = select_allocation(dense, scores, sim, counts, layers, base, heldout,
                                           oneshot_pruner(stats), ALL_CANDIDATES)
                row["before"] = {"s": round(time.perf_counter() - t0, 1), "chosen": before.choice.name,
                                 "kl": dict(zip(before.table["candidate"], before.table["kl"].round(5), strict=True))}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

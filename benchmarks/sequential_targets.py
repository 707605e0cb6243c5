"""Sequential compensation targets on held-out data: one-shot vs sequential ('dense' and 'self' targets).

    python benchmarks/sequential_targets.py --model artifacts/model --data-dir ../shared/data \
        --out benchmarks/results/quality3_smollm2 --ratio 0.2

Reuses the plan that ``quality.py run`` chose at ``--ratio`` (``plans/auto_<ratio>.json``) and the same
calibration samples and held-out windows; writes ``sequential_targets.csv`` (held-out KL / NLL).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer

from gqaprune.data.windows import calibration_samples, heldout_windows
from gqaprune.models.loading import load_model, load_tokenizer
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.allocation import dense_reference, heldout_criteria, oneshot_pruner, sequential_pruner
from gqaprune.pruning.compensation import collect_stats

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    model: Annotated[str, typer.Option()] = "artifacts/model",
    data_dir: Annotated[str, typer.Option()] = "../shared/data",
    out: Annotated[Path, typer.Option()] = Path("benchmarks/results/quality3_smollm2"),
    ratio: Annotated[float, typer.Option()] = 0.2,
    targets: Annotated[str, typer.Option()] = "oneshot,self,dense",
    threads: Annotated[int, typer.Option()] = 1,
) -> None:
    """Held-out KL / NLL of the same plan under each compensation."""
    torch.set_num_threads(threads)
    meta = json.loads(sorted(out.glob("meta_*.json"))[0].read_text())
    dense, tok = load_model(model, device="cpu"), load_tokenizer(model)
    n = meta["n_samples"]
    samples = calibration_samples(tok, "wikitext2", None, n, 128, 0, data_dir=data_dir)
    held = {"wikitext2": heldout_windows(tok, "wikitext2", None, 16, 128, n, 128, 0, data_dir=data_dir)}
    for name in ("ptb", "c4"):  # other corpora's calibration splits (the criterion audit of quality.py)
        held[name] = heldout_windows(tok, name, None, 16, 128, 0, 128, 0, data_dir=data_dir)
    doc = json.loads((out / "plans" / f"auto_{ratio:g}.json").read_text())
    plan = type("P", (), {"keep": {int(k): LayerKeep(**v) for k, v in doc["keep"].items()}})()
    import copy

    dense_bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    refs = {k: dense_reference(dense_bf16, w) for k, w in held.items()}
    for target in [t for t in targets.split(",") if t]:
        t = time.perf_counter()
        if target == "oneshot":
            pruned = oneshot_pruner(collect_stats(dense, samples, sorted(plan.keep), progress=False))(dense, plan)
        else:
            pruned = sequential_pruner(samples, target=target)(dense, plan)
        pruned = pruned.to(torch.bfloat16)
        row = {"ratio": ratio, "plan": doc["choice"], "compensation": target,
               "seconds": round(time.perf_counter() - t, 1)}
        for k, ref in refs.items():
            v = heldout_criteria(pruned, ref)
            row.update({f"{k}_kl": v["kl"], f"{k}_nll": v["nll"]})
        print(json.dumps(row), flush=True)
        path = out / "sequential_targets.csv"
        frame = pd.DataFrame([row])
        if path.exists():
            frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
        frame.to_csv(path, index=False)


if __name__ == "__main__":
    app()

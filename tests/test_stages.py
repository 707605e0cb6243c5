"""Stage-level options on the tiny project: the adaptive allocation, distillation, sequential compensation,
spread evaluation with standard errors."""

from __future__ import annotations

import json
from pathlib import Path

from gqaprune.config.choices import ALLOCATION_CANDIDATES
from gqaprune.config.loading import coerce_fields
from gqaprune.config.sections import PlanConfig
from gqaprune.pipeline.runner import execute


def run(stage: str, *overrides: str) -> int:
    return execute(stage, None, Path("params.yaml"), list(overrides), False)


def test_allocate_chooses_and_plan_applies_it(project):
    allocation = json.loads((project / "artifacts/allocate/allocation.json").read_text())
    values = {row["candidate"]: row["kl"] for row in allocation["candidates"]}
    assert set(values) == {"T0", "T1-tauinf", "uniform"}  # tiny_params' candidates
    assert allocation["chosen"] == min(values, key=values.get)  # the lowest held-out KL wins
    overrides = allocation.get("overrides", allocation["plan"])  # infinity is spelled ".inf" in JSON
    assert coerce_fields(PlanConfig, overrides, "allocation") == ALLOCATION_CANDIDATES[allocation["chosen"]]
    assert run("plan") == 0
    plan = json.loads((project / "artifacts/plan/plan.json").read_text())
    assert plan["allocation"] == allocation["chosen"]
    for key, value in allocation["plan"].items():
        assert plan["params"][key] == value
    heldout = (project / "artifacts/calibration/heldout.safetensors")
    from safetensors.torch import load_file

    windows = load_file(str(heldout))
    samples = load_file(str(project / "artifacts/calibration/samples.safetensors"))["input_ids"]
    assert set(windows) == {"wikitext2", "ptb"} and windows["wikitext2"].shape == (4, 32)
    held = {tuple(w.tolist()) for w in windows["wikitext2"]}
    assert not held & {tuple(s.tolist()) for s in samples}  # held-out windows are not calibration windows


def test_distill_and_sequential_through_the_stages(project):
    assert run("plan") == 0
    assert run("surgery", "surgery.compensation=sequential", "allocate.mode=auto") == 0
    card = (project / "artifacts/pruned/README.md").read_text()
    assert '  compensation: "sequential"' in card  # the front matter records how the outputs were refitted
    assert run("finetune", "finetune.method=distill", "finetune.max_steps=2",
               "finetune.mix={wikitext2: 1}") == 0  # a corpus of the project's snapshot
    status = json.loads((project / "artifacts/finetune/status.json").read_text())
    assert {k: status[k] for k in ("enabled", "method", "steps")} == {"enabled": True, "method": "distill", "steps": 2}
    pruned = json.loads((project / "artifacts/pruned/gqaprune_model.json").read_text())
    assert status["inputs"] == {"pruned": pruned["fingerprint"]}  # what it was trained from
    merged = json.loads((project / "artifacts/finetune/merged/gqaprune_model.json").read_text())
    assert status["merged"] == merged["fingerprint"] != pruned["fingerprint"]
    assert (project / "artifacts/finetune/merged/model.safetensors").is_file()
    assert not (project / "artifacts/finetune/adapter").exists()


def test_evaluation_reports_spread_windows_and_standard_errors(project):
    assert run("plan") == 0 and run("surgery") == 0 and run("finetune", "finetune.enabled=false") == 0
    assert run("evaluate_dense") == 0 and run("evaluate") == 0
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["spread"] is True
    for model in ("dense", "pruned"):
        assert 0 < metrics["log_ppl_se"][model]["wikitext2"] < 1
    assert run("evaluate", "evaluate.spread=false") == 1  # the dense baseline was measured on other windows

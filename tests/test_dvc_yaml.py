"""dvc.yaml agrees with the code: each stage depends on exactly the modules it runs and declares its outputs."""

from pathlib import Path

import yaml

from gqaprune.depgraph import check, closure, stage_code_deps
from gqaprune.recipes import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_code_deps_are_the_imported_modules():
    assert check(ROOT) == []


def test_closure_follows_function_level_and_relative_imports():
    deps = stage_code_deps(ROOT, "evaluate")
    # evaluate -> recipes.evaluate -> evaluation -> data (the perplexity protocol) -> corpora
    for module in ("src/gqaprune/evaluation.py", "src/gqaprune/data.py", "src/gqaprune/corpora.py",
                   "src/gqaprune/stage.py", "src/gqaprune/params.py", "src/gqaprune/modelio.py",
                   "src/gqaprune/hf_code/modeling_gqaprune.py", "src/gqaprune/hf_code/gqaprune_layout.py"):
        assert module in deps, module
    plan = stage_code_deps(ROOT, "plan")
    assert "src/gqaprune/importance.py" not in plan and "src/gqaprune/surgery.py" not in plan
    assert ROOT / "src/gqaprune/artifacts.py" in closure(ROOT / "src", ROOT / "src/gqaprune/stage.py")


def test_outputs_match_the_recipes():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)
    for name, stage in stages.items():
        declared = list(stage.get("outs", []))
        for key in ("metrics", "plots"):
            declared += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(key, [])]
        assert sorted(declared) == sorted(STAGES[name].outputs), name
        assert stage["cmd"] == f"python stages/{name}.py"

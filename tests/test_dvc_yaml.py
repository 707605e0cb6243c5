"""dvc.yaml is generated from the stage table: each stage depends on exactly the code it computes with."""

from pathlib import Path

import yaml

from gqaprune.pipeline.dvc_file import check, closure, generate, stage_code_deps
from gqaprune.pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_the_generated_one():
    assert check(ROOT) == []


def test_closure_follows_function_level_imports():
    deps = stage_code_deps(ROOT, "evaluate")
    # evaluate -> its recipe -> perplexity -> windows (the protocol) -> corpora; the loader -> saved modeling code
    for module in ("src/gqaprune/evaluation/perplexity.py", "src/gqaprune/data/windows.py",
                   "src/gqaprune/config/corpora.py", "src/gqaprune/config/sections.py",
                   "src/gqaprune/models/loading.py", "src/gqaprune/models/hf_code/modeling_gqaprune.py",
                   "src/gqaprune/models/hf_code/gqaprune_layout.py"):
        assert module in deps, module
    plan = stage_code_deps(ROOT, "plan")
    assert "src/gqaprune/pruning/importance.py" not in plan and "src/gqaprune/pruning/surgery.py" not in plan
    assert not any("torch" in d for d in plan)


def test_the_launcher_and_runner_are_no_stage_dependency():
    """How a stage is started, logged and spread over processes changes no result: editing those files must
    not invalidate cached results (README "What DVC can rely on")."""
    for name in STAGES:
        deps = stage_code_deps(ROOT, name)
        for plumbing in ("src/gqaprune/pipeline/runner.py", "src/gqaprune/runtime/launch.py", "src/gqaprune/cli.py",
                         f"stages/{name}.py", "src/gqaprune/pipeline/__init__.py"):
            assert plumbing not in deps, (name, plumbing)
    assert ROOT / "src/gqaprune/pipeline/artifacts.py" in closure(ROOT / "src",
                                                                  ROOT / "src/gqaprune/pipeline/runner.py")


def test_outputs_match_the_stage_table():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages == generate(ROOT)["stages"]
    for name, stage in stages.items():
        declared = list(stage.get("outs", []))
        for key in ("metrics", "plots"):
            declared += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(key, [])]
        assert sorted(declared) == sorted(STAGES[name].outputs), name
        assert stage["cmd"] == f"python stages/{name}.py"

"""End-to-end DVC pipeline on a tiny random model: `dvc repro`, caching, partial re-runs, `dvc exp`.

A throw-away git + DVC repository gets the project's dvc.yaml, stages/ and src/ (dvc.yaml lists library
files as dependencies) and a params.yaml for a tiny random LLaMA (GQA 4:1) with its own tiny byte-level
BPE tokenizer. Every stage is a separate `python stages/<name>.py` process (about 6 s of imports each), so
the test runs the fewest stages that still cover: a full repro, a no-op repro, a stage killed under
`dvc repro` and restored by `dvc checkout`, a finetune param change and a plan.ratio change made as an
experiment. The `source` stage (always changed: it looks at the model folder outside the project) runs at
every repro and leaves the rest up to date.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gqaprune.pipeline.dvc_file import stage_code_deps
from helpers import tiny_project

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = {"source", "prepare", "calibrate", "score", "similarity", "allocate", "plan", "surgery", "finetune",
              "evaluate_dense", "evaluate", "export"}
RUNNING = re.compile(r"Running stage '([^']+)'")


class Repo:
    """A scratch git + DVC repository; commands run with this venv's python and dvc first on PATH."""

    def __init__(self, root: Path, data_dir: Path):
        self.root = root
        bin_dir = str(Path(sys.executable).parent)
        dvc = Path(bin_dir) / "dvc"
        self.dvc = [str(dvc)] if dvc.is_file() else [sys.executable, "-m", "dvc"]
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "CI": "true",
                    "GQAPRUNE_DATA_DIR": str(data_dir), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "GIT_CONFIG_NOSYSTEM": "1"}

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
        return proc.stdout

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def dvc_(self, *args: str) -> str:
        return self.run(*self.dvc, *args)

    def ran(self, *args: str) -> set[str]:
        """Run a dvc command and return the names of the stages it ran (not the skipped ones)."""
        return set(RUNNING.findall(self.dvc_(*args)))

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def changed_stages(status: str) -> set[str]:
    """Stage names that `dvc status` lists as changed (lines 'name:' at the start of a line), leaving out the
    `source` stage, which DVC always lists (always_changed)."""
    return {line[:-1] for line in status.splitlines()
            if line.endswith(":") and not line.startswith((" ", "\t"))} - {"source"}


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its content."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _process_running(command: str, group: int) -> int | None:
    """The pid of the Python process of process group ``group`` whose arguments hold ``command``, if one runs.

    Only a Python interpreter counts: DVC may start the stage through ``sh -c "python stages/..."``, and a shell
    that does not exec its command also holds ``command`` in its arguments; killing the shell would leave the stage
    running on, writing its outputs after the test has restored them."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if (argv and Path(argv[0]).name.startswith("python") and command in argv
                and int(stat.rsplit(")", 1)[1].split()[2]) == group):  # field 5: the process group
            return int(entry.name)
    return None


def changed_stages_of(module: str, root: Path) -> set[str]:
    """The stages whose dvc.yaml deps list ``module``."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name for name, stage in stages.items() if module in stage.get("deps", [])}


def _metric_rows(node, out: list) -> list:
    """(name or rev, plan.ratio, evaluate.json data) of every row of `dvc exp show --json`, at any depth."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "metrics" in data:
            evaluate = (data.get("metrics") or {}).get("metrics/evaluate.json", {}).get("data")
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            ratio = (params.get("plan") or {}).get("ratio")
            out.append((node.get("name") or node.get("rev"), ratio, evaluate))
        for value in node.values():
            _metric_rows(value, out)
    elif isinstance(node, list):
        for item in node:
            _metric_rows(item, out)
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, data_dir) -> Repo:
    """The scratch repository after git init, dvc init and a first commit of the tiny-model pipeline."""
    root, params = tiny_project(tmp_path_factory.mktemp("pipeline"), data_dir, "repo")
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "src", root / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".gitignore").write_text("__pycache__/\nartifacts/logs/\n")
    r = Repo(root, data_dir)
    r.write_params(params)
    r.git("init", "-q")
    r.git("config", "user.name", "gqaprune tests")
    r.git("config", "user.email", "tests@gqaprune.invalid")
    r.git("config", "commit.gpgsign", "false")
    r.dvc_("init", "-q")
    r.dvc_("config", "core.analytics", "false")
    r.git("add", "-A")
    r.git("commit", "-q", "-m", "tiny pipeline")
    return r


def test_dvc_pipeline_end_to_end(repo: Repo):
    root = repo.root
    # 1. the first repro runs every stage and writes every artifact
    assert repo.ran("repro") == ALL_STAGES
    for rel in ["artifacts/model/config.json", "artifacts/model.json",
                "artifacts/calibration/samples.safetensors",
                "artifacts/scores/importance.parquet", "artifacts/similarity/similarity.parquet",
                "artifacts/plan/plan.json", "artifacts/plan/global_group_table.csv",
                "artifacts/plan/pruning_analysis.json", "artifacts/pruned/config.json",
                "artifacts/pruned/model.safetensors", "artifacts/finetune/status.json",
                "artifacts/finetune/merged/model.safetensors", "metrics/dense.json",
                "plots/layer_importance.png", "plots/kept_fraction.png", "plots/finetune_loss.png",
                "artifacts/export/model-f16.gguf", "artifacts/export/model-Q8_0.gguf", "artifacts/export/README.md",
                "artifacts/pruned/README.md", "artifacts/finetune/merged/README.md", "artifacts/source.json",
                "artifacts/evaluation/results.json"]:
        assert (root / rel).is_file(), rel
    for png in root.glob("plots/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(metrics["ppl"]) == {"dense", "pruned", "finetuned"}
    for per in metrics["ppl"].values():
        assert set(per) == {"wikitext2", "ptb"}
        assert all(0 < v < float("inf") for v in per.values())
    assert metrics["tokens_evaluated"] == {"wikitext2": 256, "ptb": 256} and metrics["capped"]
    assert metrics["params_after"] < metrics["params_before"]
    assert abs(metrics["ratio_total"] - 0.2) < 0.05
    analysis = json.loads((root / "artifacts/plan/pruning_analysis.json").read_text())
    assert analysis["params_after"] == metrics["params_after"]
    card = (root / "artifacts/export/README.md").read_text()
    assert card.startswith("---\nbase_model:") and "model-Q8_0.gguf" in card
    assert f'"wikitext2": {metrics["ppl"]["finetuned"]["wikitext2"]}' in card  # the measured perplexity
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "baseline results")

    # 2. nothing changed: nothing runs but `source`, which finds the model folder unchanged
    assert changed_stages(repo.dvc_("status")) == set()
    assert repo.ran("repro") == {"source"}

    # 2b. editing a library module marks exactly the stages whose code imports it as changed
    # (the runner and the launcher are no stage's dependency: editing them leaves every result valid)
    for module in ("src/gqaprune/pruning/similarity.py", "src/gqaprune/data/windows.py",
                   "src/gqaprune/pruning/plan.py", "src/gqaprune/pipeline/runner.py", "src/gqaprune/runtime/launch.py"):
        path = root / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        importers = {name for name in ALL_STAGES if module in stage_code_deps(root, name)} - {"source"}
        assert changed_stages(repo.dvc_("status")) == importers, module
        path.write_text(original)
    assert changed_stages(repo.dvc_("status")) == set()
    assert changed_stages_of("src/gqaprune/pruning/similarity.py", root) == {"similarity"}

    # 2c. re-running score on the same inputs writes the same bytes: plan and the rest stay up to date
    assert repo.ran("repro", "-f", "-s", "score") == {"score"}
    assert repo.ran("repro") == {"source"}

    # 2d. a stage killed under `dvc repro` (DVC removed its outputs first; SIGKILL, as the kernel's OOM killer
    # ends a process): `dvc repro` fails, dvc.lock keeps the last success, `dvc checkout` restores every output
    kept = {p: tree_bytes(root / p) for p in ("artifacts/plan", "metrics/plan.json", "plots/kept_fraction.csv")}
    proc = subprocess.Popen([*repo.dvc, "repro", "-f", "-s", "plan"], cwd=root, env=repo.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (stage := _process_running("stages/plan.py", proc.pid)) or (root / "artifacts/plan").exists():
        assert proc.poll() is None and time.time() < deadline, "dvc repro ended before its outputs were removed"
        time.sleep(0.02)
    os.kill(stage, signal.SIGKILL)
    assert proc.wait(60) != 0  # DVC reports the failed stage
    assert not (root / "artifacts/plan").exists()
    repo.dvc_("checkout", "plan")
    assert {p: tree_bytes(root / p) for p in kept} == kept  # every output back, metrics and plots included
    status = repo.dvc_("status")
    assert changed_stages(status) == set(), status

    # 3. a finetune param re-runs finetune, evaluate and export only (dense ppl comes from metrics/dense.json)
    params = repo.params()
    params["finetune"]["lr"] = 5.0e-3
    repo.write_params(params)
    status = repo.dvc_("status")
    assert "finetune:" in status and "plan:" not in status, status
    assert repo.ran("repro") == {"source", "finetune", "evaluate", "export"}
    tuned = json.loads((root / "metrics/evaluate.json").read_text())
    assert tuned["ppl"]["dense"] == metrics["ppl"]["dense"]
    assert tuned["ppl"]["pruned"] == metrics["ppl"]["pruned"]
    assert changed_stages(repo.dvc_("status")) == set()
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "finetune lr 5e-3")

    # 3b. the model folder is outside the project: the `source` stage's content digest makes DVC see an edit
    notes = Path(repo.params()["prepare"]["model"]) / "notes.txt"
    notes.write_text("an edit of the source model folder\n")
    assert repo.ran("repro", "-s", "source") == {"source"}
    assert "prepare" in changed_stages(repo.dvc_("status"))
    notes.unlink()
    assert repo.ran("repro", "-s", "source") == {"source"}
    assert changed_stages(repo.dvc_("status")) == set()
    baseline = json.loads((root / "metrics/evaluate.json").read_text())

    # 4. plan.ratio, changed as an experiment: allocate, plan, surgery, finetune, evaluate, export re-run (not
    # prepare, calibrate, score, similarity or evaluate_dense)
    assert repo.ran("exp", "run", "-S", "plan.ratio=0.3") == {"source", "allocate", "plan", "surgery", "finetune",
                                                              "evaluate", "export"}
    experiment = json.loads((root / "metrics/evaluate.json").read_text())
    assert experiment["params_after"] < baseline["params_after"]
    assert experiment["ppl"]["dense"] == baseline["ppl"]["dense"]

    # 5. `dvc exp show` lists the baseline commit and the experiment with their (different) metrics
    rows = _metric_rows(json.loads(repo.dvc_("exp", "show", "--json")), [])
    by_ratio = {ratio: ev for _, ratio, ev in rows if ev is not None}
    assert 0.2 in by_ratio and 0.3 in by_ratio, rows
    assert by_ratio[0.2]["ppl"] == baseline["ppl"]
    assert by_ratio[0.3]["ppl"] == experiment["ppl"]
    assert by_ratio[0.2]["ppl"]["pruned"] != by_ratio[0.3]["ppl"]["pruned"]
    assert by_ratio[0.2]["params_after"] > by_ratio[0.3]["params_after"]
    names = [name for name, ratio, _ in rows if ratio == 0.3]
    assert any(name and name != "workspace" for name in names), rows  # the experiment's own row

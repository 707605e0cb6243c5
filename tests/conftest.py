"""Shared pytest fixtures."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """Under CI every test must run: a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Local data mirror: $GQAPRUNE_DATA_DIR, default ../shared/data (relative paths: to the repo root)."""
    path = Path(os.environ.get("GQAPRUNE_DATA_DIR", "../shared/data")).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    path = path.resolve()
    if not path.is_dir():
        message = f"data mirror {path} not found (set GQAPRUNE_DATA_DIR)"
        if in_ci():
            pytest.fail(f"{message}; CI needs ../shared/data beside the clone")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def template(tmp_path_factory, data_dir) -> Path:
    """A project folder after prepare .. allocate on a tiny random LLaMA (copy it per test)."""
    from gqaprune.pipeline.runner import execute
    from helpers import tiny_project

    base = tmp_path_factory.mktemp("project")
    project, params = tiny_project(base, data_dir, "project")
    params["evaluate"]["datasets"] = ["wikitext2"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(project)
    try:
        for stage in ("prepare", "calibrate", "score", "similarity", "allocate"):
            assert execute(stage, None, Path("params.yaml"), [], False) == 0, stage
    finally:
        os.chdir(cwd)
    return base


def _copy_project(base: Path, dest: Path) -> Path:
    """Copy a project base (``project/`` beside ``tiny-model/``) to ``dest``; params point at the copy's model."""
    shutil.copytree(base, dest, symlinks=True)
    root = dest / "project"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["model"] = str(dest / "tiny-model")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _isolated(monkeypatch, root: Path) -> None:
    """Work in ``root``, offline, with no data-folder or debug override from the environment."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GQAPRUNE_DATA_DIR", raising=False)
    monkeypatch.delenv("GQAPRUNE_DEBUG", raising=False)
    from gqaprune.runtime.hub import hub_reachable

    hub_reachable.cache_clear()


def _workspace(base: Path, dest: Path, monkeypatch):
    """A private copy of a project base as the working folder, for the duration of a test."""
    root = _copy_project(base, dest)
    _isolated(monkeypatch, root)
    yield root
    from gqaprune.runtime.hub import hub_reachable

    hub_reachable.cache_clear()


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    """A private copy of the template project, as the working folder."""
    yield from _workspace(template, tmp_path / "t", monkeypatch)


@pytest.fixture(scope="session")
def evaluated_template(template, tmp_path_factory) -> Path:
    """The template project after plan, surgery, finetune (LoRA, merged), evaluate_dense and evaluate."""
    from gqaprune.pipeline.runner import execute

    base = tmp_path_factory.mktemp("evaluated") / "t"
    root = _copy_project(template, base)
    with pytest.MonkeyPatch.context() as mp:
        _isolated(mp, root)
        for stage in ("plan", "surgery", "finetune", "evaluate_dense", "evaluate"):
            assert execute(stage, None, Path("params.yaml"), [], False) == 0, stage
    return base


@pytest.fixture
def evaluated(evaluated_template, tmp_path, monkeypatch) -> Path:
    """A private copy of the evaluated project, as the working folder."""
    yield from _workspace(evaluated_template, tmp_path / "t", monkeypatch)

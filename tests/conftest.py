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


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    """A private copy of the template project, as the working folder."""
    shutil.copytree(template, tmp_path / "t", symlinks=True)
    root = tmp_path / "t" / "project"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["model"] = str(tmp_path / "t" / "tiny-model")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GQAPRUNE_DATA_DIR", raising=False)
    monkeypatch.delenv("GQAPRUNE_DEBUG", raising=False)
    from gqaprune.runtime.hub import hub_reachable

    hub_reachable.cache_clear()
    yield root
    hub_reachable.cache_clear()

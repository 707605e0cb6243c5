"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Local data mirror: $GQAPRUNE_DATA_DIR, default ../shared/data (relative paths: to the repo root)."""
    path = Path(os.environ.get("GQAPRUNE_DATA_DIR", "../shared/data")).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    path = path.resolve()
    if not path.is_dir():
        pytest.skip(f"data mirror {path} not found (set GQAPRUNE_DATA_DIR)")
    return path

"""Artifact I/O: atomic writes, Parquet tables that carry their provenance, provenance checks.

Every table is written with a ``gqaprune`` entry in its Parquet schema metadata (JSON): the model
fingerprint, the params that produced it and the package version. Readers check the fingerprint so
scores of one model are never applied to another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"gqaprune"


class ArtifactMismatchError(ValueError):
    """Two artifacts (or an artifact and a model) do not belong together."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    """Fallback for numpy scalars and paths in JSON output."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_json(path: str | Path) -> dict:
    """Read a JSON artifact, naming the file when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist; run the stage that writes it first")
    return json.loads(path.read_text())


def write_table(path: str | Path, df: pd.DataFrame, meta: Mapping) -> None:
    """Write ``df`` as Parquet with ``meta`` (JSON) in the schema metadata, atomically."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    merged = {**(table.schema.metadata or {}), META_KEY: json.dumps(dict(meta), default=_jsonable).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(merged), tmp)


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    """Write ``df`` as CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a Parquet artifact and its ``gqaprune`` metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist; run the stage that writes it first")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ArtifactMismatchError(f"{path} carries no gqaprune metadata: it was not written by this package")
    return table.to_pandas(), json.loads(raw)


def check_fingerprint(meta: Mapping, fingerprint: str, what: str) -> None:
    """Refuse an artifact whose recorded model fingerprint differs from ``fingerprint``."""
    recorded = meta.get("fingerprint")
    if recorded != fingerprint:
        raise ArtifactMismatchError(
            f"{what} was computed on model {recorded!r}, not on this model ({fingerprint!r}); "
            "re-run the stages that produce it for this model"
        )

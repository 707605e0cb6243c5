"""Files written so that a crash or a link never corrupts what was there: atomic writes, byte-stable JSON.

DVC links its cache objects into the workspace (``cache.type: hardlink,symlink``), so a writer never
writes through an existing file: it writes a temporary sibling and renames it over the destination
(:func:`atomic_path`, :func:`atomic_dir`), so a link into the cache is replaced, never modified. JSON
is written with a fixed layout, so equal content gives equal bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gqaprune.errors import InputError


def remove_path(path: str | Path) -> None:
    """Remove a file, link or folder if it exists (links are unlinked, never followed)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextmanager
def _replacing(path: str | Path, folder: bool) -> Iterator[Path]:
    """A temporary sibling of ``path`` (a fresh folder if ``folder``) that replaces it if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove_path(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder or (path.is_dir() and not path.is_symlink()):
            remove_path(path)
        os.replace(tmp, path)  # replaces a link (into the DVC cache) instead of writing through it
    finally:
        remove_path(tmp)


def atomic_path(path: str | Path):
    """Context manager: a temporary sibling file path, renamed onto ``path`` only if the block succeeds."""
    return _replacing(path, folder=False)


def atomic_dir(path: str | Path):
    """Context manager: a fresh temporary sibling folder that replaces ``path`` (whole) only on success."""
    return _replacing(path, folder=True)


def jsonable(x):
    """Fallback for numpy scalars and paths in JSON output."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def dumps(obj, sort_keys: bool = False) -> str:
    """The JSON text the toolkit writes (indented, numpy scalars as numbers, trailing newline)."""
    return json.dumps(obj, indent=2, default=jsonable, sort_keys=sort_keys) + "\n"


def write_json(path: str | Path, obj, sort_keys: bool = False) -> None:
    """Write JSON atomically (keys in insertion order unless ``sort_keys``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj, sort_keys))


def read_json(path: str | Path) -> dict:
    """Read a JSON artifact, naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"artifact {path} is not valid JSON ({e}); re-run the stage that writes it") from None

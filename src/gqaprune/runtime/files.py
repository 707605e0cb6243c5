"""Files written so that a crash or a link never corrupts what was there: atomic writes, byte-stable JSON.

DVC links its cache objects into the workspace (``cache.type: hardlink,symlink``), so a writer never
writes through an existing file: it writes a temporary sibling and renames it over the destination
(:func:`atomic_path`, :func:`atomic_dir`), so a link into the cache is replaced, never modified. JSON
is written with a fixed layout, so equal content gives equal bytes, and is always valid JSON:
infinity is spelled ``".inf"`` (as in params.yaml) and NaN is refused, naming the key (:func:`dumps`).
A failed write names the file it was writing (a full disk included). Temporary siblings carry the
writer's pid (``.<name>.tmp<pid>``), so litter of a killed process is recognised and removed by the
next run (:func:`remove_litter`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gqaprune.errors import InputError, NonFiniteError

#: the siblings a writer leaves while it works: ``.<name>.staged<pid>`` (stage outputs), ``.<name>.tmp<pid>``
_LITTER = re.compile(r"^\.(?P<name>.+)\.(?:staged|tmp)(?P<pid>\d+)$")


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
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if folder or (path.is_dir() and not path.is_symlink()):
            remove_path(path)
        os.replace(tmp, path)  # replaces a link (into the DVC cache) instead of writing through it
    except OSError as e:
        raise named_os_error(e, path) from e
    finally:
        remove_path(tmp)


def named_os_error(error: OSError, path: str | Path) -> OSError:
    """``error`` with the file it concerns named (a write that ran out of disk space names no file)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_litter(path: str | Path) -> list[Path]:
    """Remove the staged / temporary siblings of ``path`` left by processes that no longer run; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for sibling in path.parent.iterdir():
        name, pids = sibling.name, []
        while m := _LITTER.match(name):  # ``..out.staged12.tmp12``: a temporary file of a staged output
            name, pids = m["name"], [*pids, int(m["pid"])]
        if pids and name == path.name and not any(map(pid_alive, pids)):
            remove_path(sibling)
            removed.append(sibling)
    return removed


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


#: how a JSON artifact spells infinity (YAML's spelling, which the params loader reads back as a float)
INFINITY = ".inf"


def json_safe(obj, key: str = "", what: str = "a JSON document"):
    """``obj`` with every infinite float spelled ``".inf"`` / ``"-.inf"``; a NaN is refused with
    :class:`~gqaprune.errors.NonFiniteError` naming its key (JSON has neither)."""
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{key}.{k}" if key else str(k), what) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, f"{key}.{i}" if key else str(i), what) for i, v in enumerate(obj)]
    value = obj.item() if hasattr(obj, "item") and not isinstance(obj, str) else obj
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            raise NonFiniteError(f"{what} would hold NaN at {key or '(the value)'}, which is not valid JSON; not "
                                 "written")
        return INFINITY if value > 0 else f"-{INFINITY}"
    return obj


def dumps(obj, sort_keys: bool = False, what: str = "a JSON document") -> str:
    """The JSON text the toolkit writes (indented, numpy scalars as numbers, trailing newline).

    Always valid JSON (:func:`json_safe`): infinity is written as ``".inf"``, NaN is refused naming its key
    (``what`` names the document).
    """
    return json.dumps(json_safe(obj, what=what), indent=2, default=jsonable, sort_keys=sort_keys,
                      allow_nan=False) + "\n"


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj, sort_keys: bool = False) -> None:
    """Write JSON atomically (keys in insertion order unless ``sort_keys``); refuses NaN (:func:`dumps`)."""
    text = dumps(obj, sort_keys, what=str(path))
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def content_id(*paths: str | Path) -> str:
    """sha256 (16 hex characters) of the bytes of small artifact files, in the order given: what a later
    artifact records to say which input it was made from."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_json(path: str | Path) -> dict:
    """Read a JSON artifact, naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"artifact {path} is not valid JSON ({e}); re-run the stage that writes it") from None


class FileDigests:
    """sha256 of files, hashed again only when a file's (size, mtime_ns, ctime_ns, inode) changed.

    The cache (a JSON file, ``cache``) maps each resolved path to its stat key and digest, so an
    unchanged 16 GB model folder costs a ``stat`` per file, while any edit re-hashes the file: writing
    or ``touch -m`` always moves the change time (ctime), which no user tool can set back.
    """

    def __init__(self, cache: str | Path | None = None):
        self.cache = Path(cache) if cache is not None else None
        self.entries: dict[str, dict] = {}
        if self.cache is not None and self.cache.is_file():
            try:
                self.entries = json.loads(self.cache.read_text())
            except (OSError, ValueError):  # a damaged cache is only a cache: hash again
                self.entries = {}
        self.changed = False

    @staticmethod
    def stat_key(file: Path) -> list[int]:
        """(size, mtime_ns, ctime_ns, inode) of ``file`` (links followed)."""
        st = file.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def digest(self, file: str | Path) -> str:
        """The sha256 (hex) of ``file``'s bytes, from the cache when its stat key is unchanged."""
        file = Path(file).resolve()
        key = self.stat_key(file)
        entry = self.entries.get(str(file))
        if entry is not None and entry.get("key") == key:
            return entry["sha256"]
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        self.entries[str(file)] = {"key": key, "sha256": h.hexdigest()}
        self.changed = True
        return h.hexdigest()

    def digest_all(self, files) -> dict[Path, str]:
        """:meth:`digest` of every file, several at a time (sha256 releases the GIL: an 8-file 15 GB model
        folder hashes in the time of its largest file, not of all of them)."""
        from concurrent.futures import ThreadPoolExecutor

        files = list(files)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
            return dict(zip(files, pool.map(self.digest, files), strict=True))

    def save(self) -> None:
        """Write the cache back (when one was given and something was hashed)."""
        if self.cache is not None and self.changed:
            write_json(self.cache, self.entries, sort_keys=True)
            self.changed = False

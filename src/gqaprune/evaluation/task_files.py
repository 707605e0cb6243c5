"""lm-eval task YAMLs found and read without importing lm-eval: which tasks need the Hugging Face hub.

:func:`find_task_configs` finds the YAML that defines a task, group or tag name (the include folder first,
then likely folders of lm-eval's own tasks, then all ~14k of them) by its ``task:`` / ``group:`` / ``tag:``
line and reads it as lm-eval does (``include`` files merged, ``!function`` kept as text): 0.02-0.2 s for
lm-eval's tasks, ~1 s for a tag (its members can be anywhere), against 10-25 s for lm-eval's own index.
:func:`is_local` tells from a config whether its data needs the hub. Used by
:func:`gqaprune.evaluation.tasks.check_offline`.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_task_configs", "is_local"]

#: datasets' packaged builders: local exactly when every data file is a local path
_FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "sql", "webdataset", "imagefolder",
                  "audiofolder", "videofolder"}


def _read_config(path: Path, depth: int = 0) -> dict:
    """A task YAML with its ``include`` files merged under it (its own keys win), as lm-eval reads it;
    ``!function x`` stays a string (nothing is imported)."""
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    cfg = yaml.load(path.read_bytes(), Loader=Loader)  # noqa: S506 - the safe loader plus one tag
    if not isinstance(cfg, dict) or depth > 8:
        return {}
    includes = cfg.pop("include", None)
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes or []:
        merged.update(_read_config(path.parent / inc, depth + 1))
    return {**merged, **cfg}


def _yaml_files(root: str) -> list[str]:
    """Every ``*.yaml`` under ``root`` in lm-eval's order (sorted paths; the first of equal names wins)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints")]
        found += [os.path.join(folder, f) for f in files if f.endswith(".yaml")]
    return sorted(found, key=lambda p: Path(p).as_posix())


def _builtin_root() -> str:
    spec = importlib.util.find_spec("lm_eval")  # finds the package without importing it
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks")


def _likely_files(names: Sequence[str]) -> list[str]:
    """lm-eval's YAMLs under folders (two levels deep) named like a word of a name (``arc`` for ``arc_easy``,
    ``super_glue/boolq``): a walk of ~1 % of its 14k files. lm-eval 0.4.13 defines no task name twice,
    so a match found here is the definition."""
    words = {w for n in names for w in re.split(r"[_\-.]", n.lower()) if len(w) > 2}
    dirs = []
    for top in os.scandir(_builtin_root()):
        if top.is_dir():
            subs = [top] + [d for d in os.scandir(top.path) if d.is_dir()]
            dirs += [d.path for d in subs if words & set(re.split(r"[_\-.]", d.name.lower()))]
    return sorted({f for d in dirs for f in _yaml_files(d)}, key=lambda p: Path(p).as_posix())


@functools.lru_cache(maxsize=1)
def _all_builtin_files() -> list[str]:
    return _yaml_files(_builtin_root())


def _key(key: str, name: str) -> re.Pattern:
    """``key: name`` on a line of its own (``"task": "x"`` too); key ``[ \\t]*-``: a list item ``- name``."""
    q = rb"['\"]?"
    sep = rb"[ \t]*" if key.endswith("-") else q + rb":[ \t]*"
    return re.compile(rb"^" + (b"" if key.endswith("-") else q) + key.encode() + sep + q
                      + re.escape(name.encode()) + q + rb"[ \t]*(#.*)?$", re.M)


def find_task_configs(names: Sequence[str], include: str | None, depth: int = 0) -> dict[str, list[dict]]:
    """``{name: configs of the tasks it stands for}`` for the names some YAML defines: a task its own, a
    group or tag its members'. The include folder first (it overrides lm-eval's tasks), then likely
    folders of lm-eval's tasks, then all of them (tags always need all: their members are anywhere)."""
    keys = {n: (_key("task", n), _key("group", n), _key("tag", n), _key("[ \t]*-", n)) for n in names}
    tasks: dict[str, list[dict]] = {}
    groups: dict[str, dict] = {}
    tags: dict[str, list[dict]] = {}
    seen: set[str] = set()
    listings = (lambda: _yaml_files(include) if include else [], lambda: _likely_files(names), _all_builtin_files)
    for listing in listings:
        if all(n in tasks or n in groups for n in names):
            break
        for file in (f for f in listing() if f not in seen):
            seen.add(file)
            todo = [n for n in names if n not in tasks and n not in groups]
            if not todo:
                break
            with open(file, "rb") as fh:
                text = fh.read()
            for n in (n for n in todo if n.encode() in text):
                if any(k.search(text) for k in keys[n]):
                    cfg = _read_config(Path(file))
                    tag = cfg.get("tag")
                    if cfg.get("group") == n:
                        groups[n] = cfg
                    elif cfg.get("task") == n:
                        tasks[n] = [cfg]
                    elif n == tag or isinstance(tag, list) and n in tag:
                        tags.setdefault(n, []).append(cfg)
    out = {**tags, **tasks}
    for name, cfg in groups.items():  # members: names (tasks, tags, groups), inline configs, inline groups
        children = [c for c in cfg.get("task") or [] if isinstance(c, (str, dict))]
        named = [c if isinstance(c, str) else c.get("task") for c in children]
        sub = find_task_configs([c for c in named if isinstance(c, str)], include, depth + 1) if depth < 4 else {}
        out[name] = []
        for child, label in zip(children, named, strict=True):
            base = sub.get(label, []) if isinstance(label, str) else []
            out[name] += [{**b, **child} for b in base] if isinstance(child, dict) and base else base or (
                [child] if isinstance(child, dict) and "dataset_path" in child else [{}])
    return out


def is_local(cfg: dict) -> bool:
    """True when the task's data needs no hub: a packaged builder (json, csv...) whose data files are all
    existing local paths, a local dataset folder, or a ``custom_dataset`` function (the task's own code)."""
    if cfg.get("custom_dataset"):
        return True
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path:
        return False  # a Python task or no dataset: nothing shows it is local
    if path in _FILE_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            files = list(files.values())
        flat = [f for v in ([files] if isinstance(files, str) else files or []) for f in ([v] if isinstance(v, str)
                                                                                        else v)]
        return bool(flat) and all("://" not in f and glob.glob(os.path.expanduser(f)) for f in flat)
    return "://" not in path and Path(path).expanduser().exists()

"""Which source files each pipeline stage runs: the code dependencies that ``dvc.yaml`` must list.

DVC re-runs a stage when one of its ``deps`` changes, so a stage must depend on every module its code
path imports — and on no other, or an unrelated edit re-runs it. This module computes that set from
the sources themselves: the transitive closure of ``import`` statements (module level and inside
functions, absolute and relative) of ``gqaprune`` modules, starting at ``stages/<name>.py``, plus
the package ``__init__`` files that importing them executes.

``python -m gqaprune.depgraph --check`` compares ``dvc.yaml`` with it (``tests/test_dvc_yaml.py`` does
the same); ``--write`` rewrites the ``.py`` entries of each stage's ``deps`` (data dependencies are
kept as they are).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "gqaprune"


def _module_file(src: Path, module: str) -> Path | None:
    """The file of a ``gqaprune`` module (package → its ``__init__.py``), or None if it is not one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = src.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module_name(src: Path, file: Path) -> str:
    """Dotted name of a file under ``src`` (``__init__.py`` → its package)."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(src: Path, file: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``file`` (candidates, resolved later)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    inside = file.is_relative_to(src)
    package = _module_name(src, file) if inside else ""
    if inside and file.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names.add(root)
            names.update(f"{root}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def closure(src: Path, entry: Path) -> set[Path]:
    """Source files of ``gqaprune`` that running ``entry`` can import (entry itself excluded)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        file = todo.pop()
        for module in _imported_modules(src, file):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
                target = _module_file(src, ".".join(parts[:i]))
                if target is not None and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return seen


def stage_code_deps(root: Path, stage: str) -> list[str]:
    """Sorted repository-relative paths of the code ``stages/<stage>.py`` runs, the wrapper included."""
    entry = root / "stages" / f"{stage}.py"
    files = {entry} | closure(root / "src", entry)
    return sorted(f.relative_to(root).as_posix() for f in files)


def _is_code(dep: str) -> bool:
    return dep.endswith(".py")


def check(root: Path) -> list[str]:
    """Differences between dvc.yaml's code deps and the computed ones, one line per stage (empty: in sync)."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        listed = sorted(d for d in stage.get("deps", []) if isinstance(d, str) and _is_code(d))
        wanted = stage_code_deps(root, name)
        if listed != wanted:
            problems.append(f"{name}: missing {sorted(set(wanted) - set(listed))}, "
                            f"extra {sorted(set(listed) - set(wanted))}")
    return problems


def write(root: Path) -> None:
    """Rewrite the code entries of every stage's deps in dvc.yaml (data deps kept, listed first)."""
    import yaml

    path = root / "dvc.yaml"
    doc = yaml.safe_load(path.read_text())
    for name, stage in doc["stages"].items():
        data = [d for d in stage.get("deps", []) if not (isinstance(d, str) and _is_code(d))]
        stage["deps"] = data + stage_code_deps(root, name)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))


def main(argv: list[str] | None = None) -> int:
    """``--check`` (exit 1 when out of sync) or ``--write``, from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path.cwd()
    if argv == ["--write"]:
        write(root)
        return 0
    problems = check(root)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

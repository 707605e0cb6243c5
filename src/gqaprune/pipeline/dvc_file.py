"""dvc.yaml, generated from the stage table and the recipes' imports: one source of truth for the pipeline.

Each stage's entry comes from :data:`gqaprune.pipeline.stages.STAGES` (command, params, data inputs,
outputs, metrics, plots) plus its code dependencies: the source files of ``gqaprune`` that its recipe
(``pipeline/recipes/<stage>.py``) can import, found by following every ``import`` statement (module
level and inside functions) from there. DVC re-runs a stage when one of its ``deps`` changes, so a
stage depends on every module its computation runs, and on no other:

* the stage runner, the launcher and the thin wrappers in ``stages/`` are not dependencies: how a
  stage is started, logged and spread over processes changes no result (results equal one process's
  up to float summation order), so editing them leaves every cached result valid;
* a package ``__init__.py`` that holds only its docstring is not one either (it runs no code).

Every output is cached, metrics and plots included (no ``cache: false``, no ``persist``): DVC removes a
stage's outputs before running it and rewrites ``dvc.lock`` only when it succeeded, so after a failed
or killed stage ``dvc checkout <stage>`` brings the previous outputs back from the cache.

``python -m gqaprune.pipeline.dvc_file --check`` says whether dvc.yaml is the generated one
(``tests/test_dvc_yaml.py`` does the same); ``--write`` regenerates it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "gqaprune"
#: modules that start, log or launch a stage: never a stage's dependency (and never followed)
NOT_RESULTS = ("gqaprune.pipeline.runner", "gqaprune.runtime.launch", "gqaprune.cli")


def _module_file(src: Path, module: str) -> Path | None:
    """The file of a ``gqaprune`` module (package -> its ``__init__.py``), or None if it is not one."""
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
    """Dotted name of a file under ``src`` (``__init__.py`` -> its package)."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(src: Path, file: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``file`` (candidates, resolved by the caller)."""
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


def _runs_code(file: Path) -> bool:
    """Whether a module holds anything beyond its docstring."""
    body = ast.parse(file.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def closure(src: Path, entry: Path) -> set[Path]:
    """Source files of ``gqaprune`` that running ``entry`` can import (entry itself excluded), not following
    :data:`NOT_RESULTS` and leaving out docstring-only packages."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        file = todo.pop()
        for module in imported_modules(src, file):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
                name = ".".join(parts[:i])
                target = _module_file(src, name)
                if target is not None and target not in seen and name not in NOT_RESULTS:
                    seen.add(target)
                    todo.append(target)
    return {f for f in seen if f.name != "__init__.py" or _runs_code(f)}


def stage_code_deps(root: Path, stage: str) -> list[str]:
    """Sorted repository-relative paths of the code stage ``stage`` computes with (its recipe included)."""
    src = root / "src"
    entry = src / PACKAGE / "pipeline" / "recipes" / f"{stage}.py"
    files = {entry} | closure(src, entry)
    return sorted(f.relative_to(root).as_posix() for f in files)


def generate(root: Path) -> dict:
    """The dvc.yaml document for the stage table, with code deps computed from the sources under ``root``."""
    from gqaprune.pipeline.stages import STAGES

    stages = {}
    for name, stage in STAGES.items():
        entry: dict = {"cmd": f"python stages/{name}.py",
                       "deps": [*map(str, stage.inputs), *stage_code_deps(root, name)],
                       "params": list(stage.params)}
        if stage.outs:
            entry["outs"] = [str(p) for p in stage.outs]
        entry["metrics"] = [str(stage.metrics)]  # cached like every output: `dvc checkout` restores it
        plots = []
        for plot, x, y in stage.plots:
            plots.append(f"plots/{plot}.png")
            plots.append({f"plots/{plot}.csv": {"x": x, "y": y}})
        if plots:
            entry["plots"] = plots
        if stage.always_changed:
            entry["always_changed"] = True
        stages[name] = entry
    return {"stages": stages}


def render(doc: dict) -> str:
    """The YAML text of a dvc.yaml document, with a header saying how it is made."""
    import yaml

    header = ("# Generated by `python -m gqaprune.pipeline.dvc_file --write` from the stage table\n"
              "# (src/gqaprune/pipeline/stages.py) and the recipes' imports; edit those, not this file.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def check(root: Path) -> list[str]:
    """Differences between dvc.yaml and the generated document, one line per stage (empty: in sync)."""
    import yaml

    have = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    want = generate(root)["stages"]
    problems = [f"{name}: missing from dvc.yaml" for name in want if name not in have]
    problems += [f"{name}: not a stage of the pipeline" for name in have if name not in want]
    for name in want:
        if name in have and have[name] != want[name]:
            keys = sorted(k for k in set(have[name]) | set(want[name]) if have[name].get(k) != want[name].get(k))
            problems.append(f"{name}: {', '.join(keys)} differ from the generated dvc.yaml")
    return problems


def write(root: Path) -> None:
    """Regenerate ``root/dvc.yaml``."""
    (root / "dvc.yaml").write_text(render(generate(root)))


def main(argv: list[str] | None = None) -> int:
    """``--check`` (exit 1 when out of sync, printing the differences) or ``--write``, from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path.cwd()
    if argv == ["--write"]:
        write(root)
        return 0
    problems = check(root)
    for line in problems:
        print(line)
    if problems:
        print("regenerate it: python -m gqaprune.pipeline.dvc_file --write")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

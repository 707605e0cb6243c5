"""The code's layout keeps its promises: imports point one way, every package says what it holds, files stay short."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gqaprune"

BASE = {"errors"}
#: package -> the packages its modules may import (besides their own); pipeline above the method packages,
#: those above models / data, all above config / runtime
ALLOWED = {
    "errors": set(),
    "config": BASE,
    "runtime": BASE | {"config"},
    "data": BASE | {"config", "runtime"},
    "models": BASE | {"config", "runtime"},
    "pruning": BASE | {"config", "runtime", "data", "models"},
    "recovery": BASE | {"config", "runtime", "data", "models"},
    "evaluation": BASE | {"config", "runtime", "data", "models"},
    "export": BASE | {"config", "runtime", "models"},
    "pipeline": BASE | {"config", "runtime", "data", "models", "pruning", "recovery", "evaluation", "export"},
    "cli": BASE | {"config", "runtime", "data", "models", "pruning", "recovery", "evaluation", "export", "pipeline"},
}


def _package(file: Path) -> str:
    rel = file.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(file: Path) -> set[str]:
    """Top-level ``gqaprune`` packages imported anywhere in ``file`` (relative imports resolved)."""
    tree = ast.parse(file.read_text())
    found = set()
    here = file.relative_to(SRC).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                names = [".".join(["gqaprune", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
            if names[0] == "gqaprune":  # from gqaprune import x
                names = [f"gqaprune.{a.name}" for a in node.names]
        else:
            continue
        found.update(n.split(".")[1] for n in names if n.startswith("gqaprune.") and n != "gqaprune.__version__")
    return found


def _modules():
    return [f for f in SRC.rglob("*.py") if "hf_code" not in f.parts]


def test_imports_point_one_way():
    problems = []
    for file in _modules():
        if file.parent == SRC and file.name == "__init__.py":
            continue
        pkg = _package(file)
        assert pkg in ALLOWED, f"{file}: package {pkg} has no import rule in tests/test_layout.py"
        for target in _imports(file) - {pkg}:
            if target not in ALLOWED[pkg]:
                problems.append(f"{file.relative_to(ROOT)} ({pkg}) imports {target}")
    assert problems == []


def test_saved_modeling_code_is_standalone():
    for file in (SRC / "models" / "hf_code").glob("*.py"):
        assert not any(n.startswith("gqaprune") for n in map(str, _imports(file))), file
        assert "gqaprune." not in "".join(line for line in file.read_text().splitlines() if "import" in line), file


def test_every_package_says_what_it_holds_and_may_import():
    for init in SRC.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"
        assert "may import" in doc.lower(), f"{init} does not say what its modules may import"


@pytest.mark.parametrize("folder", ["src", "stages", "benchmarks"])
def test_no_file_over_500_lines(folder):
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / folder).rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}


def test_every_public_function_has_a_docstring():
    """Module-level functions and classes, and the methods of public classes (``rules`` overrides are
    documented once, on :class:`gqaprune.config.rules.Section`)."""
    missing = []
    for file in _modules():
        for node in ast.parse(file.read_text()).body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            members = [node] + [m for m in getattr(node, "body", []) if isinstance(node, ast.ClassDef)
                                and isinstance(m, ast.FunctionDef) and not m.name.startswith("_") and m.name != "rules"]
            missing += [f"{file.relative_to(ROOT)}:{m.lineno} {m.name}" for m in members
                        if ast.get_docstring(m) is None]
    assert missing == []

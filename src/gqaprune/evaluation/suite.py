"""Everything the evaluate stages measure on one model, in one call: perplexity, tasks, code, instructions, generation.

:func:`evaluate_model` runs the measures the ``evaluate`` params section asks for on a model already in
memory (dense or pruned; one process or N ranks, every rank returning the same result):

* ``ppl``: perplexity of the evaluation corpora (:mod:`gqaprune.evaluation.perplexity`);
* ``tasks``: lm-eval-harness tasks or suites (``evaluate.tasks``; :mod:`gqaprune.evaluation.tasks`);
* ``humaneval``: greedy pass@1 on the first ``evaluate.humaneval_problems`` HumanEval problems, each
  completion run in the sandbox (:mod:`gqaprune.evaluation.humaneval`; 0 turns it off);
* ``instructions``: mean NLL of the reference answers of held-out instruction records under the chat
  template (:mod:`gqaprune.evaluation.instructions`);
* ``generation``: loop rate, distinct-n and agreement with the dense model's continuations on the fixed
  prompt set (:mod:`gqaprune.evaluation.generation`; the texts are kept for the side-by-side document).

:func:`retention` puts a model's results next to the dense model's: each figure as a percentage of
dense (higher-is-better measures) or as a ratio (perplexity, NLL, loop rate).
"""

from __future__ import annotations

import logging
import math
import time

from gqaprune.config.recovery_and_evaluation import EvaluateParams
from gqaprune.runtime.distributed import DistContext, single_process

log = logging.getLogger("gqaprune")

__all__ = ["evaluate_model", "retention", "scalars"]


def evaluate_model(model, tokenizer, e: EvaluateParams, data_dir, ctx: DistContext | None = None,
                   reference: dict | None = None, perplexity_only: bool = False) -> dict:
    """The measures ``e`` asks for on ``model`` (module docstring), with the seconds each took (``seconds``).

    ``reference``: the dense model's result (its generation texts give the agreement). ``perplexity_only``:
    only ``ppl`` (an intermediate model, e.g. the pruned one when a recovered one is the delivered model).
    """
    from gqaprune.evaluation.perplexity import perplexities

    ctx = ctx or single_process()
    out: dict = {"seconds": {}}

    def timed(name, fn):
        t0 = time.perf_counter()
        out[name] = fn()
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
        log.info("%s: %.1f s", name, out["seconds"][name])

    timed("ppl", lambda: perplexities(model, tokenizer, e.datasets, e.seq_len, e.batch_size, e.max_tokens,
                                      data_dir, ctx, spread=e.spread))
    if perplexity_only:
        return out
    if e.instruction_records:
        timed("instructions", lambda: _instructions(model, tokenizer, e, data_dir, ctx))
    if e.generation_max_new_tokens:
        timed("generation", lambda: _generation(model, tokenizer, e, ctx, reference))
    if e.humaneval_problems:
        timed("humaneval", lambda: _humaneval(model, tokenizer, e, ctx))
    if e.tasks:
        timed("tasks", lambda: _tasks(model, tokenizer, e, ctx))
    return out


def _instructions(model, tokenizer, e: EvaluateParams, data_dir, ctx) -> dict:
    from gqaprune.data.instructions import instruction_records
    from gqaprune.evaluation.instructions import instruction_nll

    records = instruction_records(e.instruction_dataset, "heldout", data_dir)[: e.instruction_records]
    return instruction_nll(model, tokenizer, records, e.instruction_max_length, e.batch_size, ctx)


def _generation(model, tokenizer, e: EvaluateParams, ctx, reference: dict | None) -> dict:
    from gqaprune.data.prompts import CODE_PROMPTS, INSTRUCTION_PROMPTS
    from gqaprune.evaluation.generation import generation_health

    ref = (reference or {}).get("generation")
    return generation_health(model, tokenizer, INSTRUCTION_PROMPTS, CODE_PROMPTS, e.generation_max_new_tokens,
                             e.batch_size, reference=ref, ctx=ctx)


def _humaneval(model, tokenizer, e: EvaluateParams, ctx) -> dict:
    from gqaprune.evaluation.humaneval import evaluate_humaneval
    from gqaprune.evaluation.sandbox import SandboxLimits

    limits = SandboxLimits(wall_s=e.sandbox_timeout_s, cpu_s=e.sandbox_timeout_s, memory_mb=e.sandbox_memory_mb,
                           require_no_network=e.sandbox_network == "require")
    result = evaluate_humaneval(model, tokenizer, e.humaneval_problems, e.humaneval_max_new_tokens, e.batch_size,
                                limits, ctx)
    return result


def _tasks(model, tokenizer, e: EvaluateParams, ctx) -> dict:
    from gqaprune.evaluation.tasks import evaluate_tasks, resolve_tasks

    tasks = resolve_tasks(e.tasks, e.task_include_path)
    return evaluate_tasks(model, tokenizer, tasks, e.batch_size, e.task_limit, e.task_include_path, ctx,
                          e.task_num_fewshot)


def scalars(result: dict) -> dict:
    """The numbers of a result for the metrics file (``dvc exp show``): no texts, no per-problem lists."""
    out: dict = {}
    if "ppl" in result:
        out["ppl"] = {name: r["ppl"] for name, r in result["ppl"].items()}
        out["log_ppl_se"] = {name: r["log_ppl_se"] for name, r in result["ppl"].items()}
    if "instructions" in result:
        r = result["instructions"]
        out["instruction_nll"] = round(r["nll"], 5)
        out["instruction_nll_se"] = round(r["se"], 5)
    if "generation" in result:
        out["generation"] = {k: round(v, 4) for k, v in result["generation"].items() if isinstance(v, float)}
    if "humaneval" in result:
        h = result["humaneval"]
        out["humaneval"] = {k: h[k] for k in ("pass_at_1", "passed", "problems", "timeouts", "loops") if k in h}
    if "tasks" in result:
        out["tasks"] = {task: {"metric": r["metric"], "value": round(r["value"], 5), "stderr": round(r["stderr"], 5),
                               "n": r["n"]} for task, r in result["tasks"].items()}
    return out


def retention(model: dict, dense: dict) -> dict:
    """``model``'s figures relative to ``dense`` (both :func:`scalars`): task scores and pass@1 as % of dense,
    perplexity, instruction NLL and loop rate as ratios (x dense)."""
    def pct(a, b):
        return None if b in (None, 0) or a is None else round(100.0 * a / b, 1)

    def ratio(a, b):
        return None if b in (None, 0) or a is None or not math.isfinite(b) else round(a / b, 4)

    out: dict = {}
    if "ppl" in model and "ppl" in dense:
        out["ppl_x_dense"] = {k: ratio(v, dense["ppl"].get(k)) for k, v in model["ppl"].items()}
    if "instruction_nll" in model and "instruction_nll" in dense:
        out["instruction_nll_x_dense"] = ratio(model["instruction_nll"], dense["instruction_nll"])
    if "tasks" in model and "tasks" in dense:
        out["tasks_pct_of_dense"] = {t: pct(r["value"], dense["tasks"].get(t, {}).get("value"))
                                     for t, r in model["tasks"].items()}
    if "humaneval" in model and "humaneval" in dense:
        out["humaneval_pct_of_dense"] = pct(model["humaneval"]["pass_at_1"], dense["humaneval"]["pass_at_1"])
    if "generation" in model and "generation" in dense:
        g, d = model["generation"], dense["generation"]
        out["loop_rate_minus_dense"] = round(g["loop_rate"] - d["loop_rate"], 4)
    return out

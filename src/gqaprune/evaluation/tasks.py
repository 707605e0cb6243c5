"""Task accuracy through lm-evaluation-harness (``lm-eval`` 0.4.13) on the model already in memory.

* :data:`SUITES` -- named task lists with the metric each reports (``zeroshot7``).
* :func:`resolve_tasks` -- ``evaluate.tasks`` (tasks, tags, groups, suites) to ``{task: metric}``, checked
  against lm-eval's task index (with ``evaluate.task_include_path`` for local YAML tasks).
* :func:`check_offline` -- with the hub unreachable, refuse at once (one line) tasks whose data is not local.
* :func:`evaluate_tasks` -- ``{task: {"metric", "value", "stderr", "n"}}`` of the model object given
  (``HFLM`` around it: no reload, no copy), batched, on its device; on N ranks each scores a share.

lm-eval is imported inside the functions (its import and its index of ~14k task YAMLs cost 10-25 s of
CPU; the index is built once per process). Seeds are fixed (lm-eval's defaults) and the caller's RNG
states restored: equal inputs give equal numbers. Nothing is cached or pushed anywhere; lm-eval's logs
go to the ``gqaprune`` logger at DEBUG (errors at their level), progress bars are off.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gqaprune.errors import InputError
from gqaprune.evaluation.task_files import find_task_configs, is_local
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.hub import hub_reachable

log = logging.getLogger("gqaprune")

__all__ = ["SUITES", "check_offline", "evaluate_tasks", "resolve_tasks"]

#: Named suites: task -> the metric reported. ``zeroshot7`` is the commonsense set of LLM-Pruner's
#: tables (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA, 0-shot) with SliceGPT's metric
#: convention (microsoft/TransformerCompression, ``experiments/run_lm_eval.py``, ``TASK_METRIC_MAP``):
#: ``acc_norm`` wherever lm-eval reports it (PIQA, HellaSwag, ARC-e, ARC-c, OBQA), ``acc`` otherwise
#: (BoolQ, WinoGrande). Note ARC-e is ``acc_norm`` here; some papers print ARC-e ``acc``.
SUITES: dict[str, dict[str, str]] = {
    "zeroshot7": {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc",
                  "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
}
_FIX = ("run where the Hugging Face hub is reachable, give local tasks through evaluate.task_include_path "
        "(dataset_path: json with local data_files), or remove them from evaluate.tasks")
#: lm-eval's bootstrap iterations (its default) for the standard error of metrics that are not means;
#: acc / acc_norm use the closed form std / sqrt(n) whatever this is
BOOTSTRAP_ITERS = 100_000


# --- names ------------------------------------------------------------------------------------------
def _expand(names: Sequence[str]) -> dict[str, str | None]:
    """Suites expanded in place: ``{name: suite metric or None}`` in first-seen order."""
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise InputError(f"evaluate.tasks must be a list of task names or suites ({', '.join(SUITES)}), "
                         f"got {names!r}")
    out: dict[str, str | None] = {}
    for name in (n.strip() for n in names):
        for task, metric in (SUITES[name].items() if name in SUITES else [(name, None)]):
            out.setdefault(task, metric)
    return out


def _include(include_path: str | os.PathLike | None) -> str | None:
    """The include folder, absolute; refused when it is not a folder."""
    if include_path is None:
        return None
    path = Path(include_path).expanduser().resolve()
    if not path.is_dir():
        raise InputError(f"evaluate.task_include_path: {include_path} is not a folder; give the folder of the "
                         "task YAML files or null")
    return str(path)


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None, defaults: bool = True):
    """lm-eval's task index of ``include`` (+ its own tasks with ``defaults``: 10-25 s of YAML parsing, once)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=include, include_defaults=defaults)


def _manager_for(names, include: str | None):
    """The include folder's own index when it defines every name as a task (no 10-25 s), else the full one
    (the include folder overrides lm-eval's tasks of the same name either way)."""
    if include:
        from lm_eval.tasks._index import Kind

        own = _task_manager(include, False)
        if all(n in own.task_index and own.task_index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names):
            return own
    return _task_manager(include)


def _metric_of(cfg: dict) -> str:
    """acc_norm when the task reports it, else acc, else its first metric."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY as DEFAULTS  # metrics without a metric_list

    listed = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    listed = listed or DEFAULTS.get(cfg.get("output_type", "generate_until"), ["exact_match"])
    return next((m for m in ("acc_norm", "acc") if m in listed), str(listed[0]))


def resolve_tasks(names: Sequence[str], include_path: str | None = None) -> dict[str, str]:
    """``{task: reported metric}`` for the names of ``evaluate.tasks``, in order.

    Suites (:data:`SUITES`) expand to their tasks and metrics; a tag expands to its tasks (sorted); a
    group stays one entry reported by its aggregate. Other tasks report ``acc_norm`` when they have it,
    else ``acc``, else their first metric. Every name must be in lm-eval's index (with ``include_path``);
    unknown names are refused together in one line with close matches.
    """
    from lm_eval.tasks._index import Kind

    wanted = _expand(names)
    manager = _manager_for(wanted, _include(include_path))
    index = manager.task_index
    unknown = [n for n in wanted if n not in index]
    if unknown:
        hints = "; ".join(f"{n!r} (close: {', '.join(difflib.get_close_matches(n, manager.all_tasks, 3)) or '-'})"
                          for n in unknown)
        raise InputError(f"evaluate.tasks: unknown lm-eval task {hints}; use names from `lm-eval ls tasks` or "
                         "a suite (" + ", ".join(SUITES) + "), local tasks through evaluate.task_include_path")
    out: dict[str, str] = {}
    for name, metric in wanted.items():
        entry = index[name]
        if entry.kind == Kind.TAG:
            for task in sorted(entry.tags):
                out.setdefault(task, _metric_of(index[task].cfg or {}))
        elif entry.kind == Kind.GROUP:
            aggregates = (entry.cfg or {}).get("aggregate_metric_list")
            if not aggregates:
                raise InputError(f"evaluate.tasks: group {name!r} reports no aggregate metric; list its tasks "
                                 "instead")
            out.setdefault(name, metric or _metric_of({"metric_list": aggregates}))
        else:
            out.setdefault(name, metric or _metric_of(entry.cfg or {}))
    return out


# --- offline check -----------------------------------------------------------------------------
def check_offline(tasks: Sequence[str] | dict[str, str], include_path: str | None = None) -> None:
    """With the hub unreachable, refuse (one line) every task whose dataset is not local; else nothing.

    Meant before any model work: lm-eval is not imported; the task YAMLs are found by their ``task:`` /
    ``group:`` / ``tag:`` lines (include folder first) and read as lm-eval reads them (includes merged).
    A group or tag is local when all its tasks are; unknown names are left to :func:`resolve_tasks`.
    See :func:`gqaprune.evaluation.task_files.is_local` for what counts as local.
    """
    if hub_reachable():
        return
    wanted = list(_expand(list(tasks)))
    found = find_task_configs(wanted, _include(include_path))
    wanted = [n for n in wanted if found.get(n)]
    configs = {n: found[n][0] if len(found[n]) == 1 else
               ({"custom_dataset": True} if all(map(is_local, found[n])) else {}) for n in wanted}
    hub = [n for n in wanted if not is_local(configs.get(n, {}))]
    if hub:
        raise InputError(f"evaluate.tasks: the Hugging Face hub is unreachable and {', '.join(hub)} "
                         f"read{'s' if len(hub) == 1 else ''} data from it; {_FIX}")


# --- evaluation -------------------------------------------------------------------------------------
class _Forward(logging.Handler):
    """lm-eval's records re-emitted on the ``gqaprune`` logger: DEBUG below ERROR (its INFO/WARNING chatter
    about pre-initialised models is expected here), errors at their level."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno >= logging.ERROR else logging.DEBUG
        log.log(level, "lm-eval: %s", record.getMessage())


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's logs to the gqaprune logger, its (and datasets') progress bars off; restored afterwards."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task

    lm_log = logging.getLogger("lm_eval")
    saved = (lm_log.handlers[:], lm_log.propagate, lm_log.level)
    lm_log.handlers, lm_log.propagate = [_Forward()], False
    lm_log.setLevel(logging.INFO)
    import lm_eval.models.huggingface as hf

    bars = {m: m.tqdm for m in (lm_eval.api.model, lm_eval.api.task, hf)}
    bars_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    for module in bars:
        module.tqdm = _no_bar
    try:
        yield
    finally:
        for module, bar in bars.items():
            module.tqdm = bar
        if bars_on:
            datasets.utils.logging.enable_progress_bar()
        lm_log.handlers, lm_log.propagate = saved[:2]
        lm_log.setLevel(saved[2])


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """lm-eval's default seeds (python 0, numpy / torch 1234) inside; the callers' RNG states restored after."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@functools.lru_cache(maxsize=1)
def _lm_class():
    """``HFLM`` on a model object, its ranks and collectives taken from a :class:`DistContext`."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        """lm-eval's HF model around the caller's model object; ``ctx`` supplies rank / world size, gathers
        and barriers (lm-eval would use an ``accelerate`` process group, which a model object never gets)."""

        def __init__(self, model, tokenizer, batch_size: int, ctx: DistContext, data_parallel: bool):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_batch_size=batch_size, logits_cache=True)
            self._ctx = ctx
            if data_parallel:  # documents strided over the ranks (lm-eval's islice(rank, None, world))
                self._rank, self._world_size = ctx.rank, ctx.world_size

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            parts = self._ctx.all_gather_object(tensor.detach().cpu())
            return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in parts])  # as accelerate's gather

        def gather_object(self, obj, dst=0):
            return self._ctx.all_gather_object(obj) if self.world_size > 1 else [obj]

        def barrier(self):
            if self.world_size > 1:
                self._ctx.barrier()

    return InMemoryLM


def _pick(row: dict, metric: str) -> tuple[float, float]:
    """(value, stderr) of ``metric`` in lm-eval's row ``{"acc,none": .., "acc_stderr,none": ..}``."""
    key = next((k for k in row if k.split(",")[0] == metric), None)
    if key is None:
        shown = sorted({k.split(",")[0] for k in row if "," in k and "_stderr" not in k})
        raise InputError(f"evaluate.tasks: the task reports {shown}, not {metric!r}; choose a task that reports it")
    flt = key.split(",", 1)[1]
    err = row.get(f"{metric}_stderr,{flt}")
    return float(row[key]), float(err) if isinstance(err, (int, float)) else float("nan")


def evaluate_tasks(model, tokenizer, tasks: dict[str, str], batch_size: int = 8, limit: int | None = None,
                   include_path: str | None = None, ctx: DistContext | None = None,
                   num_fewshot: int = 0) -> dict[str, dict[str, Any]]:
    """``{task: {"metric", "value", "stderr", "n"}}`` of the in-memory ``model`` on ``tasks`` (from
    :func:`resolve_tasks`); ``value`` and ``stderr`` are fractions in [0, 1] for accuracies, ``n`` documents.

    The model object itself is wrapped (``HFLM(pretrained=model)``: no load, no copy, no device or dtype
    change; inputs go to ``model.device``); the tokenizer is copied (lm-eval may give it a pad token).
    ``batch_size`` requests a forward; ``limit`` caps the documents per task (lm-eval's first ``limit``).
    N ranks (``ctx``) on a replicated model: each rank scores every ``world_size``-th document and the
    per-document metrics are gathered, so every rank returns the one-process numbers (float summation
    order aside). An FSDP-sharded model cannot run different documents per rank (its forwards are
    collective), so there every rank scores every document: the same numbers, no speed-up.
    """
    from gqaprune.runtime.placement import is_sharded

    ctx = ctx or single_process()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"evaluate.batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"evaluate.task_limit must be a positive integer or null (all documents), got {limit!r}")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise InputError(f"evaluate.task_num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if not tasks:
        return {}
    include = _include(include_path)
    data_parallel = ctx.is_distributed and not is_sharded(model)
    was_training = model.training
    try:
        results = _run(model, tokenizer, list(tasks), batch_size, limit, include, ctx, data_parallel, num_fewshot)
    finally:
        model.train(was_training)  # HFLM switched it to eval mode
    if data_parallel:  # lm-eval aggregates on rank 0 only
        results = ctx.broadcast_object(results if ctx.is_main else None)
    out: dict[str, dict[str, Any]] = {}
    for name, metric in tasks.items():
        value, stderr = _pick(results["results"][name], metric)
        leaves = results.get("group_subtasks", {}).get(name) or [name]
        n = sum(int(results["n-samples"][t]["effective"]) for t in leaves if t in results["n-samples"])
        out[name] = {"metric": metric, "value": value, "stderr": stderr, "n": n}
    return out


def _run(model, tokenizer, tasks, batch_size, limit, include, ctx, data_parallel, num_fewshot) -> dict | None:
    """lm-eval's ``evaluate`` on the wrapped model; its results dict on rank 0 (None elsewhere when data-parallel)."""
    from lm_eval import evaluator

    with _quiet(), _seeded():
        manager = _manager_for(tasks, include)
        with ctx.main_first():  # rank 0 fills the datasets cache first
            loaded = manager.load(list(tasks))
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:  # a task fixed at 0 shots stays so (as simple_evaluate)
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=1234)
        lm = _lm_class()(model, copy.deepcopy(tokenizer), batch_size, ctx, data_parallel)
        return evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                                  log_samples=False, cache_requests=False)

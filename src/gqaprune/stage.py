"""Running one pipeline stage: arguments, params, logging, outputs committed together, one-line errors.

``stages/<name>.py`` (what ``dvc.yaml`` runs) and ``gqaprune <name>`` both end here. A stage:

1. parses ``--params`` / ``--set section.key=value`` (repeatable, as ``dvc exp run -S``) / ``--debug``;
2. validates the whole params file (every bad key in one message) before importing anything heavy;
3. logs to ``artifacts/logs/<name>.log`` (the full traceback of a failure goes there) and to stderr;
4. writes its outputs staged and replaces the old ones only when it succeeded
   (:func:`gqaprune.artifacts.stage_outputs`);
5. on failure prints one line, ``error: <message>``, and exits 1; ``--debug`` (or ``GQAPRUNE_DEBUG=1``)
   prints the traceback too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import GqapruneError
from .params import Params, describe, load_params
from .recipes import LOG_DIR, STAGES, StageInfo

log = logging.getLogger("gqaprune")

DEBUG_ENV = "GQAPRUNE_DEBUG"


def debugging(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or ``GQAPRUNE_DEBUG`` set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def stage_logging(stage: str) -> Iterator[Path]:
    """Log to ``artifacts/logs/<stage>.log`` and stderr for the duration of a stage; times it.

    A failure's traceback goes to the log file only; the console gets the one-line error from
    :func:`report_error`.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / f"{stage}.log"
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(f"[{stage}] %(message)s"))
    console.addFilter(lambda record: not record.exc_info)
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        yield path
    except BaseException:
        log.error("stage %s failed", stage, exc_info=True)
        raise
    finally:
        log.info("stage %s took %.1f s", stage, time.perf_counter() - start)
        root.removeHandler(handler)
        root.removeHandler(console)
        handler.close()


def report_error(exc: BaseException, stage: str | None, debug: bool) -> int:
    """Print one line for ``exc`` (and the traceback when debugging); returns the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted; the stage's previous outputs are unchanged", file=sys.stderr)
        return 130
    where = f" (traceback in {LOG_DIR / stage}.log; --debug prints it)" if stage and not debug else ""
    if isinstance(exc, GqapruneError):
        print(f"error: {exc}", file=sys.stderr)
    else:  # not an error the toolkit expects: say so, still in one line
        message = " ".join(str(exc).split()) or "(no message)"
        print(f"error: unexpected {type(exc).__name__}: {message}{where}", file=sys.stderr)
    return 1


def run_stage(name: str, run: Callable, params: Params) -> None:
    """Run one stage's recipe with logging, its outputs staged and committed together."""
    from .artifacts import stage_outputs

    info = STAGES[name]
    with stage_logging(name):
        log.info("params: %s", json.dumps(dataclasses.asdict(params), default=str))
        with stage_outputs(info.outputs) as out:
            run(params, out)


def execute(name: str, run: Callable | None, params_path: Path, overrides: list[str], debug: bool) -> int:
    """Parse params and run stage ``name``; returns the process exit code (errors reported in one line)."""
    debug = debugging(debug)
    try:
        params = load_params(params_path, overrides)
        if run is None:
            import importlib

            run = importlib.import_module(f"gqaprune.recipes.{name}").run
        run_stage(name, run, params)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        return report_error(exc, name, debug)
    return 0


def help_text(info: StageInfo) -> str:
    """The --help text of a stage: what it does, its outputs and every params key it reads."""
    keys = "\n\n".join(f"{cls.section}: {describe(cls)}" for cls in info.sections)
    outs = ", ".join(info.outputs)
    return f"{info.summary}\n\nWrites: {outs}\n\nParams read:\n\n{keys}"


def stage_main(name: str, run: Callable) -> None:
    """Entry point of ``stages/<name>.py``: run the stage with the process's arguments, exit with its code."""
    import typer

    info = STAGES[name]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help=help_text(info))
    def main(
        params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read."),
        set_: list[str] = typer.Option([], "--set", "-S", help="Override one value, e.g. -S plan.ratio=0.3."),
        debug: bool = typer.Option(False, "--debug", help="Print the traceback of a failure."),
    ) -> None:
        code = execute(name, run, params, set_, debug)
        # Every output is written, closed and renamed by now, and the logs are closed. Tearing down
        # the interpreter (torch, CUDA, tokenizers' thread pools) took ~10 s per stage process on the
        # GPU machine (benchmarks/GPU_STAGES.md), so the stage process ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    app(prog_name=f"stages/{name}.py")

"""Running one pipeline stage: arguments, params, logging, outputs committed together, one-line errors.

``stages/<name>.py`` (what ``dvc.yaml`` runs) and ``gqaprune <name>`` both end here. A stage:

1. parses ``--params`` / ``--set section.key=value`` (repeatable, as ``dvc exp run -S``) / ``--debug``;
2. validates the whole params file (every bad key in one message) before importing anything heavy;
3. takes the stage's lock (``artifacts/logs/<name>.lock``, ``fcntl.flock``): one writer per output, a
   second run of the stage refuses at once, naming the pid of the first (:func:`stage_lock`);
4. logs to ``artifacts/logs/<name>.log`` (the full traceback of a failure goes there) and to stderr;
5. removes what a killed run left (staged and temporary siblings of its outputs whose pid no longer
   runs), writes its outputs staged and replaces the old ones only when it succeeded
   (:func:`gqaprune.pipeline.artifacts.stage_outputs`);
6. on failure prints one line, ``error: <message>``, and exits 1; ``--debug`` (or ``GQAPRUNE_DEBUG=1``)
   prints the traceback too. SIGINT and SIGTERM stop the stage the same way: the staged outputs are
   dropped and one line says so (exit code 130 / 143).

A stage that loads the model (``Stage.loads_model``: a model stage not switched off) runs on
``distributed.nproc_per_node`` x ``nnodes`` processes when the params ask for more than one: the command
re-runs itself as that many ranks under torchrun (:func:`gqaprune.runtime.launch.launch`; a process that
already is a rank just runs), each rank joins the process group (NCCL on CUDA, gloo on CPU) and runs the
recipe with its :class:`~gqaprune.runtime.distributed.DistContext`. Rank 0 logs to the console and
``<stage>.log``, rank N to ``artifacts/logs/<stage>.rank<N>.log`` only (its stdout and stderr too). Only
rank 0 writes and commits the outputs, and only after every rank agreed that it finished. A failing rank
records its error line (``<stage>.rank<N>.error.json``) and aborts the process group, so the job ends at
once; the launching process prints the first failure's line and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gqaprune.config.loading import describe, load_params, with_data_dir_resolved
from gqaprune.config.sections import DistributedParams, Params
from gqaprune.errors import GqapruneError
from gqaprune.pipeline.stages import LOG_DIR, MULTI_PROCESS, STAGES, Stage
from gqaprune.runtime.distributed import LAUNCHED_ENV, PeerFailed, Stopped, launched, single_process
from gqaprune.runtime.launch import under_launcher

log = logging.getLogger("gqaprune")

DEBUG_ENV = "GQAPRUNE_DEBUG"
#: what a rank's error looks like when another rank failed first (it is then not the cause)
_PEER_GONE = ("closed by peer", "reset by peer", "remote worker", "ncclRemoteError", "was aborted", "Broken pipe")


class StageBusyError(GqapruneError):
    """Another process is running the same stage (it holds the stage's lock)."""


def debugging(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or ``GQAPRUNE_DEBUG`` set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get(LAUNCHED_ENV[0], "0")) if launched() else 0


def log_path(stage: str, rank: int = 0) -> Path:
    """``artifacts/logs/<stage>.log`` (rank 0, or one process), ``<stage>.rank<N>.log`` for rank N."""
    return LOG_DIR / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")


def _error_record(stage: str, rank: int) -> Path:
    return LOG_DIR / f"{stage}.rank{rank}.error.json"


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextmanager
def stage_logging(stage: str, ctx=None) -> Iterator[Path]:
    """Log to ``artifacts/logs/<stage>.log`` and stderr for the duration of a stage; times it.

    A failure's traceback goes to the log file only; the console gets the one-line error from
    :func:`report_error`. On N ranks (``ctx``) rank N > 0 logs to ``<stage>.rank<N>.log`` only, with its
    stdout and stderr, and a failing rank records its error line for the launching process.
    """
    rank = ctx.rank if ctx is not None else 0
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = log_path(stage, rank)
    path.write_text("")
    handler = logging.FileHandler(path, mode="a")  # appends, like the redirected output of rank N
    prefix = f"[rank {rank}] " if ctx is not None and ctx.is_distributed else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    handlers = [handler]
    if rank == 0:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(f"[{stage}] %(message)s"))
        console.addFilter(lambda record: not record.exc_info)
        handlers.append(console)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        with _output_to(path) if rank else _nothing():
            try:
                yield path
            except BaseException as exc:
                log.error("stage %s failed", stage, exc_info=True)
                if ctx is not None and ctx.is_distributed:
                    _record_failure(stage, rank, exc, path)
                raise
            finally:
                log.info("stage %s took %.1f s", stage, time.perf_counter() - start)
    finally:
        for h in handlers:
            root.removeHandler(h)
        handler.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _secondary(exc: BaseException) -> bool:
    """Whether ``exc`` only says that another rank failed first (that rank reports the cause)."""
    return isinstance(exc, Stopped | PeerFailed) or any(marker in str(exc) for marker in _PEER_GONE)


def _record_failure(stage: str, rank: int, exc: BaseException, path: Path) -> None:
    """Write this rank's error line (with the time it failed) for the launching process to report."""
    record = {"time": time.time(), "rank": rank, "secondary": _secondary(exc),
              "line": error_line(exc, path, debug=False)}
    try:
        _error_record(stage, rank).write_text(json.dumps(record) + "\n")
    except OSError:
        log.debug("could not record the failure", exc_info=True)


def error_line(exc: BaseException, log_file: Path | None, debug: bool, stage: str | None = None) -> str:
    """The one line that reports ``exc``: ``error: <message>`` (and where its traceback is)."""
    outputs = f"the previous outputs of {stage} are unchanged" if stage else "nothing was written"
    if isinstance(exc, KeyboardInterrupt):
        return f"error: stopped by SIGINT (Ctrl-C); {outputs}"
    if isinstance(exc, Stopped):
        return f"error: {exc}; {outputs}"
    if isinstance(exc, GqapruneError):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"error: no space left on the disk while writing {exc.filename or 'the outputs'}; free space and "
                f"run it again ({outputs})")
    where = f" (traceback in {log_file}; --debug prints it)" if log_file and not debug else ""
    message = " ".join(str(exc).split()) or "(no message)"  # not an error the toolkit expects: still one line
    return f"error: unexpected {type(exc).__name__}: {message}{where}"


def report_error(exc: BaseException, stage: str | None, debug: bool) -> int:
    """Print one line for ``exc`` (and the traceback when debugging); returns the exit code.

    A rank started by :func:`gqaprune.runtime.launch.launch` prints no line (the launching process prints
    the first failure's); a rank of a job started by hand prints its line unless it only saw another
    rank fail (then rank 0 says so).
    """
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    code = 130 if isinstance(exc, KeyboardInterrupt) else 143 if isinstance(exc, Stopped) else 1
    rank = _rank()
    line = error_line(exc, log_path(stage, rank) if stage else None, debug, stage)
    if under_launcher():
        if stage and not _error_record(stage, rank).exists():  # failed before its log was set up (joining)
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            with open(log_path(stage, rank), "a") as f:
                traceback.print_exception(exc, file=f)
            _record_failure(stage, rank, exc, log_path(stage, rank))
        return code
    if launched() and _secondary(exc):
        if rank == 0:
            print(f"error: another rank failed; see {LOG_DIR / stage}.rank*.log", file=sys.stderr)
        return code
    print(line if rank == 0 else line.replace("error: ", f"error: rank {rank}: ", 1), file=sys.stderr)
    return code


def _launched_failure(stage: str, since: float, code: int, processes: int) -> str:
    """The line reporting a failed N-rank run: the first failing rank's (a cause before a consequence)."""
    records = []
    for file in LOG_DIR.glob(f"{stage}.rank*.error.json"):
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if record.get("time", 0) >= since - 1:
            records.append(record)
    if not records:
        return (f"error: stage {stage} failed on {processes} processes (exit code {code}) without an error "
                f"message (a rank was killed: out of memory?); see {LOG_DIR / stage}*.log")
    first = min(records, key=lambda r: (r.get("secondary", False), r["time"]))
    line, rank = first["line"], first.get("rank", 0)
    return line if rank == 0 else line.replace("error: ", f"error: rank {rank}: ", 1)


def _stage_device(name: str, params: Params) -> str:
    """The ``device`` key of the stage's own params section ('auto' when it has none)."""
    for cls in STAGES[name].sections:
        device = getattr(getattr(params, cls.section), "device", None)
        if device is not None:
            return device
    return "auto"


@contextmanager
def _processes(name: str, params: Params):
    """This process's context for stage ``name``: one process, a rank of the process group, or None
    (a rank other than 0 of a one-process stage started under torchrun: nothing to do)."""
    if not launched():
        yield single_process()
        return
    if name not in MULTI_PROCESS:
        yield single_process() if _rank() == 0 else None
        return
    from gqaprune.runtime.distributed import process_group

    with process_group(_stage_device(name, params), params.distributed.timeout_s) as ctx:
        yield ctx


def _lock_holder(fd: int) -> str:
    """The pid written into a lock file by the process that holds it ('?' when it has not written it yet)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text or "?"


@contextmanager
def stage_lock(stage: str) -> Iterator[None]:
    """Hold ``artifacts/logs/<stage>.lock`` for the block; refuses at once while another process holds it.

    ``fcntl.flock``: the kernel releases it when its holder exits, however it exits (SIGKILL included), so
    a stale lock cannot exist. The holder's pid is written into the file for the refusal's message.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOG_DIR / f"{stage}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageBusyError(f"stage {stage} is already running (pid {_lock_holder(fd)}); wait for it or stop "
                                 "it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _raise_on_sigterm(signum, frame) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _stoppable() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` inside the stage for the block (SIGINT raises KeyboardInterrupt), so
    the staged outputs are dropped and the stage says so; ranks of a job get this from their process group."""
    if threading.current_thread() is not threading.main_thread() or launched():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(name: str, run: Callable, params: Params) -> None:
    """Run one stage's recipe with its lock held (by the process that commits the outputs), logging, its
    outputs staged and committed together (by the main rank, once every rank agreed that it finished)."""
    from gqaprune.pipeline.artifacts import stage_outputs

    info = STAGES[name]
    with _processes(name, params) as ctx:
        if ctx is None:
            return
        with stage_lock(name) if ctx.is_main else _nothing(), stage_logging(name, ctx):
            log.info("params: %s", json.dumps(dataclasses.asdict(params), default=str))
            if ctx.is_distributed:
                log.info("%d processes (%s); this one: %s", ctx.world_size, params.distributed.placement, ctx)
            with stage_outputs(info.outputs, commit=ctx.is_main) as out:
                run(params, out, ctx)
                ctx.agree(True)  # every rank finished: only now may the main rank commit


def rank_command(name: str, params_path: Path, overrides: list[str], debug: bool) -> list[str]:
    """The command each rank runs (after ``python``): this stage through :mod:`gqaprune.pipeline.runner`."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return ["-m", "gqaprune.pipeline.runner", name, "--params", str(params_path), *sets,
            *(["--debug"] if debug else [])]


def execute(name: str, run: Callable | None, params_path: Path, overrides: list[str], debug: bool,
            argv: list[str] | None = None) -> int:
    """Parse params and run stage ``name``; returns the process exit code (errors reported in one line).

    When the params ask for several processes (a model stage, not already a rank), the stage re-runs as
    ``python <argv>`` on each rank under torchrun (default :func:`rank_command`) and this returns the
    job's exit code, printing the first failing rank's line.
    """
    raw_debug, debug = debug, debugging(debug)
    try:
        params = with_data_dir_resolved(load_params(params_path, overrides), params_path)
        if STAGES[name].loads_model(params) and params.distributed.processes > 1 and not launched():
            # torch's elastic agent forwards SIGINT / SIGTERM to the ranks, which stop as below
            code = _launch(name, params.distributed, argv or rank_command(name, params_path, overrides, raw_debug))
            if code is not None:
                return code
        with _stoppable():
            if run is None:
                import importlib

                run = importlib.import_module(f"gqaprune.pipeline.recipes.{name}").run
            run_stage(name, run, params)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        return report_error(exc, name, debug)
    return 0


def _launch(name: str, params: DistributedParams, argv: list[str]) -> int | None:
    """Run the stage on ``params.nproc_per_node`` ranks here; the exit code (None: run in this process)."""
    from gqaprune.runtime.launch import launch

    for stale in LOG_DIR.glob(f"{name}.rank*.error.json"):
        stale.unlink(missing_ok=True)
    since = time.time()
    code = launch(params, argv)
    if code:
        print(_launched_failure(name, since, code, params.processes), file=sys.stderr)
    return code


def help_text(info: Stage) -> str:
    """The --help text of a stage: what it does, its outputs and every params key it reads."""
    sections = list(info.sections)
    if info.multi_process:
        sections.append(DistributedParams)
    keys = "\n\n".join(f"{cls.section}: {describe(cls)}" for cls in sections)
    outs = ", ".join(info.outputs)
    return f"{info.summary}\n\nWrites: {outs}\n\nParams read:\n\n{keys}"


def stage_main(name: str, run: Callable | None = None) -> None:
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


# what each rank runs: python -m gqaprune.pipeline.runner <name> [--params ...] [--set ...] [--debug]
if __name__ == "__main__":
    from gqaprune.pipeline.runner import stage_main as _main

    _main(sys.argv.pop(1))

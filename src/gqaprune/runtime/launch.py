"""Starting a stage's ranks: the command re-runs itself under torchrun (torch's elastic agent, in-process).

:func:`launch` runs when ``distributed.nproc_per_node > 1`` or ``nnodes > 1`` and this process is not
already a rank. How a job is started changes no result (the ranks compute what one process would, up
to float summation order), so this module is not a code dependency of any pipeline stage.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence

from gqaprune.config.sections import DistributedParams
from gqaprune.runtime.distributed import launched

log = logging.getLogger("gqaprune")

#: set to 1 to make :func:`launch` never re-run (run in this process whatever the params say)
NO_LAUNCH_ENV = "GQAPRUNE_NO_LAUNCH"
#: set by :func:`launch` for its ranks: the launching process reports a failure, not the ranks
LAUNCHER_ENV = "GQAPRUNE_LAUNCHER"


def under_launcher() -> bool:
    """True when this rank was started by :func:`launch` (which then reports the job's failure)."""
    return launched() and os.environ.get(LAUNCHER_ENV) == "1"


def launch_config(params: DistributedParams):
    """torch's elastic ``LaunchConfig`` equal to ``torchrun`` with these params (see :func:`torchrun_command`)."""
    from torch.distributed.launcher.api import LaunchConfig

    params.validate()
    if params.nnodes == 1 and params.rdzv_endpoint is None:  # torchrun --standalone
        backend, endpoint, run_id, configs = "c10d", "localhost:0", str(uuid.uuid4()), {}
    else:
        backend, endpoint, run_id = params.rdzv_backend, params.rdzv_endpoint, params.rdzv_id
        configs = {"rank": params.node_rank} if params.rdzv_backend == "static" else {}
    return LaunchConfig(min_nodes=params.nnodes, max_nodes=params.nnodes, nproc_per_node=params.nproc_per_node,
                        run_id=run_id, rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=configs,
                        max_restarts=0, monitor_interval=0.1, start_method="spawn")


def torchrun_command(params: DistributedParams, argv: Sequence[str]) -> list[str]:
    """The ``torchrun`` command line equal to :func:`launch` of ``argv`` (for logs and manual runs)."""
    cmd = ["torchrun", f"--nproc_per_node={params.nproc_per_node}"]
    if params.nnodes == 1 and params.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={params.nnodes}", f"--rdzv_backend={params.rdzv_backend}",
                f"--rdzv_endpoint={params.rdzv_endpoint}", f"--rdzv_id={params.rdzv_id}"]
        if params.node_rank is not None:
            cmd.append(f"--node_rank={params.node_rank}")
    argv = list(argv)
    return [*cmd, *(["-m"] if argv[:1] == ["-m"] else []), "--", *(argv[1:] if argv[:1] == ["-m"] else argv)]


def launch(params: DistributedParams, argv: Sequence[str]) -> int | None:
    """Run ``python <argv>`` as ``params.nproc_per_node`` ranks (on this host) under torchrun; the exit code.

    Returns None when this process should run the work itself: one process asked for, already a rank
    (e.g. a multi-host job started with ``torchrun`` by hand), or ``$GQAPRUNE_NO_LAUNCH=1``.
    Otherwise torch's elastic agent runs in this process (torchrun without its console noise): the
    ranks inherit stdout / stderr, a failing rank makes the agent stop the others at once (SIGTERM),
    SIGINT / SIGTERM sent here stop them too. 0 when every rank succeeded, else non-zero; the ranks
    see ``$GQAPRUNE_LAUNCHER=1`` (the caller reports their failure). ``OMP_NUM_THREADS`` defaults to
    the CPU cores divided among the ranks.
    """
    params.validate()
    if params.processes == 1 or launched() or os.environ.get(NO_LAUNCH_ENV) == "1":
        return None
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = launch_config(params)
    log.debug("launching: %s", " ".join(torchrun_command(params, argv)))
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher")]
    levels = [lg.level for lg in quiet]
    saved = {k: os.environ.get(k) for k in (LAUNCHER_ENV, "OMP_NUM_THREADS", "PYTHONUNBUFFERED")}
    os.environ[LAUNCHER_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params.nproc_per_node)))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for lg in quiet:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*argv)
        return 0
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

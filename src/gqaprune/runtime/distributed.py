"""Several processes: the process context, splitting work, reductions, and the torchrun launcher.

Every library function that touches a model takes an optional ``ctx`` (:class:`DistContext`); the
default, :func:`single_process`, is one process with no process group, where every helper is a no-op:
the single-process path *is* the multi-process path with world size 1.

* :class:`DistContext` -- rank, world size, local rank and device of this process, with the
  collectives the library needs (sum in place, sum into one rank, broadcast, barrier, agree) and the
  deterministic split of work (:meth:`~DistContext.shard`, :meth:`~DistContext.split_units`).
* :func:`process_group` -- a block run as one rank of a torchrun job: reads torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``...), initialises NCCL on CUDA or gloo on CPU, and tears
  it down; when the block raises, the group is *aborted* (never a blocking destroy) so the process
  exits at once and the launcher stops the other ranks.
Starting the ranks is :mod:`gqaprune.runtime.launch` (a stage re-runs itself under torchrun).

Importing this module does not import torch (the stages parse params and decide whether to launch
before anything heavy is loaded). Several hosts: nothing assumes one; devices come from
``LOCAL_RANK``, the global rank 0 writes files (the project must be on storage every host sees).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gqaprune")

#: variables that mark a process started by torchrun (or another launcher setting them)
LAUNCHED_ENV = ("RANK", "WORLD_SIZE")


class Stopped(BaseException):
    """This rank was told to stop (SIGTERM): the launcher ends the job because another rank failed."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the ranks of a job; every helper is collective when ``world_size > 1``.

    Build it with :func:`process_group` (under torchrun) or :func:`single_process`. Collective helpers
    must be called by every rank, in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: Any = None  # torch.device of this rank; None for a plain single process (the caller's choice)
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        """True when a process group of more than one rank is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that writes files and logs to the console."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}, {self.device}, {self.backend})"

    # --- splitting work ------------------------------------------------------------------------
    def shard(self, n: int, rank: int | None = None) -> range:
        """A rank's contiguous share of ``range(n)``: sizes differ by at most one, lower ranks larger.

        The shares of ranks 0..N-1, concatenated, are ``range(n)`` in order.
        """
        return shard_range(n, self.world_size, self.rank if rank is None else rank)

    def split_units(self, n_units: int, lockstep: bool = False) -> list[tuple[int, bool]]:
        """This rank's share of ``n_units`` indivisible units (micro-batches, windows) as ``(unit, active)``.

        With ``lockstep`` every rank gets as many units as the largest share, the missing ones
        *inactive* repeats of a real unit (unit 0 when the share is empty), to be run and ignored:
        FSDP all-gathers every layer on every rank's forward, so sharded ranks must run equally often.
        One process: every unit, active, in order.
        """
        mine = [(u, True) for u in self.shard(n_units)]
        if lockstep and self.is_distributed:
            most = len(shard_range(n_units, self.world_size, 0))
            pad = mine[0][0] if mine else 0
            mine += [(pad, False)] * (most - len(mine))
        return mine

    def batches(self, n: int, batch_size: int, lockstep: bool = False) -> list[tuple[slice, bool]]:
        """This rank's batches of ``n`` items as ``(slice, active)``: :meth:`split_units` over the
        batches ``[0, b), [b, 2b), ...`` one process would run (so every batch is the same as there)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        units = self.split_units(-(-n // batch_size), lockstep)
        return [(slice(u * batch_size, min((u + 1) * batch_size, n)), active) for u, active in units]

    # --- collectives ---------------------------------------------------------------------------
    def _comm_device(self):
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_(self, tensors, op: str = "sum") -> None:
        """Reduce ``tensors`` (one or a sequence) across ranks in place; ``op``: sum | max | min. No-op on one rank.

        Tensors of one dtype travel as one flat buffer over the backend's device (one collective per
        dtype) and are written back where they live.
        """
        if not self.is_distributed:
            return
        import torch
        import torch.distributed as dist

        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1).to(self._comm_device()) for t in group])
            dist.all_reduce(flat, op=reduce_op)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def reduce_to_(self, tensor, dst: int) -> None:
        """Sum ``tensor`` over the ranks into rank ``dst``'s copy, in place (the others' copies are left as
        they were, or undefined). No-op on one rank."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        buf = tensor.detach().to(self._comm_device())
        dist.reduce(buf, dst=dst)
        if self.rank == dst and buf.data_ptr() != tensor.data_ptr():
            tensor.copy_(buf)

    def broadcast_(self, tensor, src: int = 0) -> None:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor`` (same shape and dtype everywhere)."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        buf = tensor.detach().to(self._comm_device())
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != tensor.data_ptr():
            tensor.copy_(buf)

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank ``src``'s picklable ``obj``, on every rank."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def agree(self, ok: bool, message: str = "another rank failed") -> None:
        """Collective check: raise on every rank when ``ok`` is False on any (for what only some ranks see).

        The rank that saw the problem raises ``RuntimeError(message)``; the others raise
        :class:`PeerFailed`. On one rank: raise when not ``ok``.
        """
        if self.is_distributed:
            import torch

            flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
            self.all_reduce_(flag, op="max")
            if flag.item() > 0 and ok:
                raise PeerFailed(f"{message} (on another rank)")
        if not ok:
            raise RuntimeError(message)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, a cache to fill), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


class PeerFailed(RuntimeError):
    """A collective check failed on another rank (that rank reports the cause)."""


def shard_range(n: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(n)``; the first ``n % world_size`` ranks get one more."""
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: n={n}, world_size={world_size}, rank={rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


_SINGLE = DistContext()


def single_process() -> DistContext:
    """The context of a plain single-process run (no process group; every helper a no-op)."""
    return _SINGLE


def launched() -> bool:
    """True when this process is a rank started by torchrun (or a launcher that sets RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in LAUNCHED_ENV)


def rank_device(device: str = "auto"):
    """This rank's device: ``auto`` -> ``cuda:<LOCAL_RANK>`` when CUDA exists, else the CPU;
    ``cuda`` -> ``cuda:<LOCAL_RANK>``; anything else as given."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    return dev


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The context of this rank; initialises the default process group when started by torchrun with
    more than one rank (NCCL on CUDA, gloo on CPU; every collective bounded by ``timeout_s``).

    Without torchrun's environment this is :func:`single_process`.
    """
    if not launched():
        return single_process()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = rank_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
            if backend == "nccl":
                kwargs["device_id"] = dev  # eager NCCL initialisation; barriers know their device
            dist.init_process_group(**kwargs)
        else:
            backend = dist.get_backend()
    return DistContext(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, device=dev,
                       backend=backend)


def shutdown(failed: bool = False) -> None:
    """Tear the default process group down; after a failure *abort* it (never waits for the other ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if failed:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            try:
                abort()
                return
            except Exception:  # noqa: BLE001 - best effort: this rank is failing already
                log.debug("aborting the process group failed", exc_info=True)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Run a block as one rank of the job (``with process_group("auto") as ctx: ...``).

    Initialises the process group under torchrun (:func:`init`), turns SIGTERM into :class:`Stopped`
    (so cleanup runs when the launcher ends the job), and always tears the group down: after the
    block, every rank meets once more before the group is destroyed; when the block raises on this
    rank, the group is aborted and the error re-raised, so this process exits at once and the launcher
    stops the others instead of leaving them waiting in a collective until ``timeout_s``.
    """
    ctx = init(device, timeout_s)
    if not ctx.is_distributed:
        yield ctx
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield ctx
        ctx.barrier()  # nobody leaves while another rank may still need it
    except BaseException:
        shutdown(failed=True)
        raise
    else:
        shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)

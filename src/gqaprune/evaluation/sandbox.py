"""Running model-written programs: one process each, with limits, a throw-away folder and no network.

A program (e.g. a HumanEval completion followed by its tests) runs as ``python -I runner.py``, where
``runner.py`` is :data:`RUNNER` written by this module. The runner, in the child process and before any
model-written line runs:

1. sets resource limits: ``RLIMIT_CPU`` (soft ``cpu_s``: SIGXCPU, hard ``cpu_s + 1``: SIGKILL),
   ``RLIMIT_AS`` (``memory_mb``: allocations beyond it raise MemoryError), ``RLIMIT_FSIZE``
   (``file_mb``: a larger write fails with EFBIG) and ``RLIMIT_CORE`` 0;
2. isolates itself with ``unshare(2)`` (through ctypes; ``CLONE_NEWUSER`` added when not root):
   a new *network* namespace (only a loopback, down: every connect fails) and a new *mount* namespace
   in which every mount is made read-only (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``, after
   making propagation private so nothing leaks back) except a bind of the program's own folder;
3. installs :data:`GUARD`, which replaces obviously destructive calls (``os.system``, ``os.remove``,
   ``shutil.rmtree``, ``subprocess.Popen``, ``os.kill``, ``os.fork``...) by functions raising
   PermissionError and refuses opening files for writing outside the program's folder (the in-program
   layer; it catches accidents, not a determined adversary);
4. runs the program with ``exec`` and, only if it returns, writes a random marker to a file: a program
   that calls ``sys.exit(0)`` or ``os._exit(0)`` before its tests ran is *failed*, not passed.

The parent (:func:`run_program`) gives each program a fresh temporary folder (the cwd, ``HOME`` and
``TMPDIR``; removed afterwards), a minimal environment, ``stdin`` from /dev/null, output to files
(capped by the file-size limit, so an endless print cannot fill memory), its own session
(``start_new_session``) and a wall-time limit after which the whole process group is killed.

Which isolation works is probed once per process (:func:`network_isolation`,
:func:`filesystem_isolation`: a probe program must see only the loopback interface / fail to create a
file outside its folder). Without a network namespace, :class:`SandboxLimits` ``require_no_network``
refuses to run (:class:`gqaprune.errors.InputError`); otherwise a warning is logged once.
Not provided: a PID namespace (a program that forks past the guard and calls ``setsid`` outlives the
group kill) and a process-count limit (``RLIMIT_NPROC`` is per user and ignored for root).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gqaprune.errors import InputError

log = logging.getLogger("gqaprune")

__all__ = ["GUARD", "SandboxLimits", "SandboxResult", "filesystem_isolation", "network_isolation",
           "run_program", "run_programs"]

#: exit status of the runner when the isolation it was asked for cannot be set up
ISOLATION_FAILED = 121
STDERR_TAIL = 2000  # characters of stderr kept in a result

#: the in-program guard, run by the runner just before the program (``_work`` is the program's folder)
GUARD = r'''
def _install_guard(_work):
    import builtins, io, os, shutil, subprocess

    def _blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refuse

    disabled = {
        os: ["system", "popen", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
             "kill", "killpg", "fork", "forkpty", "setsid", "chmod", "chown", "lchown", "truncate",
             "link", "symlink", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
             "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "posix_spawn", "posix_spawnp", "setuid", "setgid", "seteuid"],
        shutil: ["rmtree", "move", "chown"],  # copies write through the guarded open()
        subprocess: ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
    }
    try:
        import resource
        disabled[resource] = ["setrlimit", "prlimit"]  # root could raise its own limits again
    except ImportError:
        pass
    for module, names in disabled.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _blocked(f"{module.__name__}.{name}"))

    work = os.path.realpath(_work)
    realpath, fspath = os.path.realpath, os.fspath

    def inside(path):
        if isinstance(path, int):  # an open descriptor: already allowed when it was opened
            return True
        p = realpath(fspath(path) if not isinstance(path, bytes) else path.decode(errors="replace"))
        return p == work or p.startswith(work + os.sep) or p == os.devnull

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing {file!r} outside the program's folder is disabled")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the program's folder is disabled")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
'''

#: the child-side launcher; argv[1] is its JSON configuration (see :func:`run_program`)
RUNNER = r'''
import json, os, resource, sys

cfg = json.loads(sys.argv[1])
marker = os.open(cfg["marker"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # before the mounts go read-only


def fail(step, err=0):
    os.write(2, f"sandbox: {step} failed ({os.strerror(err) if err else 'error'})\n".encode())
    os._exit(ISOLATION_FAILED)


def limit(res, value, hard=None):
    hard = value if hard is None else hard
    cur = resource.getrlimit(res)[1]
    if cur != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
        value, hard = min(value, cur), min(hard, cur)
    resource.setrlimit(res, (value, hard))


limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
limit(resource.RLIMIT_AS, cfg["memory_bytes"])
limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
limit(resource.RLIMIT_CORE, 0)

if cfg["net"] or cfg["fs"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = (0x40000000 if cfg["net"] else 0) | (0x00020000 if cfg["fs"] else 0)  # CLONE_NEWNET, CLONE_NEWNS
    if os.geteuid() != 0:
        flags |= 0x10000000  # CLONE_NEWUSER: gives the capabilities the other namespaces need
    if libc.unshare(flags) != 0:
        fail("unshare", ctypes.get_errno())
    if cfg["fs"]:
        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        def setattr_(path, attr_set, attr_clr, recursive):
            attr = MountAttr(attr_set, attr_clr, 0, 0)
            rc = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(path),  # mount_setattr, AT_FDCWD
                              ctypes.c_uint(0x8000 if recursive else 0), ctypes.byref(attr),  # AT_RECURSIVE
                              ctypes.c_size_t(ctypes.sizeof(attr)))
            if rc != 0:
                fail("mount_setattr", ctypes.get_errno())

        work = os.getcwd().encode()
        if libc.mount(b"none", b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None) != 0:  # MS_REC | MS_PRIVATE
            fail("mount --make-rprivate", ctypes.get_errno())
        if libc.mount(work, work, None, ctypes.c_ulong(0x1000 | 0x4000), None) != 0:  # MS_BIND | MS_REC
            fail("bind mount", ctypes.get_errno())
        setattr_(b"/", 1, 0, True)  # MOUNT_ATTR_RDONLY on every mount
        setattr_(work, 0, 1, False)  # ... but the program's folder
        os.chdir(work)  # enter the new bind mount (the old cwd is the read-only one underneath)

if cfg["guard"]:
    exec(GUARD_SOURCE)
    _install_guard(os.getcwd())

with open(cfg["program"], encoding="utf-8") as f:
    source = f.read()
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(source, cfg["program"], "exec"), namespace)
os.write(marker, cfg["nonce"].encode())
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed program.

    ``wall_s``: seconds of wall time before the process group is killed; ``cpu_s``: CPU seconds
    (RLIMIT_CPU); ``memory_mb``: address space in MiB (RLIMIT_AS); ``file_mb``: largest file the
    program may write, stdout and stderr included (RLIMIT_FSIZE); ``require_no_network``: refuse to
    run when no network namespace can be had (else run with a warning).
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    require_no_network: bool = True
    file_mb: int = 16


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program.

    ``status``: ``passed`` (ran to its end), ``failed`` (raised, or exited early), ``timeout`` (wall or
    CPU limit), ``error`` (the sandbox could not run it); ``returncode`` of the process (negative: the
    signal that ended it); ``stderr``: the last :data:`STDERR_TAIL` characters; ``detail``: one line on
    why; ``wall_s``: seconds it ran.
    """

    status: str
    returncode: int | None
    stderr: str
    detail: str
    wall_s: float


def _env(work: Path) -> dict[str, str]:
    """The minimal environment of a program: no inherited variables (tokens, proxies, CUDA settings)."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - STDERR_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _run(source: str, limits: SandboxLimits, net: bool, fs: bool, guard: bool) -> SandboxResult:
    """One program under the given isolation (no checks; :func:`run_program` decides what to ask for)."""
    root = Path(tempfile.mkdtemp(prefix="gqaprune-sandbox-"))
    try:
        work = root / "work"  # the program's folder: the only writable place when fs isolation works
        work.mkdir()
        nonce = secrets.token_hex(16)
        program, marker = root / "program.py", root / "done"
        program.write_text(source, encoding="utf-8")
        runner = root / "runner.py"
        runner.write_text(f"ISOLATION_FAILED = {ISOLATION_FAILED}\nGUARD_SOURCE = {GUARD!r}\n{RUNNER}",
                          encoding="utf-8")
        cfg = {"cpu_s": int(limits.cpu_s), "memory_bytes": int(limits.memory_mb) << 20,
               "file_bytes": int(limits.file_mb) << 20, "net": net, "fs": fs, "guard": guard,
               "program": str(program), "marker": str(marker), "nonce": nonce}
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", str(runner), json.dumps(cfg)], cwd=work,
                                    env=_env(work), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                rc = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                rc, timed_out = proc.wait(), True
            _kill_group(proc.pid)  # stragglers of the group
        wall = time.monotonic() - start
        stderr = _tail(root / "stderr")
        finished = marker.exists() and marker.read_text(errors="replace") == nonce
        if timed_out:
            status, detail = "timeout", f"wall-time limit of {limits.wall_s:g} s"
        elif rc in (-signal.SIGXCPU, -signal.SIGKILL):
            status, detail = "timeout", f"CPU-time limit of {limits.cpu_s} s (signal {-rc})"
        elif rc == ISOLATION_FAILED and stderr.startswith("sandbox:"):
            status, detail = "error", stderr.strip().splitlines()[0]
        elif rc == 0 and finished:
            status, detail = "passed", "ran to its end"
        elif rc == 0:
            status, detail = "failed", "exited before its end"
        else:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
            status, detail = "failed", last[:200]
        return SandboxResult(status, rc, stderr, detail, wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_PROBE_NET = "import socket\nnames = [n for _, n in socket.if_nameindex()]\nassert names == ['lo'], names\n"
_PROBE_FS = (
    "import os\n"
    "target = os.path.join(os.path.dirname(os.getcwd()), 'probe-outside')\n"
    "try:\n"
    "    os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))\n"
    "except OSError:\n"
    "    pass\n"
    "else:\n"
    "    raise SystemExit('wrote outside the folder')\n"
)
_PROBE_LIMITS = SandboxLimits(wall_s=30.0, cpu_s=10, memory_mb=1024, require_no_network=False)


def _probe(program: str, what: str, net: bool, fs: bool) -> bool:
    """Whether ``program`` passes under the isolation asked for (unguarded); what failed is logged."""
    r = _run(program, _PROBE_LIMITS, net=net, fs=fs, guard=False)
    if r.status != "passed":
        log.debug("no %s for sandboxed programs: %s", what, r.detail)
    return r.status == "passed"


@functools.cache
def network_isolation() -> bool:
    """True when programs can run in a network namespace of their own (probed once: only ``lo`` is seen)."""
    return _probe(_PROBE_NET, "network namespace", net=True, fs=False)


@functools.cache
def filesystem_isolation() -> bool:
    """True when programs can run with every mount read-only but their folder (probed once, unguarded)."""
    return _probe(_PROBE_FS, "read-only mount namespace", net=False, fs=True)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def check_isolation(limits: SandboxLimits) -> None:
    """Raise :class:`InputError` when ``limits`` require no network and none can be cut; warn once otherwise."""
    if network_isolation():
        return
    if limits.require_no_network:
        raise InputError("generated programs cannot be cut off the network here (unshare(CLONE_NEWNET) is not "
                         "permitted); set evaluate.sandbox_network: warn to run them with network access")
    _warn_once("net", "sandbox: no network namespace available; generated programs run WITH network access "
                      "(evaluate.sandbox_network: warn)")


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), guard: bool = True) -> SandboxResult:
    """Run one Python program in the sandbox (module docstring) and say how it ended.

    ``guard``: install :data:`GUARD` first (off only to test the other layers).
    Raises :class:`InputError` when ``limits.require_no_network`` and no network namespace works.
    """
    check_isolation(limits)
    fs = filesystem_isolation()
    if not fs:
        _warn_once("fs", "sandbox: no read-only mount namespace available; only the in-program guard keeps "
                         "generated programs from writing outside their folder")
    return _run(source, limits, net=network_isolation(), fs=fs, guard=guard)


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2
                 ) -> list[SandboxResult]:
    """:func:`run_program` over ``sources``, ``workers`` at a time (threads waiting on processes), in order."""
    check_isolation(limits)  # raise before starting anything
    if workers <= 1 or len(sources) <= 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))

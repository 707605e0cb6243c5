"""The sandbox that runs model-written programs: outcomes, limits, containment, the network refusal."""

from __future__ import annotations

import os
import tempfile

import pytest

from gqaprune.errors import InputError
from gqaprune.evaluation import sandbox
from gqaprune.evaluation.sandbox import SandboxLimits, network_isolation, run_program, run_programs

FAST = SandboxLimits(wall_s=10.0, cpu_s=2, memory_mb=512, require_no_network=False)


def test_passing_program():
    r = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n", FAST)
    assert (r.status, r.returncode) == ("passed", 0)


def test_failing_assert_reports_the_error():
    r = run_program("assert 1 + 1 == 3, 'arithmetic'\n", FAST)
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError: arithmetic" in r.stderr


def test_syntax_error_fails():
    r = run_program("def f(:\n", FAST)
    assert r.status == "failed" and "SyntaxError" in r.stderr


def test_exit_before_the_end_is_not_a_pass():
    """A completion calling sys.exit(0) (or os._exit(0)) before the tests ran must not pass."""
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        r = run_program(early + "assert False\n", FAST)
        assert r.returncode == 0 and r.status == "failed", early


def test_sleeping_program_is_killed_at_the_wall_limit():
    limits = SandboxLimits(wall_s=1.0, cpu_s=5, memory_mb=512, require_no_network=False)
    r = run_program("import time\ntime.sleep(60)\n", limits)
    assert r.status == "timeout" and "wall" in r.detail
    assert r.wall_s < 5.0


def test_cpu_bound_loop_is_killed_by_rlimit_cpu():
    limits = SandboxLimits(wall_s=30.0, cpu_s=1, memory_mb=512, require_no_network=False)
    r = run_program("while True:\n    pass\n", limits)
    assert r.status == "timeout" and "CPU" in r.detail
    assert r.returncode < 0  # ended by SIGXCPU / SIGKILL, not by the wall limit (30 s)
    assert r.wall_s < 20.0


def test_memory_bomb_is_stopped_by_rlimit_as():
    r = run_program("x = bytearray(8 * 1024 ** 3)\n", FAST)  # 8 GiB > 512 MiB
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_large_file_is_stopped_by_the_file_size_limit():
    limits = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512, require_no_network=False, file_mb=1)
    r = run_program("with open('big', 'wb') as f:\n    f.write(b'x' * (4 << 20))\n", limits)
    assert r.status == "failed" and "File too large" in r.stderr


def test_destructive_calls_are_disabled():
    for call in ("import os\nos.system('true')\n", "import shutil\nshutil.rmtree('/nonexistent')\n",
                 "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.kill(1, 0)\n",
                 "import os\nos.remove('x')\n"):
        r = run_program(call, FAST)
        assert r.status == "failed" and "PermissionError: sandbox:" in r.stderr, call


def test_writes_stay_in_the_programs_own_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    r = run_program(f"open({str(outside)!r}, 'w').write('x')\n", FAST)
    assert r.status == "failed" and not outside.exists()
    # its own folder is writable, and nothing of it is left behind
    r = run_program("import os\nopen('mine.txt', 'w').write('x')\nprint(os.getcwd())\n", FAST)
    assert r.status == "passed"


def test_mount_namespace_blocks_writes_even_without_the_guard(tmp_path):
    if not sandbox.filesystem_isolation():
        pytest.skip("no mount namespace here: only the in-program guard contains writes")
    outside = tmp_path / "outside.bin"
    r = run_program(f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))\n", FAST, guard=False)
    assert r.status == "failed" and "Read-only file system" in r.stderr
    assert not outside.exists()


def test_temporary_folders_are_removed():
    base = tempfile.gettempdir()
    before = {n for n in os.listdir(base) if n.startswith("gqaprune-sandbox-")}
    results = run_programs(["print(1)\n", "raise ValueError\n", "import time\ntime.sleep(5)\n"],
                           SandboxLimits(wall_s=1.0, cpu_s=2, memory_mb=512, require_no_network=False), workers=2)
    assert [r.status for r in results] == ["passed", "failed", "timeout"]  # in order despite running in parallel
    after = {n for n in os.listdir(base) if n.startswith("gqaprune-sandbox-")}
    assert after <= before


def test_network_is_unreachable_when_isolated():
    if not network_isolation():
        pytest.skip("no network namespace on this machine")
    r = run_program("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n", FAST)
    assert r.status == "failed" and "OSError" in r.stderr
    r = run_program("import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n", FAST)
    assert r.status == "passed"


def test_refuses_without_isolation_when_required(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "network_isolation", lambda: False)
    monkeypatch.setattr(sandbox, "_warned", set())
    with pytest.raises(InputError) as err:
        run_program("print(1)\n", SandboxLimits(require_no_network=True))
    message = str(err.value)
    assert "\n" not in message and "evaluate.sandbox_network: warn" in message
    # allowed with a warning otherwise
    with caplog.at_level("WARNING", logger="gqaprune"):
        assert run_program("print(1)\n", FAST).status == "passed"
    assert "WITH network access" in caplog.text

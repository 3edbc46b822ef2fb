"""Benchmark workers in fresh processes, and the peak memory of a process.

A benchmark module ``experiments.bench.<name>`` is both the parent (``python -m
experiments.bench.<name> ...``) and its own workers (``... --worker KIND --spec SPEC --out
OUT``): :func:`worker_main` runs ``WORKERS[KIND](spec, peak, save)`` and writes the result
dict to OUT as JSON (also partial results, whenever the worker calls ``save``), so a
crash or an out-of-memory error in one worker loses only what it had not saved and never
stops the others. :func:`run_worker` is the parent's side (time limit, environment).
The step protocol of the framework comparisons, which drives workers step by step, is
:mod:`experiments.bench.compare`.

Standard library only, so that a parent process stays small (see :class:`PeakRSS`).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from experiments.bench.report import REPO_ROOT

KIB_PER_MIB = 1024


def log(name: str, msg: str) -> None:
    """A progress line ``[<name>] msg`` on stderr."""
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None if unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def _ru_maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class PeakRSS:
    """Peak resident set size of the current process, in KiB.

    The measure is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux). Caveat:
    Linux carries the peak RSS of the *parent's* address space into a child across
    ``fork``/``vfork`` + ``exec`` (``exec_mmap`` -> ``setmax_mm_hiwater_rss``), so a worker
    started by a big process (a pytest run, a parent that imported torch) reports at least
    the parent's peak. Create this object first thing in the worker: when ``ru_maxrss``
    then already exceeds the current RSS by more than ``inherited_margin_kib``, the value
    was inherited and :meth:`peak_kib` falls back to ``VmHWM`` of ``/proc/self/status`` (the
    high-water mark of this process's own address space), and :attr:`measure` says so.
    """

    def __init__(self, inherited_margin_kib: int = 64 * KIB_PER_MIB):
        rss = self.current_kib()
        self.inherited = rss is not None and _ru_maxrss_kib() > rss + inherited_margin_kib
        if self.inherited and _proc_status_kib("VmHWM") is None:
            raise RuntimeError("ru_maxrss is inherited from the parent and VmHWM is unavailable")

    @property
    def measure(self) -> str:
        if self.inherited:
            return "peak RSS (VmHWM; ru_maxrss was inherited from the parent)"
        return "peak RSS (getrusage ru_maxrss)"

    def peak_kib(self) -> int:
        if self.inherited:
            return int(_proc_status_kib("VmHWM"))
        return _ru_maxrss_kib()

    @staticmethod
    def current_kib() -> int | None:
        """Current RSS (``VmRSS``), KiB; None where ``/proc`` is unavailable."""
        return _proc_status_kib("VmRSS")


Worker = Callable[[dict, PeakRSS, Callable[[dict], None]], dict]


def worker_command(module: str, kind: str, spec_path: Path, out: Path) -> list[str]:
    """The command line of worker ``kind`` of ``experiments.bench.<module>``."""
    return [sys.executable, "-m", f"experiments.bench.{module}", "--worker", kind,
            "--spec", str(spec_path), "--out", str(out)]  # fmt: skip


def worker_main(workers: dict[str, Worker], kind: str, spec_path: str, out_path: str) -> None:
    """Entry point of a worker process: run ``workers[kind](spec, peak, save)`` and write
    its result, with ``done: True`` and the 1/5/15-minute load averages at its start and
    end (``load_average``), as JSON to ``out_path``; ``save(result)`` writes a
    partial one (atomically) while it runs, and an exception is added to the last one as
    ``error`` before it ends the process. With ``spec["threads"]`` the process is first
    pinned to that many cores (Linux; before XLA sizes its thread pool)."""
    peak = PeakRSS()  # first, before anything big is allocated
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec["threads"]])
    out = Path(out_path)
    last: dict = {}

    def save(result: dict) -> None:
        last.clear()
        last.update(result)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, out)

    load_start = os.getloadavg()
    try:
        result = workers[kind](spec, peak, save)
    except Exception as e:  # recorded with what was saved, then the process fails
        save({**last, "error": f"{type(e).__name__}: {e}"[:2000]})
        raise
    result.update(done=True, load_average=[load_start, os.getloadavg()])
    save(result)


def run_worker(
    module: str,
    kind: str,
    spec: dict,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict:
    """Run worker ``kind`` of ``experiments.bench.<module>`` to its end in a fresh process.

    Its output goes to this process's stderr. ``spec["deadline"]`` (``time.time()`` by
    which it should stop itself) is set from ``timeout``; the process is killed 15 s after.

    Returns:
      The worker's result dict (a partial one if it died) with ``wall_s``, ``ok`` (it
      finished and exited 0) and, on failure, ``error`` (exit status or time-out).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("*.spec.json")))
    stem = workdir / f"{n:02d}_{kind}"
    spec_path, out = stem.with_suffix(".spec.json"), stem.with_suffix(".json")
    if timeout is not None:
        spec = {**spec, "deadline": time.time() + timeout}
    spec_path.write_text(json.dumps(spec))
    try:
        stdout = sys.stderr.fileno()  # workers' chatter goes to our stderr
    except (AttributeError, OSError, ValueError):
        stdout = None
    t = time.perf_counter()
    proc = subprocess.Popen(
        worker_command(module, kind, spec_path, out),
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=stdout,
    )
    error = None
    try:
        status = proc.wait(timeout=None if timeout is None else timeout + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status, error = None, f"killed after {timeout + 15:.0f} s (time budget)"
    res = json.loads(out.read_text()) if out.is_file() else {}
    res["wall_s"] = time.perf_counter() - t
    if status:
        error = f"exit status {status}" + (" (killed by a signal)" if status < 0 else "")
    res["ok"] = error is None and res.get("done", False)
    if error or not res["ok"]:
        res["error"] = res.get("error") or error or "the worker wrote no result"
    return res

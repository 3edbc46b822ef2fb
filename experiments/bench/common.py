"""Small helpers shared by the benchmark scripts of ``experiments/bench``.

* what ran where: :func:`machine`, :func:`git_commit`, :func:`load_average`;
* peak memory of a process: :class:`PeakRSS` (``getrusage`` ``ru_maxrss``, guarded against
  the value a child process inherits from its parent, see the class docstring);
* output: :func:`format_table` (plain text for stdout) and :func:`append_row` (one dated
  row in a Markdown table of ``docs/BENCHMARKS.md``, one section per benchmark);
* framework-versus-framework step benchmarks (``lm_step``, ``qlora_step``): each framework
  in a worker process of its own, driven step by step from the parent (:func:`run_init`,
  :func:`run_steps`, :class:`Worker`; worker side :func:`worker_main`,
  :func:`serve_steps`), per-worker memory (:func:`cpu_memory`, :func:`jax_memory`,
  :func:`torch_memory`) and the statistics, table rows and load note of the result
  (:func:`summarize_steps`, :func:`report_rows`, :func:`loads_note`).

Standard library only, so that a benchmark's parent process stays small (see
:class:`PeakRSS`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
KIB_PER_MIB = 1024


def cpu_count() -> int:
    """Cores this process may run on (``sched_getaffinity``; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    """``"<CPU model> (<n> cores)"``; the model from ``/proc/cpuinfo`` on Linux."""
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
            model = m.group(1).strip()
    except OSError:
        pass
    return f"{model} ({cpu_count()} cores)"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files differ from it.

    The dirtiness check uses ``git --no-optional-locks status`` so that it never writes the
    index (safe while others use the same checkout). ``"unknown"`` outside a git checkout.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return os.getloadavg()


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None if unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


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


def _ru_maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: columns left-aligned, cells ``str()``-ed, a dashed rule under
    the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |"


def append_row(
    section: str,
    columns: Sequence[str],
    row: Sequence[object],
    *,
    intro: str = "",
    path: Path = BENCHMARKS_MD,
) -> Path:
    """Append ``row`` to the Markdown table of ``## <section>`` in ``path``.

    The table is the first one after the section heading; the row goes after its last
    line. A missing section (heading, ``intro`` paragraph, table header) is added at the
    end of the file; a missing file is an error (it holds the explanation of the rows).
    The file is rewritten atomically (temporary file + ``os.replace``).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``len(row) != len(columns)``, or the section's table has other columns.
    """
    if len(row) != len(columns):
        raise ValueError(f"{len(row)} cells for {len(columns)} columns")
    lines = path.read_text().splitlines()
    header = _md_row(columns)
    heading = f"## {section}"
    try:
        start = lines.index(heading)
    except ValueError:
        block = ["", heading, ""] + ([intro, ""] if intro else [])
        block += [header, _md_row(["---"] * len(columns)), _md_row(row)]
        lines = _strip_trailing_blank(lines) + block
    else:
        i = start + 1
        while i < len(lines) and not lines[i].startswith("|") and not lines[i].startswith("## "):
            i += 1
        if i >= len(lines) or not lines[i].startswith("|"):
            lines[i:i] = [header, _md_row(["---"] * len(columns)), _md_row(row), ""]
        else:
            if lines[i].strip() != header:
                raise ValueError(f"{path}: the table of {heading!r} has other columns:\n{lines[i]}")
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            lines.insert(i, _md_row(row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


# -- framework-versus-framework step benchmarks ----------------------------------------------
#
# A benchmark module ``experiments.bench.<name>`` is both the parent (``python -m
# experiments.bench.<name> ...``) and its own workers (``... --worker KIND --spec SPEC --out
# OUT``): an ``init`` worker writes what both frameworks load (run to completion first), then
# one worker per framework (:data:`FRAMEWORKS`) sets itself up, says ``ready`` and runs one
# timed step per ``step`` line on its stdin, answering ``step <seconds> <loss>``; at the end
# of its stdin it writes its result dict to OUT as JSON. Protocol lines on a worker's stdout
# start with ``@@<name>``; the parent passes anything else a worker prints on to stderr.

FRAMEWORKS = ("jax", "torch")

# Spec fields of the run schedule that :func:`run_steps` reads.
RUN_FIELDS = ("warmup", "steps", "repeats", "schedule", "threads")


def log(name: str, msg: str) -> None:
    """A progress line ``[<name>] msg`` on stderr."""
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def mib(kib: float) -> float:
    return kib / KIB_PER_MIB


def add_run_args(p: argparse.ArgumentParser, workers: Sequence[str]) -> None:
    """The options every step benchmark shares: seed, threads, schedule, repeats,
    ``--record``/``--note``/``--json``, and the hidden worker options (``workers``: the
    worker kinds)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=cpu_count(), help="default: all cores")
    p.add_argument(
        "--schedule",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: the two workers take turns step by step (robust to a changing "
        "machine load); sequential: one framework's steps, then the other's",
    )
    p.add_argument("--repeats", type=int, default=1, help="worker pairs, order alternating")
    p.add_argument("--record", action="store_true", help="append a row to docs/BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the recorded row's notes")
    p.add_argument("--json", help="also write the full result dict to this file")
    p.add_argument("--worker", choices=tuple(workers), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def run_spec(args, spec: dict) -> dict:
    """``spec`` plus the run fields of :func:`add_run_args`' options (``threads`` capped at
    the cores this process may use); ``ValueError`` on impossible ones."""
    spec = {**spec, "seed": args.seed, "repeats": args.repeats, "schedule": args.schedule}
    spec["threads"] = min(args.threads, cpu_count())
    if spec["steps"] < 1 or spec["warmup"] < 0 or spec["repeats"] < 1 or spec["threads"] < 1:
        raise ValueError("need steps >= 1, warmup >= 0, repeats >= 1, threads >= 1")
    return spec


def run_str(spec: dict) -> str:
    """The run-schedule part of a row's ``config``."""
    return (
        f"{spec['threads']} threads, median of {spec['steps'] * spec['repeats']} steps "
        f"after {spec['warmup']} warm-up, {spec['schedule']}"
    )


def make_batch(spec: dict):
    """``(input_ids, labels)`` int64 ``[batch_size, seq_len]`` of uniform random token ids
    (numpy, ``spec["seed"]``); ``labels[:, t] = input_ids[:, t + 1]`` and -100 (ignored) at
    the last position, as Hugging Face shifts them."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    shape = (spec["batch_size"], spec["seq_len"])
    ids = rng.integers(0, spec["vocab_size"], shape, dtype=np.int64)
    labels = np.concatenate([ids[:, 1:], np.full((shape[0], 1), -100, np.int64)], axis=1)
    return ids, labels


def quiet_transformers(transformers) -> None:
    """No progress bars or info/warning lines from transformers (e.g. its ``loss_type``
    notice) in a benchmark's output."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# Worker side.


def _reply(name: str, *words: object) -> None:
    """A protocol line from a worker to the parent (stdout; logs go to stderr)."""
    print(f"@@{name}", *words, flush=True)


def serve_steps(name: str, run_step: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Worker side of the step protocol: say ``ready``, then for every ``step`` line on
    stdin time one call of ``run_step() -> float loss`` (which synchronises) and answer
    ``step <seconds> <loss>``, until ``end``. Returns (seconds, losses) of all steps."""
    _reply(name, "ready")
    times, losses = [], []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        losses.append(run_step())
        times.append(time.perf_counter() - t)
        _reply(name, "step", repr(times[-1]), repr(losses[-1]))
    return times, losses


def worker_main(
    workers: dict[str, Callable[[dict, PeakRSS], dict]], kind: str, spec_path: str, out_path: str
) -> None:
    """Entry point of a worker process: run ``workers[kind](spec, peak)``, write its result
    (plus the load averages at its start and end) as JSON to ``out_path``. The process is
    pinned to the first ``spec["threads"]`` cores first (Linux; before XLA sizes its thread
    pool)."""
    peak = PeakRSS()  # first, before anything big is allocated
    spec = json.loads(Path(spec_path).read_text())
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec["threads"]])
    load_start = load_average()
    result = workers[kind](spec, peak)
    result["load_average"] = [load_start, load_average()]
    Path(out_path).write_text(json.dumps(result))


def cpu_memory(peak: PeakRSS) -> dict:
    """``{"now", "peak"}`` KiB of this process's RSS and the ``measure``'s wording."""
    return {"now": peak.current_kib(), "peak": peak.peak_kib(), "measure": peak.measure}


def jax_memory(peak: PeakRSS, device) -> dict:
    """:func:`cpu_memory` on a CPU ``device``, else its allocator's bytes in use / peak."""
    if device.platform == "cpu":
        return cpu_memory(peak)
    stats = device.memory_stats()
    return {
        "now": stats["bytes_in_use"] / 1024,
        "peak": stats["peak_bytes_in_use"] / 1024,
        "measure": 'jax memory_stats()["peak_bytes_in_use"]',
    }


def torch_memory(peak: PeakRSS, torch) -> dict:
    """:func:`cpu_memory` without CUDA, else torch's CUDA allocator's allocated / peak."""
    if not torch.cuda.is_available():
        return cpu_memory(peak)
    return {
        "now": torch.cuda.memory_allocated() / 1024,
        "peak": torch.cuda.max_memory_allocated() / 1024,
        "measure": "torch.cuda.max_memory_allocated()",
    }


# Parent side.


def _command(name: str, kind: str, spec_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", f"experiments.bench.{name}", "--worker", kind,
            "--spec", str(spec_path), "--out", str(out)]  # fmt: skip


def run_init(name: str, spec_path: Path, workdir: Path) -> None:
    """Run the ``init`` worker of ``experiments.bench.<name>`` to completion."""
    init = subprocess.run(
        _command(name, "init", spec_path, workdir / "init.json"),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if init.returncode:
        raise RuntimeError(f"the init worker failed with exit status {init.returncode}")


class Worker:
    """Parent side of a framework worker of ``experiments.bench.<name>``: started, set up
    (imports, weights, compilation) and ``ready`` on construction; :meth:`step` runs one
    timed step; :meth:`finish` ends it and returns its result dict."""

    def __init__(self, name: str, kind: str, spec_path: Path, workdir: Path):
        self.name, self.kind, self.out = name, kind, workdir / f"{kind}.json"
        log(name, f"{kind} worker starting")
        env = dict(os.environ)
        # Interleaved on a GPU, jax must not take 75% of its memory up front (torch shares it).
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        self.proc = subprocess.Popen(
            _command(name, kind, spec_path, self.out),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")

    def _expect(self, tag: str) -> list[str]:
        for line in self.proc.stdout:
            words = line.split()
            if words[:2] == [f"@@{self.name}", tag]:
                return words[2:]
            sys.stderr.write(line)  # the worker's (or a library's) own output
        raise RuntimeError(f"the {self.kind} worker exited (status {self.proc.wait()})")

    def step(self) -> tuple[float, float]:
        """One step: (seconds, loss) as the worker measured them."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        seconds, loss = self._expect("step")
        return float(seconds), float(loss)

    def finish(self) -> dict:
        self.proc.stdin.close()
        for line in self.proc.stdout:
            sys.stderr.write(line)
        if status := self.proc.wait():
            raise RuntimeError(f"the {self.kind} worker failed with exit status {status}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_steps(
    name: str, spec: dict, spec_path: Path, workdir: Path
) -> tuple[dict[str, list[dict]], list[float]]:
    """Run the :data:`FRAMEWORKS` workers ``spec["repeats"]`` times (alternating which goes
    first) for ``warmup + steps`` steps each on ``spec["schedule"]``.

    ``interleaved``: both workers are set up one after the other, then take turns step by
    step (order alternating), so that both see the same machine load over time;
    ``sequential``: all steps of one worker, then all of the other.

    Returns:
      ``({kind: [result dict of each repeat]}, load_trace)``: the 1-minute load average
      after every step (pair).
    """
    runs = {k: [] for k in FRAMEWORKS}
    load_trace = []
    n = spec["warmup"] + spec["steps"]
    for r in range(spec["repeats"]):
        order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
        groups = [order] if spec["schedule"] == "interleaved" else [(k,) for k in order]
        for group in groups:
            workers = {}
            try:
                for kind in group:
                    workers[kind] = Worker(name, kind, spec_path, workdir)
                for i in range(n):
                    done = []
                    for kind in group if i % 2 == 0 else group[::-1]:
                        seconds, loss = workers[kind].step()
                        done.append(f"{kind} {seconds:.3f} s (loss {loss:.5f})")
                    load_trace.append(load_average()[0])
                    log(name, f"step {i}{' (warm-up)' if i < spec['warmup'] else ''}: "
                        + ", ".join(done))  # fmt: skip
                for kind in group:
                    runs[kind].append(workers[kind].finish())
            finally:
                for w in workers.values():
                    w.kill()
    return runs, load_trace


# The result.


def summarize_steps(
    spec: dict,
    runs: dict[str, list[dict]],
    load_trace: list[float],
    *,
    tokens: int,
    loss_tolerance: float,
    keys: Sequence[str] = (),
    same: Sequence[str] = (),
) -> dict:
    """Per framework: step-time median / quartiles over the timed steps of all repeats,
    tokens/s, compile (where the worker reports ``compile_s``) and first-step time
    (medians), peak memory (max), first and last losses, ``keys`` copied from the first
    repeat's result; plus the jaxfit / torch ratios, the first-step loss check against
    ``loss_tolerance`` and the 1-minute load average seen during the steps (``load_trace``).

    Raises:
      RuntimeError: a ``same`` key differs between the frameworks (they ran different
        models, or on different backends).
    """
    out = {"spec": spec, "tokens_per_step": tokens, "load_trace": load_trace}
    for kind in FRAMEWORKS:
        rs = runs[kind]
        timed = [t for r in rs for t in r["times_s"][spec["warmup"] :]]
        q1, med, q3 = (
            statistics.quantiles(timed, n=4, method="inclusive") if len(timed) > 1 else timed * 3
        )
        peak = max(r["memory"]["peak_kib"] for r in rs)
        imports = statistics.median(r["memory"]["after_imports_kib"] for r in rs)
        out[kind] = {
            "step_median_s": med,
            "step_q1_s": q1,
            "step_q3_s": q3,
            "tokens_per_s": tokens / med,
            "first_step_s": statistics.median(r["times_s"][0] for r in rs),
            "compile_s": (
                statistics.median(r["compile_s"] for r in rs) if "compile_s" in rs[0] else None
            ),
            "peak_mib": mib(peak),
            "after_imports_mib": mib(imports),
            "increase_mib": mib(peak - imports),
            "first_loss": rs[0]["losses"][0],
            "last_loss": rs[0]["losses"][-1],
            "memory_measure": rs[0]["memory_measure"],
            "load_average": [r["load_average"] for r in rs],
            **{k: rs[0][k] for k in keys},
        }
    jx, pt = out["jax"], out["torch"]
    for key in same:
        if jx[key] != pt[key]:
            raise RuntimeError(f"different {key}: jaxfit {jx[key]} vs torch {pt[key]}")
    paired = [
        a / b
        for j, t in zip(runs["jax"], runs["torch"])
        for a, b in zip(j["times_s"][spec["warmup"] :], t["times_s"][spec["warmup"] :])
    ]
    out["ratio"] = {
        "step": jx["step_median_s"] / pt["step_median_s"],
        # Median over steps i of jax_i / torch_i: under "interleaved" the two steps i ran
        # back to back, so a load change cancels out of each ratio.
        "step_paired": statistics.median(paired),
        "tokens_per_s": jx["tokens_per_s"] / pt["tokens_per_s"],
        "peak": jx["peak_mib"] / pt["peak_mib"],
        "increase": jx["increase_mib"] / pt["increase_mib"],
    }
    diffs = [abs(j["losses"][0] - t["losses"][0]) for j, t in zip(runs["jax"], runs["torch"])]
    out["loss_diff"] = max(diffs)
    out["loss_diff_last"] = abs(jx["last_loss"] - pt["last_loss"])
    out["loss_tolerance"] = loss_tolerance
    out["loss_ok"] = out["loss_diff"] <= loss_tolerance
    return out


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """Rows ``(metric, jaxfit, torch, jaxfit/torch)`` of a :func:`summarize_steps` result
    for :func:`format_table`."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    f3 = lambda x: f"{x:.3f}"
    last_step = res["spec"]["warmup"] + res["spec"]["steps"] - 1
    return [
        ("compile (s)", f3(jx["compile_s"]), "-", "-"),
        ("first step (s)", f3(jx["first_step_s"]), f3(pt["first_step_s"]), ""),
        ("step median (ms)", f"{jx['step_median_s'] * 1e3:.1f}",
         f"{pt['step_median_s'] * 1e3:.1f}", f3(ratio["step"])),
        ("step ratio, paired", "", "", f3(ratio["step_paired"])),
        ("step q1-q3 (ms)",
         f"{jx['step_q1_s'] * 1e3:.1f}-{jx['step_q3_s'] * 1e3:.1f}",
         f"{pt['step_q1_s'] * 1e3:.1f}-{pt['step_q3_s'] * 1e3:.1f}", ""),
        ("tokens/s", f"{jx['tokens_per_s']:.1f}", f"{pt['tokens_per_s']:.1f}",
         f3(ratio["tokens_per_s"])),
        ("peak memory (MiB)", f"{jx['peak_mib']:.0f}", f"{pt['peak_mib']:.0f}",
         f3(ratio["peak"])),
        ("  after imports (MiB)", f"{jx['after_imports_mib']:.0f}",
         f"{pt['after_imports_mib']:.0f}", ""),
        ("  increase (MiB)", f"{jx['increase_mib']:.0f}", f"{pt['increase_mib']:.0f}",
         f3(ratio["increase"])),
        ("first-step loss", f"{jx['first_loss']:.6f}", f"{pt['first_loss']:.6f}",
         f"|diff| {res['loss_diff']:.2e}"),
        (f"loss after step {last_step}",
         f"{jx['last_loss']:.6f}", f"{pt['last_loss']:.6f}", f"|diff| {res['loss_diff_last']:.2e}"),
    ]  # fmt: skip


def report_notes(res: dict) -> list[str]:
    """The lines under the table: what memory is, the loss check's verdict, the load."""
    jx, pt = res["jax"], res["torch"]
    verdict = "OK" if res["loss_ok"] else "MISMATCH: the two steps do not compute the same loss"
    return [
        f"memory: jaxfit {jx['memory_measure']}; torch {pt['memory_measure']}; "
        "'after imports' = in use right after the framework imports, 'increase' = peak - it",
        f"first-step loss check (|diff| <= {res['loss_tolerance']:g}): {verdict}",
        f"load: {loads_note(res)}",
    ]


def loads_note(res: dict) -> str:
    """The 1-min load average during the steps (min / median / max over steps) and the
    1/5/15-min ones when the first worker started."""
    trace = res["load_trace"]
    first = res["jax"]["load_average"][0][0]  # jax's worker starts first
    return (
        f"1-min load during the steps {min(trace):.1f} / {statistics.median(trace):.1f} / "
        f"{max(trace):.1f} (min / median / max); at the start "
        + "/".join(f"{v:.1f}" for v in first)
    )


def row_cells(res: dict) -> list[str]:
    """The cells every step benchmark's recorded row shares, after ``config``: step ms of
    both, ratio (paired), tok/s of both, jax compile s, peak MiB (+increase) of both, peak
    ratio (increase ratio), loss diff."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    mem = lambda r: f"{r['peak_mib']:.0f} (+{r['increase_mib']:.0f})"
    return [
        f"{jx['step_median_s'] * 1e3:.0f}", f"{pt['step_median_s'] * 1e3:.0f}",
        f"{ratio['step']:.2f} ({ratio['step_paired']:.2f})",
        f"{jx['tokens_per_s']:.0f}", f"{pt['tokens_per_s']:.0f}",
        f"{jx['compile_s']:.1f}", mem(jx), mem(pt),
        f"{ratio['peak']:.2f} ({ratio['increase']:.2f})", f"{res['loss_diff']:.1e}",
    ]  # fmt: skip


def row_head(res: dict) -> list[str]:
    """The first cells of a recorded row: date (UTC), machine, backend, versions, commit."""
    jx, pt = res["jax"], res["torch"]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    backend = jx["backend"] if jx["backend"] == "cpu" else f"{jx['backend']} ({jx['device']})"
    return [date, machine(), backend, f"{jx['version']}, {pt['version']}", git_commit()]

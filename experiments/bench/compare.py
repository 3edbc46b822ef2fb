"""Framework-versus-framework step benchmarks (``lm_step``, ``qlora_step``): scheduling.

Each benchmark module is its own set of workers (:mod:`experiments.bench.procs`): an
``init`` worker writes what both frameworks load (run to completion first), then one
worker per framework (:data:`FRAMEWORKS`) sets itself up, says ``ready`` and runs one
timed step per ``step`` line on its stdin, answering ``step <seconds> <loss>``; at the end
of its stdin it writes its result dict to OUT as JSON. Protocol lines on a worker's stdout
start with ``@@<name>``; the parent passes anything else a worker prints on to stderr.

:func:`run_steps` runs the workers ``repeats`` times (order alternating), ``interleaved``
(set up one after the other, then taking turns step by step, so that a load change on a
shared machine hits both) or ``sequential``; :func:`summarize_steps` turns their step
times, losses and memory into the result the benchmark reports (:mod:`.compare_report`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.bench.procs import KIB_PER_MIB, log, worker_command
from experiments.bench.report import REPO_ROOT

FRAMEWORKS = ("jax", "torch")


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


def run_init(name: str, spec_path: Path, workdir: Path) -> None:
    """Run the ``init`` worker of ``experiments.bench.<name>`` to completion."""
    init = subprocess.run(
        worker_command(name, "init", spec_path, workdir / "init.json"),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if init.returncode:
        raise RuntimeError(f"the init worker failed with exit status {init.returncode}")


class StepWorker:
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
            worker_command(name, kind, spec_path, self.out),
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
                    workers[kind] = StepWorker(name, kind, spec_path, workdir)
                for i in range(n):
                    done = []
                    for kind in group if i % 2 == 0 else group[::-1]:
                        seconds, loss = workers[kind].step()
                        done.append(f"{kind} {seconds:.3f} s (loss {loss:.5f})")
                    load_trace.append(os.getloadavg()[0])
                    log(
                        name,
                        f"step {i}{' (warm-up)' if i < spec['warmup'] else ''}: " + ", ".join(done),
                    )
                for kind in group:
                    runs[kind].append(workers[kind].finish())
            finally:
                for w in workers.values():
                    w.kill()
    return runs, load_trace


def worker_result(times, losses, memory: dict, after_imports_kib: float, **info) -> dict:
    """The result dict every framework worker writes: step times and losses, memory
    (``memory``: ``{"peak": KiB, "measure": str}``) and the worker's own ``info``."""
    return {
        "times_s": times,
        "losses": losses,
        "memory": {"after_imports_kib": after_imports_kib, "peak_kib": memory["peak"]},
        "memory_measure": memory["measure"],
        **info,
    }


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def _framework_summary(spec: dict, rs: list[dict], tokens: int, keys: Sequence[str]) -> dict:
    timed = [t for r in rs for t in r["times_s"][spec["warmup"] :]]
    q1, med, q3 = _quartiles(timed)
    peak = max(r["memory"]["peak_kib"] for r in rs)
    imports = statistics.median(r["memory"]["after_imports_kib"] for r in rs)
    compile_s = [r["compile_s"] for r in rs if r.get("compile_s") is not None]
    return {
        "step_median_s": med,
        "step_q1_s": q1,
        "step_q3_s": q3,
        "tokens_per_s": tokens / med,
        "first_step_s": statistics.median(r["times_s"][0] for r in rs),
        "compile_s": statistics.median(compile_s) if compile_s else None,
        "peak_mib": peak / KIB_PER_MIB,
        "after_imports_mib": imports / KIB_PER_MIB,
        "increase_mib": (peak - imports) / KIB_PER_MIB,
        "first_loss": rs[0]["losses"][0],
        "last_loss": rs[0]["losses"][-1],
        "memory_measure": rs[0]["memory_measure"],
        "load_average": [r["load_average"] for r in rs],
        **{k: rs[0][k] for k in keys if k in rs[0]},
    }


# What every worker reports and the summary keeps (from the first repeat).
INFO_KEYS = ("backend", "device", "version", "planned_peak_mib", "attention", "threads",
             "model_dtype", "adapter_dtypes", "nf4_sq_sum")  # fmt: skip


def summarize_steps(
    spec: dict,
    runs: dict[str, list[dict]],
    load_trace: list[float],
    *,
    loss_tolerance: float,
    same: Sequence[str] = (),
) -> dict:
    """Per framework: step-time median / quartiles over the timed steps of all repeats,
    tokens/s (``batch_size * seq_len`` tokens per step), compile (where the worker reports
    ``compile_s``) and first-step time (medians), peak memory (max), first and last
    losses, :data:`INFO_KEYS` and ``same`` copied from the first repeat's result; plus the
    jaxfit / torch ratios, the first-step loss check against ``loss_tolerance`` and the
    1-minute load average seen during the steps (``load_trace``).

    Raises:
      RuntimeError: a ``same`` key, or the backend, differs between the frameworks (they
        ran different models, or on different backends).
    """
    tokens = spec["batch_size"] * spec["seq_len"]
    same = (*same, "backend")
    out = {"spec": spec, "tokens_per_step": tokens, "load_trace": load_trace}
    for kind in FRAMEWORKS:
        out[kind] = _framework_summary(spec, runs[kind], tokens, (*INFO_KEYS, *same))
    jx, pt = out["jax"], out["torch"]
    for key in same:
        if jx[key] != pt[key]:
            raise RuntimeError(f"different {key}: jaxfit {jx[key]} vs torch {pt[key]}")
    warm = spec["warmup"]
    paired = [
        a / b
        for j, t in zip(runs["jax"], runs["torch"])
        for a, b in zip(j["times_s"][warm:], t["times_s"][warm:])
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

"""Run summaries, the comparison table and the report files shared by
``experiments/ablate_precision.py`` and ``experiments/compare_runs.py``.

A run is a finished training workdir (``config.json``, ``metrics.jsonl``,
``eval/step_<N>.npz``); an ablation arm's workdir also holds ``result.json`` (memory,
quantisation error) or ``error.json`` (how it failed). :func:`summarize_run` reads one
into a flat row; :func:`write_report` writes ``results.csv``, ``results.md``,
``bootstrap.csv`` and the plots for a list of them (:func:`report`: the Markdown alone),
the first successful one (or the named reference) being the reference of the relative
differences.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import bootstrap
from jaxfit import tasks

MIB = 1 << 20


@dataclasses.dataclass
class Run:
    """One run: its table row, train-loss curve and latest per-example evaluation."""

    name: str
    row: dict[str, Any]
    curve: tuple[list[int], list[float]] = ((), ())
    examples: dict[str, np.ndarray] | None = None

    @property
    def ok(self) -> bool:
        return self.row.get("status") == "ok"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_examples(workdir: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """``(step, arrays)`` of the newest ``WORKDIR/eval/step_<N>.npz``, or None."""
    found = []
    for path in (Path(workdir) / "eval").glob("step_*.npz"):
        if m := re.fullmatch(r"step_(\d+)\.npz", path.name):
            found.append((int(m.group(1)), path))
    if not found:
        return None
    step, path = max(found)
    with np.load(path) as data:
        return step, {k: data[k] for k in data.files}


def step_timing(records: Sequence[dict]) -> dict[str, float]:
    """Step time, compile time from ``perf/step_time_s``, which the trainer logs as the mean
    over the steps since the previous log (evaluation excluded).

    ``step_time_s``: median over the logged intervals after the first (the first holds the
    compilation); ``compile_s``: time to the first step (trace + compile + run), the
    first interval's time less its other steps at the median step time. With
    ``log_every=1`` (ablation arms) every step is timed and the first interval IS step 1.
    """
    timed = [r for r in records if "perf/step_time_s" in r]
    if not timed:
        return {"step_time_s": math.nan, "compile_s": math.nan}
    steady = [r["perf/step_time_s"] for r in timed[1:]]
    median = statistics.median(steady) if steady else math.nan
    first, n = timed[0]["perf/step_time_s"], timed[0]["step"]
    compile_s = first if n <= 1 else first * n - (n - 1) * median
    return {"step_time_s": median, "compile_s": compile_s}


def summarize_run(workdir: str | Path, name: str | None = None) -> Run:
    """Summarise a workdir (see the module docstring) into a :class:`Run`.

    Row keys: ``name, status, error, task, precision, optimizer, trainable, steps,
    batch_size, step_time_s, compile_s, examples_per_s, tokens_per_s (LM),
    final_train_loss`` (mean logged ``train/loss`` over the last 10% of logged steps),
    ``eval/...`` (the last evaluation), plus ``result.json``'s fields when present
    (``planned_peak_bytes, measured_peak_bytes, measured_source, quant_rel_error``).
    """
    workdir = Path(workdir)
    name = name or workdir.name
    config = read_json(workdir / "config.json") or {}
    records = read_metrics(workdir)
    row: dict[str, Any] = {"name": name, "status": "ok" if records else "no metrics"}
    row["task"] = config.get("task", "")
    row["precision"] = config.get("precision", "")
    row["optimizer"] = config.get("optim", {}).get("name", "")
    lora = config.get("lora", {}).get("enabled") or row["precision"] in ("int8", "nf4")
    row["trainable"] = "lora" if lora else "full"
    row["steps"] = max((r["step"] for r in records), default=0)
    row["batch_size"] = config.get("batch_size", math.nan)
    row.update(step_timing(records))
    row["examples_per_s"] = (
        row["batch_size"] / row["step_time_s"] if row["step_time_s"] else math.nan
    )
    entry = tasks.TASKS.get(row["task"])  # tokens per step where the task counts them
    tokens = entry.tokens_per_step(config) if entry is not None and "seq_len" in config else None
    if tokens:
        row["tokens_per_s"] = row["examples_per_s"] * tokens / row["batch_size"]
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    tail = max(1, math.ceil(0.1 * len(losses)))
    row["final_train_loss"] = float(np.mean([v for _, v in losses[-tail:]])) if losses else math.nan
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evals:
        row.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
    for extra in ("result.json", "error.json"):
        row.update(
            {k: v for k, v in (read_json(workdir / extra) or {}).items() if k != "traceback"}
        )
    row["workdir"] = str(workdir)
    latest = latest_examples(workdir)
    return Run(
        name=name,
        row=row,
        curve=([s for s, _ in losses], [v for _, v in losses]),
        examples=latest[1] if latest else None,
    )


# (label, row key, formatter) of the Markdown table, in order; eval rows are added per task.
def _mib(x):
    return f"{x / MIB:.1f}"


def _num(x):
    return f"{x:.4g}"


TABLE_ROWS = [
    ("planned peak memory (MiB)", "planned_peak_bytes", _mib),
    ("measured peak memory (MiB)", "measured_peak_bytes", _mib),
    ("step time (s, median)", "step_time_s", _num),
    ("throughput (examples/s)", "examples_per_s", _num),
    ("throughput (tokens/s)", "tokens_per_s", _num),
    ("compile = time to first step (s)", "compile_s", _num),
    ("final train loss", "final_train_loss", _num),
]
TAIL_ROWS = [
    ("base quantisation error (rel. Frobenius)", "quant_rel_error", _num),
    ("load average (1 min) after training", "load_average_1m", _num),
]
NO_RELATIVE = ("quant_rel_error", "load_average_1m")


def eval_keys(rows: Sequence[dict]) -> list[str]:
    """The headline ``eval/`` keys present: loss and perplexity, or recall@K."""
    present = {k for r in rows for k in r if k.startswith("eval/")}
    keys = [k for k in ("eval/loss", "eval/perplexity") if k in present]
    recall = sorted(
        (k for k in present if re.fullmatch(r"eval/(i2t|t2i)_R@\d+", k)),
        key=lambda k: (int(k.rsplit("@", 1)[1]), k),
    )
    return keys + recall


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def relative(value, ref) -> str:
    """``"+12.3%"`` of ``value`` against ``ref``; empty when undefined."""
    if not (_is_number(value) and _is_number(ref)) or ref == 0:
        return ""
    return f"{100.0 * (value - ref) / abs(ref):+.1f}%"


def markdown_table(runs: Sequence[Run], reference: str) -> str:
    """Metrics as rows, runs as columns; cells ``value (relative difference to the
    reference)``; rows no run has are left out."""
    rows = [r.row for r in runs]
    ref = next(r.row for r in runs if r.name == reference)
    spec = TABLE_ROWS + [(k, k, _num) for k in eval_keys(rows)] + TAIL_ROWS
    head = ["metric"] + [f"{r.name} (reference)" if r.name == reference else r.name for r in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| status | " + " | ".join(str(r.get("status", "")) for r in rows) + " |")
    for label, key, fmt in spec:
        if not any(_is_number(r.get(key)) for r in rows):
            continue
        cells = []
        for r in rows:
            v = r.get(key)
            cell = fmt(v) if _is_number(v) else "-"
            rel = relative(v, ref.get(key)) if r is not ref and key not in NO_RELATIVE else ""
            cells.append(f"{cell} ({rel})" if rel else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_table(comparisons: Sequence[bootstrap.Comparison], reference: str) -> str:
    head = f"| metric | run | n | value [95% CI] | difference to {reference} [95% CI] | paired |"
    lines = [head, "|---|---|---|---|---|---|"]
    for c in comparisons:
        value = f"{c.value:.4g} [{c.ci[0]:.4g}, {c.ci[1]:.4g}]"
        if c.diff_ci is None:
            diff, paired = "(reference)" if c.run == reference else "-", ""
        else:
            mark = "significant" if c.significant else "not significant"
            diff = f"{c.diff:+.4g} [{c.diff_ci[0]:+.4g}, {c.diff_ci[1]:+.4g}] {mark}"
            paired = "yes" if c.paired else "no"
        lines.append(f"| {c.metric} | {c.run} | {c.n} | {value} | {diff} | {paired} |")
    return "\n".join(lines)


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """Headline metrics to bootstrap: LM loss and perplexity; CLIP recall@(smallest K)."""
    names = [m for r in runs if r.examples for m in bootstrap.statistics(r.examples)]
    if "loss" in names:
        return ["loss", "perplexity"]
    ks = sorted({int(m.rsplit("@", 1)[1]) for m in names if "@" in m})
    return [f"{d}_R@{ks[0]}" for d in ("i2t", "t2i")] if ks else []


def report(
    runs: Sequence[Run],
    *,
    title: str,
    notes: Sequence[str] = (),
    reference: str | None = None,
    metrics: Sequence[str] | None = None,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = bootstrap.SEED,
) -> tuple[str, list[bootstrap.Comparison]]:
    """The Markdown report of ``runs`` and its bootstrap comparisons.

    ``reference``: a run name (default: the first successful run); ``metrics``: the
    bootstrapped metrics (default :func:`default_metrics`).

    Raises:
      ValueError: a requested metric no run's evaluation examples provide.
    """
    ok = [r for r in runs if r.ok]
    reference = reference or (ok[0].name if ok else runs[0].name)
    md = [f"# {title}", "", *notes, "", markdown_table(runs, reference), ""]
    for r in runs:
        if not r.ok:
            md.append(f"- **{r.name}** {r.row.get('status')}: {r.row.get('error', '')}")
    stats = {r.name: bootstrap.statistics(r.examples) for r in ok if r.examples}
    available = sorted({m for s in stats.values() for m in s})
    if metrics and (unknown := [m for m in metrics if m not in available]):
        raise ValueError(f"metric(s) {unknown} not in the runs' evaluations; have {available}")
    metrics = list(metrics or default_metrics(ok))
    comparisons = []
    if stats and metrics:
        comparisons = bootstrap.compare(stats, reference, metrics, resamples=resamples, seed=seed)
        md += [
            "",
            f"Validation metrics with {bootstrap.LEVEL:.0%} percentile bootstrap intervals "
            f"({resamples:,} resamples of the evaluation examples, seed {seed}); "
            "differences are run minus reference, paired when both evaluated the same "
            "examples, significant when the interval excludes 0.",
            "",
            bootstrap_table(comparisons, reference),
        ]
    return "\n".join(md).rstrip() + "\n", comparisons


def write_report(out_dir: str | Path, runs: Sequence[Run], **kwargs) -> str:
    """Write ``results.md`` (:func:`report`, same arguments), ``results.csv`` (one row per
    run, every field), ``bootstrap.csv`` and ``loss.png``, ``memory.png``,
    ``throughput.png``, ``metrics_ci.png`` into ``out_dir``; return the Markdown."""
    text, comparisons = report(runs, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    keys = list(dict.fromkeys(k for r in runs for k in r.row if k not in ("plan", "overrides")))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(r.row for r in runs)
    with open(out / "bootstrap.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "run", "n", "value", "ci_lo", "ci_hi", "diff", "diff_lo",
                    "diff_hi", "paired", "significant"])  # fmt: skip
        for c in comparisons:
            lo, hi = c.diff_ci or (None, None)
            w.writerow([c.metric, c.run, c.n, c.value, *c.ci, c.diff, lo, hi, c.paired,
                        c.significant])  # fmt: skip
    from experiments import plots  # matplotlib only where plots are drawn

    ok = [r for r in runs if r.ok]
    plots.loss_curves(ok, out / "loss.png")
    memory = {"planned peak memory": "planned_peak_bytes"}
    memory["measured peak memory"] = "measured_peak_bytes"
    plots.bars(ok, out / "memory.png", memory, "MiB", scale=MIB)
    tput = "tokens_per_s" if any("tokens_per_s" in r.row for r in ok) else "examples_per_s"
    plots.bars(ok, out / "throughput.png", {"throughput": tput}, tput.replace("_per_s", "/s"))
    plots.intervals(comparisons, out / "metrics_ci.png")
    return text

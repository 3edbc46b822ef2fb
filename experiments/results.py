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

import ml_collections
import numpy as np

from experiments import bootstrap
from jaxfit import config as config_lib
from jaxfit import tasks

MIB = 1 << 20


@dataclasses.dataclass
class Run:
    """One run: its table row, train-loss curve and latest per-example evaluation;
    ``start``: the per-example evaluation of its starting point (an ablation arm's
    ``WORKDIR/start/eval/step_0.npz``), when there is one."""

    name: str
    row: dict[str, Any]
    curve: tuple[list[int], list[float]] = ((), ())
    examples: dict[str, np.ndarray] | None = None
    start: dict[str, np.ndarray] | None = None

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

    Row keys: ``name, status, error, task, precision, compute_dtype, base_format,
    optimizer, trainable`` (``"lora"`` or ``"full"``), ``trained`` (in words: ``"LoRA
    r=16 on all-linear"``, ``"all weights"``), ``steps, batch_size, step_time_s,
    compile_s, examples_per_s, tokens_per_s (LM), final_train_loss`` (mean logged
    ``train/loss`` over the last 10% of logged steps), ``eval/...`` (the last
    evaluation), plus ``result.json``'s fields when present (``planned_peak_bytes,
    measured_peak_bytes, measured_source, quant_rel_error, trainable_params``).
    ``compute_dtype`` / ``base_format`` are ``config.json``'s (which records them
    resolved), else what the ``precision`` shorthand stands for.
    """
    workdir = Path(workdir)
    name = name or workdir.name
    config = read_json(workdir / "config.json") or {}
    records = read_metrics(workdir)
    row: dict[str, Any] = {"name": name, "status": "ok" if records else "no metrics"}
    row["task"] = config.get("task", "")
    row["precision"] = config.get("precision", "")
    row["compute_dtype"], row["base_format"], lora = "", "", False  # no config.json
    if config:  # the one decoder of the precision fields (config.json records them resolved)
        p = config_lib.precision_settings(ml_collections.ConfigDict(config))
        row["compute_dtype"], row["base_format"], lora = p.compute_dtype, p.base_format, p.lora
    row["optimizer"] = config.get("optim", {}).get("name", "")
    lora_cfg = config.get("lora", {})
    row["trainable"] = "lora" if lora else "full"
    row["trained"] = _trained(lora_cfg, row["base_format"]) if lora else "all weights"
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
    start = latest_examples(workdir / "start")
    return Run(
        name=name,
        row=row,
        curve=([s for s, _ in losses], [v for _, v in losses]),
        examples=latest[1] if latest else None,
        start=start[1] if start else None,
    )


def _trained(lora: dict, base_format: str) -> str:
    """``"LoRA r=16 on c_attn, c_fc"`` (``QLoRA`` over an NF4 base, Dettmers et al. 2023)."""
    targets = lora.get("targets", ())
    targets = ", ".join([targets] if isinstance(targets, str) else targets)
    name = "QLoRA" if base_format == "nf4" else "LoRA"
    return f"{name} r={lora.get('rank', '?')} on {targets or '?'}"


def mixed_methods(runs: Sequence[Run]) -> str:
    """A warning when the successful runs train different parameter sets (full
    fine-tuning next to LoRA, or LoRA of other ranks or targets): their differences then
    measure the method, not the precision. Empty when they all train the same set (LoRA
    over an NF4 base, "QLoRA", trains the same set as LoRA over a float one)."""
    kinds: dict[str, list[str]] = {}
    for r in runs:
        if r.ok:
            kind = str(r.row.get("trained", "?")).replace("QLoRA", "LoRA")
            kinds.setdefault(kind, []).append(r.name)
    if len(kinds) < 2:
        return ""
    parts = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(kinds.items()))
    return (
        f"WARNING: these runs train different parameter sets ({parts}): their differences "
        "mix the training method with the precision. Compare LoRA arms with LoRA arms for "
        "the cost of quantising the base."
    )


# (label, row key, formatter) of the Markdown table, in order; eval rows are added per task.
def _mib(x):
    return f"{x / MIB:.1f}"


def _num(x):
    return f"{x:.4g}"


def _count(x):
    return f"{int(x):,}"


# what each run trained, as text, above the numbers
TEXT_ROWS = [
    ("trained", "trained"),
    ("base format (frozen base storage)", "base_format"),
    ("compute dtype", "compute_dtype"),
    ("optimizer", "optimizer"),
]
TABLE_ROWS = [
    ("trainable parameters", "trainable_params", _count),
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
NO_RELATIVE = ("quant_rel_error", "load_average_1m", "trainable_params")


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
    for label, key in TEXT_ROWS:
        if any(r.get(key) for r in rows):
            lines.append(f"| {label} | " + " | ".join(str(r.get(key) or "-") for r in rows) + " |")
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


def _ci(value: float, ci: tuple[float, float], signed: bool = False) -> str:
    f = "{:+.4g}" if signed else "{:.4g}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def against_baseline(
    baseline: Run,
    runs: Sequence[Run],
    metrics: Sequence[str],
    *,
    start: bool = False,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = bootstrap.SEED,
) -> dict[tuple[str, str], bootstrap.Comparison]:
    """``{(run, metric): comparison}`` of each run's final evaluation (``start``: its
    starting point's, :attr:`Run.start`) against ``baseline``'s, paired where they
    evaluated the same examples; the baseline's own entry has its value and interval."""
    stats = {baseline.name: bootstrap.statistics(baseline.examples or {})}
    for r in runs:
        examples = r.start if start else r.examples
        if examples and r.name != baseline.name:
            stats[r.name] = bootstrap.statistics(examples)
    comparisons = bootstrap.compare(stats, baseline.name, metrics, resamples=resamples, seed=seed)
    return {(c.run, c.metric): c for c in comparisons}


def summary_table(
    runs: Sequence[Run],
    comparisons: Sequence[bootstrap.Comparison],
    reference: str,
    metric: str,
    baseline: Run | None = None,
    final_vs_base: dict | None = None,
    start_vs_base: dict | None = None,
) -> str:
    """One row per run: what it trained, its base's quantisation error, ``metric`` with its
    interval and its paired difference to ``reference``; with a ``baseline`` (the model
    every run started from) also each run's starting point and final value against it
    (:func:`against_baseline`)."""
    by_run = {c.run: c for c in comparisons if c.metric == metric}
    head = ["run", "trained", "trainable params", "base format", "compute dtype",
            "base quant. error"]  # fmt: skip
    base = baseline is not None
    head += [f"start {metric} - base [95% CI]"] if base else []
    head += [f"{metric} [95% CI]"]
    head += [f"{metric} - base [95% CI]"] if base else []
    head += [f"{metric} - {reference} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def diff(table, name):
        c = (table or {}).get((name, metric))
        return _ci(c.diff, c.diff_ci, signed=True) if c and c.diff_ci else "-"

    if base and (b := (final_vs_base or {}).get((baseline.name, metric))):
        cells = [f"{baseline.name} (no fine-tuning)", "-", "-", "float", "float32", "0", "-"]
        lines.append("| " + " | ".join(cells + [_ci(b.value, b.ci), "-", "-"]) + " |")
    for r in runs:
        c = by_run.get(r.name)
        if c is None:
            continue
        row = r.row
        params, qerr = row.get("trainable_params"), row.get("quant_rel_error")
        cells = [r.name, str(row.get("trained", "")), _count(params) if _is_number(params) else "-",
                 str(row.get("base_format", "")), str(row.get("compute_dtype", "")),
                 _num(qerr) if _is_number(qerr) else "-"]  # fmt: skip
        cells += [diff(start_vs_base, r.name)] if base else []
        cells += [_ci(c.value, c.ci)]
        cells += [diff(final_vs_base, r.name)] if base else []
        ref = "(reference)" if r.name == reference else "-"
        cells.append(_ci(c.diff, c.diff_ci, signed=True) if c.diff_ci else ref)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    runs: Sequence[Run],
    *,
    title: str,
    notes: Sequence[str] = (),
    reference: str | None = None,
    metrics: Sequence[str] | None = None,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = bootstrap.SEED,
    baseline: Run | None = None,
) -> tuple[str, list[bootstrap.Comparison]]:
    """The Markdown report of ``runs`` and its bootstrap comparisons.

    ``reference``: a run name (default: the first successful run); ``metrics``: the
    bootstrapped metrics (default :func:`default_metrics`); ``baseline``: the model every
    run started from, evaluated on the same examples (an ablation's base stage): each
    run's paired difference to it goes into a summary table and into the run's row
    (``vs_base/<metric>``, ``vs_base/<metric>_lo``, ``vs_base/<metric>_hi``), and so does
    its starting point's (:attr:`Run.start`; ``start_vs_base/<metric>...``). A warning
    (:func:`mixed_methods`) heads the report when the runs train different parameter sets.

    Raises:
      ValueError: a requested metric no run's evaluation examples provide.
    """
    ok = [r for r in runs if r.ok]
    reference = reference or (ok[0].name if ok else runs[0].name)
    warning = mixed_methods(runs)
    md = [f"# {title}", ""] + ([f"**{warning}**", ""] if warning else [])
    md += [*notes, "", markdown_table(runs, reference), ""]
    for r in runs:
        if not r.ok:
            md.append(f"- **{r.name}** {r.row.get('status')}: {r.row.get('error', '')}")
    stats = {r.name: bootstrap.statistics(r.examples) for r in ok if r.examples}
    available = sorted({m for s in stats.values() for m in s})
    if metrics and (unknown := [m for m in metrics if m not in available]):
        raise ValueError(f"metric(s) {unknown} not in the runs' evaluations; have {available}")
    metrics = list(metrics or default_metrics(ok))
    comparisons: list[bootstrap.Comparison] = []
    if stats and metrics:
        comparisons = bootstrap.compare(stats, reference, metrics, resamples=resamples, seed=seed)
        final_vs_base = start_vs_base = None
        if baseline is not None and baseline.examples:
            kw = dict(resamples=resamples, seed=seed)
            final_vs_base = against_baseline(baseline, ok, metrics, **kw)
            start_vs_base = against_baseline(baseline, ok, metrics, start=True, **kw)
            for prefix, table in (("vs_base", final_vs_base), ("start_vs_base", start_vs_base)):
                for (name, metric), c in table.items():
                    if c.diff_ci is not None:
                        row = next(r.row for r in ok if r.name == name)
                        key = f"{prefix}/{metric}"
                        row[key], (row[f"{key}_lo"], row[f"{key}_hi"]) = c.diff, c.diff_ci
        headline = [m for m in metrics if m != "perplexity"]  # loss says it (exp(loss))
        md += [
            "",
            f"Validation metrics with {bootstrap.LEVEL:.0%} percentile bootstrap intervals "
            f"({resamples:,} resamples of the evaluation examples, seed {seed}); "
            "differences are run minus reference, paired when both evaluated the same "
            "examples, significant when the interval excludes 0.",
        ]
        if final_vs_base:
            md += [
                "",
                f"`base` is the model every run started from ({baseline.row.get('steps')} "
                "steps of the base stage); `start` is each run's starting point (its stored "
                "base, adapters as initialised) evaluated before training: the cost of the "
                "base's storage before the adapters learn.",
            ]
        base = baseline if final_vs_base else None
        for metric in headline:
            table = summary_table(
                ok, comparisons, reference, metric, base, final_vs_base, start_vs_base
            )
            md += ["", table]
        md += ["", bootstrap_table(comparisons, reference)]
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
    warning = mixed_methods(runs)
    plots.loss_curves(ok, out / "loss.png", warning=warning)
    memory = {"planned peak memory": "planned_peak_bytes"}
    memory["measured peak memory"] = "measured_peak_bytes"
    plots.bars(ok, out / "memory.png", memory, "MiB", scale=MIB)
    tput = "tokens_per_s" if any("tokens_per_s" in r.row for r in ok) else "examples_per_s"
    plots.bars(ok, out / "throughput.png", {"throughput": tput}, tput.replace("_per_s", "/s"))
    plots.intervals(comparisons, out / "metrics_ci.png", warning=warning)
    return text

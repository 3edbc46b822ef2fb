"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

Each function takes :class:`experiments.results.Run` objects (or bootstrap comparisons)
and writes one file; a plot with nothing to show is not written (a stale file from an
earlier report is removed).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _save(fig, path: Path, warning: str = "") -> None:
    """Write ``fig``; a ``warning`` (:func:`experiments.results.mixed_methods`) is drawn
    in red above the axes, wrapped to the figure's width."""
    if warning:
        width = int(fig.get_figwidth() * 12)  # ~12 characters per inch at 8 pt
        fig.suptitle(textwrap.fill(warning, width), color="red", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clear(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def loss_curves(runs, path: Path, *, warning: str = "") -> None:
    """``train/loss`` against the step, every run on one axis (log scale); ``warning``:
    see :func:`_save`."""
    curves = [r for r in runs if len(r.curve[0])]
    if not curves:
        return _clear(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in curves:
        ax.plot(r.curve[0], r.curve[1], label=r.name, linewidth=1.2, alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    values = [v for r in curves for v in r.curve[1] if v > 0]
    if values and max(values) > 10 * min(values):  # from-scratch curves: log scale
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    _save(fig, path, warning)


def bars(runs, path: Path, series: dict[str, str], unit: str, *, scale: float = 1.0) -> None:
    """One panel per ``series`` (title -> row key), a bar per run that has the value."""
    panels = []
    for title, key in series.items():
        have = [r for r in runs if _finite(r.row.get(key))]
        if have:
            panels.append((title, [r.name for r in have], [r.row[key] / scale for r in have]))
    if not panels:
        return _clear(path)
    width = max(len(names) for _, names, _ in panels) * 1.1 + 1.5
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4), squeeze=False)
    for i, (ax, (title, names, values)) in enumerate(zip(axes[0], panels)):
        drawn = ax.bar(range(len(names)), values, 0.6, color=f"C{i}")
        ax.bar_label(drawn, fmt="%.4g", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)


def intervals(comparisons, path: Path, *, warning: str = "") -> None:
    """Each bootstrapped metric's value with its confidence interval, per run;
    ``warning``: see :func:`_save`."""
    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    if not metrics:
        return _clear(path)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics) + 1, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        cs = [c for c in comparisons if c.metric == metric]
        ys = [c.value for c in cs]
        err = [[c.value - c.ci[0] for c in cs], [c.ci[1] - c.value for c in cs]]
        ax.errorbar(range(len(cs)), ys, yerr=err, fmt="o", capsize=4)
        ax.set_xticks(range(len(cs)), [c.run for c in cs], rotation=30)
        ax.set_title(metric)
        ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path, warning)

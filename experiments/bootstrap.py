"""Bootstrap confidence intervals over evaluation examples (numpy only).

Every headline metric of a run is a *ratio of sums over evaluation examples*: the LM
validation loss is ``sum(loss_sum) / sum(tokens)`` over validation sequences (perplexity
is its ``exp``), a CLIP recall@K is ``100 * sum(hit@K) / number of queries``, a code
pass@k is ``100 * sum(pass@k of each problem) / number of problems`` (each problem's
unbiased estimate from its ``n`` samples and ``c`` correct ones, Chen et al. 2021 eq. 1,
stored by ``jaxfit.evals.code``; the examples are the problems). A bootstrap resample
draws the examples with replacement (``n`` of ``n``) and recomputes the ratio; the 95%
interval is the 2.5th and 97.5th percentiles of the resampled values (the
percentile bootstrap, Efron & Tibshirani 1993, ch. 13).

When two runs evaluated the SAME examples (equal per-example keys, see
``jaxfit.tasks.*.evaluate_examples``), the difference of their metrics is bootstrapped
*paired*: one set of resampled indices is applied to both runs, so the example-to-example
variation they share cancels out (Koehn 2004, "Statistical significance tests for machine
translation evaluation"). Otherwise both runs are resampled independently. A difference
is called significant when its interval excludes 0.

Example data (``examples``) is what ``WORKDIR/eval/step_<N>.npz`` holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
_MAX_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)


@dataclasses.dataclass(frozen=True)
class Statistic:
    """``transform(sum(num) / sum(den))`` over examples; ``key`` identifies the examples
    (empty: unknown, so never paired)."""

    num: np.ndarray
    den: np.ndarray
    key: np.ndarray
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray

    def value(self) -> float:
        return float(self.transform(np.sum(self.num) / np.sum(self.den)))


def statistics(examples: dict[str, np.ndarray]) -> dict[str, Statistic]:
    """The bootstrappable metrics of one evaluation's examples, by metric name (the names
    of the task's ``evaluate``: ``loss``, ``perplexity``; ``i2t_R@K``, ``t2i_R@K``; and
    ``pass@k`` (percent) of ``python -m jaxfit.evaluate_code``, whose examples are
    problems)."""
    if "loss_sum" in examples:
        num, den = examples["loss_sum"], examples["tokens"]
        key = examples.get("key", np.zeros(0, np.uint64))
        return {"loss": Statistic(num, den, key), "perplexity": Statistic(num, den, key, np.exp)}
    out = {}
    if "c" in examples and "n" in examples:  # code evaluation (jaxfit.evals.code)
        key = examples.get("key", np.zeros(0, np.uint64))
        for k in examples["ks"].tolist():
            est = np.asarray(examples[f"pass@{k}"], np.float64)
            out[f"pass@{k}"] = Statistic(est, np.ones_like(est), key, _percent)
        return out
    if "t2i_rank" in examples:
        for k in examples["ks"].tolist():
            for d in ("i2t", "t2i"):
                rank = examples[f"{d}_rank"]
                key = examples.get(f"{d}_key", np.zeros(0, np.uint64))
                hit = (rank < k).astype(np.float64)
                out[f"{d}_R@{k}"] = Statistic(hit, np.ones_like(hit), key, _percent)
    return out


def _percent(x):
    return 100.0 * np.asarray(x)


def resample(stats: Sequence[Statistic], *, resamples: int = RESAMPLES, seed=SEED) -> np.ndarray:
    """``[len(stats), resamples]`` bootstrap values of statistics over the same ``n``
    examples, every statistic resampled with the SAME indices (paired when several).

    Raises:
      ValueError: the statistics have different numbers of examples, or none.
    """
    n = len(stats[0].num)
    if n == 0 or any(len(s.num) != n for s in stats):
        raise ValueError(
            f"need the same positive number of examples, got {[len(s.num) for s in stats]}"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((len(stats), resamples))
    chunk = max(1, _MAX_ELEMENTS // n)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        for j, s in enumerate(stats):
            out[j, start : start + m] = s.transform(s.num[idx].sum(1) / s.den[idx].sum(1))
    return out


def percentile_ci(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values``."""
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired(a: Statistic, b: Statistic) -> bool:
    """Whether ``a`` and ``b`` are over the same examples in the same order."""
    return len(a.key) > 0 and a.key.shape == b.key.shape and bool(np.all(a.key == b.key))


@dataclasses.dataclass
class Comparison:
    """One metric of one run, and its difference to the reference run (``run - ref``)."""

    metric: str
    run: str
    n: int
    value: float
    ci: tuple[float, float]
    diff: float | None = None
    diff_ci: tuple[float, float] | None = None
    paired: bool | None = None

    @property
    def significant(self) -> bool | None:
        if self.diff_ci is None:
            return None
        return not (self.diff_ci[0] <= 0.0 <= self.diff_ci[1])


def compare(
    stats_by_run: dict[str, dict[str, Statistic]],
    reference: str,
    metrics: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> list[Comparison]:
    """Value, CI, and difference to ``reference`` (paired where possible) of ``metrics``
    for every run (a run lacking a metric is left out). Deterministic given ``seed``."""
    out = []
    runs = list(stats_by_run)
    for metric in metrics:
        ref = stats_by_run.get(reference, {}).get(metric)
        ref_boot = None
        if ref is not None:
            ref_boot = resample([ref], resamples=resamples, seed=[seed, runs.index(reference)])[0]
        for i, run in enumerate(runs):
            s = stats_by_run[run].get(metric)
            if s is None:
                continue
            boot = resample([s], resamples=resamples, seed=[seed, i])[0]
            c = Comparison(metric, run, len(s.num), s.value(), percentile_ci(boot, level))
            if ref is not None and run != reference:
                c.diff = s.value() - ref.value()
                c.paired = paired(s, ref)
                if c.paired:
                    both = resample([s, ref], resamples=resamples, seed=[seed, i, 1])
                    diffs = both[0] - both[1]
                else:
                    diffs = boot - ref_boot  # independent resamples of each run
                c.diff_ci = percentile_ci(diffs, level)
            out.append(c)
    return out

"""Compare finished training runs: one table, plots and bootstrap confidence intervals.

  python experiments/compare_runs.py runs/control runs/experiment --out runs/cmp
  python experiments/compare_runs.py runs/a runs/b runs/c --names base,lr2x,wd0 \\
      --metric t2i_R@1 --metric i2t_R@1 --out runs/cmp

Each argument is a workdir ``python -m jaxfit.train`` wrote (or an arm of
``experiments/ablate_precision.py``), or the output directory of
``python -m jaxfit.evaluate_code`` (pass@k of generated code; its evaluation examples are
the problems, and the default bootstrapped metrics are its ``pass@k``). The FIRST run is
the reference (the control; or ``--reference NAME``): the table shows every metric of
every run with its relative difference to it. Read from each workdir:

* ``metrics.jsonl``: step time (median of the logged ``perf/step_time_s`` after the first
  log, which holds the compilation), throughput (batch / step time; tokens/s for LMs),
  compile time (time to the first step), final train loss (mean over the last 10% of
  logged steps), the last evaluation's ``eval/`` metrics, the train-loss curve;
* ``eval/step_<N>.npz`` (the latest): the per-example evaluation results the trainer
  saves at every evaluation (LM: loss sum and token count per validation sequence; CLIP:
  rank of the first correct candidate per query). The headline metrics (``--metric``;
  default LM ``loss`` and ``perplexity``, CLIP ``i2t_R@K`` / ``t2i_R@K`` for the smallest
  K) get 95% percentile bootstrap intervals (``--resamples``, default 10,000, ``--seed``)
  over the evaluation examples, and so does each run's difference to the reference:
  paired (the same resampled examples for both runs) when both evaluated the same
  examples, independent otherwise; "significant" when the interval excludes 0;
* ``result.json`` when present (ablation arms): planned and measured peak memory and the
  quantisation error.

Prints the Markdown table; with ``--out DIR`` also writes ``results.md``,
``results.csv``, ``bootstrap.csv``, ``loss.png``, ``throughput.png``,
``metrics_ci.png`` (and ``memory.png`` when memory was measured) and ``tb/<name>``
(TensorBoard runs to overlay).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import bootstrap, results, tensorboard_runs  # noqa: E402


def run_names(workdirs: list[str], names: str) -> list[str]:
    """``--names`` (comma-separated) or the workdirs' base names, made unique.

    Raises:
      ValueError: ``--names`` does not name every run, or repeats a name.
    """
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(workdirs) or len(set(out)) != len(out):
            raise ValueError(f"--names needs {len(workdirs)} distinct names, got {out}")
        return out
    out = []
    for w in workdirs:
        name = Path(w).resolve().name
        out.append(name if name not in out else f"{name}_{len(out)}")
    return out


def code_metrics(runs: list[results.Run]) -> list[str]:
    """The ``pass@k`` metrics of code evaluations (``python -m jaxfit.evaluate_code``
    outputs) among ``runs``, by increasing k; empty for training runs."""
    names = {m for r in runs if r.examples for m in bootstrap.statistics(r.examples)}
    return sorted((m for m in names if m.startswith("pass@")), key=lambda m: int(m[5:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="experiments/compare_runs.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("runs", nargs="+", help="workdirs; the first is the reference")
    ap.add_argument("--out", default="", help="write the report and plots here")
    ap.add_argument("--names", default="", help="comma-separated run names")
    ap.add_argument("--reference", default="", help="reference run name (default: first)")
    ap.add_argument("--metric", action="append", default=[], help="bootstrapped metric")
    ap.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES)
    ap.add_argument("--seed", type=int, default=bootstrap.SEED)
    args = ap.parse_args(argv)
    try:
        names = run_names(args.runs, args.names)
        missing = [w for w in args.runs if not (Path(w) / "metrics.jsonl").is_file()]
        if missing:
            raise ValueError(f"not a training workdir (no metrics.jsonl): {missing}")
        runs = [results.summarize_run(w, n) for w, n in zip(args.runs, names)]
        if args.reference and args.reference not in names:
            raise ValueError(f"--reference {args.reference!r} is none of {names}")
        kwargs = dict(
            title="Comparison: " + " vs ".join(names),
            notes=[", ".join(f"{n} = `{w}`" for n, w in zip(names, args.runs)) + "."],
            reference=args.reference or names[0],
            metrics=args.metric or code_metrics(runs) or None,
            resamples=args.resamples,
            seed=args.seed,
        )
        if args.out:
            text = results.write_report(args.out, runs, **kwargs)
            tensorboard_runs.export(Path(args.out) / "tb", runs)
        else:
            text = results.report(runs, **kwargs)[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a run's latest checkpoint: ``python -m jaxfit.evaluate --workdir DIR [--step N]``.

Rebuilds the run's task from ``WORKDIR/config.json``, restores the checkpoint, runs the
task's evaluation (retrieval recall@K for CLIP, validation loss and perplexity for LMs),
writes the metrics at that step to the run's TensorBoard events and ``metrics.jsonl``, and
prints them as JSON on stdout, R@1, R@5, R@10 in that order (progress, and a table with
each recall's chance level, go to stderr).

The checkpoints are only read (safe beside a run still training in WORKDIR): the newest
sealed one that verifies is used (a damaged newer one is named in a warning and
skipped). Non-finite metrics are written nowhere.

exit status:
  0    evaluated
  2    no such workdir, no checkpoint (or not --step), invalid input
  4    the evaluation gave NaN or infinite metrics (nothing written)
  6    checkpoints exist but none is usable (each one's problem is named)
  7    the disk is full (the message names the directory and its free space)

examples:
  python -m jaxfit.evaluate --workdir runs/clip_demo
  python -m jaxfit.evaluate --workdir runs/gpt2 --step 500
"""

from __future__ import annotations

import json
import logging
import sys
import time

from jaxfit import cli, metrics, trainer

PROG = "python -m jaxfit.evaluate"


def parser() -> cli.ArgumentParser:
    """The command line's flags (``--help`` lists them)."""
    parser = cli.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--workdir", required=True, help="run directory written by jaxfit.train")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return parser


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parser().parse_args(argv)
    latest = cli.checkpoint_step(args.workdir, args.step)  # before any data is read
    which = f"step {args.step}" if args.step is not None else (
        f"the newest usable checkpoint (step {latest} is the newest now)"
    )  # fmt: skip
    print(
        f"evaluating {which} of {args.workdir} (rebuilding the task and its data first)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    # without --step the step is chosen when read: a run may add and remove checkpoints
    step, results = trainer.evaluate_checkpoint(args.workdir, args.step)
    print(f"evaluated step {step} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    table = metrics.summary_table(results, title=f"step {step} of {args.workdir}:")
    if table:  # with the chance level of each recall row
        print(table, file=sys.stderr)
    # R@1, R@5, R@10 (natural order), not sorted as strings
    print(json.dumps({"step": step, **metrics.natural_order(results)}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())

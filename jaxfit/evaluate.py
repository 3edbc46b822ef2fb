"""Evaluate a run's latest checkpoint: ``python -m jaxfit.evaluate --workdir DIR [--step N]``.

Rebuilds the run's task from ``WORKDIR/config.json``, restores the checkpoint, runs the
task's evaluation (retrieval recall@K for CLIP, validation loss and perplexity for LMs),
writes the metrics at that step to the run's TensorBoard events and ``metrics.jsonl``, and
prints them as JSON on stdout (progress goes to stderr).

examples:
  python -m jaxfit.evaluate --workdir runs/clip_demo
  python -m jaxfit.evaluate --workdir runs/gpt2 --step 500
"""

from __future__ import annotations

import json
import logging
import sys
import time

from jaxfit import cli, trainer

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
    step = cli.checkpoint_step(args.workdir, args.step)
    print(
        f"evaluating step {step} of {args.workdir} (rebuilding the task and its data first)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    results = trainer.evaluate(args.workdir, step)
    print(f"evaluated step {step} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps({"step": step, **results}, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())

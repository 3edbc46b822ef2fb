"""Evaluate a run's latest checkpoint: ``python -m jaxfit.evaluate --workdir DIR [--step N]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxfit import trainer


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="python -m jaxfit.evaluate", description=__doc__)
    parser.add_argument("--workdir", required=True, help="run directory written by jaxfit.train")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    try:
        results = trainer.evaluate(args.workdir, args.step)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

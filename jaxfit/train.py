"""Train a model: ``python -m jaxfit.train --config configs/clip_coco.py[:ARG] --workdir DIR``.

Any config field can be overridden as ``--config.optim.lr=3e-4``. A workdir that holds a
checkpoint is resumed. See README.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from jaxfit import config as config_lib
from jaxfit import trainer
from jaxfit.oom import OutOfMemoryError
from jaxfit.plan import apply as plan_apply


def run(config, workdir: str | Path) -> dict[str, float]:
    """What the CLI runs: the planner's choice for ``workdir`` applied to ``config``
    (``WORKDIR/plan.json``, or a fresh search when ``config.fit_budget`` is set; see
    :func:`jaxfit.plan.apply.apply_plan`), then :func:`jaxfit.trainer.train`.

    Returns:
      :func:`jaxfit.trainer.train`'s results.
    """
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return trainer.train(plan_apply.apply_plan(config, workdir), workdir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config, flags = config_lib.parse_argv(
            argv or sys.argv, extra_flags={"workdir": "Run directory (checkpoints, logs)."}
        )
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not flags["workdir"]:
        print("error: --workdir DIR is required", file=sys.stderr)
        return 2
    try:
        results = run(config, flags["workdir"])
    except OutOfMemoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    evals = {k: round(v, 3) for k, v in results.items() if k.startswith("eval/")}
    print(f"done: {evals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

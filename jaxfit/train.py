"""Train a model: ``python -m jaxfit.train --config configs/clip_coco.py[:ARG] --workdir DIR``.

Any config field can be overridden as ``--config.optim.lr=3e-4``. A workdir that holds a
checkpoint is resumed. See README.md.

examples:
  python -m jaxfit.train --config configs/clip_coco.py:demo --workdir runs/clip_demo
  python -m jaxfit.train --config configs/gpt2_scratch.py --workdir runs/gpt2 \\
      --config.data.path=input.txt
  python -m jaxfit.train --config configs/gpt2_scratch.py --help   # that config's fields

exit status:
  0    finished (or nothing left to train)
  1    an unexpected error (a bug: the traceback is printed)
  2    invalid config, flags, paths or input; or a resume that would change the run's
       shapes or data order, or on changed data (--accept_data_change goes on); a start
       refused or failed before training leaves the workdir as it was
  3    out of device memory (the message says what to change)
  4    training diverged (NaN/inf loss, gradient or state); the last good checkpoint is
       kept: lower --config.optim.lr and rerun to resume from it
  5    the workdir is in use by another run (named in the message)
  6    checkpoints exist but none is usable (each one's problem is named)
  7    the disk is full (named with its free space); the last sealed checkpoint is intact:
       free some space and rerun to resume from it
  130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM, after checkpointing the last
       completed step: rerun the same command to resume
Logs: the console and WORKDIR/train.log; metrics: WORKDIR/metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from jaxfit import cli, distributed, logs, runtime, trainer, validation
from jaxfit import config as config_lib
from jaxfit import metrics as metrics_lib
from jaxfit import workdir as workdir_lib
from jaxfit.errors import UsageError
from jaxfit.plan import apply as plan_apply


def run(config, workdir: str | Path, *, accept_data_change: bool = False) -> dict[str, float]:
    """What the CLI runs: the planner's choice for ``workdir`` applied to ``config``
    (``WORKDIR/plan.json``, or a fresh search when ``config.fit_budget`` is set; see
    :func:`jaxfit.plan.apply.apply_plan`), then :func:`jaxfit.trainer.train`.

    Returns:
      :func:`jaxfit.trainer.train`'s results.
    """
    with workdir_lib.lock(workdir):  # before planning, which may write plan.json
        return trainer.train(
            plan_apply.apply_plan(config, workdir), workdir, accept_data_change=accept_data_change
        )


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv or sys.argv, prog="python -m jaxfit.train", doc=__doc__)


def _main(argv: list[str]) -> int:
    logs.setup(verbose=cli.debug_requested(argv))  # library INFO lines only with --verbose
    config, flags = config_lib.parse_argv(
        argv,
        extra_flags={
            "workdir": "Run directory (checkpoints, logs); created if missing.",
            **distributed.FLAGS,
        },
        bool_flags={
            "dry_run": "Check the config and flags, print the config, and stop.",
            "accept_data_change": "Resume although the training or validation data changed "
            "since the checkpoint (recorded in WORKDIR/config_history/changes.jsonl).",
        },
    )
    runtime.configure_runtime()  # compilation cache, XLA flag defaults: before any device
    validation.validate_values(config)  # every value, before any work or write
    distributed.initialize_from_flags(flags)  # before anything touches a device
    workdir = flags["workdir"]
    if not workdir:
        raise UsageError("--workdir DIR is required, in the command line, e.g. --workdir runs/x")
    cli.check_output_dir("--workdir", workdir)  # a file, not writable, cannot be created
    if flags["dry_run"]:
        print(config)
        return 0
    # the errors (out of memory, non-finite, busy workdir, ...) carry their exit status
    # (jaxfit.errors.Error.exit_code, reported by cli.run); a signal is no error
    try:
        results = run(config, flags["workdir"], accept_data_change=flags["accept_data_change"])
    except trainer.StoppedBySignal as e:
        command = shlex.join(["python", "-m", "jaxfit.train", *argv[1:]])
        resume = f"; resume with: {command}" if e.step is not None else ""
        print(f"{e}{resume}", file=sys.stderr)
        return e.exit_code
    table = metrics_lib.summary_table(results, title=f"results ({workdir}):")
    if table:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

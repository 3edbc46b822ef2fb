"""One TensorBoard run per compared run, so ``tensorboard --logdir DIR`` overlays them.

:func:`export` copies each run's event files (scalars and the trainer's ``hparams`` text
summary) into ``DIR/<name>/`` and adds the HParams plugin's records: a session per run
with its settings (precision, optimizer, trainable, ...) and, at ``DIR``, the experiment
listing them and the metrics, so the HParams tab tables the runs side by side.
Written with tensorboard's framework-free event writer (no TensorFlow needed).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from experiments.results import Run, eval_keys, read_json

SETTINGS = ("precision", "optimizer", "trainable", "steps", "batch_size", "status")


def _write(logdir: Path, summary, suffix: str) -> None:
    writer = EventFileWriter(str(logdir), filename_suffix=suffix)
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
    writer.close()


def hparams(run: Run) -> dict:
    """The settings recorded for ``run`` (HParams values: str, int, float or bool)."""
    out = {k: run.row[k] for k in SETTINGS if isinstance(run.row.get(k), str | int | float)}
    config = read_json(Path(run.row.get("workdir", "")) / "config.json") or {}
    out["lr"] = float(config.get("optim", {}).get("lr", 0.0))
    if out.get("trainable") == "lora":
        out["lora_rank"] = int(config.get("lora", {}).get("rank", 0))
    out["seed"] = int(config.get("seed", 0))
    return out


def export(tb_dir: str | Path, runs: Sequence[Run]) -> None:
    """Rewrite ``tb_dir`` with one sub-directory per run (see the module docstring)."""
    tb_dir = Path(tb_dir)
    tb_dir.mkdir(parents=True, exist_ok=True)
    for old in tb_dir.glob("events.out.tfevents.*"):
        old.unlink()
    settings = {}
    for run in runs:
        dst = tb_dir / run.name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        workdir = Path(run.row.get("workdir", ""))
        for events in sorted(workdir.glob("events.out.tfevents.*")):
            shutil.copy2(events, dst / events.name)
        settings[run.name] = hparams(run)
        _write(dst, hp.hparams_pb(settings[run.name], trial_id=run.name), ".hparams")
    names = sorted({k for s in settings.values() for k in s})
    metrics = ["train/loss"] + eval_keys([r.row for r in runs])
    config = hp.hparams_config_pb(
        hparams=[hp.HParam(k) for k in names], metrics=[hp.Metric(m) for m in metrics]
    )
    _write(tb_dir, config, ".hparams")

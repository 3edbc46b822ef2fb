"""One metric writer that fans out to TensorBoard, ``metrics.jsonl`` and a console progress bar.

TensorBoard events are written with ``tensorboard``'s own framework-free event writer
(``tensorboard.summary.writer.event_file_writer.EventFileWriter``; no TensorFlow or torch
needed). Scalars use the classic ``simple_value`` encoding, which TensorBoard and
``EventAccumulator.Scalars`` both read; text uses the text plugin's tensor encoding
(``EventAccumulator.Tensors``).

Only process 0 writes (``jax.process_index() == 0``); the others get a no-op writer.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value), dtype=np.float64))


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raise if any scalar metric is NaN or infinite.

    Raises:
      FloatingPointError: naming the first non-finite metric, its value and the step.
    """
    for name, value in metrics.items():
        arr = np.asarray(jax.device_get(value))
        if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
            raise FloatingPointError(f"non-finite metric {name}={arr} at step {step}")


class MetricWriter:
    """Writes scalars to TensorBoard and ``<workdir>/metrics.jsonl``; shows a tqdm bar.

    Args:
      workdir: run directory; events go to ``workdir`` itself (``events.out.tfevents.*``),
        ``metrics.jsonl`` and ``hparams.json`` next to them. Created if missing.
      total_steps: length of the run, for the progress bar's ETA.
      console: show the progress bar (stderr) with the latest scalars as postfix.
      initial_step: where the bar starts (resumed runs).

    ``metrics.jsonl`` is appended to (a resumed run continues the file); one JSON object
    per :meth:`write_scalars` call: ``{"step": int, "time": unix seconds, name: float...}``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        console: bool = True,
        initial_step: int = 0,
    ):
        self.workdir = os.fspath(workdir)
        self.active = jax.process_index() == 0
        self._events = None
        self._jsonl = None
        self._bar = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._events = EventFileWriter(self.workdir)
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if console:
            # In a log file (no terminal) redraw at most every 30 s instead of 10 times/s.
            interactive = sys.stderr.isatty()
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=initial_step,
                dynamic_ncols=True,
                unit="step",
                mininterval=0.1 if interactive else 30.0,
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write ``{name: scalar}`` (floats, numpy or jax scalars) at ``step``."""
        if not self.active:
            return
        step = int(step)
        values = {k: _to_float(v) for k, v in scalars.items()}
        event = event_pb2.Event(wall_time=time.time(), step=step)
        for name, value in values.items():
            event.summary.value.add(tag=name, simple_value=value)
        self._events.add_event(event)
        self._events.flush()
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            self._bar.set_postfix(
                {k.removeprefix("train/"): _short(v) for k, v in values.items()}, refresh=False
            )

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Write a (markdown) text summary, shown in TensorBoard's Text tab."""
        if not self.active:
            return
        event = event_pb2.Event(wall_time=time.time(), step=int(step))
        event.summary.value.add(
            tag=tag,
            tensor=tensor_util.make_tensor_proto(np.array(text.encode("utf-8"), dtype=object)),
            metadata=text_metadata.create_summary_metadata(display_name=tag, description=""),
        )
        self._events.add_event(event)
        self._events.flush()

    def write_hparams(self, hparams: Mapping[str, Any] | Any) -> None:
        """Record the run's hyperparameters: ``<workdir>/hparams.json`` + a text summary.

        ``hparams`` is a dict or an ``ml_collections.ConfigDict`` (``to_dict()`` is used);
        values JSON cannot encode are written with ``str``.
        """
        if not self.active:
            return
        if hasattr(hparams, "to_dict"):
            hparams = hparams.to_dict()
        text = json.dumps(hparams, indent=2, sort_keys=True, default=str)
        with open(os.path.join(self.workdir, "hparams.json"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        # Indented by four spaces: a markdown code block in TensorBoard's text plugin.
        self.write_text(0, "hparams", "\n".join("    " + line for line in text.splitlines()))

    def update_progress(self, step: int) -> None:
        """Move the progress bar to ``step`` (absolute); cheap, call every step."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Flush and close every output (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.active = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(x: float) -> str:
    if not math.isfinite(x) or x == 0:
        return str(x)
    return f"{x:.3e}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4g}"

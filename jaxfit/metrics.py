"""One metric writer that fans out to TensorBoard, ``metrics.jsonl`` and a console progress bar.

TensorBoard events are written with ``tensorboard``'s own framework-free event writer
(``tensorboard.summary.writer.event_file_writer.EventFileWriter``; no TensorFlow or torch
needed). Scalars use the classic ``simple_value`` encoding, which TensorBoard and
``EventAccumulator.Scalars`` both read; text uses the text plugin's tensor encoding
(``EventAccumulator.Tensors``).

Only process 0 writes (``jax.process_index() == 0``); the others get a no-op writer.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from jaxfit.errors import Error
from jaxfit.evals.retrieval import chance_recall


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value), dtype=np.float64))


class NonFiniteError(Error, FloatingPointError):
    """A step produced NaN or infinite values; nothing of that step was checkpointed
    (exit status 4).

    Attributes:
      step: the step whose result is non-finite.
      names: what went bad (metric names, or parameter / optimizer-state paths).
    """

    exit_code = 4

    def __init__(self, message: str, *, step: int, names: list[str]):
        super().__init__(message)
        self.step = step
        self.names = names


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raise if any scalar metric is NaN or infinite.

    Raises:
      NonFiniteError: (a ``FloatingPointError``) naming the first non-finite metric, its
        value and the step.
    """
    for name, value in metrics.items():
        arr = np.asarray(jax.device_get(value))
        if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
            raise NonFiniteError(
                f"non-finite metric {name}={arr} at step {step}", step=step, names=[name]
            )


def _floating(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """On-device ``bool[]``: every floating-point leaf of ``tree`` is free of NaN and inf.

    One fused reduction, so a step's metrics (``loss``, ``grad_norm``: a non-finite
    gradient norm is the sign of non-finite updates) can be checked every step at the
    cost of moving one bool to the host; also used on whole train states before a
    checkpoint is written. Integer leaves (step counters, 8-bit moments, PRNG keys) are
    ignored; a tree without floating leaves is finite.
    """
    flags = [jnp.isfinite(x).all() for x in _floating(tree)]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def nonfinite_paths(tree: Any, limit: int = 5) -> list[str]:
    """``"path=value"`` of up to ``limit`` floating-point leaves holding NaN or inf (the
    value: a scalar itself, else ``"k of n non-finite"``), in tree order; for messages.
    Moves each leaf's finiteness (one bool per leaf) to the host."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        bad = int(jax.device_get((~jnp.isfinite(leaf)).sum()))
        if bad:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            value = (
                float(jax.device_get(leaf))
                if leaf.ndim == 0
                else f"{bad} of {leaf.size} non-finite"
            )
            out.append(f"{name}={value}")
            if len(out) >= limit:
                break
    return out


def drop_rows_after(workdir: str | os.PathLike, step: int) -> int:
    """Remove the ``metrics.jsonl`` rows logged after ``step`` (and a partial last line),
    so that a run resumed from the checkpoint at ``step`` logs each step once. Call it
    before opening a :class:`MetricWriter` on ``workdir``; the file is rewritten
    atomically. Returns the number of rows removed."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricWriter:
    """Writes scalars to TensorBoard and ``<workdir>/metrics.jsonl``; shows a tqdm bar.

    Args:
      workdir: run directory; events go to ``workdir`` itself (``events.out.tfevents.*``),
        ``metrics.jsonl`` and ``hparams.json`` next to them. Created if missing.
      total_steps: length of the run, for the progress bar's ETA.
      console: show the progress bar (stderr) with the latest scalars worth watching
        (:func:`console_postfix`) as postfix. It appears after the first step of the
        process (which compiles the step; its time gets a line of its own), so rate and
        ETA exclude the compilation; a run with nothing left to do says so instead.
      initial_step: where the bar starts (resumed runs).

    ``metrics.jsonl`` is appended to (a resumed run continues the file); one JSON object
    per :meth:`write_scalars` call: ``{"step": int, "time": unix seconds, name: float...}``.
    """

    PLAIN_INTERVAL_S = 30.0  # seconds between two progress lines when stderr is no terminal

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
        self._plain: list[float] | None = None  # the progress as plain lines (no terminal)
        self._console = console and self.active
        self._bar_args = dict(total=total_steps, unit="step")
        self._first_step = initial_step
        self._postfix: dict[str, str] = {}
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._events = EventFileWriter(self.workdir)
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if self._console:
            if initial_step >= total_steps:
                print(
                    f"already finished at step {initial_step} (total_steps={total_steps}): "
                    "nothing to train; raise --config.total_steps to train on",
                    file=sys.stderr,
                )
            else:
                print(
                    f"step {initial_step}: compiling the train step, then running the first step",
                    file=sys.stderr,
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
        if self._console:
            shown = console_postfix(values)
            if step <= self._first_step + 1:  # rates over the compiling step: not a speed
                shown = {k: v for k, v in shown.items() if k not in ("tok/s", "img/s", "mfu")}
            self._postfix.update(shown)
            if self._bar is not None:
                self._bar.set_postfix(self._postfix, refresh=False)
            evals = [(k.removeprefix("eval/"), v) for k, v in _natural(values) if k[:5] == "eval/"]
            if evals:
                line = f"step {step} eval: " + ", ".join(f"{k}={_short(v)}" for k, v in evals)
                tqdm.tqdm.write(line, file=sys.stderr)

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

    def mark_restart(self, step: int) -> None:
        """Tell TensorBoard the run restarted from ``step``: a ``SessionLog.START`` event at
        ``step + 1`` makes it discard the events of the previous attempt after ``step``
        (TensorBoard's ``EventAccumulator`` purges steps >= a START event's step)."""
        if not self.active:
            return
        event = event_pb2.Event(wall_time=time.time(), step=int(step) + 1)
        event.session_log.status = event_pb2.SessionLog.START
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

    def first_step(self, compile_s: float, run_s: float) -> None:
        """Report the first step of the process on a line of its own: the seconds spent
        compiling it and running it (each measured to ``block_until_ready`` by the
        caller, :mod:`jaxfit.trainer`)."""
        if self._console:
            print(
                f"compiled the train step in {compile_s:.1f} s; "
                f"ran the first step in {run_s:.2f} s",
                file=sys.stderr,
            )

    def update_progress(self, step: int) -> None:
        """Move the progress bar to ``step`` (absolute); cheap, call every step.

        The bar starts after the first step of the process (compiled and run, reported
        by :meth:`first_step`), so its rate and ETA are those of the steady steps after.
        On a terminal it is a tqdm bar; when stderr is a file or a pipe (``2> log``,
        ``| tee``), where every redraw of a bar would be one more copy of it, it is a plain
        line ``step N/T (P%): S s/step, ETA H:MM:SS; loss=...`` at most every
        :attr:`PLAIN_INTERVAL_S` seconds and at the last step, each printed once.
        """
        if not self._console:
            return
        if self._bar is None and self._plain is None:
            if step <= self._first_step:
                return
            if sys.stderr.isatty():
                self._bar = tqdm.tqdm(
                    initial=step,
                    dynamic_ncols=True,
                    mininterval=0.1,
                    postfix=self._postfix or None,
                    **self._bar_args,
                )
            else:  # [steady start step, its time, the last step printed, its time]
                now = time.perf_counter()
                self._plain = [step, now, step, now]
            return
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            return
        start, t_start, printed, t_printed = self._plain
        now = time.perf_counter()
        total = self._bar_args["total"]
        if step > printed and (now - t_printed >= self.PLAIN_INTERVAL_S or step >= total):
            self._plain[2:] = [step, now]
            per_step = (now - t_start) / max(step - start, 1)
            eta = datetime.timedelta(seconds=round(per_step * max(total - step, 0)))
            line = f"step {step}/{total} ({100 * step / total:.0f}%): {per_step:.3g} s/step, "
            line += f"ETA {eta}"
            if self._postfix:
                line += "; " + ", ".join(f"{k}={v}" for k, v in self._postfix.items())
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close every output (idempotent)."""
        if self._bar is not None:
            bar, self._bar = self._bar, None
            if bar.last_print_n == bar.n and not bar.disable:
                # Already shown at its final count: end its line instead of drawing it
                # again (a second copy after other output).
                bar.disable = True
                bar.fp.write("\n")
                bar.fp.flush()
            else:
                bar.close()
        self._plain = None
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


# Console names of the metrics worth watching; others (internals such as the accumulated
# loss_weight, or the step time the rate already shows) stay in TensorBoard / metrics.jsonl.
_CONSOLE_NAMES = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "perf/tokens_per_sec": "tok/s",
    "perf/images_per_sec": "img/s",
    "perf/mfu": "mfu",
}


def mfu_shown() -> bool:
    """MFU is measured against ``config.device``'s peak (an accelerator); on a CPU backend
    that ratio describes no device in use, so the console leaves it out."""
    return jax.default_backend() != "cpu"


def console_postfix(values: Mapping[str, float]) -> dict[str, str]:
    """The progress bar's ``{short name: text}`` for logged ``values``: the training
    metrics of :data:`_CONSOLE_NAMES` and skipped-data counts that are not zero
    (evaluations get a line of their own)."""
    out = {}
    for name, value in values.items():
        if name == "perf/mfu":
            if mfu_shown():
                out["mfu"] = f"{value:.1%}"
        elif name in _CONSOLE_NAMES:
            out[_CONSOLE_NAMES[name]] = _short(value)
        elif name.startswith("data/skipped_") and value:
            out[name.removeprefix("data/")] = str(int(value))
    return out


_RECALL = re.compile(r"^eval/(i2t|t2i)_R@(\d+)$")


def chance_column(results: Mapping[str, float]) -> dict[str, float]:
    """``{recall row name: its chance level in percent}`` for the retrieval rows of
    ``results`` (``eval/t2i_R@K``, ``eval/i2t_R@K``), when the gallery sizes are known
    (``eval/num_images``, ``eval/num_captions``); empty otherwise.

    t2i (the gallery: N images, one right): ``K / N``. i2t (the gallery: the captions,
    ``c = num_captions / num_images`` of them right): the chance that the top K of a
    random ranking holds one of them, ``1 - C(M - c, K) / C(M, K)`` with M captions
    (:func:`jaxfit.evals.retrieval.chance_recall`); ``c K / M`` for small K."""
    images, captions = results.get("eval/num_images"), results.get("eval/num_captions")
    if not images or not captions:
        return {}
    out = {}
    for name in results:
        found = _RECALL.match(name)
        if found:
            chance = chance_recall(int(images), float(captions) / float(images), int(found[2]))
            out[name] = chance[found[1]]
    return out


def summary_table(results: Mapping[str, float], *, title: str = "") -> str:
    """The end-of-run table: one ``metric  value`` row per result worth reading
    (evaluation first, then training, speed and skipped data; internals and a CPU's MFU
    left out, as on the progress bar). Retrieval recall rows get a ``chance`` column
    (:func:`chance_column`) when the gallery sizes are known. Empty when there is
    nothing to show."""
    order = ("eval/", "train/", "perf/", "data/")
    hidden = {"train/loss_weight"}
    if not mfu_shown():
        hidden.add("perf/mfu")
    if "perf/tokens_per_sec" in results or "perf/images_per_sec" in results:
        hidden.add("perf/examples_per_sec")  # the same rate in the task's own unit
    chance = chance_column(results)
    rows = []
    for prefix in order:
        for name, value in _natural(results):
            if not name.startswith(prefix) or name in hidden:
                continue
            value = float(value)
            if name.startswith("data/skipped_") and not value:
                continue
            rows.append((name, f"{value:.2%}" if name == "perf/mfu" else _short(value)))
    rows += [(k, _short(float(v))) for k, v in results.items() if not k.startswith(order)]
    if not rows:
        return ""
    width = max(len("metric"), *(len(n) for n, _ in rows))
    vwidth = max(len("value"), *(len(v) for _, v in rows))
    lines = [title] if title else []
    if chance:
        lines.append(f"{'metric':<{width}}  {'value':>{vwidth}}  {'chance':>8}")
        lines.append(f"{'-' * width}  {'-' * vwidth}  {'-' * 8}")
        for n, v in rows:
            extra = f"  {_short(chance[n]):>8}" if n in chance else ""
            lines.append(f"{n:<{width}}  {v:>{vwidth}}{extra}")
        lines.append("(chance: the recall of a random ranking of the same gallery, in percent)")
        return "\n".join(lines)
    lines.append(f"{'metric':<{width}}  {'value':>{vwidth}}")
    lines.append(f"{'-' * width}  {'-' * vwidth}")
    lines += [f"{n:<{width}}  {v:>{vwidth}}" for n, v in rows]
    return "\n".join(lines)


def natural_order(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as a dict in natural name order (``R@1, R@5, R@10``, not ``R@1, R@10,
    R@5`` as ``sorted`` gives); for printing."""
    return dict(_natural(values))


def _natural(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Items sorted by name with digit runs as numbers (``R@5`` before ``R@10``)."""

    def key(item):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]

    return sorted(values.items(), key=key)


def _short(x: float) -> str:
    """A number for the console: integral values of 1 and up as integers (a count of
    tokens is ``15420``, not ``1.542e+04``), others to 4 significant digits."""
    if not math.isfinite(x) or x == 0:
        return str(x)
    if x == int(x) and abs(x) >= 1:
        return str(int(x))
    return f"{x:.3e}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4g}"

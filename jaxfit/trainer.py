"""The training loop shared by every task: state, steps, evaluation, logging, checkpoints.

``train(config, workdir)`` is what ``python -m jaxfit.train`` calls. The loop is the same
for every task (``jaxfit.tasks``); a task only supplies the model, data, loss and
evaluation. A workdir that already holds a checkpoint is resumed from it: parameters,
optimizer state, RNG and the data iterator's position, so an interrupted run ends with
the same parameters as one that ran straight through.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxfit import checkpoint, oom, sharding
from jaxfit import config as config_lib
from jaxfit import metrics as metrics_lib
from jaxfit.optim import make_optimizer
from jaxfit.step import TrainState, abstract_train_state, create_train_state, jit_train_step
from jaxfit.tasks import build_task
from jaxfit.tasks.base import param_rng

log = logging.getLogger(__name__)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (then checkpoint and exit)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing after this step, then stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_state(task, optimizer, config, mesh, ckpt: checkpoint.Checkpointer):
    """Create the train state in its shardings, or restore it from the latest checkpoint.

    Returns:
      ``(state, state_shardings, meta)``; ``meta`` is ``None`` for a fresh state.
    """
    abstract_state, state_shardings, make_state = abstract_train_state(
        task, optimizer, config, mesh
    )
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("resuming from checkpoint at step %d in %s", latest, ckpt.directory)
        state, meta = ckpt.restore(checkpoint.to_abstract(abstract_state, state_shardings))
        return state, state_shardings, meta
    params = task.initial_params(param_rng(config), state_shardings.params)
    state = jax.jit(make_state, out_shardings=state_shardings)(params)
    return state, state_shardings, None


def train(
    config, workdir: str | Path, *, on_step: Callable[[int, TrainState], None] | None = None
) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Args:
      config: a validated ``ConfigDict`` (see ``jaxfit.config``), used as given: a
        planner's choice (``plan.json``, ``fit_budget``) is applied by the caller
        (``jaxfit.train``) before this is called.
      workdir: run directory: ``config.json``, ``checkpoints/``, TensorBoard events,
        ``metrics.jsonl`` and the task's artefacts (tokenizer) go there.
      on_step: optional hook ``(step, state)`` called after every step (tests use it to
        simulate an interruption by raising).

    Returns:
      The last evaluation's metrics (namespaced ``eval/...``) merged with the last logged
      train metrics.

    Raises:
      FloatingPointError: a non-finite loss or gradient norm.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, workdir)
    mesh = sharding.make_mesh()
    task = build_task(config, workdir, mesh)
    abstract_params = task.abstract_params()
    optimizer, schedule = make_optimizer(config.optim, config.total_steps, abstract_params)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    try:
        state, state_shardings, meta = build_state(task, optimizer, config, mesh, ckpt)
    except Exception as e:
        ckpt.close()
        if oom.is_out_of_memory(e):
            raise oom.OutOfMemoryError.from_config(config, e, "initialisation") from e
        raise
    iterator = task.train_iterator()
    if meta is not None:
        iterator.set_state(meta["data"])
    # Inputs keep the shardings they were placed with (state: out_shardings of its
    # creation or restore; batch: shard_batch; frozen base: device_put).
    step_fn = jit_train_step(task, optimizer, schedule, state_shardings, mesh)
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, total_steps=config.total_steps, initial_step=start)
    if start == 0:
        writer.write_hparams(config.to_dict())
    results: dict[str, float] = {}
    try:
        results = _loop(config, task, state, step_fn, iterator, mesh, ckpt, writer, start, on_step)
    finally:
        ckpt.close()
        writer.close()
    return results


def _loop(config, task, state, step_fn, iterator, mesh, ckpt, writer, step, on_step):
    results: dict[str, float] = {}
    total = config.total_steps
    batch_size = config.batch_size
    t_last, steps_since = time.perf_counter(), 0
    start = step
    with _StopSignal() as stop:
        while step < total:
            batch = sharding.shard_batch(next(iterator), mesh)
            state, metrics = _run_step(step_fn, state, batch, task, config, first=step == start)
            step += 1
            steps_since += 1
            if on_step is not None:
                on_step(step, state)
            last = step == total
            if step % config.log_every == 0 or last:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics_lib.check_finite(host, step)
                elapsed = time.perf_counter() - t_last
                t_last, n = time.perf_counter(), steps_since
                steps_since = 0
                scalars = {f"train/{k}": v for k, v in host.items()}
                scalars["perf/step_time_s"] = elapsed / n
                scalars["perf/examples_per_sec"] = batch_size * n / elapsed
                scalars.update(task.throughput(scalars["perf/examples_per_sec"]))
                scalars.update({f"data/skipped_{k}": v for k, v in task.skip_counts().items()})
                writer.write_scalars(step, scalars)
                results.update(scalars)
            if step % config.eval_every == 0 or last:
                t0 = time.perf_counter()
                ev = run_evaluation(task, state.params, writer.workdir, step)
                ev = {f"eval/{k}": v for k, v in ev.items()}
                ev["perf/eval_time_s"] = time.perf_counter() - t0
                writer.write_scalars(step, ev)
                results.update(ev)
                t_last = time.perf_counter()  # evaluation time is not training time
            if step % config.ckpt_every == 0 or last or stop.requested:
                ckpt.save(step, state, {"data": iterator.get_state()}, force=True)
            writer.update_progress(step)
            if stop.requested:
                log.warning("stopped at step %d on signal; checkpoint written", step)
                break
    return results


def _run_step(step_fn, state, batch, task, config, *, first: bool):
    """One step; an out-of-memory error in the first step of this process (which also
    compiles it) becomes an :class:`OutOfMemoryError` that says what to change."""
    if not first:
        return step_fn(state, batch, task.frozen)
    try:
        return step_fn(state, batch, task.frozen)
    except Exception as e:
        if oom.is_out_of_memory(e):
            raise oom.OutOfMemoryError.from_config(config, e, "the first step") from e
        raise


def run_evaluation(task, params, workdir: str | Path, step: int) -> dict[str, float]:
    """The task's evaluation metrics at ``step``; a task with ``evaluate_examples`` also
    has its per-example results saved to ``WORKDIR/eval/step_<step>.npz`` (atomically,
    process 0 only; read by ``experiments/compare_runs.py``)."""
    if not hasattr(task, "evaluate_examples"):
        return dict(task.evaluate(params))
    metrics, examples = task.evaluate_examples(params)
    if examples and jax.process_index() == 0:
        path = Path(workdir) / "eval" / f"step_{int(step)}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **examples)
        os.replace(tmp, path)
    return metrics


def restore_params(workdir: str | Path, step: int | None = None):
    """Rebuild the task of a finished or running workdir and restore its parameters.

    Returns:
      ``(config, task, params, step)``.

    Raises:
      FileNotFoundError: the workdir has no config.json or no checkpoint.
    """
    workdir = Path(workdir)
    config = config_lib.load_saved_config(workdir)
    mesh = sharding.make_mesh()
    task = build_task(config, workdir, mesh)
    abstract_params = task.abstract_params()
    optimizer, _ = make_optimizer(config.optim, config.total_steps, abstract_params)
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        found = ckpt.latest_step() if step is None else step
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {str(workdir / 'checkpoints')!r}")
        abstract_state = jax.eval_shape(
            lambda p: create_train_state(p, optimizer, jax.random.key(0)), abstract_params
        )
        repl = sharding.replicated(mesh)
        state, _ = ckpt.restore(checkpoint.to_abstract(abstract_state, repl), step=found)
    return config, task, state.params, found


def evaluate(workdir: str | Path, step: int | None = None) -> dict[str, float]:
    """Re-run the task's evaluation from a workdir's latest (or given) checkpoint.

    Writes the metrics to TensorBoard / ``metrics.jsonl`` under ``eval/`` at that step and
    returns them.
    """
    config, task, params, found = restore_params(workdir, step)
    results = {
        f"eval/{k}": float(v) for k, v in run_evaluation(task, params, workdir, found).items()
    }
    writer = metrics_lib.MetricWriter(Path(workdir), total_steps=config.total_steps, console=False)
    try:
        writer.write_scalars(found, results)
    finally:
        writer.close()
    log.info("evaluation at step %d: %s", found, results)
    return results


__all__ = [
    "build_state",
    "evaluate",
    "restore_params",
    "run_evaluation",
    "train",
]

"""The training loop shared by every task: state, steps, evaluation, logging, checkpoints.

``train(config, workdir)`` is what ``python -m jaxfit.train`` calls. The loop is the same
for every task (``jaxfit.tasks``); a task only supplies the model, data, loss and
evaluation. A workdir that already holds a checkpoint is resumed from it: parameters,
optimizer state, RNG and the data iterator's position, so an interrupted run ends with
the same parameters as one that ran straight through.

What protects a run (see docs/troubleshooting.md):

* one run per workdir (``WORKDIR/run.lock``, :mod:`jaxfit.workdir`);
* a resume may not change shapes or the data order (:func:`jaxfit.workdir.check_resume`);
  ``config.json`` is rewritten only once the state is restored (old one kept in
  ``config_history/``);
* every step's loss and gradient norm are checked for NaN/inf on the device (one bool
  to the host, one step behind so the host keeps running ahead; at once at log, eval and
  checkpoint steps); a non-finite step stops the run (:class:`NonFiniteError`) and a
  checkpoint is written only of a state whose every floating-point leaf is finite;
* a damaged or non-finite latest checkpoint is reported and set aside, and the previous
  one is used (:meth:`jaxfit.checkpoint.Checkpointer.restore_latest_usable`);
* SIGTERM/SIGINT: answered at once, even while a step runs in XLA (what will happen, and
  about when); checkpoint after the current step, then :class:`StoppedBySignal`; a second
  signal ends the process at once with ``128 + signum`` (130 for Ctrl-C), the lock
  released and the last complete checkpoint kept; before the loop starts, the first one
  stops the run at once (nothing to save);
* the first step's compilation and run are timed apart (each until
  ``block_until_ready``: ``perf/compile_time_s``, ``perf/first_step_time_s``); the pace
  (``perf/step_time_s``, the progress bar's ETA) counts the steps after it only; a run on
  a CPU that the first step says will take an hour or more says so then, with how to
  shorten it (:func:`long_run_notice`);
* log records go to ``WORKDIR/train.log`` too, and ``metrics.jsonl`` holds each step once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np

from jaxfit import checkpoint, errors, logs, oom, sharding, target, validation
from jaxfit import config as config_lib
from jaxfit import metrics as metrics_lib
from jaxfit import workdir as workdir_lib
from jaxfit.run import Run, build_run
from jaxfit.step import TrainState
from jaxfit.tasks import resolve_config, source_fingerprint

log = logging.getLogger(__name__)

LOG_FILE = "train.log"
# A CPU run estimated to last this long or more is told so at its first step, with how to
# shorten it (long_run_notice); a run of a few minutes is what the :small presets are for.
LONG_CPU_RUN_S = 3600.0
SHORT_RUN_S = 600.0  # the length of run the notice's --config.total_steps suggestion aims at
NonFiniteError = metrics_lib.NonFiniteError


class StoppedBySignal(BaseException):  # noqa: N818 (like KeyboardInterrupt, not an error)
    """The run stopped on SIGTERM / SIGINT, after checkpointing its last completed step
    when it was training. A ``BaseException`` (like ``KeyboardInterrupt``), so that no
    ``except Exception`` on the way out mistakes it for a failure of what it interrupted.

    Attributes:
      signum: the signal's number; ``exit_code`` is ``128 + signum`` (143 for SIGTERM,
        130 for SIGINT), what a shell reports for a process killed by it.
      step: the step checkpointed, or None when the run stopped before training.
    """

    def __init__(self, signum: int, step: int | None):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if step is None:
            text = f"stopped by {name} before training started; nothing to checkpoint yet"
        else:
            text = f"stopped by {name} at step {step}, after checkpointing it"
        super().__init__(text)


class _StopSignal:
    """SIGTERM/SIGINT handling for a run, answered within a second.

    Before :meth:`defer` (setting up: data, tokenizer, weights, restore) the first signal
    raises :class:`StoppedBySignal` at once: there is nothing to save yet. After it (the
    loop), the first signal sets :attr:`requested`, checked after each step: checkpoint,
    then stop. A second signal ends the process at once with ``128 + signum`` (130 for
    Ctrl-C): the run lock is released first, the last complete checkpoint stays (one
    being written then is left incomplete, which is never restored: see
    :mod:`jaxfit.checkpoint`).

    Python runs a signal handler only when the main thread is back in the interpreter,
    which a step blocked in XLA (seconds to minutes) delays. So the answer comes from a
    watcher thread woken by ``signal.set_wakeup_fd`` (the C-level handler writes the
    signal's number to a pipe at once): it prints what will happen (checkpointing after
    the current step, about how long that is, how to stop now) and handles the second
    signal; the Python-level handler only raises during the set-up.

    The loop tells it its pace: :meth:`step_started` before each step and
    :attr:`step_time` (seconds of a steady step, ``None`` before one was measured).
    """

    def __init__(self, workdir: Path | None = None):
        self.requested = False
        self.signum: int | None = None
        self.step_time: float | None = None
        self._workdir = workdir
        self._count = 0
        self._step_start: float | None = None
        self._deferred = False
        self._old = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._lock = threading.Lock()

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        if self._old:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._pipe = (read, write)
            self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, name="jaxfit-signals", daemon=True).start()
        return self

    def defer(self) -> None:
        """From now on a signal stops the run after the current step (and a checkpoint)."""
        self._deferred = True

    def step_started(self) -> None:
        """The loop starts a step now (for the "about N s" of the answer to a signal)."""
        self._step_start = time.perf_counter()

    def _remaining(self) -> str:
        if self.step_time is None or self._step_start is None:
            return "the first step (which compiles) has no measured length yet"
        left = max(self.step_time - (time.perf_counter() - self._step_start), 0.0)
        return f"about {left:.0f} s"

    def _watch(self) -> None:
        read = self._pipe[0]
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:  # the write end closed by __exit__
                os.close(read)
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._answer(signum)

    def _answer(self, signum: int) -> None:
        with self._lock:
            self._count += 1
            first = self._count == 1
            if first:
                self.requested, self.signum = True, signum
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else name
        if first and self._deferred:
            log.warning(
                "received %s: checkpointing after the current step (%s), then stopping; "
                "%s again to stop now (keeping the last complete checkpoint)",
                name,
                self._remaining(),
                again,
            )
        elif first:
            log.warning("received %s: stopping (nothing to checkpoint yet)", name)
        else:
            self._exit_now(signum)

    def _exit_now(self, signum: int) -> None:
        """The second signal: release the lock and end the process with 128 + signum."""
        last = None
        if self._workdir is not None:
            with contextlib.suppress(Exception):
                last = checkpoint.latest_sealed_step_in(self._workdir / "checkpoints")
        kept = (
            f"the last complete checkpoint, step {last}, is kept"
            if last is not None
            else "no checkpoint was written by this run"
        )
        where = f" in {str(self._workdir)!r}" if self._workdir is not None else ""
        message = (
            f"received {signal.Signals(signum).name} again: stopped now, without a checkpoint "
            f"of the current step; {kept}{where}: rerun the same command to resume"
        )
        with contextlib.suppress(Exception):
            log.warning("%s", message)
        workdir_lib.release_now()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signum)

    def _handle(self, signum, frame):
        if self._pipe is None:  # no watcher (not the main thread): answer here
            self._answer(signum)
        if not self._deferred and self._count <= 1:
            self.requested, self.signum = True, signum
            raise StoppedBySignal(signum, None)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            read, write = self._pipe
            self._pipe = None
            os.close(write)  # the watcher reads end-of-file, closes its end and returns


class _FiniteGuard:
    """Checks that every step's metrics (loss, gradient norm, ...) are finite.

    The check is one fused on-device reduction (:func:`jaxfit.metrics.all_finite`) and one
    bool moved to the host. :meth:`push` checks the PREVIOUS step, so the host still
    dispatches step k+1 before waiting for step k; :meth:`flush` checks the latest one at
    once (before its metrics are logged, it is evaluated or checkpointed). A non-finite
    gradient norm is how non-finite updates show: the parameters of that step are never
    used.

    A checkpoint is only known good once the step after it is finite: the loss and
    gradient of step k+1 are computed from the parameters of step k, before any update,
    so whatever the learning rate a state whose next loss is NaN cannot be trained on.
    :attr:`unconfirmed` is the step of the newest checkpoint not yet followed by a checked
    step; a finite next step confirms it (:meth:`jaxfit.checkpoint.Checkpointer.confirm`:
    only then may retention delete older ones), a non-finite one sets it aside.
    """

    def __init__(self, ckpt: checkpoint.Checkpointer, unconfirmed: int | None):
        self._ckpt = ckpt
        self._pending = None
        self.unconfirmed = unconfirmed

    def push(self, step: int, metrics) -> None:
        previous, self._pending = self._pending, (step, metrics_lib.all_finite(metrics), metrics)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._check(*pending)

    def _check(self, step, flag, metrics) -> None:
        parent = self.unconfirmed if self.unconfirmed == step - 1 else None
        if bool(jax.device_get(flag)):
            if parent is not None:
                self._ckpt.confirm(parent)
                self.unconfirmed = None
            return
        host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k, v in host.items() if not np.all(np.isfinite(v))]
        shown = ", ".join(f"{k}={host[k]}" for k in bad)
        fine = ", ".join(f"{k}={host[k]:.4g}" for k in ("loss", "lr") if k in host and k not in bad)
        what = f"non-finite {shown}" + (f" ({fine})" if fine else "")
        if parent is not None:
            reason = (
                f"the step after it ({step}) is non-finite ({', '.join(bad)}) whatever the "
                "learning rate: its loss and gradient come from this checkpoint's parameters"
            )
            self._ckpt.set_aside(parent, reason)
            what += f"; the checkpoint of step {parent}, whose parameters gave it, was set aside"
        raise _nonfinite(step, what, bad, self._ckpt)


def _nonfinite(step: int, what: str, names: list[str], ckpt) -> NonFiniteError:
    """The error for a non-finite step: what went bad, and where the run can resume."""
    ckpt.wait()
    last = ckpt.latest_step()
    advice = "a lower --config.optim.lr (or a longer warmup, or gradient clipping)"
    where = (
        f"the last good checkpoint is step {last} in {ckpt.directory}; rerun with {advice} "
        "to resume from it"
        if last is not None
        else f"no good checkpoint remains; rerun with {advice} to start afresh"
    )
    return NonFiniteError(
        f"training diverged at step {step}: {what}; that step was not checkpointed; {where}",
        step=step,
        names=names,
    )


def _state_problem(state) -> str | None:
    """Why a (restored) train state cannot be used: non-finite leaves, or None."""
    if bool(jax.device_get(metrics_lib.all_finite(state))):
        return None
    return "it holds non-finite values: " + ", ".join(metrics_lib.nonfinite_paths(state))


def _save(ckpt: checkpoint.Checkpointer, step: int, state, iterator) -> None:
    """Checkpoint ``state`` at ``step`` if every floating-point leaf is finite.

    Raises:
      NonFiniteError: naming up to five offending parameter / optimizer-state leaves.
    """
    problem = _state_problem(state)
    if problem is not None:
        names = metrics_lib.nonfinite_paths(state)
        raise _nonfinite(step, f"the train state {problem.removeprefix('it ')}", names, ckpt)
    ckpt.save(step, state, {"data": iterator.get_state()}, force=True)


def build_state(run: Run, ckpt: checkpoint.Checkpointer):
    """Create ``run``'s train state in its shardings (:meth:`jaxfit.run.Run.fresh_state`),
    or restore it from the newest usable checkpoint (newer damaged or non-finite ones are
    reported and set aside).

    Returns:
      ``(state, meta)``; ``meta`` is ``None`` for a fresh state.

    Raises:
      jaxfit.checkpoint.NoUsableCheckpointError: checkpoints exist, none is usable.
    """
    if ckpt.latest_step() is not None:
        state, meta, step, damaged = ckpt.restore_latest_usable(
            checkpoint.to_abstract(run.abstract_state, run.state_shardings),
            check=_state_problem,
        )
        for bad, problem in damaged.items():
            ckpt.set_aside(bad, problem)
        if damaged:
            log.warning(
                "the newer checkpoint(s) %s were unusable (set aside); resuming from step %d",
                sorted(damaged),
                step,
            )
        log.info("resuming from checkpoint at step %d in %s", step, ckpt.directory)
        return state, meta
    return run.fresh_state(), None


def train(
    config,
    workdir: str | Path,
    *,
    on_step: Callable[[int, TrainState], None] | None = None,
    accept_data_change: bool = False,
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
      accept_data_change: resume even though the data changed since the checkpoint
        (``--accept_data_change``; recorded in ``config_history/changes.jsonl``).

    Returns:
      The last evaluation's metrics (namespaced ``eval/...``) merged with the last logged
      train metrics.

    Raises:
      jaxfit.config.ConfigError: an invalid value (:func:`jaxfit.validation.validate_values`).
      jaxfit.workdir.WorkdirBusyError: another run holds the workdir.
      jaxfit.workdir.ResumeConfigError: resuming would change shapes or the data order,
        or the data changed (:func:`jaxfit.workdir.check_data`).
      jaxfit.checkpoint.NoUsableCheckpointError: checkpoints exist, none is usable.
      NonFiniteError: (a ``FloatingPointError``) a step's loss, gradient norm or state is
        NaN or infinite; the run stopped without checkpointing it.
      StoppedBySignal: SIGTERM / SIGINT (a ``BaseException``).
      jaxfit.errors.DiskFullError: the disk filled up (the newest sealed checkpoint is
        left intact; a partly written one is removed).
    """
    workdir = Path(workdir)
    # one train.log, written by process 0 (the others log to their console)
    log_file = logs.log_to_file(workdir / LOG_FILE) if jax.process_index() == 0 else nullcontext()
    # the lock creates the workdir, and undoes a start that fails before workdir.commit
    with workdir_lib.lock(workdir), log_file, _StopSignal(workdir) as stop:
        try:
            return _train(config, workdir, on_step, stop, accept_data_change)
        except Exception as e:
            if errors.disk_full_cause(e) is None:
                raise
            raise _disk_full(workdir, e) from e


def _disk_full(workdir: Path, error: BaseException) -> errors.DiskFullError:
    """The one-line report of a full disk: the partial save removed (its space given
    back), and the newest sealed checkpoint named (orbax wrote it whole, the seal was
    written after it: a failed later save touches neither)."""
    directory = workdir / "checkpoints"
    if jax.process_index() == 0:
        checkpoint.remove_partial_saves(directory)
    last = checkpoint.latest_sealed_step_in(directory)
    if last is None:
        note = "no checkpoint was written yet: free some space and rerun the same command"
    else:
        note = (
            f"the last checkpoint, step {last} in {str(directory)!r}, is intact and sealed: "
            "free some space and rerun the same command to resume from it"
        )
    return errors.DiskFullError(workdir, errors.disk_full_cause(error), note)


def _train(config, workdir: Path, on_step, stop: _StopSignal, accept_data) -> dict[str, float]:
    validation.validate_values(config)
    spec = resolve_config(config, workdir)  # every derived field, before it is saved
    config = spec.config
    # refused before any work or write when it would change shapes, data order or data
    resumed = checkpoint.latest_step_in(workdir / "checkpoints")
    workdir_lib.check_resume(config, workdir, resumed)
    if resumed is not None:  # the data files, before any is tokenized
        workdir_lib.check_data(source_fingerprint(config), workdir, resumed, accept=accept_data)
    run = build_run(spec, workdir, abstract=False)  # with the data step (tokenizer, ...)
    task, mesh = run.task, run.mesh
    data_fingerprint = task.data_fingerprint()  # files and what the task made of them
    accepted = workdir_lib.check_data(data_fingerprint, workdir, resumed, accept=accept_data)
    workdir_lib.check_shapes(task.abstract_params(), workdir, resumed)  # another model: refused
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints, confirm_saves=True
    )
    try:
        state, meta = build_state(run, ckpt)
    except Exception as e:
        ckpt.close()
        if oom.is_out_of_memory(e):
            raise oom.OutOfMemoryError.from_config(
                config, spec.precision, e, "initialisation"
            ) from e
        raise
    iterator = task.train_iterator()
    if meta is not None:
        iterator.set_state(meta["data"])
    # Inputs keep the shardings they were placed with (state: out_shardings of its
    # creation or restore; batch: shard_batch; frozen base: device_put).
    step_fn = run.step
    start = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        workdir_lib.record_config(config, workdir, start)  # only now: the state restored
        workdir_lib.record_data(data_fingerprint, workdir, start, accepted)
    workdir_lib.commit(workdir)  # the start is done: a failure from here keeps the files
    if dropped := metrics_lib.drop_rows_after(workdir, start):
        log.info("dropped %d metrics.jsonl rows logged after step %d", dropped, start)
    writer = metrics_lib.MetricWriter(workdir, total_steps=config.total_steps, initial_step=start)
    if start == 0:
        writer.write_hparams(config.to_dict())
    else:
        writer.mark_restart(start)
    results: dict[str, float] = {}
    try:
        results = _loop(
            config, task, state, step_fn, iterator, mesh, ckpt, writer, start, on_step, stop
        )
    finally:
        ckpt.close()
        writer.close()
    return results


def _loop(config, task, state, step_fn, iterator, mesh, ckpt, writer, step, on_step, stop):
    results: dict[str, float] = {}
    total = config.total_steps
    batch_size = config.batch_size
    # the pace (perf/step_time_s, the bar's ETA) counts steady steps only: not the first,
    # which compiles (its compilation and run are reported apart), nor evaluations
    t_last, steps_since = time.perf_counter(), 0
    first: dict[str, float] = {}
    start = step
    guard = _FiniteGuard(ckpt, unconfirmed=start if start > 0 else None)
    stop.defer()
    while step < total:
        stop.step_started()
        batch = sharding.shard_batch(next(iterator), mesh)
        if step == start:  # compiles: timed apart, and not part of the steady pace
            state, metrics, compile_s, run_s = _first_step(step_fn, state, batch, task, config)
            first = {"perf/compile_time_s": compile_s, "perf/first_step_time_s": run_s}
            stop.step_time = run_s
            writer.first_step(compile_s, run_s)
            notice = long_run_notice(run_s, total - step - 1, target.backend())
            if notice:
                log.warning("%s", notice)
            t_last, steps_since = time.perf_counter(), 0
        else:
            state, metrics = _run_step(step_fn, state, batch, task, config)
            steps_since += 1
        step += 1
        guard.push(step, metrics)  # checks the previous step
        if on_step is not None:
            on_step(step, state)
        last = step == total
        log_now = step % config.log_every == 0 or last
        eval_now = step % config.eval_every == 0 or last
        if log_now or eval_now:
            guard.flush()  # this step is finite before it is logged or evaluated
        if log_now:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - t_last
            t_last, n = time.perf_counter(), steps_since
            steps_since = 0
            if n == 0:  # only the first step since the last log: its run, without compiling
                elapsed, n = first["perf/first_step_time_s"], 1
            scalars = {f"train/{k}": v for k, v in host.items()}
            scalars.update(first)  # once, at the first log
            first = {}
            scalars["perf/step_time_s"] = stop.step_time = elapsed / n
            scalars["perf/examples_per_sec"] = batch_size * n / elapsed
            scalars.update(task.throughput(scalars["perf/examples_per_sec"]))
            scalars.update({f"data/skipped_{k}": v for k, v in task.skip_counts().items()})
            writer.write_scalars(step, scalars)
            results.update(scalars)
        if eval_now:
            t0 = time.perf_counter()
            ev = run_evaluation(task, state.params, writer.workdir, step)
            ev = {f"eval/{k}": v for k, v in ev.items()}
            ev["perf/eval_time_s"] = time.perf_counter() - t0
            writer.write_scalars(step, ev)
            results.update(ev)
            t_last = time.perf_counter()  # evaluation time is not training time
        stopping = stop.requested  # read once: a signal from here on counts for the next step
        if step % config.ckpt_every == 0 or last or stopping:
            guard.flush()
            _save(ckpt, step, state, iterator)
            guard.unconfirmed = step
        writer.update_progress(step)
        if stopping:
            ckpt.wait()
            log.warning("stopped at step %d on signal; checkpoint written", step)
            raise StoppedBySignal(stop.signum, step)
    guard.flush()
    return results


def long_run_notice(step_s: float, steps_left: int, backend: str) -> str | None:
    """What to tell a user whose run on a CPU will take :data:`LONG_CPU_RUN_S` or more, or
    ``None``: the estimate (``steps_left`` steps of ``step_s`` seconds, the first step's
    run time without its compilation) and how to shorten it. Other backends: ``None``
    (hours on a GPU are what a full recipe is sized for).

    Args:
      step_s: seconds one step takes (the first step's run, measured to
        ``block_until_ready``).
      steps_left: steps after the first one.
      backend: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (:func:`jaxfit.target.backend`).
    """
    estimate_s = step_s * steps_left
    if backend != "cpu" or estimate_s < LONG_CPU_RUN_S:
        return None
    short = max(1, int(SHORT_RUN_S // max(step_s, 1e-9)))
    length = f"{estimate_s / 3600:.1f} h" if estimate_s >= 3600 else f"{estimate_s / 60:.1f} min"
    return (
        f"this run will take about {length} on this CPU ({steps_left} more "
        f"steps of {step_s:.3g} s); for minutes, use the recipe's :small preset "
        f"(configs/gpt2_scratch.py:small, configs/clip_coco.py:small) or "
        f"--config.total_steps={short} (about {SHORT_RUN_S / 60:.0f} min at this pace); "
        "for a GPU, python -m jaxfit.plan --search sizes the full recipe for the card"
    )


def _run_step(step_fn, state, batch, task, config):
    """One step, dispatched (not waited for)."""
    return step_fn(state, batch, task.frozen)


def _first_step(step_fn, state, batch, task, config):
    """The first step of this process, timed honestly: the compilation (tracing,
    lowering and ``compile()``, which the jitted ``step_fn`` reuses for the steps after)
    and the run of the compiled step (until ``block_until_ready``) apart. An
    out-of-memory error in either becomes an :class:`OutOfMemoryError` that says what
    to change.

    Returns:
      ``(state, metrics, compile_s, run_s)``.
    """
    try:
        t0 = time.perf_counter()
        # a step without jax's AOT interface (a plain function) compiles as it runs
        lower = getattr(step_fn, "lower", None)
        compiled = step_fn if lower is None else lower(state, batch, task.frozen).compile()
        t1 = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch, task.frozen))
        t2 = time.perf_counter()
    except Exception as e:
        if oom.is_out_of_memory(e):
            raise oom.OutOfMemoryError.from_config(
                config, task.spec.precision, e, "the first step"
            ) from e
        raise
    return state, metrics, t1 - t0, t2 - t1


def run_evaluation(
    task, params, workdir: str | Path, step: int, *, require_finite: bool = False
) -> dict[str, float]:
    """The task's evaluation metrics at ``step`` (``task.evaluate_examples``), its
    per-example results saved to ``WORKDIR/eval/step_<step>.npz`` (atomically,
    through a temporary named after this process, so that a reader evaluating beside a
    run never collides with it; process 0 only; read by ``experiments/compare_runs.py``).

    Raises:
      NonFiniteError: with ``require_finite``, a metric is NaN or infinite; nothing was
        written.
    """
    metrics, examples = task.evaluate_examples(params)
    if require_finite:
        _check_eval_finite(metrics, step)
    if examples and jax.process_index() == 0:
        path = Path(workdir) / "eval" / f"step_{int(step)}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **examples)
        os.replace(tmp, path)
    return metrics


def _check_eval_finite(metrics, step: int) -> None:
    try:
        metrics_lib.check_finite(metrics, step)
    except NonFiniteError as e:
        raise NonFiniteError(
            f"evaluation of the checkpoint of step {step} gave a {e}; nothing was written "
            "(metrics.jsonl, TensorBoard and eval/ keep what they held)",
            step=step,
            names=e.names,
        ) from None


def restore_params(workdir: str | Path, step: int | None = None):
    """Rebuild the task of a finished or running workdir and restore its parameters.

    The parameters are placed as the run placed them (``config.mesh``: split over
    ``fsdp``) when its mesh fits this process's devices, else split over all of them.

    The checkpoints are opened read-only (``Checkpointer(read_only=True)``): a run
    training in ``workdir`` meanwhile is not disturbed. Without ``step``, the newest
    sealed checkpoint that verifies and holds finite values (newer unsealed, damaged or
    non-finite ones are reported with warnings naming step and file, and skipped, not
    moved); with ``step``, that checkpoint, checked the same way.

    Returns:
      ``(config, task, params, step)``.

    Raises:
      FileNotFoundError: the workdir has no config.json or no checkpoint (or not
        ``step``, or it was removed by the run's retention while being read).
      jaxfit.checkpoint.NoUsableCheckpointError: checkpoints exist, none is usable (or
        ``step`` is damaged).
    """
    workdir = Path(workdir)
    config = config_lib.load_saved_config(workdir)
    try:  # the run's own mesh when it fits these devices ...
        mesh = sharding.MeshSpec.from_config(config).build()
    except ValueError:  # ... else the parameters split over all of them
        mesh = sharding.make_mesh(axes={"data": 1, "fsdp": -1})
    # a reader trains nothing: the batch need not divide another mesh
    run = build_run(config, workdir, abstract=False, mesh=mesh, check_batch=False)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoint in {str(workdir / 'checkpoints')!r}")
    # read-only: a run may be writing this workdir (nothing cleaned up, sealed or moved)
    with checkpoint.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {str(workdir / 'checkpoints')!r}")
        abstract = checkpoint.to_abstract(run.abstract_state, run.state_shardings)
        if step is None:
            state, _, found, _ = ckpt.restore_latest_usable(abstract, check=_state_problem)
        else:
            state, _ = ckpt.restore_checked(abstract, step, check=_state_problem)
            found = step
    return config, run.task, state.params, found


def evaluate(workdir: str | Path, step: int | None = None) -> dict[str, float]:
    """:func:`evaluate_checkpoint`'s metrics (without the step)."""
    return evaluate_checkpoint(workdir, step)[1]


def evaluate_checkpoint(
    workdir: str | Path, step: int | None = None
) -> tuple[int, dict[str, float]]:
    """Re-run the task's evaluation from a workdir's latest usable (or given) checkpoint
    (:func:`restore_params`: read-only, verified).

    Writes the metrics to TensorBoard / ``metrics.jsonl`` under ``eval/`` at that step and
    returns ``(step, metrics)``: the step of the checkpoint evaluated. Only finite results are
    written: a NaN or infinite metric writes nothing (neither the metrics nor
    ``eval/step_<step>.npz``).

    Raises:
      NonFiniteError: a metric is NaN or infinite (nothing was written).
      (and :func:`restore_params`' errors)
    """
    config, task, params, found = restore_params(workdir, step)
    results = {
        f"eval/{k}": float(v)
        for k, v in run_evaluation(task, params, workdir, found, require_finite=True).items()
    }
    writer = metrics_lib.MetricWriter(Path(workdir), total_steps=config.total_steps, console=False)
    try:
        writer.write_scalars(found, results)
    finally:
        writer.close()
    log.info("evaluation at step %d: %s", found, results)
    return found, results


__all__ = [
    "build_state",
    "evaluate",
    "evaluate_checkpoint",
    "restore_params",
    "run_evaluation",
    "train",
]

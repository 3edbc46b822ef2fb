"""Checkpoints: an ``orbax.checkpoint.CheckpointManager`` holding the train state + JSON meta.

Layout (one directory per step, orbax's)::

    <directory>/<step>/state/   the TrainState pytree (``ocp.args.StandardSave``)
    <directory>/<step>/meta/    a JSON dict (``ocp.args.JsonSave``): data-iterator state,
                                config, anything JSON-serialisable

A checkpoint is complete or absent: orbax writes into ``<step>.orbax-checkpoint-tmp-<ts>``
and renames it to ``<step>`` only after every item is written (and ``commit_success.txt``
is present), so a save interrupted by a crash or preemption is never listed by
:meth:`Checkpointer.latest_step`; leftover temporary directories are deleted when the next
:class:`Checkpointer` opens the directory. Saves are asynchronous by default: arrays are
copied to host before :meth:`Checkpointer.save` returns (so the caller may donate the state
afterwards), and the files are written in a background thread.

Every checkpoint this class writes is sealed once orbax has committed it:
``<step>/jaxfit_checksums.json`` lists the size and SHA-256 of each of its files. A
checkpoint damaged afterwards (a truncated or overwritten data file, a deleted
``_METADATA``) is found by :meth:`Checkpointer.verify` before any byte of it is used;
:meth:`Checkpointer.restore_latest_usable` then falls back to the newest checkpoint that
verifies and restores, and :meth:`Checkpointer.set_aside` moves a damaged one out of the
way (to ``<directory>_damaged/``) so that its step can be written again. A checkpoint
without the seal (killed between commit and seal, or written by an older jaxfit) is
checked by restoring it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxfit import oom

log = logging.getLogger(__name__)

CHECKSUMS = "jaxfit_checksums.json"
# Files a complete orbax checkpoint of ``(state, meta)`` always has (checked when a
# checkpoint carries no checksums).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")

PyTree = Any


def to_abstract(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """``jax.ShapeDtypeStruct`` tree for :meth:`Checkpointer.restore`.

    Args:
      tree: arrays or ``ShapeDtypeStruct`` (e.g. ``jax.eval_shape(create_state)``).
      shardings: one ``Sharding`` for every leaf, a tree of them matching ``tree``, or None
        to keep each leaf's own ``.sharding`` (concrete ``jax.Array``s have one; abstract
        leaves without one restore to the default device).

    Returns:
      The tree with ``ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves.
    """
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape,
                x.dtype,
                sharding=shardings if shardings is not None else getattr(x, "sharding", None),
            ),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_step_in(directory: str | os.PathLike) -> int | None:
    """The highest step among the committed checkpoint directories (``<step>/``) under
    ``directory``, without opening a manager (None if there are none); for deciding
    whether a run resumes before anything is built."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    steps = [int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
    return max(steps, default=None)


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none verifies and restores; ``.problems`` maps each step to
    what is wrong with it."""

    def __init__(self, message: str, problems: dict[int, str]):
        super().__init__(message)
        self.problems = problems


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: str) -> list[str]:
    """Relative paths of the files under ``step_dir`` (the seal excluded), sorted."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs by step, keeping the last ``max_to_keep``.

    Args:
      directory: root directory (created if missing; made absolute).
      max_to_keep: number of most recent checkpoints kept; older ones are deleted after
        each save. None keeps all.
      save_interval_steps: :meth:`save` only writes when ``step % save_interval_steps == 0``,
        or ``force=True``, or no checkpoint exists yet (orbax's ``InitialSavePolicy``), or a
        preemption was signalled. Default 1: the trainer decides when to call :meth:`save`.
      async_save: write files in a background thread (orbax's default).
      confirm_saves: retention waits for :meth:`confirm`: a new checkpoint deletes no
        older one; ``confirm(step)`` (called once the step after it proved finite) keeps
        the newest ``max_to_keep`` complete checkpoints up to ``step`` and deletes older
        ones. So the last checkpoint known to be good is never deleted in favour of one
        that might not be (the trainer's mode). False: orbax deletes after each save.

    Use as a context manager or call :meth:`close` (which waits for pending saves).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        confirm_saves: bool = False,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self._async = async_save
        self._keep = max_to_keep if confirm_saves else None
        self._confirmed: int | None = None  # newest step confirmed good (confirm_saves)
        self._unsealed: set[int] = set()  # saved by this object, not yet sealed
        self._seal_lock = threading.Lock()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if confirm_saves else max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # a synchronous save seals right after it returns (see save); orbax takes the
            # callback only with its asynchronous checkpointer
            async_options=(
                ocp.AsyncOptions(post_finalization_callback=self._seal_committed)
                if async_save
                else None
            ),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(
        self, step: int, state: PyTree, meta: dict | None = None, *, force: bool = False
    ) -> bool:
        """Save ``state`` (any pytree of arrays, normally a ``TrainState``) and ``meta``.

        Args:
          step: the step number naming the checkpoint (use ``int(state.step)``).
          state: pytree of ``jax.Array`` / numpy leaves.
          meta: JSON-serialisable dict (no bytes: base64-encode binary iterator states).
          force: save even if ``step`` is off the ``save_interval_steps`` grid.

        Returns:
          True if a save was started; False if skipped: off the interval, a checkpoint for
          ``step`` exists (never overwritten), or (without ``force``) a later one exists.

        Raises:
          TypeError: ``meta`` is not JSON-serialisable (checked before anything is written).
        """
        meta = {} if meta is None else dict(meta)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from e
        step = int(step)
        if step in self._manager.all_steps():
            return False
        started = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if started:
            with self._seal_lock:
                self._unsealed.add(step)
            if not self._async:
                self._seal_committed()
        return started

    def confirm(self, step: int) -> list[int]:
        """Record that checkpoint ``step`` proved good; with ``confirm_saves``, delete the
        complete checkpoints older than the newest ``max_to_keep`` ones up to the newest
        confirmed step (one still being written counts once committed: at the next
        :meth:`confirm`, :meth:`wait` or :meth:`close`). Returns the steps deleted."""
        if self._keep is None:
            return []
        self._confirmed = step if self._confirmed is None else max(step, self._confirmed)
        return self._prune()

    def _prune(self) -> list[int]:
        if self._keep is None or self._confirmed is None:
            return []
        done = [
            s for s in self.all_steps() if s <= self._confirmed and os.path.isdir(self._step_dir(s))
        ]
        old = done[: -self._keep] if self._keep > 0 else done
        for s in old:
            self._manager.delete(s)
        return old

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def _seal_committed(self) -> None:
        """Write the checksums of every checkpoint this object saved that orbax has
        committed since (orbax calls this after each asynchronous save is finalised).
        In a multi-process run only process 0 seals (the files are every process's)."""
        with self._seal_lock:
            if jax.process_index() != 0:
                self._unsealed.clear()
                return
            for step in sorted(self._unsealed):
                step_dir = self._step_dir(step)
                if not os.path.isdir(step_dir):
                    continue  # not committed yet (orbax renames the finished directory)
                try:
                    files = {
                        rel: {
                            "bytes": os.path.getsize(os.path.join(step_dir, rel)),
                            "sha256": _sha256(os.path.join(step_dir, rel)),
                        }
                        for rel in _files(step_dir)
                    }
                    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
                    with open(tmp, "w", encoding="utf-8") as f:
                        json.dump({"step": step, "files": files}, f, indent=1, sort_keys=True)
                    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
                except FileNotFoundError:  # deleted meanwhile (retention)
                    pass
                self._unsealed.discard(step)

    def verify(self, step: int) -> str | None:
        """What is wrong with the files of checkpoint ``step``, or None if nothing is.

        With a seal (:data:`CHECKSUMS`): every listed file must exist with its size and
        SHA-256. Without one: the files every checkpoint has (:data:`REQUIRED_FILES`) must
        exist (the restore itself checks the rest). The message names the file.
        """
        step_dir = self._step_dir(step)
        seal = os.path.join(step_dir, CHECKSUMS)
        if not os.path.isfile(seal):
            for rel in REQUIRED_FILES:
                if not os.path.isfile(os.path.join(step_dir, rel)):
                    return f"{rel} is missing"
            return None
        try:
            listed = json.loads(Path(seal).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{CHECKSUMS} is unreadable ({e})"
        for rel, want in sorted(listed.items()):
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                return f"{rel} is missing"
            size = os.path.getsize(path)
            if size != want["bytes"]:
                return f"{rel} has {size} bytes, {want['bytes']} were written (truncated?)"
            if _sha256(path) != want["sha256"]:
                return f"{rel} differs from what was written (corrupted: checksum mismatch)"
        return None

    def latest_step(self) -> int | None:
        """Step of the newest COMPLETE checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restore ``(state, meta)`` from ``step`` (default: the latest complete checkpoint).

        Args:
          abstract_state: pytree with the structure of the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` with ``.sharding`` set (see :func:`to_abstract`); arrays
            are restored with exactly these dtypes and shardings. E.g.
            ``to_abstract(jax.eval_shape(make_state), state_shardings)``.
          step: which checkpoint; None for the latest.

        Returns:
          ``(state, meta)``: the state with the structure of ``abstract_state``, the meta dict.

        Raises:
          FileNotFoundError: no complete checkpoint (or not that step) in the directory.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta or {})

    def restore_latest_usable(
        self, abstract_state: PyTree, check: Callable[[PyTree], str | None] | None = None
    ) -> tuple[PyTree, dict, int, dict[int, str]]:
        """Restore the newest checkpoint that verifies, restores and passes ``check``.

        A damaged checkpoint (see :meth:`verify`; or one whose restore fails; or one
        ``check`` rejects) is reported with a warning naming its step and file, and the
        previous one is tried. Nothing is moved or deleted here (see :meth:`set_aside`).

        Args:
          abstract_state: as for :meth:`restore`.
          check: ``state -> problem or None`` run on a restored state (the trainer checks
            that it is finite).

        Returns:
          ``(state, meta, step, problems)``; ``problems`` maps each newer, unusable step to
          what is wrong with it.

        Raises:
          FileNotFoundError: the directory holds no complete checkpoint.
          NoUsableCheckpointError: none is usable; the message lists every step's problem.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        problems: dict[int, str] = {}
        for step in reversed(steps):
            problem = self.verify(step)
            if problem is None:
                try:
                    state, meta = self.restore(abstract_state, step=step)
                except Exception as e:
                    if oom.is_out_of_memory(e):
                        raise
                    first = " ".join(str(e).split())[:300]
                    problem = f"it does not restore: {type(e).__name__}: {first}"
                else:
                    problem = check(state) if check is not None else None
                    if problem is None:
                        return state, meta, step, problems
                    del state
            problems[step] = problem
            log.warning(
                "checkpoint at step %d in %s is unusable: %s; trying the previous one",
                step,
                self.directory,
                problem,
            )
        listed = "; ".join(f"step {s}: {p}" for s, p in problems.items())
        raise NoUsableCheckpointError(
            f"no usable checkpoint in {self.directory}: {listed}. Move the directory away "
            "to start afresh (or restore it from a backup)",
            problems,
        )

    def set_aside(self, step: int, reason: str) -> str:
        """Move checkpoint ``step`` to ``<directory>_damaged/<step>-<unix time>/`` (with
        ``reason.txt``) so that it is neither restored nor in the way of a new save of
        that step. Returns the new path."""
        self.wait()
        dest_root = self.directory.rstrip(os.sep) + "_damaged"
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, f"{int(step)}-{int(time.time())}")
        shutil.move(self._step_dir(step), dest)
        Path(dest, "reason.txt").write_text(reason + "\n")
        self._manager.reload()
        log.warning("moved the damaged checkpoint of step %d to %s", step, dest)
        return dest

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk (and sealed); apply
        retention to confirmed checkpoints that were still being written."""
        self._manager.wait_until_finished()
        self._seal_committed()
        self._prune()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
checked as orbax would open it (its own metadata files parse, the commit was recorded)
and by restoring it; training then seals it (:meth:`Checkpointer.restore_latest_usable`
with ``seal_verified``), or sets it aside as damaged.

Readers (evaluate, export, generate) open the directory with ``read_only=True``: no
directory is created, no temporary directory of a save in flight is cleaned up, nothing
is sealed, moved or deleted, so a run being trained is never disturbed. They take the
newest SEALED checkpoint that verifies (an unsealed one only when none is sealed, checked
as training checks it) and retry when the run's retention removes it while they read.
Retention deletes atomically for them: orbax renames an old step into
``<directory>/jaxfit_deleting/`` (its ``todelete_subdir``) and jaxfit empties that folder.
"""

from __future__ import annotations

import contextlib
import errno
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

from jaxfit import logs, oom
from jaxfit.errors import Error

log = logging.getLogger(__name__)

CHECKSUMS = "jaxfit_checksums.json"
# Where retention moves a checkpoint (one rename: a reader sees it whole or not at all)
# before its files are deleted (orbax's ``todelete_subdir``).
TRASH = "jaxfit_deleting"
# How often a reader starts over when the run's retention removed the checkpoint it read.
READ_ATTEMPTS = 5
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


def latest_sealed_step_in(directory: str | os.PathLike) -> int | None:
    """The highest step under ``directory`` that carries its seal (None if none does);
    what a message about a failed run names as intact."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    sealed = [n for n in names if os.path.isfile(os.path.join(directory, n, CHECKSUMS))]
    steps = [int(n) for n in sealed if n.isdigit()]
    return max(steps, default=None)


def remove_partial_saves(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary directories of saves that failed (``<step>.orbax-checkpoint-
    tmp*``) under ``directory``; for a run that holds the workdir's lock, after its
    saves stopped (a disk filled up: their space is given back). Returns their names."""
    removed: set[str] = set()
    # writes of the failed save still in flight (orbax's and tensorstore's threads) may add
    # files, or the directory again, meanwhile: until none is seen twice in a row, 10 s at most
    quiet = 0
    for _ in range(100):
        try:
            partial = [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n]
        except FileNotFoundError:
            break
        for name in partial:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.update(partial)
        quiet = 0 if partial else quiet + 1
        if quiet >= 2:
            break
        time.sleep(0.1)
    return sorted(removed)


class NoUsableCheckpointError(Error, RuntimeError):
    """Checkpoints exist but none verifies and restores; ``.problems`` maps each step to
    what is wrong with it (exit status 6)."""

    exit_code = 6

    def __init__(self, message: str, problems: dict[int, str]):
        super().__init__(message)
        self.problems = problems


class _Removed(Exception):  # noqa: N818 (a signal between methods, never raised out)
    """The checkpoint being read was removed meanwhile (its run's retention)."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: str) -> list[str]:
    """Relative paths of the files under ``step_dir`` (the seal excluded), sorted."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel not in (CHECKSUMS, CHECKSUMS + ".tmp"):
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
        that might not be (the trainer's mode); only SEALED checkpoints count among the
        ``max_to_keep`` kept, so one whose seal could not be written (disk full) never
        costs the sealed one before it. False: orbax deletes after each save.
      read_only: for readers of a workdir that a run may be writing (evaluate, export,
        generate): the directory is not created, orbax's temporary directories are not
        cleaned up, and nothing is saved, sealed, moved or deleted (:meth:`save`,
        :meth:`confirm` and :meth:`set_aside` raise ``PermissionError``). The list of
        checkpoints is read afresh from the disk at each :meth:`all_steps`.

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
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        self._async = async_save and not read_only
        self._keep = max_to_keep if confirm_saves else None
        self._confirmed: int | None = None  # newest step confirmed good (confirm_saves)
        self._unsealed: set[int] = set()  # saved by this object, not yet sealed
        self._seal_lock = threading.Lock()
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True,
                create=False,
                cleanup_tmp_directories=False,
                save_interval_steps=0,
                max_to_keep=None,
                enable_async_checkpointing=False,
                lightweight_initialize=True,  # no metadata read (steps come and go)
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if confirm_saves else max_to_keep,
                save_interval_steps=save_interval_steps,
                create=True,
                cleanup_tmp_directories=True,
                todelete_subdir=TRASH,  # one rename, then jaxfit deletes (_empty_trash)
                enable_async_checkpointing=async_save,
                # a synchronous save seals right after it returns (see save); orbax takes
                # the callback only with its asynchronous checkpointer
                async_options=(
                    ocp.AsyncOptions(post_finalization_callback=self._seal_committed)
                    if async_save
                    else None
                ),
            )
        for attempt in range(READ_ATTEMPTS):
            try:
                with logs.quiet_read_only_notices():
                    self._manager = ocp.CheckpointManager(
                        self.directory, options=options, item_names=("state", "meta")
                    )
                break
            except (OSError, ValueError):  # read-only: a step removed while orbax listed it
                if not read_only or attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
        if not read_only:
            self._empty_trash()
            logs.quiet_failed_writes()

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise PermissionError(
                errno.EROFS, f"{what}: this Checkpointer was opened read-only", self.directory
            )

    def _empty_trash(self) -> None:
        """Delete the checkpoints retention moved to ``<directory>/jaxfit_deleting/``."""
        trash = os.path.join(self.directory, TRASH)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(trash)  # only when empty

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
        self._writable(f"save of step {step}")
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
        self._writable(f"confirm of step {step}")
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
        # the newest max_to_keep SEALED ones are kept, and every one newer than the
        # oldest of them (a checkpoint left unsealed, e.g. by a full disk, keeps the
        # sealed one before it)
        sealed = [s for s in done if self.is_sealed(s)]
        if self._keep > 0:
            if len(sealed) < self._keep:
                return []
            old = [s for s in done if s < sealed[-self._keep]]
        else:
            old = done
        for s in old:
            self._manager.delete(s)
        self._empty_trash()
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
                if not os.path.isdir(self._step_dir(step)):
                    continue  # not committed yet (orbax renames the finished directory)
                try:
                    self._write_seal(step)
                except FileNotFoundError:  # deleted meanwhile (retention)
                    pass
                except OSError as e:  # disk full: left unsealed (checked at the next start)
                    log.warning("could not seal the checkpoint of step %d: %s", step, e)
                    continue
                self._unsealed.discard(step)

    def _write_seal(self, step: int) -> None:
        """Write ``<step>/jaxfit_checksums.json`` (atomically: a temporary, then a rename;
        the temporary is removed if writing fails)."""
        step_dir = self._step_dir(step)
        files = {
            rel: {
                "bytes": os.path.getsize(os.path.join(step_dir, rel)),
                "sha256": _sha256(os.path.join(step_dir, rel)),
            }
            for rel in _files(step_dir)
        }
        tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"step": step, "files": files}, f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def is_sealed(self, step: int) -> bool:
        """Whether checkpoint ``step`` carries its seal (:data:`CHECKSUMS`)."""
        return os.path.isfile(os.path.join(self._step_dir(step), CHECKSUMS))

    def orbax_problem(self, step: int) -> str | None:
        """What orbax's own metadata says is wrong with checkpoint ``step`` (for one
        without a seal), or None: ``_CHECKPOINT_METADATA`` must parse and record the
        commit and both items, and each item's metadata (``state/_METADATA``,
        ``meta/metadata``) must parse."""
        step_dir = self._step_dir(step)
        for rel in REQUIRED_FILES:
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                return f"{rel} is missing"
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                return f"{rel} is unreadable ({e})"
            if rel == "_CHECKPOINT_METADATA":
                if not isinstance(data, dict) or not data.get("commit_timestamp_nsecs"):
                    return f"{rel} records no commit"
                handlers = data.get("item_handlers") or {}
                if not {"state", "meta"} <= set(handlers):
                    return f"{rel} lists the items {sorted(handlers)}, not state and meta"
        return None

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
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending.

        Read-only: the step directories on disk now (orbax renames ``<step>.orbax-
        checkpoint-tmp*`` to ``<step>`` only once everything is written), listed without
        reading any file of them, so that a step the run removes meanwhile is no error.
        """
        if self.read_only:
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                return []
            return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(self._step_dir(n)))
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restore ``(state, meta)`` from ``step`` (default: the latest complete checkpoint),
        as it is: no seal or finiteness check (see :meth:`restore_checked`).

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
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {steps}"
            )
        return self._restore_step(abstract_state, step)

    def _restore_step(self, abstract_state: PyTree, step: int) -> tuple[PyTree, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta or {})

    def _load_checked(self, abstract_state, step: int, check):
        """``(state, meta, None)`` if checkpoint ``step`` verifies (seal; without one,
        orbax's metadata), restores and passes ``check``; else ``(None, None, problem)``.

        Raises:
          _Removed: the step's directory disappeared meanwhile (the run's retention).
        """
        try:
            sealed = self.is_sealed(step)
            problem = self.verify(step)
            if problem is None and not sealed:
                problem = self.orbax_problem(step)
            if problem is None:
                try:
                    state, meta = self._restore_step(abstract_state, step)
                except Exception as e:
                    if oom.is_out_of_memory(e):
                        raise
                    first = " ".join(str(e).split())[:300]
                    problem = f"it does not restore: {type(e).__name__}: {first}"
                else:
                    problem = check(state) if check is not None else None
                    if problem is None:
                        if not os.path.isdir(self._step_dir(step)):
                            raise _Removed(step)
                        return state, meta, None
                    del state
        except OSError as e:  # a file vanished while it was hashed
            problem = f"it cannot be read: {e}"
        if not os.path.isdir(self._step_dir(step)):
            raise _Removed(step)
        return None, None, problem

    def _seal_verified(self, step: int) -> None:
        """Seal checkpoint ``step``, found without a seal, once it verified (orbax's
        metadata, a restore and the caller's check); process 0 writes it."""
        if jax.process_index() != 0:
            return
        self._write_seal(step)
        log.warning(
            "the checkpoint of step %d in %s had no seal (its run stopped before writing "
            "it): it verified (orbax's metadata, a restore and its check) and is sealed now",
            step,
            self.directory,
        )

    def restore_checked(
        self,
        abstract_state: PyTree,
        step: int,
        check: Callable[[PyTree], str | None] | None = None,
    ) -> tuple[PyTree, dict]:
        """Restore checkpoint ``step`` only if it verifies exactly as
        :meth:`restore_latest_usable` verifies each one (no fallback).

        Raises:
          FileNotFoundError: no such step, or it was removed (the run's retention) while
            being read.
          NoUsableCheckpointError: it is damaged (the message names step and file).
        """
        steps = self.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {steps}"
            )
        try:
            state, meta, problem = self._load_checked(abstract_state, step, check)
        except _Removed:
            raise FileNotFoundError(
                f"the checkpoint of step {step} in {self.directory} was removed (by its "
                f"run's retention) while it was read; have {self.all_steps()}"
            ) from None
        if problem is not None:
            raise NoUsableCheckpointError(
                f"the checkpoint of step {step} in {self.directory} is unusable: {problem}",
                {step: problem},
            )
        if not self.read_only and not self.is_sealed(step):
            self._seal_verified(step)
        return state, meta

    def restore_latest_usable(
        self, abstract_state: PyTree, check: Callable[[PyTree], str | None] | None = None
    ) -> tuple[PyTree, dict, int, dict[int, str]]:
        """Restore the newest checkpoint that verifies, restores and passes ``check``.

        A damaged checkpoint (see :meth:`verify`; without a seal, :meth:`orbax_problem`;
        or one whose restore fails; or one ``check`` rejects) is reported with a warning
        naming its step and file, and the previous one is tried. Nothing is moved or
        deleted here (see :meth:`set_aside`). One found without a seal that passes every
        check is sealed now (not when read-only).

        Read-only, sealed checkpoints are tried first (newest first): a newer unsealed
        one is being written by a live run, or was left by a stopped one (the next
        training start checks and seals it); it is skipped with a warning, and tried only
        when no sealed one is usable. A checkpoint the run's retention removes while it
        is read is no problem: the list is read again (up to :data:`READ_ATTEMPTS` times).

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
        for _ in range(READ_ATTEMPTS):
            steps = self.all_steps()
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            order = list(reversed(steps))
            if self.read_only:
                sealed = [s for s in order if self.is_sealed(s)]
                order = sealed + [s for s in order if s not in sealed]
                newer = [s for s in order[len(sealed) :] if sealed and s > sealed[0]]
                if newer:
                    log.warning(
                        "checkpoint(s) %s in %s are not sealed yet (a run is writing them, "
                        "or stopped before sealing them: its next start checks and seals "
                        "them); reading the newest sealed one",
                        sorted(newer),
                        self.directory,
                    )
            problems: dict[int, str] = {}
            try:
                for step in order:
                    state, meta, problem = self._load_checked(abstract_state, step, check)
                    if problem is None:
                        if not self.read_only and not self.is_sealed(step):
                            self._seal_verified(step)
                        return state, meta, step, problems
                    problems[step] = problem
                    log.warning(
                        "checkpoint at step %d in %s is unusable: %s; trying the previous one",
                        step,
                        self.directory,
                        problem,
                    )
            except _Removed as removed:
                log.info(
                    "checkpoint of step %d in %s was removed by its run while being read; "
                    "reading the list again",
                    removed.step,
                    self.directory,
                )
                continue
            listed = "; ".join(f"step {s}: {p}" for s, p in problems.items())
            raise NoUsableCheckpointError(
                f"no usable checkpoint in {self.directory}: {listed}. Move the directory away "
                "to start afresh (or restore it from a backup)",
                problems,
            )
        raise NoUsableCheckpointError(
            f"the checkpoints in {self.directory} were removed by their run faster than "
            f"they could be read ({READ_ATTEMPTS} tries): read a finished run, or pass "
            "--step of one the run keeps",
            {},
        )

    def set_aside(self, step: int, reason: str) -> str:
        """Move checkpoint ``step`` to ``<directory>_damaged/<step>-<unix time>/`` (with
        ``reason.txt``) so that it is neither restored nor in the way of a new save of
        that step. Returns the new path."""
        self._writable(f"set_aside of step {step}")
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
        if self.read_only:
            return
        self._manager.wait_until_finished()
        self._seal_committed()
        self._prune()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

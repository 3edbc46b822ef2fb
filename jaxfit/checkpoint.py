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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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

    Use as a context manager or call :meth:`close` (which waits for pending saves).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
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
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

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

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

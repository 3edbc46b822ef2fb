"""Epochs of shuffled rows: the resumable order shared by window and packed-example batches.

A training source is a fixed list of ``num_rows`` rows (windows of the token stream, or
packed examples). The batch at step ``s`` holds rows ``perm_e[j]`` for global sample
indices ``i = s * B + b`` (``e = i // num_rows``, ``j = i % num_rows``), where ``perm_e``
is a permutation seeded by ``(seed, e)``: each epoch visits every row once in a fresh
order, and a batch is a pure function of ``(seed, step)``, so ``start_step`` (or
``set_state``) resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def check_sizes(batch_size: int, seq_len: int) -> None:
    """Raises ValueError unless both are >= 1."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")


class ShuffledEpochs:
    """Infinite, resumable iterator over batches of shuffled rows (module docstring).

    Subclasses set ``num_rows`` and implement ``batch(step)``.

    Attributes:
      step: index of the next batch ``next()`` returns.
    """

    num_rows: int
    # (start, stop): yield only these rows of each batch, this process's share of the
    # global batch in a multi-process run (jaxfit.sharding.process_batch_rows; the task
    # sets it); None: all. The state (the step) stays that of the global batch.
    process_rows: tuple[int, int] | None = None

    def __init__(self, *, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        check_sizes(batch_size, seq_len)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed = int(seed) % (1 << 64)
        self.step = int(start_step)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_rows)
        return self._perms[epoch]

    def row_indices(self, step: int) -> np.ndarray:
        """Row index of each sample of batch ``step``: int64 ``[batch_size]`` (only
        :attr:`process_rows` of them when set)."""
        i = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        if self.process_rows is not None:
            i = i[self.process_rows[0] : self.process_rows[1]]
        epoch, j = np.divmod(i, self.num_rows)
        out = np.empty_like(i)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._perm(int(e))[j[sel]]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self.step)
        self.step += 1
        return b

    def state_fields(self) -> dict:
        """What a saved position is only valid for (subclasses add theirs)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def get_state(self) -> dict:
        """JSON-able position; ``set_state`` of it continues with the same batches."""
        return {"step": self.step, **self.state_fields()}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`get_state`).

        Raises:
          ValueError: the state was made with a different seed, shape or data.
        """
        for k, v in self.state_fields().items():
            if k not in state or int(state[k]) != v:
                raise ValueError(f"data state mismatch: {k}={state.get(k)} saved, {v} now")
        self.step = int(state["step"])

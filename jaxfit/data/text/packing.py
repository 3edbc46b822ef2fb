"""Batches of whole examples: one per row, or packed into ``seq_len`` rows (``data.packing``).

An example (a conversation, or a document of the token file) of ``L`` tokens
``x[0..L-1]`` fills ``L - 1`` positions of a row: ``input_ids = x[:-1]``, ``labels =
x[1:]``, ``loss_mask`` its mask at each label (1 everywhere for plain documents),
``segment_ids = k`` (its 1-based place in the row) and ``positions = 0 .. L - 2``; padding
has ``segment_ids == 0``, ``positions == 0``, ``loss_mask == 0`` (ids: EOS). A model that
attends only within a segment and takes ``positions`` (jaxfit's GPT-2 and Llama) computes
the same loss for an example packed with others as alone in a row.

Examples longer than a row (``L - 1 > seq_len``) are dropped (``too_long="drop"``: counted
as ``too_long`` in the token file's ``meta["stats"]``, where the run's skip counts read it,
and logged with the file and line of a conversation) or cut to their first ``seq_len + 1``
tokens (``"truncate"``); examples of one token, with nothing to predict, are left out.

Packing is next-fit: each example, in a fixed order, goes into the current row while it
fits, else opens the next one. Training (:class:`PackedBatches`): the order is a
permutation seeded by ``seed`` (so the grouping is random but fixed), and the rows are
then shuffled per epoch as windows are (``epochs.ShuffledEpochs``: a batch is a pure
function of ``(seed, step)``). Evaluation (:class:`EvalExampleBatches`): file order, every
example once, the last batch completed with empty rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from jaxfit.data.text.epochs import ShuffledEpochs, check_sizes
from jaxfit.data.text.records import TextStats
from jaxfit.data.text.token_file import TokenFile

logger = logging.getLogger(__name__)


def select_examples(token_file: TokenFile, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: the examples that go into rows (int64, file order) and the tokens
    each uses (all examples; truncated ones cut to ``seq_len + 1``). Drops too-long
    examples (counting and logging them) unless ``token_file.too_long == "truncate"``.

    Raises:
      ValueError: no example is left, or the file has no document boundaries.
    """
    starts = token_file.document_starts()
    lengths = np.diff(starts)
    too_long = np.nonzero(lengths - 1 > seq_len)[0]
    keep = lengths >= 2
    if token_file.too_long == "truncate":
        if too_long.size:
            logger.info(
                "%s: %d examples longer than seq_len + 1 = %d tokens truncated",
                token_file.path,
                too_long.size,
                seq_len + 1,
            )
        lengths = np.minimum(lengths, seq_len + 1)
    else:
        keep[too_long] = False
        stats, sources = TextStats(), token_file.sources()
        for e in too_long:
            where = sources[e] if sources else f"document {e + 1} of {token_file.path}"
            why = (
                f"{lengths[e]} tokens, longer than seq_len + 1 = {seq_len + 1} "
                "(data.too_long=drop; or truncate)"
            )
            stats.skip("too_long", where, why)
        token_file.meta["stats"]["too_long"] = int(too_long.size)
    ids = np.nonzero(keep)[0]
    if ids.size == 0:
        raise ValueError(
            f"token file {token_file.path}: no example fits seq_len={seq_len} "
            f"({too_long.size} longer); raise seq_len or set data.too_long=truncate"
        )
    return ids, lengths


def pack_rows(ids: np.ndarray, lengths: np.ndarray, seq_len: int, packing: bool) -> list:
    """Rows as arrays of example ids: next-fit packing of ``ids`` in order by the
    positions each uses (``lengths - 1``), or one example per row."""
    if not packing:
        return [ids[i : i + 1] for i in range(ids.size)]
    rows, current, used = [], [], 0
    for e in ids.tolist():
        n = int(lengths[e]) - 1
        if current and used + n > seq_len:
            rows.append(np.asarray(current, np.int64))
            current, used = [], 0
        current.append(e)
        used += n
    rows.append(np.asarray(current, np.int64))
    return rows


def rows_batch(
    token_file: TokenFile, rows: list, lengths: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
    """The batch of ``rows`` (lists of example ids; see the module docstring)."""
    tf, n_rows = token_file, len(rows)
    starts = tf.document_starts()
    out = {
        "input_ids": np.full((n_rows, seq_len), tf.eos_token_id, np.int32),
        "labels": np.full((n_rows, seq_len), tf.eos_token_id, np.int32),
        "loss_mask": np.zeros((n_rows, seq_len), np.float32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, start=1):
            begin, size = int(starts[e]), int(lengths[e])
            tokens = np.asarray(tf.tokens[begin : begin + size], np.int64)
            n = size - 1
            span = slice(at, at + n)
            out["input_ids"][r, span] = tokens[:-1]
            out["labels"][r, span] = tokens[1:]
            if tf.loss_mask is None:
                out["loss_mask"][r, span] = 1.0
            else:
                out["loss_mask"][r, span] = tf.loss_mask[begin + 1 : begin + size]
            out["segment_ids"][r, span] = k
            out["positions"][r, span] = np.arange(n)
            at += n
    return out


class PackedBatches(ShuffledEpochs):
    """Infinite, resumable training batches of whole examples (module docstring).

    Attributes:
      num_rows: rows per epoch; ``examples``: the examples in them.
    """

    def __init__(
        self, token_file: TokenFile, *, batch_size: int, seq_len: int, seed: int, start_step=0
    ):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, start_step=start_step)
        self.token_file = token_file
        ids, self.lengths = select_examples(token_file, self.seq_len)
        if token_file.packing:
            ids = np.random.default_rng([self.seed, 0x9AC]).permutation(ids)
        self.rows = pack_rows(ids, self.lengths, self.seq_len, token_file.packing)
        self.num_rows, self.examples = len(self.rows), int(ids.size)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (``[batch_size, seq_len]`` arrays); does not move ``step``."""
        rows = [self.rows[r] for r in self.row_indices(step)]
        return rows_batch(self.token_file, rows, self.lengths, self.seq_len)

    def state_fields(self) -> dict:
        return {
            **super().state_fields(),
            "num_tokens": self.token_file.num_tokens,
            "num_rows": self.num_rows,
        }


class EvalExampleBatches:
    """Every example once, in file order, one per row or packed; re-iterable.

    Attributes:
      num_rows: rows of examples; ``num_loss_tokens``: ``sum(loss_mask)`` over the pass.
    """

    def __init__(self, token_file: TokenFile, *, batch_size: int, seq_len: int):
        check_sizes(batch_size, seq_len)
        self.token_file = token_file
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        ids, self.lengths = select_examples(token_file, self.seq_len)
        self.rows = pack_rows(ids, self.lengths, self.seq_len, token_file.packing)
        self.num_rows = len(self.rows)
        starts = token_file.document_starts()
        if token_file.loss_mask is None:
            self.num_loss_tokens = int(np.sum(self.lengths[ids] - 1))
        else:
            m = token_file.loss_mask
            self.num_loss_tokens = sum(
                int(np.sum(m[starts[e] + 1 : starts[e] + self.lengths[e]])) for e in ids
            )

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        empty = np.zeros(0, np.int64)
        for b in range(len(self)):
            rows = self.rows[b * self.batch_size : (b + 1) * self.batch_size]
            rows = rows + [empty] * (self.batch_size - len(rows))
            yield rows_batch(self.token_file, rows, self.lengths, self.seq_len)

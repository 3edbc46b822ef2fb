"""Fixed-length causal-LM batches from a token file: windows of its token stream.

(Files batched by example, conversations or ``data.packing``, go to ``text.packing``;
:func:`train_batches` and :func:`eval_batches` choose.)

A *window* is ``seq_len + 1`` consecutive tokens; window ``w`` starts at token
``w * seq_len``, so consecutive windows share one token and every token after the first
is a label exactly once per pass. Within a window of tokens ``x[0..L]``:

* ``input_ids[t] = x[t]`` and ``labels[t] = x[t + 1]`` for ``t < L`` (next-token targets;
  the loss at ``t`` is ``-log p(labels[t] | input_ids[..t])``).
* ``loss_mask[t]`` (float32, 0/1): 1 where ``labels[t]`` is a real token and, for
  instruction data, a completion token (or the EOS after it); 0 on padding.
* ``segment_ids[t]`` (int32, >= 1; 0 = padding): a new segment starts after every EOS in
  ``input_ids``, so the EOS belongs to the document it ends. Attend only where
  ``segment_ids`` match (with the causal mask) to keep packed documents apart; a model
  that ignores them sees the nanoGPT-style packed stream.
* ``positions[t]`` (int32): offset from the start of the segment, or from the window
  start for a document cut by the window (0 on padding).

All arrays are ``[batch_size, seq_len]``; ``input_ids``/``labels`` are int32.

Training (:func:`train_batches`): the windows are the rows of ``epochs.ShuffledEpochs``:
each epoch visits every window once in an order seeded by ``(seed, epoch)``, and a batch
is a pure function of ``(seed, step)``, so ``start_step`` (or ``set_state``) resumes
exactly. The trailing ``< seq_len`` tokens that do
not fill a window are never trained on. With ``mask_cut_documents`` (meant for
instruction data) the loss is also zero on the first segment of a window that starts
inside a document, so no completion is learned without its prompt.

Evaluation (:func:`eval_batches`): windows ``0 .. ceil((N - 1) / L) - 1`` in order, the last
one padded (loss_mask 0) and the last batch completed with all-padding rows, so every
token but the first is predicted exactly once and
``perplexity = exp(sum(loss * loss_mask) / sum(loss_mask))`` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from jaxfit.data.text import packing
from jaxfit.data.text.epochs import ShuffledEpochs, check_sizes
from jaxfit.data.text.token_file import TokenFile

# Keys of a batch: int32 [batch, seq_len] each, plus "loss_mask" float32 [batch, seq_len].
BATCH_INT_KEYS = ("input_ids", "labels", "segment_ids", "positions")


def _batch_from_windows(
    tokens: np.ndarray, valid: np.ndarray, mask: np.ndarray | None, eos: int
) -> dict[str, np.ndarray]:
    """``tokens``/``valid``/``mask``: ``[n, L + 1]`` windows -> the batch dict."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    valid_in = valid[:, :-1]
    loss = valid[:, 1:] & valid_in
    if mask is not None:
        loss = loss & (mask[:, 1:] > 0)
    is_eos = (x == eos) & valid_in
    seg = 1 + np.cumsum(is_eos, axis=1) - is_eos
    n, seq_len = x.shape
    idx = np.broadcast_to(np.arange(seq_len), (n, seq_len))
    starts = np.zeros_like(is_eos)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return {
        "input_ids": np.where(valid_in, x, eos).astype(np.int32),
        "labels": np.where(valid[:, 1:], y, eos).astype(np.int32),
        "loss_mask": loss.astype(np.float32),
        "segment_ids": np.where(valid_in, seg, 0).astype(np.int32),
        "positions": np.where(valid_in, pos, 0).astype(np.int32),
    }


class TrainBatches(ShuffledEpochs):
    """Infinite, resumable iterator of training windows (see the module docstring).

    Attributes:
      num_windows: windows per epoch, ``(num_tokens - 1) // seq_len`` (= ``num_rows``).
      step: index of the next batch ``next()`` returns.

    Raises:
      ValueError (constructor): the file has fewer than ``seq_len + 1`` tokens (message
        names the file), or a non-positive size.
    """

    def __init__(
        self,
        token_file: TokenFile,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        start_step: int = 0,
        mask_cut_documents: bool = False,
    ):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, start_step=start_step)
        self.token_file = token_file
        self.num_windows = self.num_rows = max(token_file.num_tokens - 1, 0) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"token file {token_file.path} has {token_file.num_tokens} tokens, fewer than "
                f"seq_len + 1 = {self.seq_len + 1}; use more text or a shorter seq_len"
            )
        self.mask_cut_documents = bool(mask_cut_documents)

    def window_indices(self, step: int) -> np.ndarray:
        """Window index of each row of batch ``step``: int64 ``[batch_size]``."""
        return self.row_indices(step)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (``[batch_size, seq_len]`` arrays); does not move ``step``."""
        starts = self.window_indices(step) * self.seq_len
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        tf = self.token_file
        tokens = np.asarray(tf.tokens[idx], dtype=np.int64)
        mask = None if tf.loss_mask is None else np.asarray(tf.loss_mask[idx])
        b = _batch_from_windows(tokens, np.ones(idx.shape, bool), mask, tf.eos_token_id)
        if self.mask_cut_documents:
            prev = np.asarray(tf.tokens[np.maximum(starts - 1, 0)], dtype=np.int64)
            cut = (starts > 0) & (prev != tf.eos_token_id)
            b["loss_mask"][cut[:, None] & (b["segment_ids"] == 1)] = 0.0
        return b

    def state_fields(self) -> dict:
        return {**super().state_fields(), "num_tokens": self.token_file.num_tokens}


def train_batches(token_file: TokenFile, **kwargs) -> ShuffledEpochs:
    """Resumable training batches; batch ``s`` is a pure function of ``(seed, s)``.

    Keyword arguments as :class:`TrainBatches` (``batch_size``, ``seq_len``, ``seed``,
    ``start_step``, ``mask_cut_documents``). Returns the iterator, starting at
    ``start_step``: windows of the token stream (:class:`TrainBatches`), or whole
    examples, one per row or packed (``packing.PackedBatches``) when the token file is
    batched by example (``TokenFile.by_example``: conversations, ``data.packing``). Each
    item is ``{"input_ids", "labels", "segment_ids", "positions"}`` int32 and
    ``"loss_mask"`` float32, all ``[batch_size, seq_len]``.
    """
    if token_file.by_example:
        kwargs.pop("mask_cut_documents", None)  # examples are never cut
        return packing.PackedBatches(token_file, **kwargs)
    return TrainBatches(token_file, **kwargs)


class EvalBatches:
    """One ordered pass over a token file (see the module docstring); re-iterable.

    Attributes:
      num_windows: ``ceil((num_tokens - 1) / seq_len)``.
      num_loss_tokens: ``sum(loss_mask)`` over the pass (``num_tokens - 1`` without a mask).

    Raises:
      ValueError (constructor): fewer than 2 tokens, or a non-positive size.
    """

    def __init__(self, token_file: TokenFile, *, batch_size: int, seq_len: int):
        check_sizes(batch_size, seq_len)
        n = token_file.num_tokens
        if n < 2:
            raise ValueError(f"token file {token_file.path} has {n} tokens; nothing to evaluate")
        self.token_file = token_file
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.num_windows = math.ceil((n - 1) / self.seq_len)
        m = token_file.loss_mask
        self.num_loss_tokens = n - 1 if m is None else int(np.asarray(m[1:], np.int64).sum())

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        tf, n, length = self.token_file, self.token_file.num_tokens, self.seq_len
        for b in range(len(self)):
            w = b * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
            idx = (w * length)[:, None] + np.arange(length + 1)
            valid = (idx < n) & (w < self.num_windows)[:, None]
            idx = np.minimum(idx, n - 1)
            tokens = np.asarray(tf.tokens[idx], dtype=np.int64)
            mask = None if tf.loss_mask is None else np.asarray(tf.loss_mask[idx])
            yield _batch_from_windows(tokens, valid, mask, tf.eos_token_id)


def eval_batches(token_file: TokenFile, *, batch_size: int, seq_len: int):
    """Evaluation batches covering ``token_file`` once, in order (see :class:`EvalBatches`;
    by example, ``packing.EvalExampleBatches``, when the file is batched by example).

    Every batch has the full ``[batch_size, seq_len]`` shape (one compile); padding has
    ``loss_mask == 0`` and ``segment_ids == 0``.
    """
    if token_file.by_example:
        return packing.EvalExampleBatches(token_file, batch_size=batch_size, seq_len=seq_len)
    return EvalBatches(token_file, batch_size=batch_size, seq_len=seq_len)

"""Synthetic training batches (numpy only: torch workers import this without jax).

The layouts are the tasks' own (``task.abstract_batch(batch_size)`` gives the shapes;
:func:`experiments.bench.runner.synthetic_batch` checks them):

* language model (``jaxfit.data.text.batches``): ``input_ids``, ``labels`` (``labels[t] =
  tokens[t + 1]``), ``loss_mask`` (float32), ``segment_ids`` (one document per row: 1) and
  ``positions`` (0..S-1), all ``[B, S]``, token ids uniform in ``[0, vocab_size)``;
* CLIP (``jaxfit.data.image_text.pipeline``): ``pixel_values`` float32 ``[B, H, W, 3]``
  (standard normal, the scale of CLIP-normalised pixels), ``input_ids`` int32 ``[B, L]``
  (BOS, uniform ids, EOS, then padding; caption lengths 8..32 as COCO's) and
  ``attention_mask`` int32 (1 up to and including EOS).
"""

from __future__ import annotations

import numpy as np


def lm_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """A causal-LM batch of ``batch_size`` random sequences of ``seq_len`` tokens; every
    position is a loss token (``loss_mask`` 1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    return {
        "input_ids": np.ascontiguousarray(tokens[:, :-1]),
        "labels": np.ascontiguousarray(tokens[:, 1:]),
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.ascontiguousarray(positions),
    }


def clip_batch(
    batch_size: int,
    image_size: int,
    context_length: int,
    vocab_size: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    seed: int = 0,
) -> dict:
    """A CLIP batch of random images and captions (ids of the given special tokens)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(8, context_length), min(32, context_length) + 1, batch_size)
    ids = rng.integers(0, vocab_size, (batch_size, context_length), dtype=np.int32)
    cols = np.arange(context_length)[None]
    ids[:, 0] = bos
    ids = np.where(cols == lengths[:, None] - 1, eos, ids)
    ids = np.where(cols >= lengths[:, None], pad, ids).astype(np.int32)
    shape = (batch_size, image_size, image_size, 3)
    return {
        "pixel_values": rng.standard_normal(shape, dtype=np.float32),
        "input_ids": ids,
        "attention_mask": (cols < lengths[:, None]).astype(np.int32),
    }

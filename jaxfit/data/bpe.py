"""Byte-level BPE training and atomic tokenizer directories, shared by both pipelines.

The caption tokenizer (``image_text.caption_tokenizer``) and the LM tokenizer
(``text.tokenizer``) train the same kind of model: GPT-2's byte-level BPE
(``tokenizers.models.BPE`` with the ``ByteLevel`` pre-tokenizer and decoder, every one of
the 256 byte symbols in the initial alphabet, so any string encodes and decodes back).
They differ only in their special tokens, normalisation and prefix space, which are
arguments here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

NUM_BYTES = 256  # byte symbols in a byte-level vocabulary


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str],
    min_frequency: int = 2,
    normalizer: tokenizers.normalizers.Normalizer | None = None,
    add_prefix_space: bool = False,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE with ``tokenizers.trainers.BpeTrainer``.

    Args:
      texts: training texts (iterated once).
      vocab_size: target size including ``special_tokens`` and the 256 byte symbols; the
        result is smaller when the corpus has fewer merges of ``min_frequency``.
      special_tokens: given ids ``0, 1, ...`` in this order.
      min_frequency: minimum pair count for a merge.
      normalizer: applied before pre-tokenization (``None``: text kept verbatim).
      add_prefix_space: the ``ByteLevel`` pre-tokenizer's option (a leading space is added
        so a first word is tokenized as a later one is, as CLIP's captions are).

    Returns:
      The trained Rust tokenizer (no post-processor: callers add special tokens).

    Raises:
      ValueError: ``vocab_size < 256 + len(special_tokens)``.
    """
    least = NUM_BYTES + len(special_tokens)
    if vocab_size < least:
        raise ValueError(
            f"vocab_size must be >= {least} for a byte-level BPE ({NUM_BYTES} bytes + "
            f"{len(special_tokens)} special tokens), got {vocab_size}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically: yields a fresh sibling temp directory, renamed to
    ``out_dir`` when the block ends without error and deleted otherwise, so a crash never
    leaves a half-written ``out_dir`` behind.

    Raises:
      FileExistsError: ``out_dir`` exists and is not empty (checked before yielding).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{str(out_dir)!r} exists and is not empty; not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

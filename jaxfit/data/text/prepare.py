"""The text config and one-call preparation of a run's LM data.

Pipeline (each step in its own file of ``jaxfit.data.text``):

1. ``documents.load_documents(cfg, split)``: files / HF datasets -> documents + stats.
2. ``tokenizer.load_or_train(cfg.tokenizer, workdir, texts)``: the run's tokenizer.
3. ``token_file.build_token_file(cfg, tokenizer, split, cache_dir)``: documents -> a cached
   flat token file (``uint16``/``uint32`` memmap + JSON sidecar, EOS after each document).
4. ``batches.train_batches`` / ``eval_batches``: ``[B, seq_len]`` batches with
   ``labels[t] = tokens[t + 1]``, ``loss_mask``, ``segment_ids``, ``positions``.

:func:`prepare_text_data` runs 1-3 for the train and (when configured) validation splits;
:func:`check_model_fit` is the start-of-run check against the model's limits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ml_collections

from jaxfit.data.text.documents import (
    Document,
    TextStats,
    document_text,
    has_validation,
    load_documents,
)
from jaxfit.data.text.token_file import TokenFile, build_token_file
from jaxfit.data.text.tokenizer import TextTokenizer, default_tokenizer_config, load_or_train


def default_text_config() -> ml_collections.ConfigDict:
    """Every field the text pipeline reads (``cfg.data`` of an LM recipe)."""
    c = ml_collections.ConfigDict()
    # Source. "auto" infers txt/jsonl/csv/parquet from suffixes, "hf" for hf_name or a
    # save_to_disk directory. Otherwise one of "txt", "jsonl", "csv", "parquet", "hf".
    c.format = "auto"
    # Comma-separated files, globs or directories (or a save_to_disk directory / Hub name
    # with format "hf").
    c.path = ""
    # Validation files in the same format; when set, val_fraction is ignored.
    c.val_path = ""
    # Column holding the text (jsonl/csv/parquet/hf).
    c.text_field = "text"
    # Instruction data: records {prompt_field, completion_field}; the loss covers the
    # completion (and its EOS) only. prompt_template is str.format'ed with prompt=...
    c.instruction = False
    c.prompt_field = "prompt"
    c.completion_field = "completion"
    c.prompt_template = "{prompt}"
    # txt: one document per blank-line-separated block (else one per file), or per
    # doc_separator string when that is set (e.g. "<|endoftext|>"; takes precedence).
    c.split_by_blank_lines = False
    c.doc_separator = ""
    # Non-UTF-8 bytes: "replace" (U+FFFD, document kept and counted) or "skip" (dropped).
    c.decode_errors = "replace"
    # Hold out the last ceil(val_fraction * n) documents for validation (0 = none).
    c.val_fraction = 0.0
    # Hugging Face dataset (used when path is empty): Hub name or save_to_disk directory,
    # its config name, and the splits for training / validation ("" = use val_fraction).
    c.hf_name = ""
    c.hf_config = ""
    c.hf_split = "train"
    c.hf_val_split = ""
    # Prepend BOS to each document when the tokenizer has one distinct from EOS (Llama).
    c.add_bos = True
    # Token-file cache directory; "" = <workdir>/token_cache.
    c.cache_dir = ""
    c.tokenizer = default_tokenizer_config()
    return c


@dataclasses.dataclass
class TextData:
    """What a run needs: the tokenizer and the token files (validation may be None)."""

    tokenizer: TextTokenizer
    train: TokenFile
    validation: TokenFile | None


def prepare_text_data(cfg: Any, workdir: str | os.PathLike) -> TextData:
    """Tokenizer + train/validation token files for ``cfg``, reusing what ``workdir`` has.

    The training documents are read at most once (for tokenizer training and the token
    file), and not at all when both are already cached. A tokenizer is only trained on
    the training split.

    Raises:
      FileNotFoundError / ValueError: as ``load_documents`` and ``load_or_train``.
    """
    cache = {}

    def train_docs() -> tuple[list[Document], TextStats]:
        if "train" not in cache:
            cache["train"] = load_documents(cfg, "train")
        return cache["train"]

    tokenizer = load_or_train(
        cfg.tokenizer, workdir, texts=lambda: (document_text(d) for d in train_docs()[0])
    )
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(workdir) / "token_cache"
    train = build_token_file(cfg, tokenizer, "train", cache_dir, documents=train_docs)
    validation = (
        build_token_file(cfg, tokenizer, "validation", cache_dir) if has_validation(cfg) else None
    )
    return TextData(tokenizer, train, validation)


def check_model_fit(
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    max_positions: int | None,
    model_vocab_size: int,
    model_name: str = "the model",
) -> None:
    """Stop at start when the data cannot fit the model.

    Raises:
      ValueError: ``seq_len > max_positions`` (learned position tables cannot extend), or
        the tokenizer has more ids than the model's embedding rows.
    """
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len={seq_len} is longer than the {max_positions} positions of {model_name} "
            "(max_position_embeddings); lower seq_len"
        )
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.source!r} has {tokenizer.vocab_size} ids but {model_name} "
            f"has vocab_size={model_vocab_size}"
        )

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
import logging
import os
from pathlib import Path
from typing import Any

import ml_collections

from jaxfit.data.text.documents import read_source, source_of, take_split
from jaxfit.data.text.records import Document, TextStats, document_text
from jaxfit.data.text.sources import has_validation
from jaxfit.data.text.token_file import TokenFile, build_token_file
from jaxfit.data.text.tokenizer import TextTokenizer, default_tokenizer_config, load_or_train

logger = logging.getLogger(__name__)


def default_text_config() -> ml_collections.ConfigDict:
    """Every field the text pipeline reads (``cfg.data`` of an LM recipe)."""
    c = ml_collections.ConfigDict()
    # Source. "auto" infers txt/jsonl/csv/parquet from suffixes, "hf" for hf_name or a
    # save_to_disk directory. Otherwise one of "txt", "jsonl", "csv", "parquet", "hf", or
    # the conversations "chat" (messages / ShareGPT conversations) and "alpaca"
    # (instruction, input, output), read from files of any of those kinds but txt.
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
    # Hold out the last ceil(val_fraction * n) documents for validation (0 = none); when
    # that is less than one document (a single text file), the last ceil(val_fraction * N)
    # of the N tokens instead, as nanoGPT does.
    c.val_fraction = 0.0
    # Hugging Face dataset (used when path is empty): Hub name or save_to_disk directory,
    # its config name, and the splits for training / validation ("" = use val_fraction).
    c.hf_name = ""
    c.hf_config = ""
    c.hf_split = "train"
    c.hf_val_split = ""
    # Prepend BOS to each document when the tokenizer has one distinct from EOS (Llama).
    c.add_bos = True
    # Conversations (format "chat" / "alpaca", text.chat): a Jinja chat template that
    # overrides the tokenizer's own ("" = the tokenizer's tokenizer_config.json one).
    c.chat_template = ""
    # Batching by example: pack whole examples (conversations, or documents) into seq_len
    # rows, attention and positions restarting at each (segment_ids); conversations are
    # always batched by example (one per row when packing is off). An example longer than
    # seq_len is dropped (counted as too_long) or truncated: too_long = "drop" | "truncate".
    c.packing = False
    c.too_long = "drop"
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

    Each source is read at most once (a ``val_fraction`` split reads the training source
    for both splits), and not at all when the tokenizer and token files are cached. A
    tokenizer is only trained on the training split (for a split by tokens: on the first
    ``1 - val_fraction`` of the characters, about the training tokens).

    Raises:
      FileNotFoundError / ValueError: as ``load_documents`` and ``load_or_train``.
    """
    sources: dict[tuple[str, str], tuple[list[Document], TextStats]] = {}
    splits: dict[str, tuple[list[Document], TextStats]] = {}

    def documents(split: str) -> tuple[list[Document], TextStats]:
        if split not in splits:
            key = source_of(cfg, split)
            if key not in sources:
                sources[key] = read_source(cfg, split)
            splits[split] = take_split(cfg, split, *sources[key])
        return splits[split]

    def training_texts():
        docs, stats = documents("train")
        texts = (document_text(d) for d in docs)
        if not stats.split_by_tokens:
            return texts
        total = sum(len(document_text(d)) for d in docs)
        return _first_chars(texts, int(total * (1 - cfg.val_fraction)))

    tokenizer = load_or_train(cfg.tokenizer, workdir, texts=training_texts)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(workdir) / "token_cache"
    train = build_token_file(
        cfg, tokenizer, "train", cache_dir, documents=lambda: documents("train")
    )
    validation = None
    if has_validation(cfg):
        validation = build_token_file(
            cfg, tokenizer, "validation", cache_dir, documents=lambda: documents("validation")
        )
    if "token_split" in train.meta:
        sizes = train.meta["token_split"]
        logger.info(
            "text data: split by tokens: %d train / %d validation tokens (val_fraction=%g)",
            sizes["train"],
            sizes["validation"],
            cfg.val_fraction,
        )
    return TextData(tokenizer, train, validation)


def _first_chars(texts, n: int):
    """The texts up to ``n`` characters in all (the last one cut)."""
    for t in texts:
        if n <= 0:
            return
        yield t[:n]
        n -= len(t)


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

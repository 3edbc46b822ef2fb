"""LM documents of one split: read a source (``readers``) and hold out validation data.

:func:`load_documents` reads the source named by a text config (see
``jaxfit.data.text.default_text_config`` for every field; sources in ``text.sources``,
formats in ``text.readers``) and returns the documents of one split together with a
:class:`~jaxfit.data.text.records.TextStats` that counts what was dropped and why.

Validation split: ``val_path`` (files, same format) or ``hf_val_split`` when given, else
``val_fraction`` of the training source:

* by documents, when it holds out at least one whole document (``val_fraction * n >= 1``,
  with training documents left): the *last* ``ceil(val_fraction * n)`` documents in file
  order, the training split being the first ``n - n_val``;
* else by tokens (a single text file such as tinyshakespeare, or a handful of documents):
  both splits get every document with ``stats.split_by_tokens`` set, and the token-file
  builder keeps the first / last ``ceil(val_fraction * N)`` of the ``N`` tokens, as
  nanoGPT does (``text.token_file``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from jaxfit.data.text.readers import read_spec
from jaxfit.data.text.records import Document, TextStats
from jaxfit.data.text.sources import (
    RECORD_FORMATS,
    check_split,
    resolve_format,
    train_spec,
    validation_source,
)

logger = logging.getLogger(__name__)


def _describe(cfg: Any, spec: str) -> str:
    if cfg.format in RECORD_FORMATS:
        field = f"{cfg.format} records"
    elif cfg.instruction:
        field = f"fields {cfg.prompt_field!r}/{cfg.completion_field!r}"
    else:
        field = f"field {cfg.text_field!r}"
    return f"{spec!r} (format={resolve_format(cfg, spec)}, {field})"


def source_of(cfg: Any, split: str) -> tuple[str, str]:
    """``(spec, hf_split)`` the documents of ``split`` are read from (for a ``val_fraction``
    split, the training source: both splits read it).

    Raises:
      ValueError: unknown split, or ``"validation"`` with no validation data configured.
    """
    check_split(split)
    src = validation_source(cfg) if split == "validation" else None
    if split == "validation" and src is None:
        raise ValueError(
            "text data: no validation data configured; set val_path, hf_val_split or val_fraction"
        )
    if src == "val_path":
        return cfg.val_path, cfg.hf_split
    if src == "hf_val_split":
        return train_spec(cfg), cfg.hf_val_split
    return train_spec(cfg), cfg.hf_split


def read_source(cfg: Any, split: str) -> tuple[list[Document], TextStats]:
    """Every document of the source ``split`` is read from (:func:`source_of`), and the
    drop counts; ``stats.documents`` is left 0 (:func:`take_split` sets it).

    Raises:
      as :func:`load_documents`, but not for ``val_fraction``.
    """
    spec, hf_split = source_of(cfg, split)
    stats = TextStats()
    docs = read_spec(cfg, spec, hf_split, stats)
    if not docs:
        stats.log(_describe(cfg, spec))
        raise ValueError(
            f"text data: no usable documents in {_describe(cfg, spec)}: "
            f"{stats.empty} empty, {stats.missing_field} missing the field, "
            f"{stats.not_string} not strings, {stats.malformed_rows} malformed rows, "
            f"{stats.decode_skipped} undecodable"
        )
    return docs, stats


def split_by_tokens(val_fraction: float, num_documents: int) -> bool:
    """Whether a ``val_fraction`` split of ``num_documents`` goes by tokens: when it would
    hold out less than one whole document, or every document."""
    n_val = math.ceil(val_fraction * num_documents)
    return val_fraction * num_documents < 1 or n_val >= num_documents


def take_split(
    cfg: Any, split: str, docs: list[Document], stats: TextStats
) -> tuple[list[Document], TextStats]:
    """The documents of ``split`` from those of its source (:func:`read_source`) and a copy
    of ``stats`` with ``documents`` (and ``split_by_tokens``) set; logs the counts.

    Raises:
      ValueError: a ``val_fraction`` split with ``val_fraction`` outside ``(0, 1)``.
    """
    spec = source_of(cfg, split)[0]
    stats = dataclasses.replace(stats)
    if validation_source(cfg) == "fraction":
        f, n = cfg.val_fraction, len(docs)
        if not 0 < f < 1:
            raise ValueError(f"text data: val_fraction must be in (0, 1), got {f}")
        if split_by_tokens(f, n):
            stats.split_by_tokens = True
            if split == "train":
                logger.info(
                    "text data: val_fraction=%g of the %d document(s) of %s holds out less than "
                    "one document or all of them; splitting by tokens",
                    f,
                    n,
                    _describe(cfg, spec),
                )
        else:
            # The drop counts describe the whole source; only `documents` is per split.
            n_val = math.ceil(f * n)
            docs = docs[n - n_val :] if split == "validation" else docs[: n - n_val]
    stats.documents = len(docs)
    stats.log(f"{_describe(cfg, spec)}[{split}]")
    return docs, stats


def load_documents(cfg: Any, split: str) -> tuple[list[Document], TextStats]:
    """Read the documents of ``split`` (``"train"`` or ``"validation"``).

    Args:
      cfg: a text config (``jaxfit.data.text.default_text_config()`` fields).
      split: ``"train"`` or ``"validation"``.

    Returns:
      ``(documents, stats)``: ``str`` documents, or ``InstructionExample`` with
      ``cfg.instruction``, in source order; ``stats`` counts kept and dropped documents
      and is also logged. With ``stats.split_by_tokens`` the documents are the whole
      source (see the module docstring).

    Raises:
      FileNotFoundError: a configured file is missing.
      ValueError: unknown split/format, no validation data configured for
        ``"validation"``, a source that yields no documents (message names the
        files/dataset and the field), or ``val_fraction`` outside ``(0, 1)``.
    """
    return take_split(cfg, split, *read_source(cfg, split))

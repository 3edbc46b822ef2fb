"""Tokenize a text split once into a flat token file on disk, cached by content key.

Layout, for split ``s`` and cache key ``k`` in ``cache_dir``:

* ``s-k.bin``: all tokens of all documents, in document order, as a flat little-endian
  array (``uint16`` when ``vocab_size <= 65536``, else ``uint32``); read with ``np.memmap``.
  Each document is laid out as ``[BOS] tokens EOS``; BOS is there only when the config's
  ``add_bos`` is set and the tokenizer has a BOS distinct from its EOS (GPT-2's BOS *is*
  its EOS, which already separates documents).
* ``s-k.mask.bin`` (instruction data and conversations): ``uint8``, one per token: 1 on
  completion tokens and on the EOS that ends the completion, 0 on BOS and prompt tokens;
  for conversations 1 on the assistant's tokens (``text.chat``).
* ``s-k.starts.npy``: int64 ``[documents + 1]``, where each document starts (absent for a
  split by tokens); ``s-k.sources.json`` (conversations): ``line N of FILE`` of each.
* ``s-k.json``: sidecar (``format_version``, ``key``, ``split``, ``dtype``, ``num_tokens``,
  ``vocab_size``, ``eos_token_id``, ``bos_token_id``, ``add_bos``, ``documents``,
  ``has_loss_mask``, ``loss_tokens``, ``stats`` (``documents`` and the count of each drop
  reason, ``TextStats.dropped``: every other key is a reason for ``skipped``),
  ``decode_replaced`` (documents kept with U+FFFD), ``token_split`` (``{"train": N,
  "validation": M}`` tokens when the split is by tokens, else absent), ``tokenizer``
  fingerprint, ``source`` fingerprint, ``sha256`` of the tokens, mask and document starts
  (:attr:`TokenFile.content_sha256`, what a resume compares: ``jaxfit.data.fingerprint``)).
  Written last: a token file exists iff its sidecar does. Every file is written to a
  temporary name and renamed (atomic on POSIX).

A split by tokens (``TextStats.split_by_tokens``: ``val_fraction`` holds out less than one
document) tokenizes the whole source and keeps the first ``N - M`` tokens for ``train``
and the last ``M = ceil(val_fraction * N)`` for ``validation`` (nanoGPT's
``data[:n]`` / ``data[n:]``), the loss mask cut alike.

The key is the sha256 of the source fingerprint (file paths, sizes and contents' SHA-256;
see ``text.sources.source_fingerprint``), the tokenizer fingerprint, the config fields that
change the tokens (:data:`KEY_FIELDS`) and :data:`FORMAT_VERSION`; an unchanged run reuses
the file without reading the text.

Prompt and completion are tokenized separately, so the loss boundary is exact even where
BPE would have merged across it. A conversation is its chat-template rendering, as is
(no BOS or EOS added: the template places its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from jaxfit.data import fingerprint
from jaxfit.data.text import chat
from jaxfit.data.text.documents import load_documents
from jaxfit.data.text.records import ChatExample, Document, InstructionExample, TextStats
from jaxfit.data.text.sources import RECORD_FORMATS, source_fingerprint
from jaxfit.data.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: "stats" holds drop counts only; decode_replaced, token_split; starts
# Text-config fields that change the token stream of a split.
KEY_FIELDS = (
    "format",
    "path",
    "val_path",
    "hf_name",
    "hf_config",
    "hf_split",
    "hf_val_split",
    "text_field",
    "instruction",
    "prompt_field",
    "completion_field",
    "prompt_template",
    "split_by_blank_lines",
    "doc_separator",
    "decode_errors",
    "val_fraction",
    "add_bos",
    "chat_template",
)
TOO_LONG = ("drop", "truncate")  # what batches do with an example longer than seq_len
_ENCODE_CHUNK = 2048  # documents per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id ``< vocab_size`` fits (``vocab_size <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclasses.dataclass
class TokenFile:
    """An opened token file.

    Attributes:
      path: the ``.bin`` token file.
      meta: the sidecar dict.
      tokens: ``np.memmap`` ``[num_tokens]`` of ``meta["dtype"]`` (read-only).
      loss_mask: ``np.memmap`` ``[num_tokens]`` ``uint8`` or None (plain LM: loss everywhere).
      packing, too_long: how ``text.batches`` batches it (``data.packing``,
        ``data.too_long``; set by :func:`build_token_file`, not stored).
    """

    path: Path
    meta: dict
    tokens: np.ndarray
    loss_mask: np.ndarray | None
    packing: bool = False
    too_long: str = "drop"

    @property
    def by_example(self) -> bool:
        """Batched one example (document, conversation) per row or packed whole into
        rows, rather than as windows of the stream: conversations, or ``packing``."""
        return self.meta.get("kind") == "chat" or self.packing

    def document_starts(self) -> np.ndarray:
        """int64 ``[documents + 1]``: where each document starts (and the end).

        Raises:
          ValueError: a split by tokens, which cuts documents (it has no boundaries).
        """
        f = self.path.with_suffix(".starts.npy")
        if not f.is_file():
            raise ValueError(
                f"token file {self.path} has no document boundaries (split by tokens); "
                "batch it as a stream (data.packing=False)"
            )
        return np.load(f)

    def sources(self) -> list[str] | None:
        """Where each conversation came from (``line 17 of FILE``), or None."""
        f = self.path.with_suffix(".sources.json")
        return json.loads(f.read_text()) if f.is_file() else None

    @property
    def content_sha256(self) -> str:
        """SHA-256 (hex) of the token, loss-mask and document-start files, in that order:
        equal for equal token streams (stored in the sidecar when written; computed for a
        file written before it was)."""
        if "sha256" not in self.meta:
            self.meta["sha256"] = fingerprint.sha256_of(_content_files(self.path))
        return self.meta["sha256"]

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def stats(self) -> TextStats:
        counts = self.meta["stats"] | {"decode_replaced": self.meta.get("decode_replaced", 0)}
        stats = TextStats.from_dict(counts)
        stats.split_by_tokens = "token_split" in self.meta
        return stats

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenFile:
        """Open ``<name>.bin`` with its ``<name>.json`` sidecar (and mask, if any).

        Raises:
          FileNotFoundError: sidecar or data missing.
          ValueError: file sizes disagree with the sidecar (a truncated write).
        """
        path = Path(path)
        meta = json.loads(_sidecar(path).read_text())
        n, dtype = int(meta["num_tokens"]), np.dtype(meta["dtype"])
        if path.stat().st_size != n * dtype.itemsize:
            raise ValueError(
                f"token file {path} has {path.stat().st_size} bytes, sidecar says {n} x {dtype}"
            )
        tokens = _memmap(path, dtype, n)
        mask = _memmap(_mask_path(path), np.dtype(np.uint8), n) if meta["has_loss_mask"] else None
        return cls(path, meta, tokens, mask)


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0,), dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _mask_path(path: Path) -> Path:
    return path.with_suffix(".mask.bin")


def cache_key(cfg: Any, tokenizer: TextTokenizer, split: str) -> str:
    """16-hex-digit key of (inputs, tokenizer, token-relevant config, format version)."""
    desc = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "source": source_fingerprint(cfg, split),
        "tokenizer": tokenizer.fingerprint(),
        "config": {k: cfg[k] for k in KEY_FIELDS},
        "chat_template": _template(cfg, tokenizer),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _uses_bos(tokenizer: TextTokenizer, add_bos: bool) -> bool:
    bos = tokenizer.bos_token_id
    return bool(add_bos) and bos is not None and bos != tokenizer.eos_token_id


def _encode_chunks(
    documents: Sequence[Document],
    tokenizer: TextTokenizer,
    bos: list[int],
    template: str | None,
    stats: TextStats,
) -> Iterator[tuple[list[list[int]], list[list[int]] | None, list[str]]]:
    """``(token sequences, loss masks or None, sources)`` of consecutive documents."""
    eos = [tokenizer.eos_token_id]
    for i in range(0, len(documents), _ENCODE_CHUNK):
        chunk = documents[i : i + _ENCODE_CHUNK]
        if isinstance(chunk[0], ChatExample):
            seqs, masks, sources = [], [], []
            for ex in chunk:
                try:
                    ids, mask = chat.encode_chat(tokenizer, template, ex)
                except chat.ChatTemplateError as e:
                    stats.skip("template_error", ex.source, str(e))
                    continue
                seqs.append(ids)
                masks.append(mask)
                sources.append(ex.source)
            yield seqs, masks, sources
        elif isinstance(chunk[0], InstructionExample):
            prompts = tokenizer.encode_batch([d.prompt for d in chunk])
            comps = tokenizer.encode_batch([d.completion for d in chunk])
            seqs = [bos + p + c + eos for p, c in zip(prompts, comps)]
            masks = [[0] * (len(bos) + len(p)) + [1] * (len(c) + 1) for p, c in zip(prompts, comps)]
            yield seqs, masks, []
        else:
            yield [bos + ids + eos for ids in tokenizer.encode_batch(chunk)], None, []


def write_token_file(
    documents: Sequence[Document],
    tokenizer: TextTokenizer,
    path: str | os.PathLike,
    *,
    add_bos: bool,
    meta: dict | None = None,
    token_split: tuple[str, float] | None = None,
    chat_template: str | None = None,
    stats: TextStats | None = None,
) -> TokenFile:
    """Tokenize ``documents`` into ``path`` (+ mask, document starts and sidecar), atomically.

    Args:
      documents: all ``str`` documents, all :class:`InstructionExample` or all
        :class:`ChatExample` (the last two write a loss mask).
      tokenizer: the run's tokenizer.
      path: the ``.bin`` to write; the sidecar is ``path`` with suffix ``.json``.
      add_bos: prepend BOS to each document (only if the tokenizer's BOS != EOS; not for
        conversations, whose template places its own).
      meta: extra sidecar fields (key, split, source, ...).
      token_split: ``(split, val_fraction)``: keep only ``split``'s share of the token
        stream (:func:`token_split_sizes`; see the module docstring).
      chat_template: the Jinja template conversations are rendered with
        (``text.chat.chat_template``); required for them.
      stats: the split's counts; conversations the template cannot render are added to
        it (``template_error``) and it is written to the sidecar (``stats``,
        ``decode_replaced``) with ``documents`` = the documents written.

    Raises:
      ValueError: documents of mixed kinds, conversations without a template, the
        tokenizer produced an id ``>= vocab_size``, a token split leaves a side with fewer
        than 2 tokens, or no conversation could be rendered.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = type(documents[0]) if documents else str
    if any(type(d) is not kind for d in documents):
        raise ValueError("documents mix plain text, instruction examples and conversations")
    if kind is ChatExample and not chat_template:
        raise ValueError("conversations need a chat template (text.chat.chat_template)")
    stats = stats if stats is not None else TextStats(documents=len(documents))
    masked = kind is not str
    dtype = token_dtype(tokenizer.vocab_size)
    bos = (
        [tokenizer.bos_token_id]
        if kind is not ChatExample and _uses_bos(tokenizer, add_bos)
        else []
    )
    tmp = {k: _tmp(p) for k, p in _paths(path).items()}
    lengths, sources = [], []
    num_tokens = loss_tokens = 0
    try:
        with open(tmp["tokens"], "wb") as f, open(tmp["mask"], "wb") if masked else _Null() as fm:
            for seqs, masks, srcs in _encode_chunks(
                documents, tokenizer, bos, chat_template, stats
            ):
                arr = np.fromiter(chain.from_iterable(seqs), np.int64)
                if arr.size and (arr.max() >= tokenizer.vocab_size or arr.min() < 0):
                    raise ValueError(
                        f"tokenizer {tokenizer.source!r} produced id {arr.max()} outside "
                        f"[0, {tokenizer.vocab_size})"
                    )
                f.write(arr.astype(dtype).tobytes())
                if masked:
                    m = np.fromiter(chain.from_iterable(masks), np.uint8)
                    fm.write(m.tobytes())
                    loss_tokens += int(m.sum())
                num_tokens += arr.size
                lengths.extend(len(s) for s in seqs)
                sources.extend(srcs)
        if kind is ChatExample and not lengths:
            raise ValueError(f"no conversation could be rendered with the chat template: {stats}")
        stats.documents = len(lengths)
        extra = {}
        if token_split is not None:
            split, fraction = token_split
            n_train, n_val = token_split_sizes(num_tokens, fraction)
            start, stop = (0, n_train) if split == "train" else (n_train, num_tokens)
            _keep_range(tmp["tokens"], start * dtype.itemsize, stop * dtype.itemsize)
            if masked:
                _keep_range(tmp["mask"], start, stop)
                loss_tokens = int(np.fromfile(tmp["mask"], np.uint8).sum(dtype=np.int64))
            num_tokens = stop - start
            extra["token_split"] = {"train": n_train, "validation": n_val}
        else:  # document boundaries (a split by tokens cuts documents: none)
            with open(tmp["starts"], "wb") as fs:
                np.save(fs, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        if sources:
            tmp["sources"].write_text(json.dumps(sources))
        sidecar = {
            "format_version": FORMAT_VERSION,
            **(meta or {}),
            **extra,
            "kind": {str: "text", InstructionExample: "instruction", ChatExample: "chat"}[kind],
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "add_bos": bool(bos),
            "documents": len(lengths),
            "has_loss_mask": masked,
            "loss_tokens": loss_tokens if masked else num_tokens,
            "stats": {"documents": stats.documents, **stats.dropped()},
            "decode_replaced": stats.decode_replaced,
            "tokenizer": tokenizer.fingerprint(),
            "sha256": fingerprint.sha256_of(_content_files(path, tmp)),
        }
        for name, final in _paths(path).items():
            if name != "sidecar" and tmp[name].exists():
                os.replace(tmp[name], final)
        tmp["sidecar"].write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        os.replace(tmp["sidecar"], _sidecar(path))  # last: the file exists iff this does
    finally:
        for t in tmp.values():
            if t.exists():
                t.unlink()
    return TokenFile.open(path)


def _paths(path: Path) -> dict[str, Path]:
    """The files of a token file, by role."""
    return {
        "tokens": path,
        "mask": _mask_path(path),
        "starts": path.with_suffix(".starts.npy"),
        "sources": path.with_suffix(".sources.json"),
        "sidecar": _sidecar(path),
    }


def _content_files(path: Path, names: dict[str, Path] | None = None) -> list[Path]:
    """The files :attr:`TokenFile.content_sha256` hashes (``names``: their temporary names)."""
    names = names or _paths(path)
    return [names["tokens"], names["mask"], names["starts"]]


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def token_split_sizes(num_tokens: int, val_fraction: float) -> tuple[int, int]:
    """``(train, validation)`` token counts of a split by tokens: the last
    ``ceil(val_fraction * num_tokens)`` tokens are validation.

    Raises:
      ValueError: either side would have fewer than 2 tokens (nothing to predict).
    """
    n_val = math.ceil(val_fraction * num_tokens)
    n_train = num_tokens - n_val
    if n_train < 2 or n_val < 2:
        raise ValueError(
            f"text data: val_fraction={val_fraction} of {num_tokens} tokens leaves {n_train} "
            f"training and {n_val} validation tokens; use more text or another val_fraction"
        )
    return n_train, n_val


def _keep_range(path: Path, start: int, stop: int) -> None:
    """Keep bytes ``[start, stop)`` of ``path``, in place."""
    with open(path, "r+b") as f:
        if start:
            f.seek(start)
            data = f.read(stop - start)
            f.seek(0)
            f.write(data)
        f.truncate(stop - start)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def build_token_file(
    cfg: Any,
    tokenizer: TextTokenizer,
    split: str,
    cache_dir: str | os.PathLike,
    *,
    documents: Callable[[], tuple[Sequence[Document], TextStats]] | None = None,
) -> TokenFile:
    """The token file of ``split``, reused from ``cache_dir`` when its key matches.

    Args:
      cfg: text config (``jaxfit.data.text.default_text_config()`` fields).
      tokenizer: the run's tokenizer (part of the key).
      split: ``"train"`` or ``"validation"``.
      cache_dir: directory for ``<split>-<key>.{bin,json}``.
      documents: called only on a cache miss to get ``(documents, stats)``; default
        ``load_documents(cfg, split)``.

    Raises:
      as ``load_documents`` (missing files, empty corpus, ...).
    """
    key = cache_key(cfg, tokenizer, split)
    path = Path(cache_dir) / f"{split}-{key}.bin"
    if cfg.too_long not in TOO_LONG:
        raise ValueError(f"text data: too_long must be one of {TOO_LONG}, got {cfg.too_long!r}")
    tf = None
    if _sidecar(path).is_file():
        try:
            tf = TokenFile.open(path)
            if tf.meta.get("key") != key:
                tf = None
            else:
                logger.info("reusing token file %s (%d tokens)", path, tf.num_tokens)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            logger.warning("rebuilding token file %s: %s", path, e)
    if tf is None:
        docs, stats = documents() if documents is not None else load_documents(cfg, split)
        tf = write_token_file(
            docs,
            tokenizer,
            path,
            add_bos=cfg.add_bos,
            meta={"key": key, "split": split, "source": source_fingerprint(cfg, split)},
            token_split=(split, cfg.val_fraction) if stats.split_by_tokens else None,
            chat_template=_template(cfg, tokenizer),
            stats=dataclasses.replace(stats),
        )
        logger.info(
            "wrote %s: %d documents, %d tokens (%s)",
            path,
            tf.meta["documents"],
            tf.num_tokens,
            tf.meta["dtype"],
        )
    tf.packing, tf.too_long = bool(cfg.packing), cfg.too_long
    return tf


def _template(cfg: Any, tokenizer: TextTokenizer) -> str | None:
    """The chat template of conversation formats (None for text)."""
    return (
        chat.chat_template(tokenizer, cfg.chat_template) if cfg.format in RECORD_FORMATS else None
    )

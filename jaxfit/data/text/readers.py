"""Readers of each text source format: files or datasets -> documents, drops counted.

* ``txt``: each file is one document, or one document per blank-line-separated block
  (``split_by_blank_lines``), or per ``doc_separator`` string (e.g. ``<|endoftext|>``;
  takes precedence; an empty document between two separators is dropped and counted,
  the text before the first and after the last separator is a document only when it is
  not empty). Bytes that are not UTF-8 are replaced by U+FFFD (``decode_errors="replace"``,
  counted in ``decode_replaced`` per document) or the document is dropped (``"skip"``). A
  leading UTF-8 byte-order mark is removed and CRLF line ends become LF (as Python's text
  mode does); otherwise the text is kept verbatim (stripped of surrounding whitespace when
  split into blocks).
* ``jsonl`` / ``csv``: read row by row (``data.rows``) from the user's file, so a
  malformed row (not a JSON object, a CSV row with the wrong number of fields) is skipped
  and counted in ``malformed_rows`` with its file and line; rows with bytes that are not
  UTF-8 are decoded with U+FFFD (``decode_replaced``) or dropped (``"skip"``). An empty CSV
  cell is a missing value (as pandas reads it). A ``.json`` file may hold one JSON array.
* ``parquet``: read with ``pyarrow`` (which validates UTF-8 when a file is written).
* ``hf``: a Hugging Face dataset named by ``path`` or, when ``path`` is empty, ``hf_name``:
  a local directory written by ``save_to_disk`` (``Dataset``, or ``DatasetDict`` indexed by
  ``hf_split``) or a name for ``datasets.load_dataset(name, hf_config, split=hf_split)``.

The text is column ``text_field`` (or ``prompt_field`` + ``completion_field`` with
``instruction=True``; with ``format="chat"`` / ``"alpaca"`` the record is a conversation,
``text.chat``). Records whose field is missing or null count as ``missing_field``;
values that are not strings as ``not_string``; documents that are empty or
whitespace-only (for instruction data: an empty completion) as ``empty``. Each is logged
as ``skipped line 17 of /path/file.jsonl: <why>`` (``record N of`` for datasets).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxfit.data import rows
from jaxfit.data.text import chat
from jaxfit.data.text.records import Document, InstructionExample, TextStats
from jaxfit.data.text.sources import RECORD_FORMATS, resolve_files, resolve_format

logger = logging.getLogger(__name__)

_BLANK_LINES = re.compile(rb"\n\s*\n")
_ITER_BATCH = 10_000


def _fields(cfg: Any, columns: Sequence[str] = ()) -> list[str]:
    """The fields a record's document is made of (for conversations: the one of
    ``messages`` / ``conversations`` present in ``columns``, or Alpaca's three)."""
    if cfg.format == "chat":
        return ["conversations" if "conversations" in columns else "messages"]
    if cfg.format == "alpaca":
        return list(chat.ALPACA_FIELDS)
    return [cfg.prompt_field, cfg.completion_field] if cfg.instruction else [cfg.text_field]


# ----------------------------------------------------------------------------- txt


def _txt_chunks(raw: bytes, cfg: Any) -> tuple[list[bytes], int]:
    """``(documents, empty)``: the byte chunks of one file and the empty ones dropped."""
    if cfg.doc_separator:
        chunks = [c.strip() for c in raw.split(cfg.doc_separator.encode("utf-8"))]
        if len(chunks) > 1 and not chunks[-1]:
            chunks.pop()  # text after the last separator is no document when empty
        if len(chunks) > 1 and not chunks[0]:
            chunks.pop(0)  # nor is the text before the first
        kept = [c for c in chunks if c]
        return kept, len(chunks) - len(kept)
    if cfg.split_by_blank_lines:
        return [c.strip() for c in _BLANK_LINES.split(raw.strip())], 0
    return [raw], 0


def _read_txt(paths: Sequence[Path], cfg: Any, stats: TextStats) -> Iterator[str]:
    for path in paths:
        raw = path.read_bytes()
        if raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        chunks, empty = _txt_chunks(raw.replace(b"\r\n", b"\n"), cfg)
        for _ in range(empty):
            stats.skip("empty", f"a document of {path}", "empty between two separators")
        for k, chunk in enumerate(chunks, start=1):
            where = f"document {k} of {path}"
            text, replaced = rows.decode(chunk)
            if replaced and not _keep_replaced(cfg, stats, where):
                continue
            if not text.strip():
                stats.skip("empty", where, "empty or whitespace only")
                continue
            yield text


def _keep_replaced(cfg: Any, stats: TextStats, where: str) -> bool:
    """Count a document with bytes that are not UTF-8: kept (replaced) or skipped."""
    if cfg.decode_errors == "skip":
        stats.skip("decode_skipped", where, "bytes that are not UTF-8 (decode_errors=skip)")
        return False
    stats.decode_replaced += 1
    return True


# ----------------------------------------------------------------------------- records


def document(
    values: dict, cfg: Any, stats: TextStats, where: str, replaced: bool = False
) -> Document | None:
    """The document of one record (``None`` when it is dropped; the drop is counted)."""
    if cfg.format in RECORD_FORMATS:
        if replaced and not _keep_replaced(cfg, stats, where):
            return None
        return chat.chat_example(values, cfg.format, stats, where)
    fields = _fields(cfg)
    got = [values.get(f) for f in fields]
    for f, v in zip(fields, got):
        if v is None:
            stats.skip("missing_field", where, f"no {f!r} (fields: {', '.join(map(str, values))})")
            return None
    for f, v in zip(fields, got):
        if not isinstance(v, str):
            stats.skip("not_string", where, f"{f!r} is {type(v).__name__}, not a string")
            return None
    if replaced and not _keep_replaced(cfg, stats, where):
        return None
    if not got[-1].strip():
        stats.skip("empty", where, f"{fields[-1]!r} is empty")
        return None
    if cfg.instruction:
        return InstructionExample(cfg.prompt_template.format(prompt=got[0]), got[1])
    return got[0]


def read_rows(path: Path, fmt: str) -> Iterator[rows.Row]:
    """Rows of a ``jsonl`` or ``csv`` file; an empty CSV cell becomes ``None``."""
    if fmt == "jsonl":
        yield from rows.read_rows(path, "json")
        return
    for row in rows.read_rows(path, "csv"):
        if row.value is not None:
            row = rows.Row(row.line, {k: v or None for k, v in row.value.items()}, "", row.replaced)
        yield row


def _read_table_files(
    fmt: str, paths: Sequence[Path], cfg: Any, stats: TextStats
) -> Iterator[Document]:
    for path in paths:
        for row in read_rows(path, fmt):
            where = f"line {row.line} of {path}"
            if row.value is None:
                stats.skip("malformed_rows", where, row.error)
                continue
            doc = document(row.value, cfg, stats, where, row.replaced)
            if doc is not None:
                yield doc


def _read_columns(
    batches: Iterable[dict[str, list]], columns: Sequence[str], cfg, stats, name: str, n: int
) -> Iterator[Document]:
    """Documents of a columnar source (parquet file, HF dataset) of ``n`` records."""
    fields = [f for f in _fields(cfg, columns) if f in columns]
    missing = [f for f in _fields(cfg, columns) if f not in columns and f != "input"]
    if missing:
        logger.warning(
            "%s: no field %s (columns: %s); all %d records skipped", name, missing, columns, n
        )
        stats.missing_field += n
        return
    i = 0
    for batch in batches:
        for values in zip(*(batch[f] for f in fields)):
            i += 1
            doc = document(dict(zip(fields, values)), cfg, stats, f"record {i} of {name}")
            if doc is not None:
                yield doc


def _read_parquet(paths: Sequence[Path], cfg: Any, stats: TextStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        fields = [f for f in _fields(cfg, columns) if f in columns]
        batches = (b.to_pydict() for b in pf.iter_batches(batch_size=_ITER_BATCH, columns=fields))
        yield from _read_columns(batches, columns, cfg, stats, str(path), pf.metadata.num_rows)


def _read_hf(cfg: Any, name: str, split: str, stats: TextStats) -> Iterator[Document]:
    import datasets

    local = os.path.expanduser(name)
    if os.path.isdir(local):
        ds = datasets.load_from_disk(local)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"text data: split {split!r} not in dataset {local!r} (has {list(ds)})"
                )
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, cfg.hf_config or None, split=split)
        except Exception as e:
            raise ValueError(
                f"text data: could not load dataset {name!r} split {split!r}: {e}"
            ) from e
    fields = [f for f in _fields(cfg, ds.column_names) if f in ds.column_names]
    batches = ds.select_columns(fields).iter(batch_size=_ITER_BATCH) if fields else iter(())
    yield from _read_columns(batches, ds.column_names, cfg, stats, f"{name}[{split}]", len(ds))


def read_spec(cfg: Any, spec: str, hf_split: str, stats: TextStats) -> list[Document]:
    """Every document of source ``spec`` (files, or an HF dataset's ``hf_split``), in order.

    Raises:
      FileNotFoundError: a named file is missing.
      ValueError: a bad ``decode_errors`` or format, instruction data from ``txt``, an
        unreadable dataset.
    """
    fmt = resolve_format(cfg, spec)
    if cfg.decode_errors not in ("replace", "skip"):
        raise ValueError(
            f"text data: decode_errors must be 'replace' or 'skip', got {cfg.decode_errors!r}"
        )
    if cfg.instruction and fmt == "txt":
        raise ValueError("text data: instruction=True needs jsonl/csv/parquet/hf records, not txt")
    if fmt == "hf":
        return list(_read_hf(cfg, spec, hf_split, stats))
    paths = resolve_files(spec, fmt)
    if fmt == "txt":
        return list(_read_txt(paths, cfg, stats))
    if fmt == "parquet":
        return list(_read_parquet(paths, cfg, stats))
    return list(_read_table_files(fmt, paths, cfg, stats))

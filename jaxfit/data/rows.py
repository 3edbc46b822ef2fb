"""Rows of JSON-lines, JSON-array and CSV files, each with the line it starts on.

Shared by the image-caption tables (``image_text.sources``) and the LM text and chat
readers (``text.documents``). A malformed row is returned as a :class:`Row` with
``value=None`` and an ``error`` saying why, never raised, so the caller can skip it, count
it and name ``line N of FILE`` in its log; only a file that cannot be opened raises.

Bytes that are not UTF-8 are decoded line by line with ``errors="replace"`` (U+FFFD) and
the rows they occur in are marked ``replaced``; a leading UTF-8 byte-order mark is
dropped. The reader always reads the user's file itself (no decoded temporary copy), so
every line number refers to it.

* JSON lines: one object per non-blank line; a line that is not JSON, or JSON that is not
  an object, is malformed.
* JSON array (a JSON file starting with ``[``, e.g. Alpaca's ``alpaca_data.json``): each
  item an object; the line is where the item starts. A syntax error ends the file there
  (one malformed row says so), since a JSON array cannot be resynchronised.
* CSV: a header row, then one row per record (quoted fields may span lines);
  values are strings; a row whose field count differs from the header's, or that the
  ``csv`` module rejects, is malformed.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

_SPACE = re.compile(r"\s*")
# Documents may be long: let one CSV field be as large as the csv module allows on all
# platforms (the default limit is 131,072 characters).
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table file.

    Attributes:
      line: 1-based line of ``path`` on which the row starts.
      value: the record (``dict``; CSV values are ``str``), or None when malformed.
      error: why the row is malformed ("" when it is not).
      replaced: some of the row's bytes were not UTF-8 and became U+FFFD.
    """

    line: int
    value: dict | None
    error: str = ""
    replaced: bool = False


def decode(raw: bytes) -> tuple[str, bool]:
    """``(text, replaced)``: strict UTF-8, else ``errors="replace"``."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _lines(path: Path) -> Iterator[tuple[str, bool]]:
    """Decoded lines (line ends kept) and whether each had undecodable bytes."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield decode(raw)


def _as_row(line: int, value, replaced: bool) -> Row:
    if isinstance(value, dict):
        return Row(line, value, "", replaced)
    return Row(line, None, f"not a JSON object: {json.dumps(value)[:80]}", replaced)


def read_jsonl(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a JSON-lines file; blank lines are ignored."""
    for i, (text, replaced) in enumerate(_lines(Path(path)), start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield Row(i, None, f"not JSON ({e.msg}, column {e.colno})", replaced)
            continue
        yield _as_row(i, value, replaced)


def read_json_array(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a file holding one JSON array of objects."""
    lines = list(_lines(Path(path)))
    text = "".join(t for t, _ in lines)
    bad_lines = {i for i, (_, replaced) in enumerate(lines, start=1) if replaced}
    decoder = json.JSONDecoder()
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))

    def advance(to: int) -> None:
        nonlocal pos, line
        line += text.count("\n", pos, to)
        pos = to

    def skip_space() -> None:
        advance(_SPACE.match(text, pos).end())

    skip_space()
    if text.startswith("]", pos):
        return
    while True:
        start = line
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield Row(start, None, f"not JSON ({e.msg}); the rest of the file is not read")
            return
        advance(end)
        yield _as_row(start, value, any(n in bad_lines for n in range(start, line + 1)))
        skip_space()
        if text.startswith(",", pos):
            advance(pos + 1)
            skip_space()
        elif text.startswith("]", pos):
            return
        else:
            yield Row(line, None, "expected ',' or ']' after an item; the rest is not read")
            return


def read_csv(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a CSV file with a header row: ``{column: str}`` per record."""
    bad_lines: set[int] = set()

    def lines() -> Iterator[str]:
        for i, (text, replaced) in enumerate(_lines(Path(path)), start=1):
            if replaced:
                bad_lines.add(i)
            yield text

    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield Row(1, None, f"unreadable CSV header ({e}); the file is not read")
        return
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Row(start, None, f"not CSV ({e})")
            start = reader.line_num + 1
            continue
        end, first = reader.line_num, start
        start = end + 1
        if not cells:
            continue  # a blank line
        replaced = any(n in bad_lines for n in range(first, end + 1))
        if len(cells) != len(header):
            error = f"{len(cells)} fields where the header has {len(header)}"
            yield Row(first, None, error, replaced)
        else:
            yield Row(first, dict(zip(header, cells)), "", replaced)


def csv_header(path: str | os.PathLike) -> list[str]:
    """The header row of a CSV file (``[]`` for an empty or unreadable one), for messages."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        return next(csv.reader(text for text, _ in _lines(Path(path))))
    except (StopIteration, csv.Error):
        return []


def read_rows(path: str | os.PathLike, fmt: str) -> Iterator[Row]:
    """Rows of ``path`` read as ``fmt``: ``"csv"``, or ``"json"`` (JSON lines, or one JSON
    array when the file starts with ``[``).

    Raises:
      ValueError: another ``fmt``.
    """
    path = Path(path)
    if fmt == "csv":
        return read_csv(path)
    if fmt != "json":
        raise ValueError(f"rows: format must be 'json' or 'csv', got {fmt!r}")
    return read_json_array(path) if _starts_with_bracket(path) else read_jsonl(path)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    return head.lstrip().startswith(b"[")

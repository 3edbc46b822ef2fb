"""Text sources for causal language modelling: files or datasets -> a list of documents.

A *document* is either a ``str`` (plain language modelling: the loss covers every token)
or an :class:`InstructionExample` ``(prompt, completion)`` (the loss covers the completion
only). :func:`load_documents` reads the source named by a text config (see
``jaxfit.data.text.default_text_config`` for every field) and returns the documents of one
split together with a :class:`TextStats` that counts what was dropped and why.

Sources (``cfg.format``; ``"auto"`` infers it from the file extensions or ``cfg.hf_name``):

* ``txt``: each file is one document, or one document per blank-line-separated block
  (``split_by_blank_lines``), or per ``doc_separator`` string (e.g. ``<|endoftext|>``;
  takes precedence).
  Bytes that are not UTF-8 are replaced by U+FFFD (``decode_errors="replace"``, counted in
  ``decode_replaced`` per document) or the document is dropped (``"skip"``, counted in
  ``decode_skipped``). A leading UTF-8 byte-order mark is removed and CRLF line ends
  become LF (as Python's text mode does); otherwise the text is kept verbatim (stripped
  of surrounding whitespace when split into blocks).
* ``jsonl`` / ``csv`` / ``parquet``: read with ``datasets.load_dataset("json"|"csv"|"parquet",
  data_files=...)``; the text is column ``text_field`` (or ``prompt_field`` +
  ``completion_field`` with ``instruction=True``). JSONL/CSV files that are not valid UTF-8
  are decoded with ``errors="replace"`` into a temporary copy first; their records that
  contain U+FFFD are counted in ``decode_replaced`` (or dropped with ``"skip"``).
* ``hf``: a Hugging Face dataset named by ``path`` or, when ``path`` is empty, ``hf_name``:
  a local directory written by ``save_to_disk`` (``Dataset``, or ``DatasetDict`` indexed by
  ``hf_split``) or a name for ``datasets.load_dataset(name, hf_config, split=hf_split)``.

Records whose field is missing or null count as ``missing_field``; values that are not
strings as ``not_string``; documents that are empty or whitespace-only (for instruction
data: an empty completion) as ``empty``. None of these is fatal; an empty corpus is
(``ValueError`` naming the files and field).

Validation split: ``val_path`` (files, same format) or ``hf_val_split`` when given, else the
*last* ``ceil(val_fraction * n)`` documents of the training source in file order (the
training split is then the first ``n - n_val``).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
FORMATS = ("auto", "txt", "jsonl", "csv", "parquet", "hf")
# file suffix -> format; ".json" is read as JSON lines (or a JSON array) by `datasets`.
_SUFFIX_FORMAT = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
_BUILDER = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}
_BLANK_LINES = re.compile(rb"\n\s*\n")
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_ITER_BATCH = 10_000


class InstructionExample(NamedTuple):
    """One instruction-tuning record. ``prompt`` already has ``prompt_template`` applied."""

    prompt: str
    completion: str


Document = str | InstructionExample


@dataclasses.dataclass
class TextStats:
    """Counts of documents kept and dropped while loading one split (all counts >= 0).

    ``decode_replaced`` documents are kept (with U+FFFD in place of the bad bytes);
    every other field except ``documents`` counts dropped documents.
    """

    documents: int = 0
    empty: int = 0
    missing_field: int = 0
    not_string: int = 0
    decode_replaced: int = 0
    decode_skipped: int = 0

    @property
    def skipped(self) -> int:
        """Documents dropped for any reason."""
        return self.empty + self.missing_field + self.not_string + self.decode_skipped

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> TextStats:
        return cls(**{f.name: int(d.get(f.name, 0)) for f in dataclasses.fields(cls)})

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Metric dict in the project's namespace: ``data/skipped_<reason>`` etc."""
        return {
            f"{prefix}documents": self.documents,
            f"{prefix}skipped_empty": self.empty,
            f"{prefix}skipped_missing_field": self.missing_field,
            f"{prefix}skipped_not_string": self.not_string,
            f"{prefix}skipped_decode_error": self.decode_skipped,
            f"{prefix}decode_replaced": self.decode_replaced,
        }

    def log(self, where: str) -> None:
        """Log one line; at WARNING level when anything was dropped or replaced."""
        level = logging.WARNING if (self.skipped or self.decode_replaced) else logging.INFO
        logger.log(
            level,
            "%s: kept %d documents; dropped %d empty, %d missing field, %d not a string, "
            "%d undecodable; %d kept with undecodable bytes replaced",
            where,
            self.documents,
            self.empty,
            self.missing_field,
            self.not_string,
            self.decode_skipped,
            self.decode_replaced,
        )


# ----------------------------------------------------------------------------- resolution


def _split_spec(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def resolve_files(spec: str, fmt: str = "auto") -> list[Path]:
    """Expand a comma-separated list of files, globs and directories to sorted files.

    A directory contributes the files under it (recursively) whose suffix belongs to
    ``fmt`` (any known text suffix for ``"auto"``).

    Raises:
      FileNotFoundError: a name matches nothing, or nothing at all is found.
    """
    out: list[Path] = []
    for item in _split_spec(spec):
        item = os.path.expanduser(item)
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"text data: glob {item!r} matches no file")
            out.extend(p for p in matches if p.is_file())
        elif os.path.isdir(item):
            found = sorted(
                p
                for p in Path(item).rglob("*")
                if p.is_file()
                and _SUFFIX_FORMAT.get(p.suffix.lower()) is not None
                and (fmt == "auto" or _SUFFIX_FORMAT[p.suffix.lower()] == fmt)
            )
            if not found:
                raise FileNotFoundError(f"text data: no {fmt} files under directory {item!r}")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(Path(item))
        else:
            raise FileNotFoundError(f"text data: file {item!r} does not exist")
    if not out:
        raise FileNotFoundError(f"text data: no files in path spec {spec!r}")
    return out


def _is_hf_disk_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in _HF_DISK_MARKERS
    )


def resolve_format(cfg: Any, spec: str) -> str:
    """The concrete format for source ``spec``: ``cfg.format`` or inferred.

    ``"auto"`` gives ``"hf"`` for ``cfg.hf_name`` or a ``save_to_disk`` directory, else
    the format of the (single kind of) file suffix.

    Raises:
      ValueError: unknown format, mixed suffixes, or a suffix with no known format.
    """
    fmt = cfg.format
    if fmt not in FORMATS:
        raise ValueError(f"text data: format {fmt!r} is not one of {FORMATS}")
    if fmt != "auto":
        return fmt
    items = _split_spec(spec)
    if (cfg.hf_name and spec == cfg.hf_name) or (
        len(items) == 1 and _is_hf_disk_dir(os.path.expanduser(items[0]))
    ):
        return "hf"
    found = {_SUFFIX_FORMAT.get(p.suffix.lower()) for p in resolve_files(spec)}
    if None in found or len(found) != 1:
        raise ValueError(
            f"text data: cannot infer one format from the suffixes of {spec!r}; "
            f"set format to one of {FORMATS[1:]}"
        )
    return found.pop()


def _train_spec(cfg: Any) -> str:
    """The training source: ``cfg.path``, or ``cfg.hf_name`` when ``path`` is empty."""
    spec = cfg.path or cfg.hf_name
    if not spec:
        raise ValueError("text data: no input; set path (files) or hf_name (dataset)")
    return spec


def _validation_source(cfg: Any) -> str | None:
    """Where validation data comes from: "val_path", "hf_val_split", "fraction" or None."""
    if cfg.val_path:
        return "val_path"
    if cfg.hf_val_split and resolve_format(cfg, _train_spec(cfg)) == "hf":
        return "hf_val_split"
    if cfg.val_fraction > 0:
        return "fraction"
    return None


def has_validation(cfg: Any) -> bool:
    """Whether the config names validation data (``val_path``, ``hf_val_split`` or
    ``val_fraction > 0``)."""
    return _validation_source(cfg) is not None


def _file_stats(paths: Sequence[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _spec_fingerprint(cfg: Any, spec: str, hf_split: str) -> dict:
    fmt = resolve_format(cfg, spec)
    if fmt != "hf":
        return {"format": fmt, "files": _file_stats(resolve_files(spec, fmt))}
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        return {"format": "hf", "dir": str(Path(local).resolve()), "files": _file_stats(files)}
    return {"format": "hf", "name": spec, "config": cfg.hf_config, "split": hf_split}


def source_fingerprint(cfg: Any, split: str) -> dict:
    """A JSON-able description of the inputs of ``split``, cheap to compute (no reading).

    Files are identified by absolute path, size and modification time (ns); a Hub dataset
    by name, config and split. Used in the token-file cache key.
    """
    _check_split(split)
    train = _spec_fingerprint(cfg, _train_spec(cfg), cfg.hf_split)
    if split == "train":
        return {"train": train, "val": _validation_source(cfg)}
    src = _validation_source(cfg)
    if src == "val_path":
        return {"val_path": _spec_fingerprint(cfg, cfg.val_path, cfg.hf_split)}
    if src == "hf_val_split":
        return {"hf_val_split": _spec_fingerprint(cfg, _train_spec(cfg), cfg.hf_val_split)}
    return {"train": train, "val": src}


# ----------------------------------------------------------------------------- readers


def _decode(raw: bytes, cfg: Any, stats: TextStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if cfg.decode_errors == "skip":
            stats.decode_skipped += 1
            return None
        stats.decode_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _read_txt(paths: Sequence[Path], cfg: Any, stats: TextStats) -> Iterator[str]:
    sep = cfg.doc_separator.encode("utf-8") if cfg.doc_separator else None
    for path in paths:
        raw = path.read_bytes()
        if raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        raw = raw.replace(b"\r\n", b"\n")
        if sep is not None:
            chunks = [c.strip() for c in raw.split(sep)]
            chunks = [c for c in chunks if c] or [b""]  # separators at the ends are not docs
        elif cfg.split_by_blank_lines:
            chunks = [c.strip() for c in _BLANK_LINES.split(raw.strip())]
        else:
            chunks = [raw]
        for chunk in chunks:
            text = _decode(chunk, cfg, stats)
            if text is None:
                continue
            if not text.strip():
                stats.empty += 1
                continue
            yield text


def _valid_utf8(path: Path) -> bool:
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                dec.decode(chunk)
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _load_table(fmt: str, paths: Sequence[Path], cache_dir: str | None = None):
    import datasets

    try:
        return datasets.load_dataset(
            _BUILDER[fmt], data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir
        )
    except Exception as e:  # datasets wraps arrow/pandas errors in many types
        raise ValueError(
            f"text data: could not read {[str(p) for p in paths]} as {fmt}: {e}"
        ) from e


def _records(ds, cfg: Any, stats: TextStats, where: str, bad_bytes: bool) -> Iterator[Document]:
    """Documents from the rows of a ``datasets.Dataset``; counts into ``stats``."""
    fields = [cfg.prompt_field, cfg.completion_field] if cfg.instruction else [cfg.text_field]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        logger.warning(
            "%s: no field %s (columns: %s); all %d records skipped",
            where,
            missing,
            ds.column_names,
            len(ds),
        )
        stats.missing_field += len(ds)
        return
    for batch in ds.select_columns(fields).iter(batch_size=_ITER_BATCH):
        for values in zip(*(batch[f] for f in fields)):
            if any(v is None for v in values):
                stats.missing_field += 1
                continue
            if not all(isinstance(v, str) for v in values):
                stats.not_string += 1
                continue
            if bad_bytes and any("\ufffd" in v for v in values):
                if cfg.decode_errors == "skip":
                    stats.decode_skipped += 1
                    continue
                stats.decode_replaced += 1
            if cfg.instruction:
                prompt, completion = values
                if not completion.strip():
                    stats.empty += 1
                    continue
                yield InstructionExample(cfg.prompt_template.format(prompt=prompt), completion)
            else:
                if not values[0].strip():
                    stats.empty += 1
                    continue
                yield values[0]


def _read_tabular(
    fmt: str, paths: Sequence[Path], cfg: Any, stats: TextStats
) -> Iterator[Document]:
    if fmt == "parquet":  # arrow validates UTF-8 when the file is written
        yield from _records(_load_table(fmt, paths), cfg, stats, str(paths[0]), False)
        return
    # Keep file order: consecutive clean files are read in one call; each file that is
    # not valid UTF-8 is read from a decoded (errors="replace") temporary copy.
    groups: list[tuple[bool, list[Path]]] = []
    for p in paths:
        bad = not _valid_utf8(p)
        if groups and not bad and not groups[-1][0]:
            groups[-1][1].append(p)
        else:
            groups.append((bad, [p]))
    for bad, group in groups:
        where = ", ".join(str(p) for p in group)
        if not bad:
            yield from _records(_load_table(fmt, group), cfg, stats, where, False)
            continue
        logger.warning("%s is not valid UTF-8; decoding with errors=replace", where)
        with tempfile.TemporaryDirectory(prefix="jaxfit_text_") as tmp:
            fixed = Path(tmp) / group[0].name
            text = group[0].read_bytes().decode("utf-8", errors="replace")
            fixed.write_text(text, encoding="utf-8")
            ds = _load_table(fmt, [fixed], cache_dir=os.path.join(tmp, "cache"))
            yield from _records(ds, cfg, stats, where, True)


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
    yield from _records(ds, cfg, stats, f"{name}[{split}]", False)


def _read_spec(cfg: Any, spec: str, hf_split: str, stats: TextStats) -> list[Document]:
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
    return list(_read_tabular(fmt, paths, cfg, stats))


def _describe(cfg: Any, spec: str) -> str:
    field = (
        f"fields {cfg.prompt_field!r}/{cfg.completion_field!r}"
        if cfg.instruction
        else f"field {cfg.text_field!r}"
    )
    return f"{spec!r} (format={resolve_format(cfg, spec)}, {field})"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"text data: split must be one of {SPLITS}, got {split!r}")


def load_documents(cfg: Any, split: str) -> tuple[list[Document], TextStats]:
    """Read the documents of ``split`` (``"train"`` or ``"validation"``).

    Args:
      cfg: a text config (``jaxfit.data.text.default_text_config()`` fields).
      split: ``"train"`` or ``"validation"``.

    Returns:
      ``(documents, stats)``: ``str`` documents, or :class:`InstructionExample` with
      ``cfg.instruction``, in source order; ``stats`` counts kept and dropped documents
      and is also logged.

    Raises:
      FileNotFoundError: a configured file is missing.
      ValueError: unknown split/format, no validation data configured for
        ``"validation"``, a source that yields no documents (message names the
        files/dataset and the field), or ``val_fraction`` that leaves no training
        documents.
    """
    _check_split(split)
    stats = TextStats()
    src = _validation_source(cfg) if split == "validation" else None
    if split == "validation" and src is None:
        raise ValueError(
            "text data: no validation data configured; set val_path, hf_val_split or val_fraction"
        )
    if src == "val_path":
        spec, hf_split = cfg.val_path, cfg.hf_split
    elif src == "hf_val_split":
        spec, hf_split = _train_spec(cfg), cfg.hf_val_split
    else:
        spec, hf_split = _train_spec(cfg), cfg.hf_split
    docs = _read_spec(cfg, spec, hf_split, stats)
    if not docs:
        stats.log(_describe(cfg, spec))
        raise ValueError(
            f"text data: no usable documents in {_describe(cfg, spec)}: "
            f"{stats.empty} empty, {stats.missing_field} missing the field, "
            f"{stats.not_string} not strings, {stats.decode_skipped} undecodable"
        )
    fraction_split = (src == "fraction") or (
        split == "train" and _validation_source(cfg) == "fraction"
    )
    if fraction_split:
        n_val = math.ceil(cfg.val_fraction * len(docs))
        if not 0 < cfg.val_fraction < 1 or n_val >= len(docs):
            raise ValueError(
                f"text data: val_fraction={cfg.val_fraction} of {len(docs)} documents in "
                f"{_describe(cfg, spec)} leaves no training documents; use "
                "split_by_blank_lines/doc_separator, a val_path, or val_fraction=0"
            )
        # The drop counts describe the whole source; only `documents` is per split.
        docs = docs[len(docs) - n_val :] if split == "validation" else docs[: len(docs) - n_val]
    stats.documents = len(docs)
    stats.log(f"{_describe(cfg, spec)}[{split}]")
    return docs, stats


def document_text(doc: Document) -> str:
    """The full text of a document (prompt + completion for instruction examples)."""
    return doc if isinstance(doc, str) else doc.prompt + doc.completion

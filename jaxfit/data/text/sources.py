"""Where LM text comes from: path specs -> files, the format of a source, fingerprints.

A *spec* is ``cfg.path`` (or ``cfg.val_path``): comma-separated files, globs or
directories, or a Hugging Face dataset (``save_to_disk`` directory or Hub name). The
training source is ``cfg.path``, or ``cfg.hf_name`` when ``path`` is empty; validation
data comes from ``val_path``, ``hf_val_split`` or ``val_fraction`` (in that order).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxfit.data import fingerprint

SPLITS = ("train", "validation")
FORMATS = ("auto", "txt", "jsonl", "csv", "parquet", "hf", "chat", "alpaca")
# Formats that name what the records hold (conversations, text.chat); their files are
# read as "auto" infers them (jsonl/csv/parquet/hf, never txt).
RECORD_FORMATS = ("chat", "alpaca")
# file suffix -> format; ".json" is read as JSON lines or one JSON array (data.rows).
_SUFFIX_FORMAT = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


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
    """The file format of source ``spec``: ``cfg.format``, or inferred.

    ``"auto"`` (and ``"chat"`` / ``"alpaca"``, whose records are read from files or
    datasets of any kind but txt) gives ``"hf"`` for ``cfg.hf_name`` or a
    ``save_to_disk`` directory, else the format of the (single kind of) file suffix.

    Raises:
      ValueError: unknown format, mixed suffixes, a suffix with no known format, or txt
        files for conversations.
    """
    fmt = cfg.format
    if fmt not in FORMATS:
        raise ValueError(f"text data: format {fmt!r} is not one of {FORMATS}")
    if fmt not in ("auto", *RECORD_FORMATS):
        return fmt
    inferred = _infer_format(cfg, spec)
    if fmt in RECORD_FORMATS and inferred == "txt":
        raise ValueError(f"text data: format={fmt!r} needs jsonl/json/csv/parquet/hf records")
    return inferred


def _infer_format(cfg: Any, spec: str) -> str:
    items = _split_spec(spec)
    if (cfg.hf_name and spec == cfg.hf_name) or (
        len(items) == 1 and _is_hf_disk_dir(os.path.expanduser(items[0]))
    ):
        return "hf"
    found = {_SUFFIX_FORMAT.get(p.suffix.lower()) for p in resolve_files(spec)}
    if None in found or len(found) != 1:
        raise ValueError(
            f"text data: cannot infer one format from the suffixes of {spec!r}; "
            f"set format to one of {FORMATS[1:6]}"
        )
    return found.pop()


def train_spec(cfg: Any) -> str:
    """The training source: ``cfg.path``, or ``cfg.hf_name`` when ``path`` is empty."""
    spec = cfg.path or cfg.hf_name
    if not spec:
        raise ValueError("text data: no input; set path (files) or hf_name (dataset)")
    return spec


def validation_source(cfg: Any) -> str | None:
    """Where validation data comes from: "val_path", "hf_val_split", "fraction" or None."""
    if cfg.val_path:
        return "val_path"
    if cfg.hf_val_split and resolve_format(cfg, train_spec(cfg)) == "hf":
        return "hf_val_split"
    if cfg.val_fraction > 0:
        return "fraction"
    return None


def has_validation(cfg: Any) -> bool:
    """Whether the config names validation data (``val_path``, ``hf_val_split`` or
    ``val_fraction > 0``)."""
    return validation_source(cfg) is not None


def _file_stats(paths: Sequence[Path]) -> list[list]:
    """``[path, size, sha256]`` per file: content, not modification time, so that a file
    edited with its timestamp kept (``touch -r``, ``cp -p``) is tokenized again."""
    out = []
    for p in paths:
        digest = fingerprint.file_digest(p)
        out.append([str(p.resolve()), digest["size"], digest["sha256"]])
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


def _spec_files(cfg: Any, spec: str) -> list[Path]:
    fmt = resolve_format(cfg, spec)
    if fmt != "hf":
        return resolve_files(spec, fmt)
    local = os.path.expanduser(spec)
    return sorted(p for p in Path(local).rglob("*") if p.is_file()) if os.path.isdir(local) else []


def source_files(cfg: Any, split: str) -> list[Path]:
    """The local files ``split`` is read from (none for a Hub dataset), without reading
    them: what ``jaxfit.data.fingerprint`` hashes for a resume.

    Raises:
      FileNotFoundError / ValueError: as :func:`resolve_files` and :func:`resolve_format`.
    """
    check_split(split)
    if split == "validation" and validation_source(cfg) == "val_path":
        return _spec_files(cfg, cfg.val_path)
    return _spec_files(cfg, train_spec(cfg))


def source_fingerprint(cfg: Any, split: str) -> dict:
    """A JSON-able description of the inputs of ``split``.

    Files are identified by absolute path, size and SHA-256 (``jaxfit.data.fingerprint``:
    read once per process); a Hub dataset by name, config and split. Used in the
    token-file cache key.
    """
    check_split(split)
    train = _spec_fingerprint(cfg, train_spec(cfg), cfg.hf_split)
    if split == "train":
        return {"train": train, "val": validation_source(cfg)}
    src = validation_source(cfg)
    if src == "val_path":
        return {"val_path": _spec_fingerprint(cfg, cfg.val_path, cfg.hf_split)}
    if src == "hf_val_split":
        return {"hf_val_split": _spec_fingerprint(cfg, train_spec(cfg), cfg.hf_val_split)}
    return {"train": train, "val": src}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"text data: split must be one of {SPLITS}, got {split!r}")

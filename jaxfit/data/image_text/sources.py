"""Image-caption sources: COCO captions JSON, CSV/JSONL tables, Hugging Face datasets.

``load_source(data_cfg, split)`` reads one split into a list of ``ImageCaptions`` records,
one per image with all of its captions, and a ``SkipCounter`` saying what was dropped.

Config fields read by ``load_source`` (defaults in ``default_data_config()``; every string
may contain ``{split}``, replaced by the split name ``data.train_split`` / ``data.val_split``):

* ``format``: ``"coco"``, ``"csv"``, ``"jsonl"`` or ``"hf"``. ``csv`` reads a table with a
  header row (or JSON lines when its name ends in ``.jsonl``); ``jsonl`` reads JSON lines
  (or one JSON array) whatever the suffix; both through ``jaxfit.data.rows``.
* ``root``: data directory. coco/csv/jsonl: relative ``captions_file`` / ``image_dir`` are
  resolved against it. hf: passed as ``data_dir`` to ``datasets.load_dataset`` (the
  folder for ``hf_name="imagefolder"``; may be empty for a Hub dataset).
* ``captions_file`` (coco, csv, jsonl): the COCO captions JSON or the table, one row per
  caption or per image. ``""`` (the default) is the format's own (:data:`DEFAULT_LAYOUT`):
  ``annotations/captions_{split}.json`` (coco), the first of ``captions.csv`` /
  ``captions.txt`` under the root (csv; Flickr8k's file), of ``captions.jsonl`` /
  ``captions.json`` (jsonl).
* ``image_dir`` (coco, csv, jsonl): folder holding the image files named in the
  annotations. ``""`` (the default): ``{split}`` (coco), else the first of ``images`` /
  ``Images`` under the root.
* ``image_column``, ``caption_column`` (csv, jsonl, hf): column names. A caption cell may hold a
  string or (JSONL, hf) a list of strings. In hf the image column is an ``Image`` feature
  (stored path or bytes) or a string path relative to ``root``.
* ``hf_name`` (hf): ``datasets.load_dataset`` name: a Hub dataset, or ``"imagefolder"``
  for a local folder of images with ``metadata.jsonl``. ``hf_cache_dir`` (hf): cache
  directory (empty = the datasets default).
* ``train_split``, ``val_split``: split names substituted for ``{split}`` (coco, csv) or
  passed to ``load_dataset(split=...)`` (hf).
* ``holdout_fraction`` (default 0.05): used when both splits read one source (a table whose
  name has no ``{split}``, such as Flickr8k's ``captions.txt``, or ``train_split ==
  val_split``): an image goes to "val" iff a stable hash of its id falls below this
  fraction, to "train" otherwise. A source with a split of its own for each (COCO's
  ``captions_{split}.json``) ignores it. 0 with one source: "val" is the training data.
* ``max_images``: keep only the first N images of the split (0 = all).

Bad input never crashes a run and never passes silently: a missing image file, an empty
caption, an image left without captions, an unparseable row are dropped here, counted
under a named reason in the ``SkipCounter`` and logged. Images that fail to *decode* are
found later, by the pipeline (``image_text.pipeline``), and counted as ``undecodable_image``.
A missing data root, annotation file or image folder raises ``FileNotFoundError`` naming
the path and the layout expected under the root at start; a table without rows or
without the named columns, or a split left without any usable image, raises
``jaxfit.errors.DataError`` naming the file.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import ml_collections

from jaxfit.data import rows
from jaxfit.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("coco", "csv", "jsonl", "hf")
# A format's (captions_file, image_dir) candidates when those fields are "" (the default):
# the first that exists under data.root, else the first (which the missing-file error names).
DEFAULT_LAYOUT = {
    "coco": (("annotations/captions_{split}.json",), ("{split}",)),
    "csv": (("captions.csv", "captions.txt"), ("images", "Images")),
    "jsonl": (("captions.jsonl", "captions.json"), ("images", "Images")),
}
_TABLES = ("csv", "jsonl")  # formats read as a table of rows (data.rows)
_LOG_FIRST = 10  # log this many skips per reason individually, then only count them


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
    """One image and all of its captions.

    Attributes:
      image_id: stable identifier (COCO id, CSV image name, HF path or content hash).
      image: a file path, or the encoded image bytes (HF datasets that embed images).
      captions: non-empty list of non-empty, stripped captions.
    """

    image_id: str
    image: str | bytes
    captions: list[str]


class SkipCounter:
    """Thread-safe named counters of dropped inputs, with logging.

    ``add(reason, detail=..., key=...)`` counts one skip; with ``key`` a reason counts each
    key once (an undecodable image met again in the next epoch is not counted twice). The
    first few skips per reason are logged at WARNING with their detail, the rest at DEBUG.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._keys: dict[str, set] = collections.defaultdict(set)

    def add(self, reason: str, detail: str = "", *, key=None, n: int = 1) -> bool:
        """Count ``n`` skips for ``reason``; returns False (and counts nothing) for a seen key."""
        with self._lock:
            if key is not None:
                if key in self._keys[reason]:
                    return False
                self._keys[reason].add(key)
            self._counts[reason] += n
            count = self._counts[reason]
        level = logging.WARNING if count <= _LOG_FIRST else logging.DEBUG
        logger.log(level, "skipped (%s #%d): %s", reason, count, detail or "-")
        if count == _LOG_FIRST + 1 and level == logging.DEBUG:
            logger.warning("more '%s' skips are logged at DEBUG level only", reason)
        return True

    def __getitem__(self, reason: str) -> int:
        with self._lock:
            return self._counts[reason]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}`` for every reason counted so far."""
        with self._lock:
            return dict(self._counts)

    def metrics(self, prefix: str = "data/skipped_") -> dict[str, int]:
        """Counts named for the metric writer: ``{"data/skipped_missing_image": 3, ...}``."""
        return {prefix + k: v for k, v in self.as_dict().items()}

    def update(self, other: SkipCounter) -> None:
        """Add another counter's counts and keys into this one."""
        for reason, count in other.as_dict().items():
            with self._lock:
                self._counts[reason] += count
                self._keys[reason] |= other._keys.get(reason, set())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def default_data_config() -> ml_collections.ConfigDict:
    """All data fields with defaults (COCO 2017 layout); see the module docstring.

    Fields read by ``load_source``: format, root, captions_file, image_dir, image_column,
    caption_column, hf_name, hf_cache_dir, train_split, val_split, holdout_fraction,
    max_images. The remaining fields are read by whoever builds the pipeline and the
    tokenizer (``pipeline.augment_from_config``, ``caption_tokenizer.tokenizer_from_config``).
    """
    c = ml_collections.ConfigDict()
    c.format = "coco"  # "coco" | "csv" | "jsonl" | "hf"
    c.root = ""  # data directory (coco/csv base; hf data_dir)
    # coco JSON or csv/jsonl table, relative to root; "" = the format's (DEFAULT_LAYOUT):
    # annotations/captions_{split}.json, captions.csv|captions.txt, captions.jsonl|.json
    c.captions_file = ""
    c.image_dir = ""  # image folder, relative to root; "" = {split} (coco), images|Images
    c.image_column = "image"  # csv/hf image column
    c.caption_column = "caption"  # csv/hf caption column (string or list of strings)
    c.hf_name = "imagefolder"  # datasets.load_dataset name (Hub name or "imagefolder")
    c.hf_cache_dir = ""  # datasets cache dir ("" = default)
    c.train_split = "train2017"
    c.val_split = "val2017"
    # when both splits read one source (captions.txt): this fraction of its images, by
    # hashed id, is "val"; a source with its own val split (COCO) ignores it
    c.holdout_fraction = 0.05
    c.max_images = 0  # keep only the first N images per split (0 = all)
    # Pipeline (image_text.pipeline): grain worker threads, CLIP augmentation.
    c.num_threads = 8  # image decode/preprocess threads
    c.augment = False  # random resized crop for training
    c.crop_scale_min = 0.9  # smallest crop area fraction (open_clip: 0.9)
    c.hflip = False  # horizontal flips (breaks "left"/"right" captions)
    # Tokenizer (image_text.caption_tokenizer): "" = train a byte-level BPE on the train captions.
    c.tokenizer = ""  # HF tokenizer dir or Hub name, e.g. openai/clip-vit-base-patch32
    c.vocab_size = 8192  # for a trained BPE
    c.context_length = 77  # tokens per caption incl. <|startoftext|> / <|endoftext|>
    return c


# ----------------------------------------------------------------------------- helpers


def layout_fields(cfg) -> dict[str, str]:
    """``{"captions_file": ..., "image_dir": ...}`` of a coco / csv / jsonl source, an empty
    field replaced by the first of the format's defaults (:data:`DEFAULT_LAYOUT`) that
    exists under ``data.root`` (left empty when none does). ``{}`` for hf."""
    if cfg.format not in DEFAULT_LAYOUT:
        return {}
    root = Path(cfg.root).expanduser() if cfg.root else None
    out = {}
    for field, candidates in zip(("captions_file", "image_dir"), DEFAULT_LAYOUT[cfg.format]):
        value = cfg.get(field, "")
        if not value and root is not None:
            split = cfg.train_split
            value = next((c for c in candidates if (root / c.format(split=split)).exists()), "")
        out[field] = value
    return out


def _template(cfg, field: str) -> str:
    """The ``captions_file`` / ``image_dir`` template read: :func:`layout_fields`, else the
    format's first default (which the missing-file error then names)."""
    index = ("captions_file", "image_dir").index(field)
    return layout_fields(cfg)[field] or DEFAULT_LAYOUT[cfg.format][index][0]


def one_source(cfg) -> bool:
    """Whether the train and val splits read the same source: the same table (its name has
    no ``{split}``) or split name (hf), so that ``holdout_fraction`` divides it."""
    if cfg.train_split == cfg.val_split:
        return True
    if cfg.format == "hf":
        return False
    template = _template(cfg, "captions_file")
    return template.format(split=cfg.train_split) == template.format(split=cfg.val_split)


def holdout(cfg) -> float:
    """The fraction of the images that goes to "val": ``holdout_fraction`` when both splits
    read one source (:func:`one_source`), else 0 (each split has its own)."""
    return float(cfg.get("holdout_fraction", 0.0)) if one_source(cfg) else 0.0


def _split_name(cfg, split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if holdout(cfg) > 0:
        return cfg.train_split
    return cfg.train_split if split == "train" else cfg.val_split


def _resolve(root: Path, template: str, split_name: str) -> Path:
    p = Path(template.format(split=split_name)).expanduser()
    return p if p.is_absolute() else root / p


def layout(cfg) -> str:
    """The layout ``data.format`` expects under ``data.root``, in words (for messages)."""
    defaults = DEFAULT_LAYOUT.get(cfg.format, ((), ()))
    given = [cfg.get("captions_file", ""), cfg.get("image_dir", "")]
    names = " and ".join(
        repr(value) if value else " or ".join(map(repr, candidates))
        for value, candidates in zip(given, defaults)
    )
    if "{split}" in names:
        names += " (with {split} = the split name)"
    if cfg.format == "coco":
        return f"the COCO captions layout: {names}"
    return f"a {cfg.format} table of image paths and captions and an image folder: {names}"


_OTHER_LAYOUTS = (
    "for another layout set data.format (coco|csv|jsonl|hf), data.captions_file and data.image_dir"
)


def _require_root(cfg) -> Path:
    if not cfg.root:
        raise FileNotFoundError(
            f"data.root is empty: data.format={cfg.format!r} needs the data directory"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {str(root)!r} does not exist (data.format={cfg.format!r} expects "
            f"{layout(cfg)} under it), check data.root"
        )
    return root


def _require_file(path: Path, what: str, cfg) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist: data root {cfg.root!r} lacks "
            f"{layout(cfg)}; {_OTHER_LAYOUTS}"
        )


def _require_dir(path: Path, what: str, cfg) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist: data root {cfg.root!r} lacks "
            f"{layout(cfg)}; {_OTHER_LAYOUTS}"
        )


def captions_table(cfg, split: str) -> Path | None:
    """The annotation file of ``split`` (``"train"`` / ``"val"``) of a coco / csv / jsonl
    source (``None`` for hf or an empty root), whether or not it exists."""
    if cfg.format == "hf" or not cfg.root:
        return None
    template = _template(cfg, "captions_file")
    return _resolve(Path(cfg.root).expanduser(), template, _split_name(cfg, split))


def _captions_of(value) -> list:
    """A caption cell as a list (a string, a list of strings, or None)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


class _Grouper:
    """Groups (image, caption) pairs by image id, keeping first-appearance order."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter
        self.images: dict[str, str | bytes] = {}
        self.captions: dict[str, list[str]] = {}

    def add_image(self, image_id: str, image: str | bytes) -> None:
        if image_id not in self.images:
            self.images[image_id] = image
            self.captions[image_id] = []

    def add_caption(self, image_id: str, caption) -> None:
        text = caption.strip() if isinstance(caption, str) else ""
        if not text:
            self.counter.add("empty_caption", f"image {image_id}: {caption!r}")
            return
        self.captions[image_id].append(text)

    def records(self, exists) -> list[ImageCaptions]:
        out = []
        for image_id, image in self.images.items():
            caps = self.captions[image_id]
            if isinstance(image, str) and not exists(image):
                self.counter.add("missing_image", f"{image} (image {image_id})")
            elif not caps:
                self.counter.add("no_caption", f"image {image_id} has no non-empty caption")
            else:
                out.append(ImageCaptions(image_id, image, caps))
        return out


def _file_checker(image_dir: Path):
    """``exists(path)`` that lists ``image_dir`` once instead of one stat per image."""
    names = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    prefix = str(image_dir) + os.sep

    def exists(path: str) -> bool:
        if path.startswith(prefix) and os.sep not in path[len(prefix) :]:
            return path[len(prefix) :] in names
        return os.path.isfile(path)

    return exists


# ----------------------------------------------------------------------------- formats


def _annotations_and_images(cfg, split_name: str, kind: str) -> tuple[Path, Path]:
    """``(captions_file, image_dir)`` of a split, both checked to exist."""
    root = _require_root(cfg)
    table = _resolve(root, _template(cfg, "captions_file"), split_name)
    image_dir = _resolve(root, _template(cfg, "image_dir"), split_name)
    _require_file(table, "COCO captions file" if kind == "coco" else "captions table", cfg)
    _require_dir(image_dir, "COCO image folder" if kind == "coco" else "image folder", cfg)
    return table, image_dir


def _load_coco(cfg, split_name: str, counter: SkipCounter) -> list[ImageCaptions]:
    ann_file, image_dir = _annotations_and_images(cfg, split_name, "coco")
    with open(ann_file) as f:
        coco = json.load(f)
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{str(ann_file)!r} is not a COCO captions file: no {key!r} list")
    g = _Grouper(counter)
    for im in coco["images"]:
        g.add_image(str(im["id"]), str(image_dir / im["file_name"]))
    for ann in coco["annotations"]:
        image_id = str(ann.get("image_id"))
        if image_id not in g.images:
            counter.add("unknown_image_id", f"annotation {ann.get('id')} -> image {image_id}")
            continue
        g.add_caption(image_id, ann.get("caption"))
    return g.records(_file_checker(image_dir))


def _load_table(cfg, split_name: str, counter: SkipCounter) -> list[ImageCaptions]:
    """A csv / jsonl table (``data.format``; csv with a ``.jsonl`` name reads JSON lines)."""
    table, image_dir = _annotations_and_images(cfg, split_name, cfg.format)
    kind = "json" if cfg.format == "jsonl" or table.suffix == ".jsonl" else "csv"
    g = _Grouper(counter)
    checked = False
    seen = 0
    for row in rows.read_rows(table, kind):
        seen += 1
        if row.value is None:
            counter.add("bad_row", f"line {row.line} of {table}: {row.error}")
            continue
        if not checked:
            missing = {cfg.image_column, cfg.caption_column} - set(row.value)
            if missing:
                raise DataError(
                    f"the {cfg.format} table has no column(s) {sorted(missing)} "
                    f"(columns: {sorted(row.value)})",
                    path=table,
                    line=row.line,
                    hint="set data.image_column / data.caption_column",
                )
            checked = True
        name = row.value.get(cfg.image_column)
        if not isinstance(name, str) or not name.strip():
            counter.add("bad_row", f"line {row.line} of {table}: no {cfg.image_column!r}")
            continue
        name = name.strip()
        g.add_image(name, str(image_dir / name))
        for cap in _captions_of(row.value.get(cfg.caption_column)):
            g.add_caption(name, cap)
    if not seen:
        raise DataError(
            f"the {cfg.format} table has no rows{_columns_found(table, kind)}",
            path=table,
            hint=_empty_table_hint(table),
        )
    return g.records(_file_checker(image_dir))


def _columns_found(table: Path, kind: str) -> str:
    """`` (columns found: [...])`` for a CSV's header row, else ``""``."""
    if kind != "csv":
        return ""
    shown = [c if len(c) <= 40 else c[:37] + "..." for c in rows.csv_header(table)[:6]]
    return f" (columns found: {shown})" if shown else " (the file is empty)"


def _empty_table_hint(table: Path) -> str:
    with open(table, "rb") as f:
        head = f.read(64).lstrip(codecs.BOM_UTF8).lstrip()
    if head[:1] in (b"{", b"["):
        return (
            "it holds JSON: a COCO captions file is data.format=coco, JSON lines of "
            "image and caption are data.format=jsonl"
        )
    return "add rows of image path and caption (a header alone is no data)"


def _load_hf(cfg, split_name: str, counter: SkipCounter) -> list[ImageCaptions]:
    import datasets  # slow import; only for this format

    data_dir = None
    if cfg.root:
        data_dir = str(_require_root(cfg))
    elif cfg.hf_name == "imagefolder":
        raise FileNotFoundError("data.root is empty: hf_name='imagefolder' needs the folder")
    try:
        ds = datasets.load_dataset(
            cfg.hf_name, data_dir=data_dir, split=split_name, cache_dir=cfg.hf_cache_dir or None
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Hugging Face dataset {cfg.hf_name!r} (data_dir={data_dir!r}, split="
            f"{split_name!r}) not found: {e}"
        ) from e
    missing = {cfg.image_column, cfg.caption_column} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"dataset {cfg.hf_name!r} has no column(s) {sorted(missing)}; "
            f"columns: {ds.column_names}"
        )
    ds = ds.select_columns([cfg.image_column, cfg.caption_column])
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    base = Path(data_dir) if data_dir else Path.cwd()
    g = _Grouper(counter)
    for batch in ds.iter(batch_size=1024):
        for image, caps in zip(batch[cfg.image_column], batch[cfg.caption_column]):
            if isinstance(image, dict):  # Image(decode=False): {"path", "bytes"}
                path, data = image.get("path"), image.get("bytes")
            else:
                path, data = image, None
            if data:  # group by content: stored paths of embedded images need not be unique
                image_id = "sha1:" + hashlib.sha1(data).hexdigest()
                value: str | bytes = data
            elif path:
                value = str(path if os.path.isabs(path) else base / path)
                image_id = path
            else:
                counter.add("missing_image", "row without image path or bytes")
                continue
            g.add_image(image_id, value)
            for cap in _captions_of(caps):
                g.add_caption(image_id, cap)
    return g.records(os.path.isfile)


_LOADERS = {"coco": _load_coco, "csv": _load_table, "jsonl": _load_table, "hf": _load_hf}


def _in_holdout(image_id: str, fraction: float) -> bool:
    h = hashlib.md5(image_id.encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def load_source(data_cfg, split: str) -> tuple[list[ImageCaptions], SkipCounter]:
    """Read one split of an image-caption source (fields: see the module docstring).

    Args:
      data_cfg: ``ConfigDict`` (or any attribute/``get`` mapping) with the fields of
        ``default_data_config()``.
      split: ``"train"`` or ``"val"``.

    Returns:
      ``(records, counter)``: one ``ImageCaptions`` per kept image, in file order, and the
      counts of what was dropped (reasons: ``missing_image``, ``empty_caption``,
      ``no_caption``, ``unknown_image_id``, ``bad_row``).

    Raises:
      FileNotFoundError: the data root, annotation/captions file or image folder is
        missing (the message names the path), or the HF dataset cannot be found.
      ValueError: unknown ``format`` or ``split``, a malformed COCO file.
      DataError: a table without rows or without the named columns, or a split with no
        usable image (the message names the file and the skip counts).
    """
    if data_cfg.format not in _LOADERS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {data_cfg.format!r}")
    split_name = _split_name(data_cfg, split)
    counter = SkipCounter()
    records = _LOADERS[data_cfg.format](data_cfg, split_name, counter)
    fraction = holdout(data_cfg)
    if fraction > 0:
        want_val = split == "val"
        records = [r for r in records if _in_holdout(r.image_id, fraction) == want_val]
    if data_cfg.get("max_images", 0) > 0:
        records = records[: data_cfg.max_images]
    if not records:
        table = captions_table(data_cfg, split)
        raise DataError(
            f"no usable image-caption pair in the {split} split ({split_name}; skipped: "
            f"{counter.as_dict() or 'nothing'})",
            path=table if table is not None else data_cfg.get("hf_name"),
            hint="check the image paths, captions and data.holdout_fraction",
        )
    n_caps = sum(len(r.captions) for r in records)
    table = captions_table(data_cfg, split)
    logger.info(
        "data %s/%s (%s%s%s): %d images, %d captions; skipped %s",
        data_cfg.format,
        split,
        split_name,
        f", {table}" if table is not None else "",
        f", {fraction:g} held out by image" if fraction > 0 else "",
        len(records),
        n_caps,
        counter.as_dict() or "nothing",
    )
    return records, counter

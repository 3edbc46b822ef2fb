"""grain pipelines for CLIP: an endless, checkpointable training stream and eval batches.

Training (``train_iterator``), as a grain graph::

    MapDataset.range(n)                     record indices
      .shuffle(seed=s)                      epoch e: its own permutation (grain uses seed s+e)
      .repeat()                             endless; position k is in epoch k // n
      .map_with_index(load)                 decode + preprocess + pick a caption (threads)
      .to_iter_dataset(ReadOptions(...))    thread pool; None (undecodable) is dropped
      .batch(B, batch_fn=collate)           stack pixels, tokenize captions
    ThreadPrefetchIterDataset(...)          batches assembled in a background thread

Each epoch visits every record once, in a seed-determined order. For record ``i`` in epoch
``e`` one caption is drawn, and the augmentation sampled, with
``np.random.default_rng([seed, e, i])``: batches are a deterministic function of
(seed, step), independent of thread count and timing.

Several processes (``process_rows``, from ``jaxfit.sharding.process_batch_rows``): each
reads and decodes only its rows ``[start, stop)`` of every global batch, i.e. stream
positions ``k * B + start .. k * B + stop - 1`` of batch ``k`` (``map_with_index`` over a
local position ``l`` looks up global position ``(l // b) * B + start + l % b``, ``b`` its
row count), so the global batch is the single-process one whatever the process count.
(grain's ``ShardByJaxProcess`` would instead split the records, giving each process
other examples and a global batch that depends on the process count.) Exact as long as
every image decodes: an undecodable one is skipped within its process's share.

Threads, not processes: PIL decodes and resizes with the GIL released, and skip counters
stay in the main process. ``get_state()`` is grain's state (the stream position, an int)
plus the settings it is only valid for; it is JSON-serialisable, and ``set_state`` resumes
to exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jaxfit.data.image_text.caption_tokenizer import CaptionTokenizer
from jaxfit.data.image_text.images import Augment, ImageDecodeError, load_image
from jaxfit.data.image_text.sources import ImageCaptions, SkipCounter

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def augment_from_config(data_cfg) -> Augment | None:
    """``Augment`` from ``data.augment``, ``data.crop_scale_min``, ``data.hflip``; None if off."""
    if not data_cfg.augment:
        return None
    return Augment(scale=(float(data_cfg.crop_scale_min), 1.0), hflip=bool(data_cfg.hflip))


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed hashed from ``seed`` (grain's epoch-e seed is seed + e, so
    consecutive raw seeds would share permutations across epochs)."""
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0])


class _LoadExample:
    """Record index -> {"pixel_values", "caption", "index"} or None if undecodable."""

    def __init__(self, records, image_size, seed, augment, counter, *, pick_caption=True):
        self.records = records
        self.image_size = image_size
        self.seed = int(seed)
        self.augment = augment
        self.counter = counter
        self.pick_caption = pick_caption
        self._failed: set[int] = set()
        self._lock = threading.Lock()

    def load(self, index: int, rng: np.random.Generator | None):
        rec = self.records[index]
        try:
            pixels = load_image(rec.image, self.image_size, augment=self.augment, rng=rng)
        except ImageDecodeError as e:
            self.counter.add("undecodable_image", f"image {rec.image_id}: {e}", key=rec.image_id)
            with self._lock:
                self._failed.add(index)
                if len(self._failed) == len(self.records):
                    raise RuntimeError(
                        f"none of the {len(self.records)} images could be decoded"
                    ) from e
            return None
        return pixels

    def __call__(self, position: int, index: int):
        n = len(self.records)
        epoch = position // n
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        captions = self.records[index].captions
        caption = captions[int(rng.integers(len(captions)))]  # drawn first: same for any augment
        pixels = self.load(int(index), rng if self.augment is not None else None)
        if pixels is None:
            return None
        return {"pixel_values": pixels, "caption": caption, "index": int(index)}


class _AtGlobalPosition:
    """``load`` of this process's rows ``[start, stop)`` of each global batch of ``size``:
    local stream position ``l`` is global position ``(l // b) * size + start + l % b``."""

    def __init__(self, order, load, start: int, stop: int, size: int):
        self.order, self.load = order, load
        self.start, self.rows, self.size = start, stop - start, size

    def __call__(self, position: int, _index: int):
        k, j = divmod(int(position), self.rows)
        g = k * self.size + self.start + j
        return self.load(g, self.order[g])


class TrainIterator:
    """Endless iterator of CLIP training batches (see ``train_iterator``).

    Yields dicts of numpy arrays: ``pixel_values`` float32 ``[B, H, W, 3]`` (CLIP-
    normalised), ``input_ids`` int32 ``[B, L]``, ``attention_mask`` int32 ``[B, L]``, and,
    with ``with_image_index``, ``image_index`` int32 ``[B]`` (record indices).
    """

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        tokenizer: CaptionTokenizer,
        *,
        image_size: int,
        global_batch_size: int,
        seed: int,
        augment: bool | Augment | None,
        num_threads: int,
        prefetch_batches: int,
        counter: SkipCounter,
        with_image_index: bool,
        process_rows: tuple[int, int] | None = None,
    ):
        if not records:
            raise ValueError("train_iterator: no records")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if augment is True:
            augment = Augment()
        start, stop = process_rows or (0, global_batch_size)
        if not 0 <= start < stop <= global_batch_size:
            raise ValueError(f"process_rows {process_rows} outside a batch of {global_batch_size}")
        self.num_records = len(records)
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = stop - start
        self._tokenizer = tokenizer
        self._with_image_index = with_image_index
        load = _LoadExample(records, image_size, seed, augment or None, counter)
        order = grain.MapDataset.range(self.num_records).shuffle(seed=_shuffle_seed(seed)).repeat()
        if (start, stop) != (0, global_batch_size):
            load = _AtGlobalPosition(order, load, start, stop, global_batch_size)
        ds = (
            order.map_with_index(load)
            .to_iter_dataset(
                grain.ReadOptions(
                    num_threads=num_threads,
                    prefetch_buffer_size=max(self.local_batch_size, 2 * num_threads),
                )
            )
            .batch(self.local_batch_size, drop_remainder=True, batch_fn=self._collate)
        )
        if prefetch_batches > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=prefetch_batches
            )
        self._it = iter(ds)

    def _collate(self, elements) -> dict[str, np.ndarray]:
        ids, mask = self._tokenizer.encode([e["caption"] for e in elements])
        batch = {
            "pixel_values": np.stack([e["pixel_values"] for e in elements]),
            "input_ids": ids,
            "attention_mask": mask,
        }
        if self._with_image_index:
            batch["image_index"] = np.asarray([e["index"] for e in elements], np.int32)
        return batch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        """JSON-serialisable position: ``{"version", "seed", "num_records",
        "global_batch_size", "local_batch_size", "grain"}``; ``grain`` is grain's iterator
        state (the next local stream position, an int, under ``next_index``)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_records": self.num_records,
            "global_batch_size": self.global_batch_size,
            "local_batch_size": self.local_batch_size,
            "grain": self._it.get_state(),
        }

    def set_state(self, state: dict) -> None:
        """Resume from ``get_state()`` output (possibly after a JSON round trip).

        With the same records, seed and batch size the stream continues exactly where it
        was saved. If only the number of records changed (an image file vanished between
        runs, so ``load_source`` dropped it), the exact stream no longer exists: a WARNING
        is logged and the stream restarts at the same epoch, the same fraction into it.

        Raises:
          ValueError: the state was saved with another seed or batch size, or is not a
            ``TrainIterator`` state of this version.
        """
        skip = ("grain", "num_records", "local_batch_size")
        mine = {k: v for k, v in self.get_state().items() if k not in skip}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"data iterator state is for {theirs}, this pipeline is {mine}")
        grain_state = dict(state["grain"])
        saved_local = int(state.get("local_batch_size", self.global_batch_size))
        if saved_local != self.local_batch_size:  # another process count: same batch index
            batches = int(grain_state["next_index"]) // saved_local
            grain_state["next_index"] = batches * self.local_batch_size
        n_old, n_new = int(state["num_records"]), self.num_records
        if n_old != n_new:
            epoch, offset = divmod(int(grain_state["next_index"]), n_old)
            grain_state["next_index"] = epoch * n_new + (offset * n_new) // n_old
            logger.warning(
                "data state saved with %d records, %d now: cannot resume exactly; "
                "restarting epoch %d at position %d",
                n_old,
                n_new,
                epoch,
                grain_state["next_index"],
            )
        self._it.set_state(grain_state)

    def close(self) -> None:
        """Stop the background threads."""
        self._it.close()


def train_iterator(
    records: Sequence[ImageCaptions],
    tokenizer: CaptionTokenizer,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    augment: bool | Augment | None = False,
    num_threads: int = 8,
    prefetch_batches: int = 2,
    counter: SkipCounter | None = None,
    with_image_index: bool = False,
    process_rows: tuple[int, int] | None = None,
) -> TrainIterator:
    """Endless, checkpointable stream of CLIP training batches.

    Args:
      records: the training images (``image_text.load_source``); their order matters for
        determinism.
      tokenizer: caption tokenizer; L is its ``context_length``.
      image_size: output side in pixels (H = W).
      global_batch_size: B, images per batch (the full batch across devices).
      seed: non-negative int; determines the per-epoch order, the caption drawn per image
        and the augmentation.
      augment: False/None for eval-style preprocessing, True for ``Augment()`` (random
        resized crop, no flip), or an ``Augment``.
      num_threads: grain reader threads decoding and preprocessing images; the element
        prefetch buffer is ``max(B, 2 * num_threads)``.
      prefetch_batches: batches assembled ahead in a background thread (0 = none).
      counter: receives ``undecodable_image`` skips (each image counted once; all threads
        count into it). A fresh one if None.
      with_image_index: also yield ``image_index`` int32 [B] (record indices).
      process_rows: ``(start, stop)``: yield only these rows of each global batch (this
        process's, ``jaxfit.sharding.process_batch_rows``); None: all ``B``.

    Returns:
      A ``TrainIterator``: ``next()`` gives ``{"pixel_values": float32 [B, H, W, 3],
      "input_ids": int32 [B, L], "attention_mask": int32 [B, L]}``. Batches run across epoch
      boundaries (epoch e covers stream positions [e n, (e+1) n)). Undecodable images are
      skipped, so an epoch then holds fewer than n examples.

    Raises:
      ValueError: no records, a negative seed or a non-positive batch size.
      RuntimeError (from ``next``): every image failed to decode.
    """
    return TrainIterator(
        records,
        tokenizer,
        image_size=image_size,
        global_batch_size=global_batch_size,
        seed=seed,
        augment=augment,
        num_threads=num_threads,
        prefetch_batches=prefetch_batches,
        counter=counter if counter is not None else SkipCounter(),
        with_image_index=with_image_index,
        process_rows=process_rows,
    )


def eval_batches(
    records: Sequence[ImageCaptions],
    tokenizer: CaptionTokenizer,
    *,
    image_size: int,
    batch_size: int,
    num_threads: int = 8,
    counter: SkipCounter | None = None,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """All images, then all captions, for retrieval evaluation, in fixed-shape batches.

    Yields ``(kind, batch)`` pairs, every ``"image"`` batch before the first ``"text"`` one:

    * ``("image", {"pixel_values": float32 [batch_size, H, W, 3], "valid": bool
      [batch_size]})``: the decodable images in record order (eval preprocessing). Images
      that fail to decode are skipped (counted as ``undecodable_image``), with their
      captions; image ``j`` below means the j-th *yielded valid* image.
    * ``("text", {"input_ids": int32 [batch_size, L], "attention_mask": int32
      [batch_size, L], "image_index": int32 [batch_size], "valid": bool [batch_size]})``:
      every caption of every yielded image, image by image; ``image_index`` is the index of
      its image among the yielded images.

    The last batch of each kind is padded to ``batch_size``: padded rows have ``valid``
    False, zero pixels, the tokens of an empty caption (BOS, EOS) and ``image_index`` -1.
    So with image embeddings ``I [n_img, d]`` and text embeddings ``T [n_txt, d]`` (valid
    rows only, in order), caption t matches image ``image_index[t]``.

    Raises:
      ValueError: no records, or no image could be decoded.
    """
    if not records:
        raise ValueError("eval_batches: no records")
    counter = counter if counter is not None else SkipCounter()
    load = _LoadExample(records, image_size, 0, None, counter)
    ds = (
        grain.MapDataset.range(len(records))
        .map(lambda i: load.load(i, None))
        .to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size),
            allow_nones=True,
        )
    )
    kept: list[int] = []
    pending: list[np.ndarray] = []
    for index, pixels in enumerate(ds):
        if pixels is None:
            continue
        kept.append(index)
        pending.append(pixels)
        if len(pending) == batch_size:
            yield "image", _pad_images(pending, batch_size)
            pending = []
    if pending:
        yield "image", _pad_images(pending, batch_size)
    if not kept:
        raise ValueError(f"eval_batches: none of the {len(records)} images could be decoded")
    if len(kept) < len(records):
        logger.warning("eval: %d of %d images undecodable", len(records) - len(kept), len(records))

    captions = [(j, c) for j, i in enumerate(kept) for c in records[i].captions]
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        n_pad = batch_size - len(chunk)
        ids, mask = tokenizer.encode([c for _, c in chunk] + [""] * n_pad)
        yield (
            "text",
            {
                "input_ids": ids,
                "attention_mask": mask,
                "image_index": np.asarray([j for j, _ in chunk] + [-1] * n_pad, np.int32),
                "valid": np.arange(batch_size) < len(chunk),
            },
        )


def _pad_images(pending: list[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    pixels = np.zeros((batch_size, *pending[0].shape), np.float32)
    pixels[: len(pending)] = pending
    return {"pixel_values": pixels, "valid": np.arange(batch_size) < len(pending)}


def num_eval_batches(records: Sequence[ImageCaptions], batch_size: int) -> tuple[int, int]:
    """Upper bounds ``(image_batches, text_batches)`` of ``eval_batches`` (exact when every
    image decodes)."""
    n_caps = sum(len(r.captions) for r in records)
    return math.ceil(len(records) / batch_size), math.ceil(n_caps / batch_size)

"""grain pipelines: determinism, epochs, exact resume, undecodable images, eval contract."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from jaxfit.data.image_text.pipeline import eval_batches, train_iterator
from jaxfit.data.image_text.sources import ImageCaptions, SkipCounter

SIZE = 16  # image side: small keeps the suite fast


def _stream(records, tok, n_batches, *, batch=8, seed=0, **kw):
    it = train_iterator(
        records,
        tok,
        image_size=SIZE,
        global_batch_size=batch,
        seed=seed,
        num_threads=kw.pop("num_threads", 2),
        with_image_index=True,
        **kw,
    )
    try:
        return [next(it) for _ in range(n_batches)]
    finally:
        it.close()


def _concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def test_batch_shapes_and_dtypes(synthetic_records, small_tokenizer):
    (b,) = _stream(synthetic_records, small_tokenizer, 1)
    assert b["pixel_values"].shape == (8, SIZE, SIZE, 3) and b["pixel_values"].dtype == np.float32
    assert b["input_ids"].shape == (8, 16) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"].shape == (8, 16) and b["attention_mask"].dtype == np.int32
    assert b["image_index"].dtype == np.int32


def test_each_epoch_visits_every_image_once_in_a_new_order(synthetic_records, small_tokenizer):
    n = len(synthetic_records)  # 60
    idx = _concat(_stream(synthetic_records, small_tokenizer, 3 * n // 8 + 1), "image_index")
    epochs = [idx[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))


def test_deterministic_in_seed_and_independent_of_batching_and_threads(
    synthetic_records, small_tokenizer
):
    a = _stream(synthetic_records, small_tokenizer, 15, batch=8, seed=3)
    b = _stream(synthetic_records, small_tokenizer, 10, batch=12, seed=3, num_threads=1)
    for key in ("image_index", "input_ids", "pixel_values"):
        np.testing.assert_array_equal(_concat(a, key), _concat(b, key))
    c = _stream(synthetic_records, small_tokenizer, 15, batch=8, seed=4)
    assert not np.array_equal(_concat(a, "image_index"), _concat(c, "image_index"))


def test_caption_drawn_per_epoch_from_the_image_captions(synthetic_records, small_tokenizer):
    n = len(synthetic_records)
    batches = _stream(synthetic_records, small_tokenizer, 4 * n // 8)
    idx, ids = _concat(batches, "image_index"), _concat(batches, "input_ids")
    seen: dict[int, set] = {}
    for i, row in zip(idx, ids):
        text = small_tokenizer.decode(row).strip()  # may be truncated to L=16 tokens
        assert any(c.lower().startswith(text) for c in synthetic_records[i].captions)
        seen.setdefault(int(i), set()).add(text)
    # Over 4 epochs most images show more than one of their 5 captions.
    assert np.mean([len(s) > 1 for s in seen.values()]) > 0.5


def test_augmentation_is_deterministic(synthetic_records, small_tokenizer):
    a = _stream(synthetic_records, small_tokenizer, 3, seed=5, augment=True)
    b = _stream(synthetic_records, small_tokenizer, 3, seed=5, augment=True)
    plain = _stream(synthetic_records, small_tokenizer, 3, seed=5)
    np.testing.assert_array_equal(_concat(a, "pixel_values"), _concat(b, "pixel_values"))
    np.testing.assert_array_equal(_concat(a, "input_ids"), _concat(plain, "input_ids"))
    assert not np.array_equal(_concat(a, "pixel_values"), _concat(plain, "pixel_values"))


def _with_bad_images(records, tmp_path):
    """Records with a truncated JPEG and a garbage file inserted."""
    good = records[0].image
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 300)
    gone = tmp_path / "deleted_after_loading.jpg"
    shutil.copy(good, gone)
    bad = [
        ImageCaptions("trunc", str(truncated), ["truncated"]),
        ImageCaptions("garbage", str(garbage), ["garbage"]),
        ImageCaptions("gone", str(gone), ["gone"]),
        ImageCaptions("bytes", data[:50], ["bad bytes"]),
    ]
    gone.unlink()
    out = list(records[:20])
    for k, rec in enumerate(bad):
        out.insert(3 + 5 * k, rec)
    return out, {out.index(r) for r in bad}


def test_undecodable_images_are_skipped_counted_and_the_stream_goes_on(
    tmp_path, synthetic_records, small_tokenizer
):
    records, bad = _with_bad_images(synthetic_records, tmp_path)
    counter = SkipCounter()
    n_good = len(records) - len(bad)  # 20
    batches = _stream(records, small_tokenizer, 3 * n_good // 4, batch=4, counter=counter)
    idx = _concat(batches, "image_index")
    assert not set(idx.tolist()) & bad
    for e in range(3):  # every decodable image once per epoch
        assert sorted(idx[e * n_good : (e + 1) * n_good]) == sorted(set(range(len(records))) - bad)
    assert counter.as_dict() == {"undecodable_image": 4}  # once per image, not per epoch


def test_all_images_undecodable_raises(tmp_path, small_tokenizer):
    (tmp_path / "x.jpg").write_bytes(b"nope")
    records = [ImageCaptions(str(i), str(tmp_path / "x.jpg"), ["c"]) for i in range(3)]
    with pytest.raises(RuntimeError, match="could be decoded"):
        _stream(records, small_tokenizer, 1, batch=2)


@pytest.mark.parametrize("stop_at", [0, 3, 11])
def test_resume_from_state_reproduces_the_uninterrupted_stream(
    tmp_path, synthetic_records, small_tokenizer, stop_at
):
    records, _ = _with_bad_images(synthetic_records, tmp_path)  # skips must not shift resume
    kw = dict(image_size=SIZE, global_batch_size=5, seed=11, num_threads=2, augment=True)
    total = 16  # > 3 epochs of 20 images at 5 per batch
    full = _stream(records, small_tokenizer, total, batch=5, seed=11, augment=True)

    it = train_iterator(records, small_tokenizer, **kw)
    for _ in range(stop_at):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    for _ in range(2):
        next(it)  # the interrupted run goes on a bit ...
    it.set_state(state)  # (a used iterator rewinds too)
    for got, want in zip([next(it), next(it)], full[stop_at:]):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    it.close()  # ... and dies

    resumed = train_iterator(records, small_tokenizer, **kw)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(total - stop_at)]
    resumed.close()
    for got, want in zip(rest, full[stop_at:]):
        for key in ("pixel_values", "input_ids", "attention_mask"):
            np.testing.assert_array_equal(got[key], want[key])


def test_set_state_rejects_a_state_of_another_pipeline(synthetic_records, small_tokenizer):
    kw = dict(image_size=SIZE, global_batch_size=4, num_threads=1)
    a = train_iterator(synthetic_records, small_tokenizer, seed=1, **kw)
    b = train_iterator(synthetic_records, small_tokenizer, seed=2, **kw)
    with pytest.raises(ValueError, match="seed"):
        b.set_state(a.get_state())
    c = train_iterator(synthetic_records, small_tokenizer, seed=1, **{**kw, "global_batch_size": 5})
    with pytest.raises(ValueError, match="global_batch_size"):
        c.set_state(a.get_state())
    c.close()
    with pytest.raises(ValueError, match="non-negative"):
        train_iterator(synthetic_records, small_tokenizer, seed=-1, **kw)
    a.close()
    b.close()


def test_eval_batches_contract(tmp_path, synthetic_records, small_tokenizer):
    records, bad = _with_bad_images(synthetic_records[:10], tmp_path)  # 10 good + 4 bad
    counter = SkipCounter()
    out = list(
        eval_batches(records, small_tokenizer, image_size=SIZE, batch_size=4, counter=counter)
    )
    kinds = [k for k, _ in out]
    assert kinds == ["image"] * 3 + ["text"] * 13  # 10 images, 50 captions
    images = [b for k, b in out if k == "image"]
    texts = [b for k, b in out if k == "text"]
    assert all(b["pixel_values"].shape == (4, SIZE, SIZE, 3) for b in images)
    assert _concat(images, "valid").tolist() == [True] * 10 + [False] * 2
    assert not images[-1]["pixel_values"][2:].any()
    good = [r for i, r in enumerate(records) if i not in bad]
    valid = _concat(texts, "valid")
    image_index = _concat(texts, "image_index")[valid]
    ids = _concat(texts, "input_ids")[valid]
    assert valid.sum() == 50 and (_concat(texts, "image_index")[~valid] == -1).all()
    assert image_index.tolist() == [j for j, r in enumerate(good) for _ in r.captions]
    for j, row in zip(image_index, ids):
        text = small_tokenizer.decode(row).strip()
        assert any(c.lower().startswith(text) for c in good[j].captions)
    # Eval pixels are the eval preprocessing of the kept images, in order.
    from jaxfit.data.image_text.images import load_image

    np.testing.assert_array_equal(images[0]["pixel_values"][1], load_image(good[1].image, SIZE))
    assert counter.as_dict() == {"undecodable_image": 4}


def test_resume_after_records_changed_warns_and_keeps_the_epoch(
    synthetic_records, small_tokenizer, caplog
):
    kw = dict(image_size=SIZE, global_batch_size=6, seed=2, num_threads=1, with_image_index=True)
    a = train_iterator(synthetic_records, small_tokenizer, **kw)  # 60 records
    for _ in range(15):  # 90 examples: epoch 1, 30 in
        next(a)
    state = a.get_state()
    a.close()
    fewer = synthetic_records[:40]  # e.g. images deleted between runs
    b = train_iterator(fewer, small_tokenizer, **kw)
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        b.set_state(state)
    assert "cannot resume exactly" in caplog.text
    assert b.get_state()["grain"]["next_index"] == 40 + 20  # epoch 1, halfway
    batches = [next(b) for _ in range(4)]  # the rest of epoch 1 (20), then epoch 2
    assert np.concatenate([x["image_index"] for x in batches]).max() < 40
    b.close()

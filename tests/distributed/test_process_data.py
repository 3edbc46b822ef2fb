"""Each process reads only its rows of the global batch, and the rows of all processes
together are the single-process batch (so the global batch does not depend on the process
count): the CLIP grain pipeline and the LM token batches; resume across process counts."""

from __future__ import annotations

import json

import numpy as np

from jaxfit.data.image_text.pipeline import train_iterator
from jaxfit.data.text.batches import train_batches
from jaxfit.data.text.token_file import TokenFile

KEYS = ("pixel_values", "input_ids", "attention_mask", "image_index")


def _clip(records, tok, rows=None, steps=4, state=None, batch=8):
    it = train_iterator(
        records, tok, image_size=16, global_batch_size=batch, seed=5, num_threads=2,
        augment=True, with_image_index=True, process_rows=rows, prefetch_batches=0,
    )  # fmt: skip
    try:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))
        out = [next(it) for _ in range(steps)]
        return out, it.get_state()
    finally:
        it.close()


def test_clip_rows_of_the_processes_make_the_single_process_batch(coco_records, caption_tokenizer):
    # 24 records, batches of 8: 4 steps cross an epoch boundary (shuffle per epoch)
    whole, whole_state = _clip(coco_records, caption_tokenizer, steps=4)
    for parts in ([(0, 8)], [(0, 4), (4, 8)], [(0, 2), (2, 4), (4, 6), (6, 8)]):
        got = [_clip(coco_records, caption_tokenizer, rows=r, steps=4) for r in parts]
        for step in range(4):
            for key in KEYS:
                joined = np.concatenate([g[0][step][key] for g in got])
                np.testing.assert_array_equal(joined, whole[step][key], err_msg=f"{parts} {key}")
        assert all(g[1]["local_batch_size"] == 8 // len(parts) for g in got)
    # a position saved by 2 processes resumes in 1 (and 1 in 4): the same next batches
    _, two_state = _clip(coco_records, caption_tokenizer, rows=(0, 4), steps=2)
    rest, _ = _clip(coco_records, caption_tokenizer, steps=2, state=two_state)
    for key in KEYS:
        np.testing.assert_array_equal(rest[0][key], whole[2][key])
        np.testing.assert_array_equal(rest[1][key], whole[3][key])
    quarter, _ = _clip(coco_records, caption_tokenizer, rows=(6, 8), steps=1, state=whole_state)
    after, _ = _clip(coco_records, caption_tokenizer, steps=5)
    np.testing.assert_array_equal(quarter[0]["image_index"], after[4]["image_index"][6:8])


def _token_file(tmp_path, n=2000) -> TokenFile:
    tokens = np.random.default_rng(0).integers(1, 100, size=n).astype(np.uint16)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    meta = {
        "dtype": "uint16", "num_tokens": n, "vocab_size": 100, "eos_token_id": 0,
        "bos_token_id": None, "has_loss_mask": False, "stats": {},
    }  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(meta))
    return TokenFile.open(path)


def test_lm_rows_of_the_processes_make_the_single_process_batch(tmp_path):
    tf = _token_file(tmp_path)
    kw = dict(batch_size=8, seq_len=16, seed=1)
    whole = train_batches(tf, **kw)
    parts = []
    for rows in ((0, 3), (3, 8)):  # unequal shares work too
        part = train_batches(tf, **kw)
        part.process_rows = rows
        parts.append(part)
    for step in (0, 1, 17, 40):  # 40: past an epoch (124 windows)
        ref = whole.batch(step)
        for key, value in ref.items():
            joined = np.concatenate([p.batch(step)[key] for p in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"step {step} {key}")
    # the position is the global step: a 2-process state resumes in 1 process
    next(parts[0])
    next(parts[0])
    resumed = train_batches(tf, **kw)
    resumed.set_state(json.loads(json.dumps(parts[0].get_state())))
    np.testing.assert_array_equal(next(resumed)["input_ids"], whole.batch(2)["input_ids"])

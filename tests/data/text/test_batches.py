"""LM batches: label shift, determinism, exact resume, epochs, segments, exact eval pass."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxfit.data.text.batches import eval_batches, train_batches
from jaxfit.data.text.token_file import TokenFile

EOS = 0
KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")


def make_token_file(tmp_path: Path, tokens, mask=None, name="t") -> TokenFile:
    """A token file written by hand (the documented on-disk format), without a tokenizer."""
    tokens = np.asarray(tokens, np.uint16)
    path = tmp_path / f"{name}.bin"
    tokens.tofile(path)
    if mask is not None:
        np.asarray(mask, np.uint8).tofile(path.with_suffix(".mask.bin"))
    meta = {
        "dtype": "uint16",
        "num_tokens": int(tokens.size),
        "vocab_size": 100,
        "eos_token_id": EOS,
        "bos_token_id": None,
        "has_loss_mask": mask is not None,
        "stats": {},
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return TokenFile.open(path)


def random_stream(n: int, seed: int = 0, eos_rate: float = 0.08) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 100, size=n)
    t[rng.random(n) < eos_rate] = EOS
    return t


def reference_segments(x: np.ndarray):
    """Loop version: a new segment starts after each EOS; positions count from its start."""
    seg, pos = np.zeros_like(x), np.zeros_like(x)
    for r in range(x.shape[0]):
        s, p = 1, 0
        for t in range(x.shape[1]):
            if t > 0 and x[r, t - 1] == EOS:
                s, p = s + 1, 0
            seg[r, t], pos[r, t] = s, p
            p += 1
    return seg, pos


def test_batch_contents_shift_and_segments(tmp_path):
    stream = random_stream(1001)
    tf = make_token_file(tmp_path, stream)
    it = train_batches(tf, batch_size=4, seq_len=16, seed=3)
    for step in range(5):
        b = next(it)
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "input_ids": ((4, 16), "int32"),
            "labels": ((4, 16), "int32"),
            "loss_mask": ((4, 16), "float32"),
            "segment_ids": ((4, 16), "int32"),
            "positions": ((4, 16), "int32"),
        }
        for row, w in enumerate(it.window_indices(step)):
            window = stream[w * 16 : w * 16 + 17]
            np.testing.assert_array_equal(b["input_ids"][row], window[:-1])
            np.testing.assert_array_equal(b["labels"][row], window[1:])  # labels[t] = x[t+1]
        np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        assert (b["loss_mask"] == 1).all()
        seg, pos = reference_segments(b["input_ids"])
        np.testing.assert_array_equal(b["segment_ids"], seg)
        np.testing.assert_array_equal(b["positions"], pos)


def test_deterministic_and_exact_resume(tmp_path):
    tf = make_token_file(tmp_path, random_stream(2000))
    kw = dict(batch_size=3, seq_len=32, seed=7)  # 62 windows: batches straddle epochs
    run = [next(it) for it in [train_batches(tf, **kw)] for _ in range(50)]
    again = train_batches(tf, **kw)
    for want in run:
        got = next(again)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    resumed = train_batches(tf, start_step=37, **kw)
    for want in run[37:]:
        got = next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])

    it = train_batches(tf, **kw)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    fresh = train_batches(tf, **kw)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["input_ids"], run[11]["input_ids"])
    with pytest.raises(ValueError, match="seed"):
        train_batches(tf, batch_size=3, seq_len=32, seed=8).set_state(state)

    other = next(train_batches(tf, batch_size=3, seq_len=32, seed=8))
    assert not np.array_equal(other["input_ids"], run[0]["input_ids"])


def test_each_epoch_visits_every_window_once_in_new_order(tmp_path):
    tf = make_token_file(tmp_path, random_stream(20 * 8 + 5))
    it = train_batches(tf, batch_size=4, seq_len=8, seed=0)
    assert it.num_windows == 20 and it.steps_per_epoch == 5
    epoch0 = np.concatenate([it.window_indices(s) for s in range(5)])
    epoch1 = np.concatenate([it.window_indices(s) for s in range(5, 10)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch0, epoch1)
    odd = train_batches(tf, batch_size=3, seq_len=8, seed=0)  # 20 % 3 != 0
    samples = np.concatenate([odd.window_indices(s) for s in range(14)])  # 42 samples
    assert sorted(samples[:20]) == sorted(samples[20:40]) == list(range(20))


def test_too_short_file_names_the_file(tmp_path):
    tf = make_token_file(tmp_path, [5, 6, 7, EOS], name="tiny")
    with pytest.raises(ValueError, match=r"tiny\.bin has 4 tokens, fewer than seq_len \+ 1 = 9"):
        train_batches(tf, batch_size=2, seq_len=8, seed=0)


@pytest.mark.parametrize(
    "n,seq_len,batch_size", [(1000, 16, 4), (97, 8, 5), (17, 16, 2), (2, 4, 3)]
)
def test_eval_predicts_every_token_once(tmp_path, n, seq_len, batch_size):
    stream = random_stream(n, seed=n)
    tf = make_token_file(tmp_path, stream)
    ev = eval_batches(tf, batch_size=batch_size, seq_len=seq_len)
    batches = list(ev)
    windows = math.ceil((n - 1) / seq_len)
    assert len(batches) == len(ev) == math.ceil(windows / batch_size)
    predicted = []
    for b in batches:
        assert b["input_ids"].shape == (batch_size, seq_len)  # fixed shape: one compile
        m = b["loss_mask"] > 0
        predicted.extend(b["labels"][m].tolist())
        assert (m <= (b["segment_ids"] > 0)).all()  # a target always has a real input token
    assert predicted == stream[1:].tolist()  # every token but the first, once, in order
    assert ev.num_loss_tokens == n - 1
    last = batches[-1]
    pad_rows = ~(last["segment_ids"] > 0).any(axis=1)
    assert (last["loss_mask"][pad_rows] == 0).all()


def test_eval_perplexity_is_exact_for_a_context_free_model(tmp_path):
    stream = random_stream(503, seed=1)
    tf = make_token_file(tmp_path, stream)
    logp = np.log(np.random.default_rng(0).dirichlet(np.ones(100)))  # a unigram "model"
    total, count = 0.0, 0.0
    for b in eval_batches(tf, batch_size=4, seq_len=32):
        total += float((-logp[b["labels"]] * b["loss_mask"]).sum())
        count += float(b["loss_mask"].sum())
    np.testing.assert_allclose(np.exp(total / count), np.exp(-logp[stream[1:]].mean()), rtol=1e-12)


def test_instruction_mask_in_batches(tmp_path):
    # doc: prompt(3) completion(2) EOS, repeated; mask on completion + EOS
    doc_t, doc_m = [11, 12, 13, 21, 22, EOS], [0, 0, 0, 1, 1, 1]
    tf = make_token_file(tmp_path, doc_t * 20, doc_m * 20)
    b = next(train_batches(tf, batch_size=2, seq_len=12, seed=0))
    assert ((b["loss_mask"] == 1) == np.isin(b["labels"], [21, 22, EOS])).all()
    ev = eval_batches(tf, batch_size=4, seq_len=12)
    assert ev.num_loss_tokens == 60
    got = sum(float(x["loss_mask"].sum()) for x in ev)
    assert got == 60


def test_mask_cut_documents(tmp_path):
    doc_t, doc_m = [11, 12, 13, 21, 22, EOS], [0, 0, 0, 1, 1, 1]
    tf = make_token_file(tmp_path, doc_t * 20, doc_m * 20)
    plain = train_batches(tf, batch_size=8, seq_len=8, seed=0)
    cut = train_batches(tf, batch_size=8, seq_len=8, seed=0, mask_cut_documents=True)
    a, b = plain.batch(0), cut.batch(0)
    for row, w in enumerate(plain.window_indices(0)):
        starts_in_doc = (w * 8) % 6 != 0
        first = a["segment_ids"][row] == 1
        want = a["loss_mask"][row] * (~first if starts_in_doc else 1)
        np.testing.assert_array_equal(b["loss_mask"][row], want)
        np.testing.assert_array_equal(b["input_ids"][row], a["input_ids"][row])
    assert b["loss_mask"].sum() < a["loss_mask"].sum()

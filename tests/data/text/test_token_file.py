"""Token files: layout (EOS/BOS), dtype choice, cache reuse and invalidation, loss mask."""

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

import jaxfit.data.text.token_file as token_file_mod
from jaxfit.data.text import default_text_config, prepare_text_data
from jaxfit.data.text.records import InstructionExample, TextStats
from jaxfit.data.text.token_file import TokenFile, build_token_file, token_dtype, write_token_file
from jaxfit.data.text.tokenizer import TextTokenizer, load_or_train

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DOCS = ["First document, short.", "Second one\nhas two lines.", "Third: the end!"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> TextTokenizer:
    c = default_text_config().tokenizer
    c.vocab_size = 320
    corpus = DOCS * 30 + ["What is two plus two? Four. The answer is four."] * 30
    return load_or_train(c, tmp_path_factory.mktemp("tok"), lambda: corpus)


def word_level(specials, **special_map) -> TextTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "world", "again", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, **special_map))


def test_token_dtype_boundary():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_layout_eos_between_documents(tmp_path, bpe):
    tf = write_token_file(DOCS, bpe, tmp_path / "t.bin", add_bos=True)  # BOS == EOS: no BOS
    expected = sum((ids + [bpe.eos_token_id] for ids in bpe.encode_batch(DOCS)), [])
    assert tf.tokens.dtype == np.uint16 and tf.tokens.tolist() == expected
    assert (tf.num_tokens, tf.meta["documents"], tf.meta["add_bos"]) == (len(expected), 3, False)
    assert tf.loss_mask is None
    assert bpe.decode(tf.tokens).split("<|endoftext|>") == DOCS + [""]
    assert os.path.getsize(tmp_path / "t.bin") == 2 * len(expected)


def test_bos_only_when_distinct_and_asked(tmp_path):
    tok = word_level(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    docs = ["hello world", "again"]
    on = write_token_file(docs, tok, tmp_path / "on.bin", add_bos=True)
    assert on.tokens.tolist() == [0, 2, 3, 1, 0, 4, 1] and on.meta["add_bos"]
    off = write_token_file(docs, tok, tmp_path / "off.bin", add_bos=False)
    assert off.tokens.tolist() == [2, 3, 1, 4, 1]


def test_uint32_for_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<eos>"] = 70_000
    t = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>"))
    tf = write_token_file(["w1 w69999 w65536", "w65535"], tok, tmp_path / "big.bin", add_bos=True)
    assert tf.meta["dtype"] == "uint32" and tf.tokens.dtype == np.uint32
    assert tf.tokens.tolist() == [1, 69999, 65536, 70000, 65535, 70000]


def test_instruction_loss_mask_covers_completion_and_eos(tmp_path, bpe):
    ex = [
        InstructionExample("What is two plus two?", " Four."),
        InstructionExample("", "The answer is four."),
    ]
    tf = write_token_file(ex, bpe, tmp_path / "sft.bin", add_bos=True)
    assert tf.loss_mask is not None and tf.loss_mask.dtype == np.uint8
    tokens, mask = tf.tokens.tolist(), tf.loss_mask.tolist()
    p0, c0 = bpe.encode(ex[0].prompt), bpe.encode(ex[0].completion)
    c1 = bpe.encode(ex[1].completion)
    eos = bpe.eos_token_id
    assert tokens == p0 + c0 + [eos] + c1 + [eos]
    assert mask == [0] * len(p0) + [1] * (len(c0) + 1) + [1] * (len(c1) + 1)
    masked = [t for t, m in zip(tokens, mask) if m]
    assert bpe.decode(masked) == " Four.<|endoftext|>The answer is four.<|endoftext|>"
    assert tf.meta["loss_tokens"] == sum(mask)
    with pytest.raises(ValueError, match="mix"):
        write_token_file([ex[0], "plain"], bpe, tmp_path / "mixed.bin", add_bos=False)


def _cfg(path: Path, **kw):
    c = default_text_config()
    c.path = str(path)
    for k, v in kw.items():
        c[k] = v
    return c


def test_cache_reuse_and_invalidation(tmp_path, bpe, monkeypatch):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS))
    calls = []
    real = token_file_mod.load_documents
    monkeypatch.setattr(
        token_file_mod, "load_documents", lambda c, s: calls.append(s) or real(c, s)
    )
    cache = tmp_path / "cache"
    c = _cfg(src, split_by_blank_lines=True)
    first = build_token_file(c, bpe, "train", cache)
    stamp = os.stat(first.path).st_mtime_ns
    second = build_token_file(c, bpe, "train", cache)
    assert calls == ["train"]  # second call did not read or tokenize
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == stamp
    assert second.tokens.tolist() == first.tokens.tolist()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [first.path.name, first.path.with_suffix(".json").name]
        + [first.path.with_suffix(".starts.npy").name]
    )  # no temporary files left
    side = json.loads(first.path.with_suffix(".json").read_text())
    assert side["key"] in first.path.name and side["stats"]["documents"] == 3

    other = build_token_file(_cfg(src), bpe, "train", cache)  # a token-relevant field changed
    assert other.path != first.path and calls == ["train", "train"] and other.meta["documents"] == 1

    src.write_text("\n\n".join(DOCS + ["A fourth document."]))  # content (size/mtime) changed
    changed = build_token_file(c, bpe, "train", cache)
    assert changed.path != first.path and changed.meta["documents"] == 4

    expected = changed.tokens.tolist()
    changed.path.write_bytes(b"\x00")  # a truncated file is rebuilt, not trusted
    rebuilt = build_token_file(c, bpe, "train", cache)
    assert len(calls) == 4 and rebuilt.tokens.tolist() == expected

    # two documents swapped, the size and modification time kept (touch -r): the key is
    # the content's, so the tokens are rebuilt; the content hash tells them apart
    st = src.stat()
    swapped = [DOCS[1], DOCS[0], *DOCS[2:], "A fourth document."]
    src.write_text("\n\n".join(swapped))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size
    again = build_token_file(c, bpe, "train", cache)
    assert again.path != rebuilt.path and len(calls) == 5
    assert again.num_tokens == rebuilt.num_tokens
    assert again.content_sha256 != rebuilt.content_sha256
    assert (
        rebuilt.content_sha256
        == json.loads(rebuilt.path.with_suffix(".json").read_text())["sha256"]
    )


def test_open_rejects_truncated_file(tmp_path, bpe):
    tf = write_token_file(DOCS, bpe, tmp_path / "t.bin", add_bos=False)
    with open(tf.path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="sidecar says"):
        TokenFile.open(tf.path)


def test_prepare_text_data_end_to_end(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc number {i} " * 5}) + "\n" for i in range(40)))
    c = _cfg(src, val_fraction=0.1)
    c.tokenizer.vocab_size = 300
    data = prepare_text_data(c, tmp_path / "run")
    assert data.train.meta["documents"] == 36 and data.validation.meta["documents"] == 4
    assert data.train.meta["tokenizer"] == data.tokenizer.fingerprint()
    assert isinstance(data.train.stats, TextStats) and data.train.stats.documents == 36
    val_text = data.tokenizer.decode(data.validation.tokens)
    assert val_text.startswith("doc number 36 ") and "doc number 35" not in val_text
    again = prepare_text_data(c, tmp_path / "run")  # resume: same tokenizer and files
    assert again.train.path == data.train.path and again.validation.path == data.validation.path
    assert again.tokenizer.fingerprint() == data.tokenizer.fingerprint()


@pytest.mark.shared_data
def test_tinystories_with_separator_file(tmp_path, bpe):
    p = SHARED / "tinystories_sample" / "tinystories_sample_cs336.txt"
    if not p.exists():
        pytest.skip(f"shared data {p} not available")
    c = _cfg(p, doc_separator="<|endoftext|>")
    tf = build_token_file(c, bpe, "train", tmp_path)
    n_docs = len([d for d in p.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()])
    assert tf.meta["documents"] == n_docs > 1
    assert int((np.asarray(tf.tokens) == bpe.eos_token_id).sum()) == n_docs


def test_single_document_splits_by_tokens(tmp_path, bpe, caplog):
    src = tmp_path / "one.txt"
    src.write_text(" ".join(DOCS * 20))  # one document: val_fraction=0.1 holds out < 1
    c = _cfg(src, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    c.tokenizer.vocab_size = 320
    with caplog.at_level(logging.INFO, logger="jaxfit.data"):
        data = prepare_text_data(c, tmp_path / "run")
    whole = data.tokenizer.encode(src.read_text()) + [data.tokenizer.eos_token_id]
    n_val = math.ceil(0.1 * len(whole))
    assert data.train.num_tokens == len(whole) - n_val and data.validation.num_tokens == n_val
    assert data.train.tokens.tolist() + data.validation.tokens.tolist() == whole
    assert data.train.meta["token_split"] == {"train": len(whole) - n_val, "validation": n_val}
    assert data.train.stats.split_by_tokens and data.validation.stats.documents == 1
    assert f"split by tokens: {len(whole) - n_val} train / {n_val} validation tokens" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxfit.data"):
        again = prepare_text_data(c, tmp_path / "run")  # from the cache: still said
    assert again.validation.tokens.tolist() == whole[-n_val:] and "split by tokens" in caplog.text

    # instruction data cut alike: the mask follows the tokens
    rows = [{"prompt": "Q", "completion": " answer " * 40}]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ci = _cfg(tmp_path / "i.jsonl", instruction=True, val_fraction=0.25)
    full = write_token_file(
        [InstructionExample("Q", rows[0]["completion"])], bpe, tmp_path / "full.bin", add_bos=False
    )
    val = build_token_file(ci, bpe, "validation", tmp_path / "c2")
    n_val = math.ceil(0.25 * full.num_tokens)
    assert val.tokens.tolist() == full.tokens.tolist()[-n_val:]
    assert val.loss_mask.tolist() == full.loss_mask.tolist()[-n_val:]
    assert val.meta["loss_tokens"] == int(np.sum(full.loss_mask[-n_val:]))

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Third")
    with pytest.raises(ValueError, match="leaves .* training and .* validation tokens"):
        build_token_file(_cfg(tiny, val_fraction=0.5), bpe, "train", tmp_path / "c3")


def test_skip_counts_in_sidecar_name_only_dropped_documents(tmp_path, bpe):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{broken\n{"text": ""}\n{"text": "b\xffd"}\n')
    tf = build_token_file(_cfg(src), bpe, "train", tmp_path / "cache")
    stats = tf.meta["stats"]
    assert stats["documents"] == 2 and stats["malformed_rows"] == 1 and stats["empty"] == 1
    # kept documents with replaced bytes are not a drop reason (the LM task reports every
    # key of "stats" but "documents" as data/skipped_<key>)
    assert "decode_replaced" not in stats and tf.meta["decode_replaced"] == 1
    assert tf.stats.decode_replaced == 1 and tf.stats.malformed_rows == 1


@pytest.mark.shared_data
def test_tinyshakespeare_one_file_splits_by_tokens(tmp_path):
    p = SHARED / "tinyshakespeare" / "input.txt"
    gpt2 = SHARED / "tokenizers" / "gpt2"
    if not (p.exists() and gpt2.exists()):
        pytest.skip(f"shared data {p} / {gpt2} not available")
    c = _cfg(p, val_fraction=0.05)
    c.tokenizer.name = str(gpt2)
    data = prepare_text_data(c, tmp_path / "run")
    n = data.train.num_tokens + data.validation.num_tokens
    # GPT-2 BPE of the whole play (+ EOS), as nanoGPT's shakespeare/prepare.py counts it
    assert n == len(data.tokenizer.encode(p.read_text(encoding="utf-8"))) + 1
    assert data.validation.num_tokens == math.ceil(0.05 * n)
    assert data.train.meta["token_split"]["train"] == data.train.num_tokens

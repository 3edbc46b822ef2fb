"""CaptionTokenizer: CLIP ids against openai/CLIP's algorithm and transformers; trained BPE."""

from __future__ import annotations

import csv
import functools
import gzip
import html
import json

import numpy as np
import pytest

from jaxfit.data.image_text.caption_tokenizer import (
    CaptionTokenizer,
    clip_tokenizer_from_bpe,
    load_or_train_caption_bpe,
    train_caption_bpe,
)


class OpenAIClipReference:
    """openai/CLIP clip/simple_tokenizer.py + clip.tokenize(truncate=True), re-typed as the
    independent reference (ftfy.fix_text omitted: the test captions are plain ASCII)."""

    def __init__(self, bpe_path):
        import regex

        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        bs += list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.regex = regex

    @functools.cache  # noqa: B019 (test helper, one instance)
    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(text)).strip()
        text = self.regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids

    def tokenize(self, texts, context_length):
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        out = np.zeros((len(texts), context_length), np.int64)
        for i, t in enumerate(texts):
            tokens = [sot, *self.encode(t), eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            out[i, : len(tokens)] = tokens
        return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shared):
    path = tmp_path_factory.mktemp("clip_tok")
    clip_tokenizer_from_bpe(shared("tokenizers", "clip", "bpe_simple_vocab_16e6.txt.gz"), path)
    return path


@pytest.fixture(scope="module")
def flickr_captions(shared):
    with open(shared("flickr8k_1k_small", "captions.txt"), newline="") as f:
        return [row["caption"] for row in csv.DictReader(f)][:1500]


@pytest.mark.shared_data
def test_clip_tokenizer_matches_openai_clip_and_transformers(clip_dir, flickr_captions, shared):
    tok = CaptionTokenizer.from_pretrained(clip_dir)  # the HF path: AutoTokenizer from a dir
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.vocab_size == 49408 and tok.context_length == 77
    captions = flickr_captions + ["A caption with UPPER case,   extra   spaces & <b>html</b>!"]
    ids, mask = tok.encode(captions)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(captions), 77)

    ref = OpenAIClipReference(shared("tokenizers", "clip", "bpe_simple_vocab_16e6.txt.gz"))
    ref_ids = ref.tokenize(captions, 77)
    # openai pads with 0, HF CLIP with EOS (49407): compare where the mask is on.
    np.testing.assert_array_equal(np.where(mask == 1, ids, 0), ref_ids)
    np.testing.assert_array_equal(mask, (ref_ids != 0).astype(np.int32))

    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(clip_dir))
    enc = hf(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, enc["input_ids"])
    np.testing.assert_array_equal(mask, enc["attention_mask"])


@pytest.mark.shared_data
def test_truncation_keeps_eos_last_and_special_strings_are_text(clip_dir):
    tok = CaptionTokenizer.from_pretrained(clip_dir, context_length=8)
    ids, mask = tok.encode(["one two three four five six seven eight nine", "hi", ""])
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id and mask[0].all()
    assert list(mask[1]) == [1, 1, 1, 0, 0, 0, 0, 0] and ids[1, 2] == tok.eos_token_id
    assert list(ids[2, :2]) == [tok.bos_token_id, tok.eos_token_id] and mask[2].sum() == 2
    eos_pos = mask.sum(-1) - 1
    assert (ids[np.arange(3), eos_pos] == tok.eos_token_id).all()
    # A caption spelling out the EOS token cannot end itself early.
    spoof, _ = tok.encode(["a <|endoftext|> b"])
    assert (spoof[0, 1:] == tok.eos_token_id).argmax() + 1 > 3


def test_train_caption_bpe_save_and_reload_gives_same_ids(tmp_path, synthetic_records):
    captions = [c for r in synthetic_records for c in r.captions]
    calls = []

    def corpus():
        calls.append(1)
        return iter(captions)

    tok = load_or_train_caption_bpe(tmp_path / "tok", corpus, vocab_size=320, context_length=20)
    assert calls == [1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 320 and tok.context_length == 20
    again = load_or_train_caption_bpe(tmp_path / "tok", corpus, vocab_size=320, context_length=20)
    assert calls == [1]  # reused from disk, not retrained
    texts = captions[:50] + ["Ünïcode and UPPER case are fine"]
    for a, b in zip(tok.encode(texts), again.encode(texts)):
        np.testing.assert_array_equal(a, b)
    ids, mask = tok.encode(["A Big RED circle"])
    assert tok.decode(ids[0]).strip() == "a big red circle"
    assert (
        json.loads((tmp_path / "tok" / "jaxfit_tokenizer.json").read_text())["context_length"] == 20
    )
    with pytest.raises(ValueError, match="vocab_size"):
        load_or_train_caption_bpe(tmp_path / "tok", corpus, vocab_size=999, context_length=20)


def test_save_and_from_pretrained_round_trip(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "copy")
    back = CaptionTokenizer.from_pretrained(tmp_path / "copy")
    assert back.context_length == small_tokenizer.context_length
    caps = ["a small blue square on the left", "x" * 100]
    for a, b in zip(small_tokenizer.encode(caps), back.encode(caps)):
        np.testing.assert_array_equal(a, b)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        CaptionTokenizer.from_pretrained(tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        clip_tokenizer_from_bpe(tmp_path / "bpe.txt.gz")
    with pytest.raises(ValueError, match="259"):
        train_caption_bpe(["a"], 100, tmp_path / "t")

"""Tokenizers: byte-level BPE training round trip and reuse; GPT-2 ids equal transformers'."""

import json
from pathlib import Path

import pytest

from jaxfit.data.text.tokenizer import (
    ENDOFTEXT,
    TextTokenizer,
    default_tokenizer_config,
    load_or_train,
    load_pretrained,
)

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow; the dog barks.",
    "the the the then there their they them these those",
] * 20
PROBES = [
    "The quick brown fox",
    "unseen wörds, 中文, emoji 🙂 and\ttabs\n\nnew lines \x00 end",
    "",
    f"two documents{ENDOFTEXT}glued",
]


def gpt2_dir() -> Path:
    d = SHARED / "tokenizers" / "gpt2"
    if not d.exists():
        pytest.skip(f"shared data {d} not available")
    return d


def tok_cfg(**kw):
    c = default_tokenizer_config()
    for k, v in kw.items():
        c[k] = v
    return c


def test_train_round_trip_and_reuse(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return iter(CORPUS)

    tok = load_or_train(tok_cfg(vocab_size=300, min_frequency=2), tmp_path, texts)
    assert calls == [1]
    assert tok.eos_token_id == tok.bos_token_id == 0  # <|endoftext|> is special token 0
    assert 257 < tok.vocab_size <= 300
    ids = tok.encode_batch(PROBES)
    for text, seq in zip(PROBES, ids):
        assert tok.decode(seq) == text  # byte-level: lossless on any text
        assert all(0 <= i < tok.vocab_size for i in seq)
    assert tok.encode(PROBES[3]).count(0) == 1  # a literal <|endoftext|> is the special token
    assert len(tok.encode("the the the")) < len("the the the")  # merges were learned

    again = load_or_train(tok_cfg(vocab_size=300, min_frequency=2), tmp_path, texts)
    assert calls == [1]  # reused, not retrained
    assert again.encode_batch(PROBES) == ids and again.fingerprint() == tok.fingerprint()

    # The saved file is a plain HF fast tokenizer.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer" / "tokenizer.json"))
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in PROBES] == ids
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert auto.eos_token == ENDOFTEXT and auto(PROBES[1])["input_ids"] == ids[1]

    with pytest.raises(ValueError, match="trained with vocab_size=300"):
        load_or_train(tok_cfg(vocab_size=512), tmp_path, texts)


def test_train_needs_texts_and_min_vocab(tmp_path):
    with pytest.raises(ValueError, match="no training texts"):
        load_or_train(tok_cfg(), tmp_path)
    with pytest.raises(ValueError, match=">= 257"):
        load_or_train(tok_cfg(vocab_size=100), tmp_path, lambda: CORPUS)


def test_train_max_chars_caps_training_text(tmp_path):
    big = load_or_train(tok_cfg(vocab_size=400), tmp_path / "a", lambda: CORPUS)
    small = load_or_train(
        tok_cfg(vocab_size=400, train_max_chars=60), tmp_path / "b", lambda: CORPUS
    )
    assert small.vocab_size < big.vocab_size


def _word_level(tmp_path: Path, specials: list[str], **special_map) -> TextTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + ["hello", "world", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special_map)
    hf.save_pretrained(str(tmp_path))
    return hf


def test_eos_resolution(tmp_path):
    _word_level(tmp_path / "none", [])
    with pytest.raises(ValueError, match="no EOS token"):
        load_pretrained(str(tmp_path / "none"))
    _word_level(tmp_path / "s", ["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    t = load_pretrained(str(tmp_path / "s"))
    assert (t.bos_token_id, t.eos_token_id, t.vocab_size) == (0, 1, 5)
    assert t.encode_batch(["hello world", "world"]) == [[2, 3], [3]]  # no specials added
    assert load_pretrained(str(tmp_path / "s"), eos_token="world").eos_token_id == 3
    with pytest.raises(ValueError, match="not in tokenizer"):
        load_pretrained(str(tmp_path / "s"), eos_token="<nope>")


@pytest.mark.shared_data
def test_gpt2_ids_equal_transformers():
    from transformers import GPT2TokenizerFast

    d = gpt2_dir()
    ours = load_pretrained(str(d))  # tokenizer.json (no config: EOS found as <|endoftext|>)
    ref = GPT2TokenizerFast(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    assert (ours.vocab_size, ours.eos_token_id) == (50257, 50256)
    assert ref.eos_token_id == 50256 and len(ref) == 50257
    texts = list(PROBES)
    shakespeare = SHARED / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():
        texts += shakespeare.read_text(encoding="utf-8")[:30000].split("\n\n")
    expected = [ref(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = ours.encode_batch(texts)
    assert got == expected
    assert got[0] == [464, 2068, 7586, 21831]  # "The quick brown fox" in GPT-2's vocabulary
    assert all(ours.decode(ids) == t for ids, t in zip(got, texts))
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["The"] == 464 and vocab[ENDOFTEXT] == 50256


def _texts_without_specials() -> list[str]:
    """Probe texts plus real prose (blocks of tinyshakespeare, C4 documents when present)."""
    texts = [p for p in PROBES if ENDOFTEXT not in p]
    texts += [" leading space", "  two leading", "trailing ", "   ", "a\n  indented", "ü é ß"]
    shakespeare = SHARED / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():
        texts += shakespeare.read_text(encoding="utf-8")[:60000].split("\n\n")
    c4 = SHARED / "c4_en_minimal" / "derived_jsonl" / "validation.jsonl"
    if c4.exists():
        texts += [json.loads(line)["text"] for line in c4.open(encoding="utf-8")][:100]
    return texts


def _shared_tokenizer(name: str) -> Path:
    d = SHARED / "tokenizers" / name
    if not d.exists():
        pytest.skip(f"shared data {d} not available")
    return d


@pytest.mark.shared_data
def test_llama3_tiktoken_file_equals_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from jaxfit.data.text.tokenizer_files import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS

    d = _shared_tokenizer("llama3")
    tok = load_pretrained(str(d))  # a directory holding only tokenizer_llama3.tiktoken
    ranks = load_tiktoken_bpe(str(d / "tokenizer_llama3.tiktoken"))
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)  # fmt: skip
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (128256, 128000, 128001)
    assert tok.encode("Hello world") == ref.encode("Hello world") == [9906, 1917]
    assert tok.hf("Hello world")["input_ids"] == [128000, 9906, 1917]  # BOS added by HF
    texts = _texts_without_specials()
    got = tok.encode_batch(texts)
    assert got == ref.encode_batch(texts, disallowed_special=())
    assert all(tok.decode(ids) == t for ids, t in zip(got, texts))
    for name in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.encode(name) == [specials[name]]  # special in text -> its id
    tok.save(tmp_path / "hf")  # a Hugging Face directory: AutoTokenizer reads it back
    again = load_pretrained(str(tmp_path / "hf"))
    assert again.encode_batch(texts[:50]) == got[:50] and again.chat_template == tok.chat_template


@pytest.mark.shared_data
def test_llama2_sentencepiece_model_equals_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    d = _shared_tokenizer("llama2")
    tok = load_pretrained(str(d / "tokenizer.model"))  # the file itself works too
    ref = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (32000, 1, 2)
    assert tok.encode("Hello world") == ref.encode("Hello world") == [15043, 3186]
    texts = _texts_without_specials()
    got = tok.encode_batch(texts)
    assert got == ref.encode(texts)
    assert [tok.decode(ids) for ids in got] == ref.decode(got)
    assert "[INST]" in tok.chat_template

"""Llama tokenizers from Meta's own files, as HF fast tokenizers (no Hub download).

Meta ships Llama 3 as a tiktoken BPE file (``tokenizer.model`` / ``*.tiktoken``: one
``base64(token) rank`` per line, 128,000 entries; the 256 special tokens are added in code)
and Llama 2 as a SentencePiece model (``tokenizer.model``, 32,000 pieces). A directory
holding only such a file is turned here into a ``transformers.PreTrainedTokenizerFast``
with the ids, special tokens and chat format of Meta's reference code:

* Llama 3 (meta-llama/llama3 ``tokenizer.py``): the tiktoken split regex, byte-level BPE
  over the ranks (``transformers.convert_slow_tokenizer.TikTokenConverter``), special
  tokens at ids 128000..128255 (``<|begin_of_text|>`` = 128000 is BOS,
  ``<|end_of_text|>`` = 128001 EOS, ``<|start_header_id|>`` 128006, ``<|end_header_id|>``
  128007, ``<|eot_id|>`` 128009, the rest ``<|reserved_special_token_N|>``), and the
  Llama 3 Instruct chat template (:data:`LLAMA3_CHAT_TEMPLATE`).
* Llama 2 (SentencePiece BPE with byte fallback): the vocabulary and scores of the model,
  merges recovered from the scores as ``transformers``' ``SentencePieceExtractor`` does,
  the "legacy" Llama normaliser (prepend ``▁``, spaces to ``▁``), ``<unk>`` 0, ``<s>`` 1
  (BOS), ``</s>`` 2 (EOS), and the Llama 2 chat template (:data:`LLAMA2_CHAT_TEMPLATE`).

Both need the optional packages ``tiktoken`` (Llama 3) and ``sentencepiece`` (Llama 2),
imported only here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template" (meta-llama/llama3
# ChatFormat: header, two newlines, stripped content, <|eot_id|>; BOS before the first).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Llama-2-7b-chat-hf tokenizer_config.json "chat_template" ([INST] ... [/INST] answer </s>).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# meta-llama/llama3 tokenizer.py
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL - 5)]
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?$")


def tokenizer_file(path: str | os.PathLike) -> tuple[str, Path] | None:
    """``("tiktoken" | "sentencepiece", file)`` when ``path`` is such a file, or a directory
    with one and no ``tokenizer.json`` / ``tokenizer_config.json`` (which ``transformers``
    loads itself); else None. The kind is read from the content (Meta's Llama 3
    ``tokenizer.model`` is a tiktoken file, Llama 2's a SentencePiece protobuf)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return None
        found = sorted(path.glob("*.tiktoken")) + [path / "tokenizer.model"]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            return None
    elif not path.is_file() or path.suffix not in (".model", ".tiktoken"):
        return None
    with open(path, "rb") as f:
        first = f.readline(256)
    return ("tiktoken" if _TIKTOKEN_LINE.match(first) else "sentencepiece"), path


def _prepend_bos(bos: str, bos_id: int):
    """A post-processor adding BOS, as Meta's tokenizers do with ``bos=True``."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def from_tiktoken(path: str | os.PathLike):
    """Llama 3's tokenizer from its tiktoken ranks file (see the module docstring).

    Raises:
      ImportError: ``tiktoken`` is not installed.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(
        vocab_file=str(path), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    bos, eos = LLAMA3_SPECIAL_TOKENS[0], LLAMA3_SPECIAL_TOKENS[1]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            _prepend_bos(bos, tok.token_to_id(bos)),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=True,
        model_max_length=8192,
    )


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score, highest first (ties by id), then by the
    ids of the parts (as ``transformers.convert_slow_tokenizer.SentencePieceExtractor``).
    Llama 2's whitespace runs (``▁▁`` ...) score -1e9, so they merge last."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(((-scores[piece_id], piece_id), m) for m in local)
    merges.sort(key=lambda m: m[0])
    return [m for _, m in merges]


def from_sentencepiece(path: str | os.PathLike):
    """Llama 2's tokenizer from its SentencePiece model (see the module docstring).

    Raises:
      ImportError: ``sentencepiece`` is not installed.
      ValueError: the model is not a BPE model.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    byte_ids = [i for i in range(len(pieces)) if sp.is_byte(i)]
    scores = [sp.get_score(i) for i in range(len(pieces))]
    vocab = {p: i for i, p in enumerate(pieces)}
    merge_vocab = {p: i for p, i in vocab.items() if i not in special and i not in byte_ids}
    unk, bos, eos = (pieces[sp.unk_id()], pieces[sp.bos_id()], pieces[sp.eos_id()])
    tok = Tokenizer(
        models.BPE(
            vocab,
            _sentencepiece_merges(merge_vocab, scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    tok.post_processor = _prepend_bos(bos, sp.bos_id())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        chat_template=LLAMA2_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def load_tokenizer_file(path: str | os.PathLike):
    """The HF fast tokenizer of a Llama tokenizer file or directory, or None when
    ``path`` is neither (:func:`tokenizer_file`)."""
    found = tokenizer_file(path)
    if found is None:
        return None
    kind, file = found
    return from_tiktoken(file) if kind == "tiktoken" else from_sentencepiece(file)

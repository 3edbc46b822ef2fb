"""Tokenizers for causal language models: a pretrained HF tokenizer, or a byte-level BPE
trained on the training text (as nanoGPT/nanochat do for from-scratch runs).

:class:`TextTokenizer` wraps a ``transformers`` fast tokenizer and exposes what the data
pipeline needs: ``eos_token_id``, ``bos_token_id`` (``None`` when the tokenizer has none),
``vocab_size``, ``encode_batch`` (batched, in Rust, *no* special tokens added) and
``decode``. Special-token strings that occur in the text (e.g. a literal
``<|endoftext|>``) are matched as the special token, as ``transformers`` does.

:func:`load_or_train` is the entry point: ``cfg.name`` set -> load that tokenizer (local
directory or Hub name, ``transformers.AutoTokenizer``); otherwise reuse
``<workdir>/tokenizer/`` when present (so a resumed run tokenizes identically), or train a
byte-level BPE of ``cfg.vocab_size`` entries with one special token ``<|endoftext|>``
(EOS, and BOS for the HF metadata) and save it there (``tokenizer.json``, loadable by
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``, plus
``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(dir)`` works too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxfit.data import bpe
from jaxfit.data.text import tokenizer_files

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_DIR = "tokenizer"
_TRAIN_META = "jaxfit_tokenizer_train.json"
# Tried in order when a tokenizer declares no EOS token (e.g. a bare GPT-2 tokenizer.json).
_EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<|end_of_text|>", "<eos>")


def default_tokenizer_config() -> ml_collections.ConfigDict:
    """Tokenizer fields (``cfg.data.tokenizer`` in an LM recipe)."""
    c = ml_collections.ConfigDict()
    # Pretrained tokenizer: local directory or Hub name (usually the model's). "" = train one.
    c.name = ""
    # Byte-level BPE training (name == ""): target vocabulary size incl. <|endoftext|>
    # (the result may be smaller on a tiny corpus), minimum pair count for a merge, and a
    # cap on training characters (0 = all training text).
    c.vocab_size = 8192
    c.min_frequency = 2
    c.train_max_chars = 0
    # Override the special tokens the tokenizer declares ("" = keep its own).
    c.eos_token = ""
    c.bos_token = ""
    return c


class TextTokenizer:
    """A fast HF tokenizer with the ids the LM data pipeline needs.

    Attributes:
      hf: the wrapped ``transformers`` tokenizer.
      eos_token_id: int, appended after every document.
      bos_token_id: int or None.
      vocab_size: number of ids, ``len(hf)`` (base vocabulary + added tokens); every id
        produced is ``< vocab_size``.
      source: where it came from (path or name), for messages.

    Raises:
      ValueError (constructor): no EOS token can be determined; set ``eos_token``.
    """

    def __init__(self, hf: Any, *, eos_token: str = "", bos_token: str = "", source: str = ""):
        self.hf = hf
        self.source = source or getattr(hf, "name_or_path", "")
        self.vocab_size = len(hf)
        self.eos_token_id = self._special_id(eos_token or hf.eos_token, _EOS_CANDIDATES)
        if self.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.source!r} has no EOS token; set tokenizer.eos_token to one "
                "of its tokens"
            )
        self.bos_token_id = self._special_id(bos_token or hf.bos_token, ())
        self._backend = getattr(hf, "backend_tokenizer", None)

    def _special_id(self, token: str | None, fallbacks: Sequence[str]) -> int | None:
        vocab = self.hf.get_vocab()
        for t in ([token] if token else []) + list(fallbacks):
            if t in vocab:
                return int(vocab[t])
            if token and t == token:
                raise ValueError(f"special token {t!r} is not in tokenizer {self.source!r}")
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS or other added special tokens."""
        texts = list(texts)
        if self._backend is None:  # slow (Python) tokenizer
            return self.hf(texts, add_special_tokens=False)["input_ids"]
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens added; special-token strings in it are
        the special tokens) and each token's ``(start, end)`` character span in ``text``.

        Raises:
          ValueError: a slow (Python) tokenizer, which has no offsets.
        """
        if self._backend is None:
            raise ValueError(f"tokenizer {self.source!r} is not a fast tokenizer (no offsets)")
        enc = self._backend.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), or None."""
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without special tokens added."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (special tokens kept unless ``skip_special_tokens``)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's definition (its ``tokenizer.json`` without padding and
        truncation settings) and special ids; equal fingerprints give equal token ids."""
        if self._backend is not None:
            spec = json.loads(self._backend.to_str())
            spec.pop("padding", None)
            spec.pop("truncation", None)
        else:
            spec = {"class": type(self.hf).__name__, "vocab": self.hf.get_vocab()}
        spec["jaxfit_special"] = [self.eos_token_id, self.bos_token_id, self.vocab_size]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write the HF tokenizer files to ``out_dir`` (``save_pretrained``)."""
        self.hf.save_pretrained(str(out_dir))

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.source!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token_id}, bos={self.bos_token_id})"
        )


def load_pretrained(
    name_or_path: str, *, eos_token: str = "", bos_token: str = ""
) -> TextTokenizer:
    """Load a tokenizer with ``transformers.AutoTokenizer`` (fast) from a directory or Hub name.

    A directory holding only ``tokenizer.json`` is loaded with ``PreTrainedTokenizerFast``;
    one holding only Meta's Llama 3 tiktoken file or Llama 2 SentencePiece model (or that
    file itself) is converted by ``text.tokenizer_files`` (Meta's ids, special tokens and
    chat template; needs ``tiktoken`` / ``sentencepiece``).

    Raises:
      OSError: not found locally and not available from the Hub.
      ValueError: no EOS token (see :class:`TextTokenizer`).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif (meta_file := tokenizer_files.load_tokenizer_file(path)) is not None:
        hf = meta_file
    else:
        try:
            hf = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name_or_path)
        except (OSError, ValueError):
            if not (path / "tokenizer.json").is_file():
                raise
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return TextTokenizer(hf, eos_token=eos_token, bos_token=bos_token, source=str(name_or_path))


def _load_trained(out_dir: Path) -> TextTokenizer:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"), eos_token=ENDOFTEXT, bos_token=ENDOFTEXT
    )
    return TextTokenizer(hf, source=str(out_dir))


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    total = 0
    for t in texts:
        if max_chars and total + len(t) > max_chars:
            if max_chars - total > 0:
                yield t[: max_chars - total]
            return
        total += len(t)
        yield t


def train_text_bpe(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    max_chars: int = 0,
) -> TextTokenizer:
    """Train a byte-level BPE (``data.bpe.train_bpe``: GPT-2 pre-tokenizer regex, no prefix
    space, no normalisation, 256 byte symbols, one special token ``<|endoftext|>`` = id 0)
    on ``texts`` (the first ``max_chars`` characters when > 0) and save it to ``out_dir``
    atomically (``data.bpe.atomic_directory``).

    Every byte is in the initial alphabet, so any text encodes and ``decode(encode(t)) == t``.

    Returns the tokenizer as reloaded from ``out_dir`` (EOS = BOS = ``<|endoftext|>``).

    Raises:
      ValueError: ``vocab_size`` < 257 (256 bytes + the special token).
      FileExistsError: ``out_dir`` is not empty.
    """
    from transformers import PreTrainedTokenizerFast

    tok = bpe.train_bpe(
        _capped(texts, max_chars),
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        min_frequency=min_frequency,
    )
    with bpe.atomic_directory(out_dir) as tmp:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, bos_token=ENDOFTEXT)
        hf.save_pretrained(str(tmp))  # tokenizer_config.json for AutoTokenizer / exports
        tok.save(str(tmp / "tokenizer.json"))  # keep the tokenizers-native file
        meta = {"vocab_size": vocab_size, "min_frequency": min_frequency, "max_chars": max_chars}
        (tmp / _TRAIN_META).write_text(json.dumps(meta, indent=2))
    trained = _load_trained(Path(out_dir))
    logger.info("trained byte-level BPE with %d tokens -> %s", trained.vocab_size, out_dir)
    return trained


def load_or_train(
    cfg: Any,
    workdir: str | os.PathLike,
    texts: Callable[[], Iterable[str]] | None = None,
) -> TextTokenizer:
    """The run's tokenizer: pretrained (``cfg.name``), reused from the workdir, or trained.

    Args:
      cfg: tokenizer config (:func:`default_tokenizer_config` fields).
      workdir: run directory; a trained tokenizer lives in ``<workdir>/tokenizer/``.
      texts: called (only when training is needed) to get the training texts.

    Raises:
      ValueError: a saved tokenizer was trained with a different ``vocab_size`` /
        ``min_frequency`` than ``cfg`` asks (use a fresh workdir or delete it), or
        training is needed and ``texts`` is None.
    """
    if cfg.name:
        return load_pretrained(cfg.name, eos_token=cfg.eos_token, bos_token=cfg.bos_token)
    out_dir = Path(workdir) / TOKENIZER_DIR
    if (out_dir / "tokenizer.json").is_file():
        meta_path = out_dir / _TRAIN_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            for k in ("vocab_size", "min_frequency"):
                if meta.get(k) != cfg[k]:
                    raise ValueError(
                        f"tokenizer in {out_dir} was trained with {k}={meta.get(k)}, config asks "
                        f"{cfg[k]}; delete that directory or use a new workdir"
                    )
        logger.info("reusing tokenizer %s", out_dir)
        return _load_trained(out_dir)
    if texts is None:
        raise ValueError(f"no tokenizer in {out_dir} and no training texts to train one")
    return train_text_bpe(
        texts(),
        out_dir,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        max_chars=cfg.train_max_chars,
    )

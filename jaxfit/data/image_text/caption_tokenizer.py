"""Caption tokenization for CLIP: fixed-length int32 ids with BOS ... EOS, then padding.

``CaptionTokenizer`` wraps a Hugging Face fast tokenizer (the Rust ``tokenizers`` backend)
and does truncation and padding itself, the way openai/CLIP's ``clip.tokenize(...,
truncate=True)`` does: ``[BOS] + ids[: L - 2] + [EOS]`` then ``pad_token_id`` up to the
context length ``L``. The EOS token is therefore always the last real token, at position
``attention_mask.sum(-1) - 1``, which is where CLIP's text tower pools.

Three ways to get one:

* ``CaptionTokenizer.from_pretrained(path_or_name)``: any HF tokenizer directory or Hub name
  with BOS and EOS tokens (``openai/clip-vit-base-patch32``: BOS 49406, EOS = PAD 49407).
* ``clip_tokenizer_from_bpe(bpe_path)``: the OpenAI CLIP tokenizer built offline from
  ``bpe_simple_vocab_16e6.txt.gz``, exactly as openai/CLIP ``simple_tokenizer.py`` builds
  its 49,408-token vocabulary.
* ``train_caption_bpe(captions, vocab_size, save_dir)`` / ``load_or_train_caption_bpe(...)``:
  a byte-level BPE trained on the (lowercased) training captions and saved in the workdir,
  so a resumed run reloads the same tokenizer from disk.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, normalizers, processors

from jaxfit.data import bpe

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META_FILE = "jaxfit_tokenizer.json"  # context_length (+ training settings), next to tokenizer.json
DEFAULT_CONTEXT_LENGTH = 77  # openai/CLIP text context length


@dataclasses.dataclass(frozen=True)
class TokenizerShape:
    """What a CLIP text config needs of a caption tokenizer, without one (planning builds
    the model before any tokenizer is trained). The special ids are placeholders."""

    vocab_size: int
    context_length: int
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 1


class CaptionTokenizer:
    """Fixed-length caption encoder over an HF tokenizer.

    Attributes:
      context_length: L, tokens per caption including BOS and EOS (>= 2).
      bos_token_id, eos_token_id, pad_token_id: special ids (pad = eos when the HF
        tokenizer has no pad token, as in CLIP).
      vocab_size: number of ids, special tokens included (``len(hf_tokenizer)``).

    ``encode`` is safe to call from one thread at a time per instance; the pipeline calls
    it from its single batching thread.
    """

    def __init__(self, hf_tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS + EOS), got {context_length}")
        if hf_tokenizer.bos_token_id is None or hf_tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {type(hf_tokenizer).__name__} lacks a BOS or EOS token "
                f"(bos={hf_tokenizer.bos_token!r}, eos={hf_tokenizer.eos_token!r})"
            )
        self.hf_tokenizer = hf_tokenizer
        self.context_length = int(context_length)
        self.bos_token_id = int(hf_tokenizer.bos_token_id)
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = int(self.eos_token_id if pad is None else pad)
        self.vocab_size = len(hf_tokenizer)
        # A private copy of the Rust tokenizer: no truncation/padding state shared with the
        # HF object, and special-token strings inside captions are encoded as plain text
        # (a caption containing "<|endoftext|>" cannot end itself early).
        self._backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = True

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize captions to ``[BOS] + ids[:L-2] + [EOS] + [PAD] * rest``.

        Args:
          captions: n strings.

        Returns:
          ``(input_ids, attention_mask)``, both int32 ``[n, L]``; the mask is 1 on BOS,
          the text tokens and EOS, 0 on padding.
        """
        n, length = len(captions), self.context_length
        ids = np.full((n, length), self.pad_token_id, np.int32)
        mask = np.zeros((n, length), np.int32)
        if n == 0:
            return ids, mask
        encodings = self._backend.encode_batch(list(captions), add_special_tokens=False)
        for i, enc in enumerate(encodings):
            row = [self.bos_token_id, *enc.ids[: length - 2], self.eos_token_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids) -> str:
        """Text of one id sequence, special tokens and padding dropped."""
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the HF tokenizer files and ``jaxfit_tokenizer.json`` (context length)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save_pretrained(str(directory))
        meta = _read_meta(directory)
        meta["context_length"] = self.context_length
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | os.PathLike, context_length: int | None = None
    ) -> CaptionTokenizer:
        """Load with ``transformers.AutoTokenizer`` from a directory or Hub name.

        Args:
          path_or_name: a local directory (``tokenizer.json`` or vocab/merges files) or a
            Hub repository such as ``openai/clip-vit-base-patch32``.
          context_length: L; ``None`` takes ``jaxfit_tokenizer.json`` if the directory has
            one, else the tokenizer's ``model_max_length`` if below 100,000, else 77.

        Raises:
          FileNotFoundError: a local-looking path that does not exist, or an unknown name.
          ValueError: the tokenizer has no BOS or EOS token.
        """
        from transformers import AutoTokenizer

        p = Path(path_or_name).expanduser()
        if not p.is_dir() and (p.exists() or str(path_or_name).startswith((".", "/", "~"))):
            raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(str(p) if p.is_dir() else str(path_or_name))
        except OSError as e:
            raise FileNotFoundError(
                f"cannot load a tokenizer from {str(path_or_name)!r}: {e}"
            ) from e
        if context_length is None:
            meta = _read_meta(p) if p.is_dir() else {}
            context_length = meta.get("context_length")
            if context_length is None:
                mml = getattr(hf, "model_max_length", None) or 0
                context_length = int(mml) if 0 < mml < 100_000 else DEFAULT_CONTEXT_LENGTH
        return cls(hf, context_length)


def _read_meta(directory: Path) -> dict:
    f = Path(directory) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer_from_bpe(
    bpe_path: str | os.PathLike,
    save_dir: str | os.PathLike | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> CaptionTokenizer:
    """The OpenAI CLIP tokenizer from its merges file, without the Hub.

    Builds the vocabulary as openai/CLIP ``simple_tokenizer.py`` does: the 256 byte
    symbols, the same with ``</w>``, one token per merge of lines ``1 .. 48894`` of
    ``bpe_simple_vocab_16e6.txt.gz`` (``49152 - 256 - 2`` merges), then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids. The tokenizer
    is ``transformers.CLIPTokenizer`` (pad = EOS, as in HF's CLIP checkpoints).

    Args:
      bpe_path: the gzipped merges file.
      save_dir: if given, the HF tokenizer files are written there.
      context_length: L.

    Raises:
      FileNotFoundError: ``bpe_path`` does not exist.
    """
    from transformers import CLIPTokenizer

    if not Path(bpe_path).is_file():
        raise FileNotFoundError(f"CLIP BPE merges file {str(bpe_path)!r} does not exist")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    hf = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=context_length,
    )
    tok = CaptionTokenizer(hf, context_length)
    if save_dir is not None:
        tok.save(save_dir)
    return tok


def train_caption_bpe(
    captions: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    min_frequency: int = 2,
) -> CaptionTokenizer:
    """Train a byte-level BPE on captions (``data.bpe.train_bpe``) and save it in ``save_dir``.

    Text is NFC-normalised, whitespace-collapsed, stripped and lowercased (as CLIP's
    tokenizer does); pre-tokenization is GPT-2's byte-level split with a prefix space.
    Ids 0, 1, 2 are ``<|startoftext|>``, ``<|endoftext|>``, ``<|pad|>``; the 256 byte
    symbols are always in the vocabulary, so every string is encodable.

    The directory is written atomically (``data.bpe.atomic_directory``), so a crash never
    leaves a half-written tokenizer for ``load_or_train_caption_bpe`` to pick up.

    Args:
      captions: training captions (iterated once).
      vocab_size: target size incl. the 3 special tokens and 256 bytes (>= 259); smaller if
        the corpus has fewer merges.
      save_dir: output directory (must not exist yet or be empty).
      context_length: L stored with the tokenizer.
      min_frequency: minimum pair count for a merge.

    Raises:
      ValueError: ``vocab_size < 259``.
      FileExistsError: ``save_dir`` is not empty.
    """
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tok = bpe.train_bpe(
        captions,
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        min_frequency=min_frequency,
        normalizer=normalizer,
        add_prefix_space=True,
    )
    # So that the saved tokenizer, used directly through transformers, also adds BOS/EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[
            (BOS_TOKEN, tok.token_to_id(BOS_TOKEN)),
            (EOS_TOKEN, tok.token_to_id(EOS_TOKEN)),
        ],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=context_length,
    )
    out = CaptionTokenizer(hf, context_length)
    with bpe.atomic_directory(save_dir) as tmp:
        out.save(tmp)
        meta = _read_meta(tmp) | {"trained_vocab_size": vocab_size, "min_frequency": min_frequency}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("trained a %d-token byte-level BPE; saved in %s", out.vocab_size, save_dir)
    return out


def load_or_train_caption_bpe(
    save_dir: str | os.PathLike,
    captions: Iterable[str] | Callable[[], Iterable[str]],
    *,
    vocab_size: int,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> CaptionTokenizer:
    """Reload the tokenizer saved in ``save_dir``, or train one there (``train_caption_bpe``).

    ``captions`` may be a zero-argument callable, called only when training is needed.

    Raises:
      ValueError: the saved tokenizer was trained with another ``vocab_size`` or has
        another context length (a resumed run would otherwise silently change its ids).
    """
    save_dir = Path(save_dir)
    if (save_dir / "tokenizer.json").is_file():
        meta = _read_meta(save_dir)
        saved = (meta.get("trained_vocab_size"), meta.get("context_length"))
        if saved != (vocab_size, context_length):
            raise ValueError(
                f"tokenizer in {str(save_dir)!r} was trained with (vocab_size, context_length)="
                f"{saved}, but {(vocab_size, context_length)} was asked for; delete the "
                "directory to retrain"
            )
        logger.info("reusing the tokenizer saved in %s", save_dir)
        return CaptionTokenizer.from_pretrained(save_dir, context_length)
    texts = captions() if callable(captions) else captions
    return train_caption_bpe(texts, vocab_size, save_dir, context_length=context_length)


def tokenizer_from_config(
    data_cfg, save_dir: str | os.PathLike, captions: Callable[[], Iterable[str]]
) -> CaptionTokenizer:
    """Tokenizer for a run: ``data.tokenizer`` if set, else ``load_or_train_caption_bpe``.

    Reads ``data.tokenizer`` (HF dir / Hub name, or ""), ``data.vocab_size`` and
    ``data.context_length``. ``save_dir`` should be inside the run's workdir.
    """
    if data_cfg.tokenizer:
        return CaptionTokenizer.from_pretrained(data_cfg.tokenizer, data_cfg.context_length)
    return load_or_train_caption_bpe(
        save_dir, captions, vocab_size=data_cfg.vocab_size, context_length=data_cfg.context_length
    )

"""A model ready to sample from: a jaxfit workdir as trained, or a Hugging Face model.

:func:`load_model_and_tokenizer` is what ``python -m jaxfit.generate`` and
``python -m jaxfit.evaluate_code`` load. It composes three floors, so it sits above them:
the trainer (a workdir's checkpoint, task and tokenizer), ``hf`` (an HF directory or Hub
name and its tokenizer, :func:`jaxfit.hf.load_model_and_tokenizer`, quantised while
loading with any registered format) and ``lora`` (a PEFT adapter over the HF model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxfit import hf, lora, trainer


def is_workdir(path: str | Path) -> bool:
    """True when ``path`` holds a jaxfit run's ``config.json`` (one with a ``task``)."""
    saved = Path(path) / "config.json"
    return saved.is_file() and "task" in json.loads(saved.read_text())


def load_model_and_tokenizer(
    path: str | Path, *, quantize: str | None = None, adapter: str = ""
) -> tuple[Any, Any, Callable[[str], list[int]], Callable[[list[int]], str], int | None]:
    """``(model, params, encode, decode, eos_token_id)`` for a workdir or an HF model.

    A workdir is sampled as trained (its LoRA adapters over its frozen, possibly
    quantised, base; :func:`jaxfit.trainer.restore_params`; ``quantize`` and ``adapter``
    do not apply to it). For an HF model,
    ``quantize`` (a registered format, :func:`jaxfit.quant.names`) quantises the weights
    while loading; without it the weights load as stored (a bitsandbytes 4-bit checkpoint
    as NF4); ``adapter`` applies a PEFT LoRA directory (:func:`jaxfit.lora.load_peft`).
    ``encode`` maps text to token ids, ``decode`` ids to text (special tokens kept).

    Raises:
      FileNotFoundError: neither a jaxfit workdir with a checkpoint nor an HF model.
      ValueError: as :func:`jaxfit.hf.load_pretrained` / :func:`jaxfit.lora.load_peft`.
    """
    if is_workdir(path):
        _, task, params, _ = trainer.restore_params(Path(path))
        tok = task.tokenizer
        params = task.full_params(params, task.frozen)
        return task.model, params, tok.encode, tok.decode, tok.eos_token_id
    model, params, tok = hf.load_model_and_tokenizer(str(path), quantize=quantize)
    if adapter:
        params = lora.load_peft(params, model, adapter)
    return (
        model,
        params,
        lambda s: tok(s)["input_ids"],
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        tok.eos_token_id,
    )

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
from typing import Any, NamedTuple

from jaxfit import hf, lora, trainer


def is_workdir(path: str | Path) -> bool:
    """True when ``path`` holds a jaxfit run's ``config.json`` (one with a ``task``)."""
    saved = Path(path) / "config.json"
    return saved.is_file() and "task" in json.loads(saved.read_text())


class Loaded(NamedTuple):
    """What :func:`load_model_and_tokenizer` returns (unpacks as a tuple).

    Attributes:
      model, params: the linen module and its full parameter tree.
      encode: text -> token ids; decode: ids -> text (special tokens kept).
      eos_token_id: the end-of-sequence id, or None.
      render_chat: ``(messages, generation_prompt=True) -> token ids``: the conversation
        rendered (with the assistant's header after it) by the run's
        ``data.chat_template`` or the tokenizer's own template
        (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``), then
        tokenized with no special tokens added (the template writes them); ``ValueError``
        when there is no template.
    """

    model: Any
    params: Any
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_token_id: int | None
    render_chat: Callable[[list[dict]], list[int]]


def _renderer(hf_tokenizer, template: str, encode, where: str) -> Callable:
    def render(messages: list[dict], generation_prompt: bool = True) -> list[int]:
        if not (template or getattr(hf_tokenizer, "chat_template", None)):
            raise ValueError(f"{where} has no chat template (tokenizer_config.json "
                             "'chat_template', or a run's data.chat_template)")  # fmt: skip
        text = hf_tokenizer.apply_chat_template(
            messages,
            chat_template=template or None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return encode(text)

    return render


def load_model_and_tokenizer(
    path: str | Path, *, quantize: str | None = None, adapter: str = ""
) -> Loaded:
    """:class:`Loaded` ``(model, params, encode, decode, eos_token_id, render_chat)`` for a
    workdir or an HF model.

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
        config, task, params, _ = trainer.restore_params(Path(path))
        tok = task.tokenizer
        params = task.full_params(params, task.frozen)
        template = config.get("data", {}).get("chat_template", "") or ""
        render = _renderer(tok.hf, template, tok.encode, f"the run {path}")
        return Loaded(task.model, params, tok.encode, tok.decode, tok.eos_token_id, render)
    model, params, tok = hf.load_model_and_tokenizer(str(path), quantize=quantize)
    if adapter:
        params = lora.load_peft(params, model, adapter)
    return Loaded(
        model,
        params,
        lambda s: tok(s)["input_ids"],
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        tok.eos_token_id,
        _renderer(tok, "", lambda t: tok(t, add_special_tokens=False)["input_ids"], str(path)),
    )

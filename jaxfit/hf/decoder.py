"""What the name maps of the decoder families (GPT-2, Llama, Qwen2) share.

* Config fields that keep their Hugging Face name in jaxfit are copied one to one
  (:func:`read_fields`, :func:`write_fields`); each family lists its own.
* An untied LM head is ``lm_head.weight``, an ``nn.Linear`` (transposed); a tied one is
  not written, and a checkpoint may hold it anyway (families list it in ``IGNORE``).
* ``model.init`` needs one token id (:func:`init_inputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp

from jaxfit.hf.mapping import Rule, linear

TIED_HEAD = "lm_head.weight"


def declared_default(config_class: type, name: str) -> Any:
    """The default a dataclass declares for field ``name`` (not the value ``__post_init__``
    may derive from other fields)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def read_fields(hf: dict, config_class: type, fields: Iterable[str]) -> dict[str, Any]:
    """Keyword arguments of ``config_class`` from an HF ``config.json`` dict.

    A field absent from ``hf`` takes its declared default (:func:`declared_default`): a
    config without ``head_dim`` gets ``None``, i.e. ``hidden_size // num_attention_heads``
    of *its* sizes, not that of the default sizes.
    """
    return {name: hf.get(name, declared_default(config_class, name)) for name in fields}


def write_fields(config: Any, fields: Iterable[str], **extra) -> dict[str, Any]:
    """``{field: value}`` of ``config`` for ``config.json`` (tuples as lists), plus ``extra``."""
    out = {}
    for name in fields:
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return {**out, **extra}


def head_rules(config: Any) -> list[Rule]:
    """The untied LM head's rule (none when ``config.tie_word_embeddings``)."""
    if config.tie_word_embeddings:
        return []
    return [Rule(TIED_HEAD, ("lm_head", "kernel"), linear)]


def init_inputs(config: Any) -> dict:
    """Keyword inputs for ``model.init``: one token."""
    return {"input_ids": jnp.zeros((1, 1), jnp.int32)}

"""Checks of a config's values before any data, tokenizer or model work.

:func:`validate_values` is what ``jaxfit.train`` runs first (through
:func:`jaxfit.trainer.train`): types and ranges, cross-field rules that need a model
family's facts (:mod:`jaxfit.hf.families`) or the optimizers (:mod:`jaxfit.optim`), and
``init_from``. It sits above :mod:`jaxfit.config`, which stays a loader at the bottom of
the package.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import ml_collections

from jaxfit import config as config_lib
from jaxfit import tasks
from jaxfit.config import get_field
from jaxfit.hf import families
from jaxfit.optim import OPTIMIZERS

log = logging.getLogger(__name__)


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """:func:`jaxfit.config.load_config` followed by :func:`validate_values`: the config
    a CLI would run, or :class:`~jaxfit.config.ConfigError` naming the bad value."""
    config = config_lib.load_config(spec, overrides)
    validate_values(config)
    return config


_bad = config_lib.invalid


def _number(
    config,
    key: str,
    *,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    integer=False,
    optional=False,
) -> None:
    """Check ``key`` (when the config has it) is a number in the given range."""
    value = get_field(config, key, _MISSING)
    if value is _MISSING or (optional and value is None):
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise _bad(key, value, f"must be {kind}")
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    if (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        raise _bad(key, value, f"must be {kind} {' and '.join(x for x in (lo, hi) if x)}")


_MISSING = object()
# Bare Hub names of the canonical checkpoints that predate "org/name" (still served).
LEGACY_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def validate_values(config: ml_collections.ConfigDict) -> None:
    """Check the config's values before any data, tokenizer or model work.

    Types and ranges (steps, intervals and batch sizes positive integers, ``optim.lr > 0``,
    Adam's betas in [0, 1), ...), cross-field rules (heads dividing the width, KV heads
    dividing the heads, patches dividing the image, ``seq_len`` within the model's
    positions when the config or a local ``init_from`` tells them, a known model family and
    optimizer) and ``init_from`` (an existing local directory with a ``config.json``, or a
    Hub name ``org/name``; decided without touching the Hub). Fields a config lacks are
    not checked.

    A warmup as long as the run or longer is clamped to ``total_steps - 1`` with a warning
    (as Hugging Face's Trainer tolerates it), so shortened recipes run. That is the one
    change made to ``config``.

    Raises:
      ConfigError: naming the key, its value and what is allowed.
    """
    for key in (
        "total_steps",
        "log_every",
        "eval_every",
        "ckpt_every",
        "keep_checkpoints",
        "batch_size",
        "micro_batch_size",
        "seq_len",
        "eval.batch_size",
    ):
        _number(config, key, low=1, integer=True)
    for key in (
        "seed",
        "optim.warmup_steps",
        "loss_chunk_size",
        "eval.max_batches",
        "eval.max_images",
    ):
        _number(config, key, low=0, integer=True)
    _number(config, "optim.lr", low=0, low_open=True)
    _number(config, "optim.b1", low=0, high=1, high_open=True)
    _number(config, "optim.b2", low=0, high=1, high_open=True)
    _number(config, "optim.eps", low=0, low_open=True)
    _number(config, "optim.weight_decay", low=0)
    _number(config, "optim.min_lr_ratio", low=0, high=1)
    _number(config, "optim.grad_clip_norm", low=0, optional=True)
    _number(config, "data.val_fraction", low=0, high=1, high_open=True)
    if get_field(config, "optim.name") is not None and config.optim.name not in OPTIMIZERS:
        raise _bad("optim.name", config.optim.name, f"expected one of {sorted(OPTIMIZERS)}")
    if get_field(config, "lora") is not None:  # checked whether or not LoRA is on
        _number(config, "lora.rank", low=1, integer=True)
        _number(config, "lora.alpha", low=0, low_open=True)
        _number(config, "lora.dropout", low=0, high=1, high_open=True)
    if not get_field(config, "init_from"):
        _validate_model_shape(config)
    else:
        _validate_init_from(config)
    warmup, total = get_field(config, "optim.warmup_steps"), get_field(config, "total_steps")
    if warmup is not None and total is not None and warmup >= total:
        config.optim.warmup_steps = max(total - 1, 0)
        log.warning(
            "optim.warmup_steps=%d is not shorter than total_steps=%d: clamped to %d (the "
            "learning rate peaks at the last step)",
            warmup,
            total,
            config.optim.warmup_steps,
        )


# (width, heads) field-name pairs of the model configs (GPT-2, Llama-likes, CLIP towers)
_WIDTH_HEADS = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"))


def _validate_model_shape(config) -> None:
    """Cross-field rules of a from-scratch ``config.model``: the shared ones here, then the
    task's (``jaxfit.tasks.TaskEntry.validate``).

    Raises:
      ConfigError: naming the key; an unknown ``config.task``.
    """
    model = get_field(config, "model")
    if model is None:
        return
    for part in ("config", "text", "vision"):
        node = model.get(part)
        if node is None:
            continue
        where = f"model.{part}"
        for width, heads in _WIDTH_HEADS:
            w, h = node.get(width), node.get(heads)
            if isinstance(w, int) and isinstance(h, int) and (h <= 0 or w % h):
                raise _bad(f"{where}.{heads}", h, f"must divide {where}.{width}={w}")
        h, kv = node.get("num_attention_heads"), node.get("num_key_value_heads")
        if isinstance(h, int) and isinstance(kv, int) and (kv <= 0 or h % kv):
            raise _bad(
                f"{where}.num_key_value_heads", kv, f"must divide {where}.num_attention_heads={h}"
            )
    tasks.entry(config).validate(config)  # the task's own rules (its families, ...)


def _validate_init_from(config) -> None:
    """``init_from``: a local checkpoint directory, or something that can be a Hub name."""
    value = str(config.init_from)
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _bad("init_from", value, f"the directory has no config.json ({path})")
        try:
            hf_config = json.loads((path / "config.json").read_text())
            family = families.for_model_type(hf_config.get("model_type", ""))
        except ValueError:
            return  # the loader names the problem
        if family.decoder is not None:
            field = family.decoder.max_positions
            config_lib.check_seq_len(
                config, hf_config.get(field), f"{field} (in {path}/config.json)"
            )
        return
    looks_local = value.startswith((".", "/", "~")) or value.endswith("/") or value.count("/") > 1
    if looks_local or not (_HUB_NAME.match(value) or value in LEGACY_HUB_NAMES):
        raise _bad(
            "init_from",
            value,
            "no such local directory, and not a Hugging Face Hub name (org/name, e.g. "
            "openai-community/gpt2)",
        )

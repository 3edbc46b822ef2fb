"""Hugging Face ``qwen2`` checkpoints <-> :class:`jaxfit.models.qwen2.Qwen2ForCausalLM`.

Tensor names are Llama's (``model.layers.{i}.self_attn.q_proj.weight``, ...) plus the
``q_proj``/``k_proj``/``v_proj`` biases, so the family's name map is
:func:`jaxfit.hf.llama.rules` (which adds them for ``qkv_bias=True``) and its ignored
names Llama's (the registry entry, :mod:`jaxfit.hf.families`, says so); this file holds
the config conversion. The config keeps Llama's field names
(:data:`jaxfit.hf.llama.COMMON_FIELDS`; HF's ``Qwen2Config`` has no ``attention_bias`` /
``mlp_bias`` and reads ``head_dim`` only when present) and adds the sliding-window
settings, which jaxfit refuses when on (``use_sliding_window``, see
:mod:`jaxfit.models.qwen2`).
"""

from __future__ import annotations

from jaxfit.hf import llama
from jaxfit.models.qwen2 import Qwen2Config

_FIELDS = (*llama.COMMON_FIELDS, "use_sliding_window")


def config_from_hf(hf: dict) -> Qwen2Config:
    """``Qwen2Config`` from an HF ``config.json`` dict.

    Raises:
      ValueError: ``use_sliding_window: true`` (the message names the field), or what
        :func:`jaxfit.hf.llama.read_config` rejects.
    """
    return llama.read_config(hf, Qwen2Config, _FIELDS)


def config_to_hf(config: Qwen2Config) -> dict:
    """An HF ``config.json`` dict that ``transformers.Qwen2ForCausalLM`` loads (every layer
    full attention: ``sliding_window`` null, ``max_window_layers`` = the layer count)."""
    return llama.write_config(
        config,
        _FIELDS,
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        sliding_window=None,
        max_window_layers=config.num_hidden_layers,
        layer_types=["full_attention"] * config.num_hidden_layers,
    )

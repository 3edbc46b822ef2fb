"""Hugging Face ``llama`` checkpoints <-> :class:`jaxfit.models.llama.LlamaForCausalLM`.

Every projection is an ``nn.Linear`` (``weight [out, in]``, transposed to ``kernel``).
RoPE settings are read from ``rope_parameters`` (transformers 5.x) or ``rope_theta`` +
``rope_scaling`` (4.x) and written in both spellings. A tied checkpoint exports no
``lm_head.weight`` and may hold one on import (ignored); ``rotary_emb.inv_freq`` buffers
of old checkpoints are ignored. The Llama-like families (Qwen2: :mod:`jaxfit.hf.qwen2`)
reuse :func:`read_config`, :func:`write_config` and :func:`rules`.
"""

from __future__ import annotations

from typing import Any

from jaxfit.hf import decoder
from jaxfit.hf.mapping import IDENTITY, Rule, linear
from jaxfit.models import rope
from jaxfit.models.llama import LlamaConfig

IGNORE = ("rotary_emb.inv_freq", decoder.TIED_HEAD)

# Fields with the same name and meaning in HF's config of every Llama-like family.
COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_FIELDS = (*COMMON_FIELDS, "attention_bias", "mlp_bias")


def read_config(hf: dict, config_class: type[LlamaConfig], fields: tuple[str, ...]) -> Any:
    """A ``config_class`` (``LlamaConfig`` or a subclass) from an HF ``config.json`` dict:
    ``fields`` copied, RoPE settings converted.

    Raises:
      ValueError: a RoPE type other than default/linear/llama3, a partial rotary factor,
        or what ``config_class`` rejects.
    """
    kwargs = decoder.read_fields(hf, config_class, fields)
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", decoder.declared_default(config_class, "rope_theta"))
    theta = rope_params.get("rope_theta", theta)
    if rope_params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    max_pos = kwargs["max_position_embeddings"]
    scaling = rope.RopeScaling.from_hf(rope_params, max_pos)
    return config_class(**kwargs, rope_theta=float(theta), rope_scaling=scaling)


def write_config(config: LlamaConfig, fields: tuple[str, ...], **extra) -> dict:
    """An HF ``config.json`` dict of ``config``: ``fields``, RoPE settings in both the 4.x
    and 5.x spellings, zero dropout, and ``extra`` (``model_type``, ``architectures``...)."""
    scaling = config.rope_scaling.to_hf() if config.rope_scaling else None
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    return decoder.write_fields(
        config,
        fields,
        rope_parameters=rope_parameters,
        rope_theta=config.rope_theta,
        rope_scaling=None if scaling is None else dict(rope_parameters),
        attention_dropout=0.0,
        use_cache=True,
        **extra,
    )


def config_from_hf(hf: dict) -> LlamaConfig:
    """``LlamaConfig`` from an HF ``config.json`` dict (see :func:`read_config`)."""
    return read_config(hf, LlamaConfig, _FIELDS)


def config_to_hf(config: LlamaConfig) -> dict:
    """An HF ``config.json`` dict that ``transformers.LlamaForCausalLM`` loads (4.x and 5.x).

    Raises:
      ValueError: ``config.qkv_bias`` (HF Llama has biases on all of q/k/v/o or none).
    """
    if config.qkv_bias and not config.attention_bias:
        raise ValueError(
            "LlamaConfig(qkv_bias=True) has no transformers Llama equivalent (its "
            "attention_bias covers o_proj too); q/k/v biases alone are Qwen2's (Qwen2Config)"
        )
    return write_config(
        config, _FIELDS, model_type="llama", architectures=["LlamaForCausalLM"], pretraining_tp=1
    )


def rules(config: LlamaConfig) -> list[Rule]:
    """The name map (every ``nn.Linear`` weight transposed; biases as the config says)."""
    n = config.num_hidden_layers
    pre = "model.layers.{i}."
    out = [
        Rule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
        Rule("model.norm.weight", ("norm", "scale")),
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(Rule(pre + norm + ".weight", ("layers", norm, "scale"), IDENTITY, n))
    qkv_bias = config.attention_bias or config.qkv_bias
    projections = [("self_attn", p, qkv_bias) for p in ("q", "k", "v")]
    projections.append(("self_attn", "o", config.attention_bias))
    projections += [("mlp", p, config.mlp_bias) for p in ("gate", "up", "down")]
    for mod, p, bias in projections:
        base = f"{pre}{mod}.{p}_proj."
        path = ("layers", mod, f"{p}_proj")
        out.append(Rule(base + "weight", (*path, "kernel"), linear, n))
        if bias:
            out.append(Rule(base + "bias", (*path, "bias"), IDENTITY, n))
    return out + decoder.head_rules(config)

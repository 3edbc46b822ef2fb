"""Hugging Face ``llama`` checkpoints <-> :class:`jaxfit.models.llama.LlamaForCausalLM`.

Every projection is an ``nn.Linear`` (``weight [out, in]``, transposed to ``kernel``).
RoPE settings are read from ``rope_parameters`` (transformers 5.x) or ``rope_theta`` +
``rope_scaling`` (4.x) and written in both spellings. A tied checkpoint exports no
``lm_head.weight`` and may hold one on import (ignored); ``rotary_emb.inv_freq`` buffers
of old checkpoints are ignored.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxfit.hf.mapping import IDENTITY, Rule, linear
from jaxfit.models import rope
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM

MODEL_TYPES = ("llama",)
MODEL_CLASS = LlamaForCausalLM

IGNORE = ("rotary_emb.inv_freq", "lm_head.weight")

_FIELDS = (
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
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def config_from_hf(hf: dict) -> LlamaConfig:
    """``LlamaConfig`` from an HF ``config.json`` dict.

    Raises:
      ValueError: a RoPE type other than default/linear/llama3, or a partial rotary factor.
    """
    defaults = LlamaConfig()
    kwargs = {f: hf.get(f, getattr(defaults, f)) for f in _FIELDS}
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope_params.get("rope_theta", hf.get("rope_theta", defaults.rope_theta))
    if rope_params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    max_pos = kwargs["max_position_embeddings"]
    scaling = rope.RopeScaling.from_hf(rope_params, max_pos)
    return LlamaConfig(**kwargs, rope_theta=float(theta), rope_scaling=scaling)


def config_to_hf(config: LlamaConfig) -> dict:
    """An HF ``config.json`` dict that ``transformers.LlamaForCausalLM`` loads (4.x and 5.x)."""
    out = {f: getattr(config, f) for f in _FIELDS}
    if isinstance(out["eos_token_id"], tuple):
        out["eos_token_id"] = list(out["eos_token_id"])
    scaling = config.rope_scaling.to_hf() if config.rope_scaling else None
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    out.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_parameters=rope_parameters,
        rope_theta=config.rope_theta,
        rope_scaling=None if scaling is None else dict(rope_parameters),
        attention_dropout=0.0,
        pretraining_tp=1,
        use_cache=True,
    )
    return out


def rules(config: LlamaConfig) -> list[Rule]:
    """The name map (every ``nn.Linear`` weight transposed)."""
    n = config.num_hidden_layers
    pre = "model.layers.{i}."
    out = [
        Rule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
        Rule("model.norm.weight", ("norm", "scale")),
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(Rule(pre + norm + ".weight", ("layers", norm, "scale"), IDENTITY, n))
    projections = [("self_attn", p, config.attention_bias) for p in ("q", "k", "v", "o")]
    projections += [("mlp", p, config.mlp_bias) for p in ("gate", "up", "down")]
    for mod, p, bias in projections:
        base = f"{pre}{mod}.{p}_proj."
        path = ("layers", mod, f"{p}_proj")
        out.append(Rule(base + "weight", (*path, "kernel"), linear, n))
        if bias:
            out.append(Rule(base + "bias", (*path, "bias"), IDENTITY, n))
    if not config.tie_word_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head", "kernel"), linear))
    return out


def init_inputs(config: LlamaConfig) -> dict:
    return {"input_ids": jnp.zeros((1, 1), jnp.int32)}

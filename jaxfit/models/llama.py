"""Llama-style causal language model (Touvron et al. 2023, https://arxiv.org/abs/2302.13971;
Llama 3, https://arxiv.org/abs/2407.21783), numerically equivalent to ``transformers``'
``LlamaForCausalLM`` (``transformers/models/llama/modeling_llama.py``).

Pre-RMSNorm blocks (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467, eq. 4;
normalised in float32 as ``LlamaRMSNorm``), rotary positions (:mod:`jaxfit.models.rope`,
HF ``rotate_half`` layout, optional ``linear``/``llama3`` scaling), grouped-query attention
(Ainslie et al. 2023, https://arxiv.org/abs/2305.13245; query head ``h`` reads KV head
``h // (num_heads / num_kv_heads)`` as HF's ``repeat_kv``), a SwiGLU MLP (Shazeer 2020,
https://arxiv.org/abs/2002.05202, eq. 6: ``down(silu(gate(x)) * up(x))``), a final norm and a
tied or separate LM head.

Parameter tree (per-layer leaves carry a leading ``[num_hidden_layers]`` axis)::

    embed_tokens/embedding [vocab, hidden]
    layers/input_layernorm/scale [hidden]       layers/post_attention_layernorm/scale
    layers/self_attn/{q,k,v,o}_proj/kernel      (+ bias when attention_bias)
    layers/mlp/{gate,up,down}_proj/kernel       (+ bias when mlp_bias)
    norm/scale [hidden]     lm_head/kernel [hidden, vocab]   (only when not tied)

Calls: as :mod:`jaxfit.models.gpt2` (``__call__``, ``hidden_states``, ``logits``,
``decode``, ``init_cache``, ``head_kernel``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxfit.models import kv_cache, layers, rope
from jaxfit.models.decoder import CausalLMMixin

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama architecture (HF ``LlamaConfig`` field names) and jaxfit execution options.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads:
        sizes as in HF.
      num_key_value_heads: KV heads for GQA (``None``: = ``num_attention_heads``).
      head_dim: per-head size (``None``: ``hidden_size // num_attention_heads``).
      hidden_act: MLP gate activation (``silu``).
      max_position_embeddings: the context length the model was trained for (RoPE itself
        does not limit positions).
      rms_norm_eps, initializer_range: as in HF.
      rope_theta: RoPE base.
      rope_scaling: ``None`` or a :class:`jaxfit.models.rope.RopeScaling` (a dict in HF
        form is converted).
      tie_word_embeddings: LM head = ``embed_tokens`` transposed.
      attention_bias, mlp_bias: biases on the attention / MLP projections.
      bos_token_id, eos_token_id (an int or a tuple of ints), pad_token_id: special ids.
      dtype, param_dtype, remat_policy, scan_layers, attention_impl: as ``GPT2Config``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_scaling: rope.RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            set_(
                "rope_scaling",
                rope.RopeScaling.from_hf(self.rope_scaling, self.max_position_embeddings),
            )
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        layers.activation(self.hidden_act)
        layers.remat_policy(self.remat_policy)


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis (``LlamaRMSNorm``).

    The statistics are taken in float32; the normalised value is cast back to the input's
    dtype before the ``scale`` multiply, in HF's order. Returns the input's dtype.
    """

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return jnp.asarray(scale, x.dtype) * y


def _dense(cfg: LlamaConfig, features: int, name: str, use_bias: bool):
    return layers.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE on queries and keys (``LlamaAttention``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos_sin, segment_ids, layer_cache, index):
        cfg = self.config
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = _dense(cfg, nh * hd, "q_proj", bias)(x).reshape(b, s, nh, hd)
        k = _dense(cfg, nkv * hd, "k_proj", bias)(x).reshape(b, s, nkv, hd)
        v = _dense(cfg, nkv * hd, "v_proj", bias)(x).reshape(b, s, nkv, hd)
        cos, sin = cos_sin
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        out, layer_cache = kv_cache.causal_attention(
            q,
            k,
            v,
            layer_cache=layer_cache,
            index=index,
            segment_ids=segment_ids,
            implementation=cfg.attention_impl,
        )
        out = _dense(cfg, cfg.hidden_size, "o_proj", bias)(out.reshape(b, s, nh * hd))
        return out, layer_cache


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (``LlamaMLP``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x)
        up = _dense(cfg, cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x)
        h = layers.activation(cfg.hidden_act)(gate) * up
        return _dense(cfg, cfg.hidden_size, "down_proj", cfg.mlp_bias)(h)


class LlamaBlock(nn.Module):
    """One decoder layer; ``(x, cos_sin, segment_ids, layer_cache, index) -> (x, layer_cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos_sin, segment_ids, layer_cache, index):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x)
        attn, layer_cache = LlamaAttention(cfg, name="self_attn")(
            h, cos_sin, segment_ids, layer_cache, index
        )
        x = x + checkpoint_name(attn, "attn_out")
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x)
        x = x + checkpoint_name(LlamaMLP(cfg, name="mlp")(h), "mlp_out")
        return x, layer_cache


class LlamaForCausalLM(CausalLMMixin, nn.Module):
    """Llama with its LM head; see the module docstring and :mod:`jaxfit.models.gpt2`."""

    EMBEDDING = "embed_tokens"  # token embedding submodule (tied head)
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=init,
        )
        stack = layers.stack_layers(
            LlamaBlock,
            num_layers=cfg.num_hidden_layers,
            remat=cfg.remat_policy,
            scan=cfg.scan_layers,
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        )
        self.layers = stack(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=init,
            )

    def _backbone(self, input_ids, positions, segment_ids, layer_cache, index):
        cfg = self.config
        if positions is None:
            b, s = input_ids.shape
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        inv_freq = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos_sin = rope.cos_sin(positions, inv_freq)
        x = self.embed_tokens(input_ids)
        x, layer_cache = self.layers(x, cos_sin, segment_ids, layer_cache, index)
        return self.norm(x), layer_cache

    def init_cache(self, batch: int, max_len: int) -> kv_cache.KVCache:
        """An empty :class:`~jaxfit.models.kv_cache.KVCache`: ``[layers, batch, max_len,
        num_key_value_heads, head_dim]`` keys/values in the compute dtype."""
        cfg = self.config
        return kv_cache.init_cache(
            num_layers=cfg.num_hidden_layers,
            batch=batch,
            max_len=max_len,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            dtype=cfg.dtype,
        )

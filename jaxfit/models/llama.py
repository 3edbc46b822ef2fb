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
    layers/self_attn/{q,k,v,o}_proj/kernel      (+ bias when attention_bias; q/k/v only: qkv_bias)
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

from jaxfit import placement
from jaxfit.models import kv_cache, layers, rope
from jaxfit.models.decoder import CausalLMMixin, causal_attention, dense, embed

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig(layers.ExecutionConfig):
    """Llama architecture (HF ``LlamaConfig`` field names) over the execution options of
    :class:`jaxfit.models.layers.ExecutionConfig`.

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
      attention_bias, mlp_bias: biases on the attention (q/k/v/o) / MLP projections.
      qkv_bias: biases on q/k/v alone, not o (Qwen2's layout: :mod:`jaxfit.models.qwen2`;
        HF Llama has no such option).
      bos_token_id, eos_token_id (an int or a tuple of ints), pad_token_id: special ids.
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
    qkv_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
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


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE on queries and keys (``LlamaAttention``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos_sin, segment_ids, layer_cache, index):
        cfg = self.config
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias
        q = dense(cfg, nh * hd, "q_proj", use_bias=bias)(x).reshape(b, s, nh, hd)
        k = dense(cfg, nkv * hd, "k_proj", use_bias=bias)(x).reshape(b, s, nkv, hd)
        v = dense(cfg, nkv * hd, "v_proj", use_bias=bias)(x).reshape(b, s, nkv, hd)
        cos, sin = cos_sin
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        out, layer_cache = causal_attention(cfg, q, k, v, segment_ids, layer_cache, index)
        o_proj = dense(cfg, cfg.hidden_size, "o_proj", use_bias=cfg.attention_bias)
        return o_proj(out.reshape(b, s, nh * hd)), layer_cache


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (``LlamaMLP``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bias = cfg.mlp_bias
        gate = dense(cfg, cfg.intermediate_size, "gate_proj", use_bias=bias)(x)
        up = dense(cfg, cfg.intermediate_size, "up_proj", use_bias=bias)(x)
        h = layers.activation(cfg.hidden_act)(gate) * up
        return dense(cfg, cfg.hidden_size, "down_proj", use_bias=bias)(h)


class LlamaBlock(nn.Module):
    """One decoder layer; ``(x, cos_sin, segment_ids, layer_cache, index) -> (x, layer_cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos_sin, segment_ids, layer_cache, index):
        cfg = self.config
        # the residual stream, split over the batch; what remat_policy="offload" moves to the host
        x = checkpoint_name(placement.constrain_batch(x), "layer_input")
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x)
        attn, layer_cache = LlamaAttention(cfg, name="self_attn")(
            h, cos_sin, segment_ids, layer_cache, index
        )
        x = x + checkpoint_name(attn, "attn_out")
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x)
        mlp = layers.sequence_chunked(LlamaMLP(cfg, name="mlp"), h, cfg.mlp_chunk_size)
        x = x + checkpoint_name(mlp, "mlp_out")
        return x, layer_cache


class LlamaForCausalLM(CausalLMMixin, nn.Module):
    """Llama with its LM head; see the module docstring and :mod:`jaxfit.models.gpt2`."""

    EMBEDDING = "embed_tokens"  # token embedding submodule (tied head)
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = embed(cfg, cfg.vocab_size, cfg.hidden_size)
        in_axes = (nn.broadcast, nn.broadcast, 0, nn.broadcast)
        self.layers = self._stack(LlamaBlock, cfg.num_hidden_layers, in_axes)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
        self._setup_head()

    def _backbone(self, input_ids, positions, segment_ids, layer_cache, index):
        cfg = self.config
        positions = self._positions(input_ids, positions)
        inv_freq = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos_sin = rope.cos_sin(positions, inv_freq)
        x = self.embed_tokens(input_ids)
        x, layer_cache = self.layers(x, cos_sin, segment_ids, layer_cache, index)
        return self.norm(x), layer_cache

    def init_cache(self, batch: int, max_len: int, quant: str | None = None) -> kv_cache.KVCache:
        """An empty :class:`~jaxfit.models.kv_cache.KVCache`: ``[layers, batch, max_len,
        num_key_value_heads, head_dim]`` keys/values in the compute dtype, or int8 codes
        and scales with ``quant="int8"``."""
        cfg = self.config
        layers_, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        return self._empty_cache(batch, max_len, layers_, heads, cfg.head_dim, quant)

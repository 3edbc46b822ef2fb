"""GPT-2 causal language model (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"), numerically equivalent to ``transformers``' ``GPT2LMHeadModel``
(``transformers/models/gpt2/modeling_gpt2.py``).

Learned absolute positions, pre-LayerNorm blocks (``x + attn(ln_1(x))``,
``x + mlp(ln_2(x))``), a tanh-approximated GELU MLP of width ``n_inner`` (``4 * n_embd``
by default), a final ``ln_f`` and an LM head tied to the token embedding.

Parameter tree (per-layer leaves carry a leading ``[n_layer]`` axis)::

    wte/embedding [vocab, n_embd]        wpe/embedding [n_positions, n_embd]
    h/ln_1/{scale,bias}  h/attn/c_attn/{kernel [D, 3D], bias}  h/attn/c_proj/{kernel, bias}
    h/ln_2/{scale,bias}  h/mlp/c_fc/{kernel [D, n_inner], bias}  h/mlp/c_proj/{kernel, bias}
    ln_f/{scale,bias}    lm_head/kernel [n_embd, vocab]   (only when not tied)

Calls (all through ``model.apply({"params": p}, ..., method=...)``):

* ``__call__(input_ids, segment_ids=None, positions=None) -> logits [B, S, vocab] float32``
* ``hidden_states(input_ids, segment_ids=None, positions=None) -> [B, S, n_embd]`` (after
  ``ln_f``, compute dtype) and ``logits(hidden) -> float32 [..., vocab]`` (the head alone,
  e.g. per chunk of a chunked cross-entropy); ``model.head_kernel(params) -> [n_embd, vocab]``.
* ``decode(input_ids, cache) -> (logits, cache)`` with ``cache = model.init_cache(batch,
  max_len)`` (see :mod:`jaxfit.models.kv_cache`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxfit import placement
from jaxfit.models import kv_cache, layers
from jaxfit.models.decoder import CausalLMMixin, causal_attention, dense, embed


@dataclasses.dataclass(frozen=True)
class GPT2Config(layers.ExecutionConfig):
    """GPT-2 architecture (HF ``GPT2Config`` field names) over the execution options of
    :class:`jaxfit.models.layers.ExecutionConfig` (``dtype``, ``remat_policy``, ...).

    Attributes:
      vocab_size, n_positions, n_embd, n_layer, n_head: sizes as in HF.
      activation_function: HF name (``gelu_new`` = tanh GELU).
      n_inner: MLP width; ``None`` means ``4 * n_embd``.
      layer_norm_epsilon, initializer_range: as in HF.
      bos_token_id, eos_token_id, pad_token_id: special ids (``None`` when absent).
      tie_word_embeddings: LM head = ``wte`` transposed (GPT-2 default).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    activation_function: str = "gelu_new"
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        layers.activation(self.activation_function)  # validate

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd


def _layer_norm(cfg: GPT2Config, name: str | None):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


def _residual_std(cfg: GPT2Config) -> float:
    """Init std of the projections into the residual stream: ``initializer_range /
    sqrt(2 * n_layer)`` (GPT-2 paper, sec. 2.3)."""
    return cfg.initializer_range / (2 * cfg.n_layer) ** 0.5


class GPT2Attention(nn.Module):
    """Fused-QKV causal self-attention (``GPT2Attention``)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, segment_ids, layer_cache, index):
        cfg = self.config
        b, s, _ = x.shape
        qkv = dense(cfg, 3 * cfg.n_embd, "c_attn")(x)
        q, k, v = (t.reshape(b, s, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, -1))
        out, layer_cache = causal_attention(cfg, q, k, v, segment_ids, layer_cache, index)
        out = out.reshape(b, s, cfg.n_embd)
        return dense(cfg, cfg.n_embd, "c_proj", std=_residual_std(cfg))(out), layer_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` (``GPT2MLP``)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(cfg, cfg.intermediate_size, "c_fc")(x)
        h = layers.activation(cfg.activation_function)(h)
        return dense(cfg, cfg.n_embd, "c_proj", std=_residual_std(cfg))(h)


class GPT2Block(nn.Module):
    """One pre-LN block; ``(x, segment_ids, layer_cache, index) -> (x, layer_cache)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, segment_ids, layer_cache, index):
        cfg = self.config
        # the residual stream, split over the batch; what remat_policy="offload" moves to the host
        x = checkpoint_name(placement.constrain_batch(x), "layer_input")
        attn, layer_cache = GPT2Attention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(x), segment_ids, layer_cache, index
        )
        x = x + checkpoint_name(attn, "attn_out")
        h = _layer_norm(cfg, "ln_2")(x)
        mlp = layers.sequence_chunked(GPT2MLP(cfg, name="mlp"), h, cfg.mlp_chunk_size)
        x = x + checkpoint_name(mlp, "mlp_out")
        return x, layer_cache


class GPT2LMHeadModel(CausalLMMixin, nn.Module):
    """GPT-2 with its LM head; see the module docstring for the calls and parameters."""

    EMBEDDING = "wte"  # token embedding submodule (tied head)
    POSITION_EMBEDDING = "wpe"  # learned positions: a lookup, no FLOPs
    STACK = "h"
    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.wte = embed(cfg, cfg.vocab_size, cfg.n_embd)
        self.wpe = embed(cfg, cfg.n_positions, cfg.n_embd)
        self.h = self._stack(GPT2Block, cfg.n_layer, (nn.broadcast, 0, nn.broadcast))
        self.ln_f = _layer_norm(cfg, None)
        self._setup_head()

    def _backbone(self, input_ids, positions, segment_ids, layer_cache, index):
        positions = self._positions(input_ids, positions)
        x = self.wte(input_ids) + self.wpe(positions)
        x, layer_cache = self.h(x, segment_ids, layer_cache, index)
        return self.ln_f(x), layer_cache

    def init_cache(self, batch: int, max_len: int, quant: str | None = None) -> kv_cache.KVCache:
        """An empty :class:`~jaxfit.models.kv_cache.KVCache` (no parameters needed; int8
        codes and scales with ``quant="int8"``).

        Raises:
          ValueError: ``max_len > n_positions`` (learned positions end there).
        """
        cfg = self.config
        if max_len > cfg.n_positions:
            raise ValueError(f"max_len={max_len} exceeds n_positions={cfg.n_positions}")
        return self._empty_cache(batch, max_len, cfg.n_layer, cfg.n_head, cfg.head_dim, quant)

"""A pure-functional key/value cache for decoding the causal language models.

The cache is a pytree (:class:`KVCache`) the caller threads through calls::

    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": p}, prompt_ids, cache, method="decode")  # prefill
    logits, cache = model.apply({"params": p}, next_ids[:, None], cache, method="decode")

Keys and values of every layer are stacked on a leading layer axis, like the parameters
of the scanned layer stack, so the stack scans over ``(params, k, v)`` together and
returns the updated per-layer slices as its scan output. All sequences of a batch share
one write position ``index`` (prompts are left-aligned and of equal length), so a step
writes ``[batch, new_len]`` entries at ``index`` with one ``dynamic_update_slice`` and
query ``s`` of the step, at absolute position ``index + s``, attends keys ``<= index + s``.
Entries beyond ``index`` hold zeros and are masked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxfit.models import attention


@struct.dataclass
class KVCache:
    """Keys and values of all layers, and the number of positions already filled.

    Attributes:
      k, v: ``[num_layers, batch, max_len, num_kv_heads, head_dim]`` in the model's compute
        dtype (keys after RoPE for Llama).
      index: int32 scalar, the next write position (= tokens consumed so far).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(
    *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: Any
) -> KVCache:
    """An empty cache (zeros, ``index = 0``) of the shapes documented in :class:`KVCache`."""
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32)
    )


def positions(cache: KVCache, batch: int, length: int) -> jax.Array:
    """Absolute positions ``[batch, length]`` int32 of ``length`` new tokens: ``index + s``."""
    pos = cache.index + jnp.arange(length, dtype=jnp.int32)
    return jnp.broadcast_to(pos[None, :], (batch, length))


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layer_cache: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | None,
    segment_ids: jax.Array | None,
    implementation: str | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Causal self-attention of one layer, with or without a KV cache.

    Args:
      q: ``[batch, len, num_heads, head_dim]``.
      k, v: ``[batch, len, num_kv_heads, head_dim]`` for the ``len`` new tokens.
      layer_cache: ``None`` (a plain forward over the whole sequence) or this layer's
        ``(k, v)`` cache slices ``[batch, max_len, num_kv_heads, head_dim]``.
      index: int32 scalar write position (with ``layer_cache``).
      segment_ids: ``[batch, len]`` packed-document ids (plain forward only).
      implementation: forwarded to :func:`jaxfit.models.attention.dot_product_attention` (with a
        cache: ``causal`` from ``q_offset=index``; cuDNN runs single-token steps, a
        multi-token step such as the prefill falls back as that function says).

    Returns:
      ``(out [batch, len, num_heads, head_dim], new_layer_cache or None)``.
    """
    if layer_cache is None:
        out = attention.dot_product_attention(
            q, k, v, causal=True, segment_ids=segment_ids, implementation=implementation
        )
        return out, None
    if segment_ids is not None:
        raise ValueError("segment_ids are not supported with a KV cache")
    ck, cv = layer_cache
    start = (0, index, 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
    # query s sits at position index + s and sees keys <= index + s; the zeros beyond are
    # masked by the same rule
    out = attention.dot_product_attention(
        q,
        ck.astype(q.dtype),
        cv.astype(q.dtype),
        causal=True,
        q_offset=index,
        implementation=implementation,
    )
    return out, (ck, cv)

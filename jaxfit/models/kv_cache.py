"""A pure-functional key/value cache for decoding the causal language models.

The cache is a pytree (:class:`KVCache`) the caller threads through calls::

    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": p}, prompt_ids, cache, method="decode")  # prefill
    logits, cache = model.apply({"params": p}, next_ids[:, None], cache, method="decode")

Keys and values of every layer are stacked on a leading layer axis, like the parameters
of the scanned layer stack, so the stack scans over ``(params, k, v)`` together. A layer
reads its cache slice and returns only its NEW entries (``[batch, new_len, kv_heads,
head_dim]``) as the scan output; :func:`write` then puts the ``[layers, batch, new_len,
...]`` entries of all layers into the cache with one ``dynamic_update_slice``, which XLA
does in place on a donated or loop-carried cache. (Returning each layer's updated slice
instead would make the scan write a second whole cache: measured on the 8B generation
plan, temporaries grew by 3x the cache instead of 1x.) All sequences of a batch share one
write position ``index`` (prompts are left-aligned and of equal length), and query ``s``
of a step, at absolute position ``index + s``, attends keys ``<= index + s``. Entries
beyond ``index`` hold zeros and are masked.

``init_cache(..., quant="int8")`` stores keys and values as int8 with one float32 absmax
scale per (token, head) (:class:`Int8KV`: symmetric round-to-nearest over ``head_dim``,
the per-token scheme of KIVI's value cache and of vLLM/TensorRT-LLM's int8 KV cache;
Liu et al. 2024, "KIVI", arXiv:2402.02750, sec. 3): ``head_dim + 4`` bytes per token and
head instead of ``2 head_dim`` in bf16 (0.52x at ``head_dim = 128``). Each step writes its
new tokens quantised and attends the dequantised cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxfit.models import attention

KV_QUANT = (None, "int8")  # the storage formats init_cache(quant=) takes


@struct.dataclass
class Int8KV:
    """Keys (or values) of a cache stored as int8 codes with an absmax scale each.

    Attributes:
      q: int8 ``[..., max_len, num_kv_heads, head_dim]`` codes in ``[-127, 127]``.
      scale: float32 ``[..., max_len, num_kv_heads, 1]``: ``max |x| / 127`` over
        ``head_dim`` of each (token, head); the value is ``q * scale``.
    """

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @staticmethod
    def quantize(x: jax.Array) -> Int8KV:
        """Round ``x [..., head_dim]`` to int8 with a per-row absmax scale (a zero row
        gets scale 0 and codes 0)."""
        x = x.astype(jnp.float32)
        scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
        safe = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
        return Int8KV(q=q, scale=scale)

    def dequantize(self, dtype: Any) -> jax.Array:
        """``q * scale`` in ``dtype``."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def _encode(stored, new: jax.Array) -> Any:
    """``new [..., head_dim]`` in the storage format of ``stored`` (quantised for
    :class:`Int8KV`, else cast to its dtype)."""
    return Int8KV.quantize(new) if isinstance(stored, Int8KV) else new.astype(stored.dtype)


def _read(stored, dtype: Any) -> jax.Array:
    return stored.dequantize(dtype) if isinstance(stored, Int8KV) else stored.astype(dtype)


def write(stored, new, index: jax.Array) -> Any:
    """Entries ``new`` (``[layers, batch, n, ...]`` in the storage format: arrays or
    :class:`Int8KV`) written into the stacked cache ``stored`` at position ``index``."""
    start = (0, 0, index, 0, 0)
    return jax.tree.map(lambda c, x: jax.lax.dynamic_update_slice(c, x, start), stored, new)


@struct.dataclass
class KVCache:
    """Keys and values of all layers, and the number of positions already filled.

    Attributes:
      k, v: ``[num_layers, batch, max_len, num_kv_heads, head_dim]`` in the model's compute
        dtype (keys after RoPE for Llama), or :class:`Int8KV` of that shape.
      index: int32 scalar, the next write position (= tokens consumed so far).
    """

    k: jax.Array | Int8KV
    v: jax.Array | Int8KV
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(
    *,
    num_layers: int,
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: Any,
    quant: str | None = None,
) -> KVCache:
    """An empty cache (zeros, ``index = 0``) of the shapes documented in :class:`KVCache`:
    in ``dtype``, or with ``quant="int8"`` as :class:`Int8KV` codes and scales.

    Raises:
      ValueError: ``quant`` not in :data:`KV_QUANT`.
    """
    if quant not in KV_QUANT:
        raise ValueError(f"KV cache quant={quant!r}; expected one of {list(KV_QUANT)}")
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)

    def empty():
        if quant == "int8":
            return Int8KV(q=jnp.zeros(shape, jnp.int8), scale=jnp.zeros(shape[:-1] + (1,)))
        return jnp.zeros(shape, dtype)

    return KVCache(k=empty(), v=empty(), index=jnp.zeros((), jnp.int32))


def nbytes(num_layers, batch, max_len, num_kv_heads, head_dim, dtype, quant=None) -> int:
    """Bytes of a cache of these sizes (closed form): ``2 x layers x batch x max_len x
    kv_heads x (head_dim x itemsize)``, or ``x (head_dim + 4)`` for int8 codes and their
    float32 scale."""
    per_head = head_dim + 4 if quant == "int8" else head_dim * jnp.dtype(dtype).itemsize
    return 2 * num_layers * batch * max_len * num_kv_heads * per_head


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
        ``(k, v)`` cache slices ``[batch, max_len, num_kv_heads, head_dim]`` (arrays or
        :class:`Int8KV`).
      index: int32 scalar write position (with ``layer_cache``).
      segment_ids: ``[batch, len]`` packed-document ids (plain forward only).
      implementation: forwarded to :func:`jaxfit.models.attention.dot_product_attention` (with a
        cache: ``causal`` from ``q_offset=index``; cuDNN runs single-token steps, a
        multi-token step such as the prefill falls back as that function says).

    Returns:
      ``(out [batch, len, num_heads, head_dim], new_entries or None)``: the ``len`` new
      keys and values ``[batch, len, num_kv_heads, head_dim]`` in the cache's storage
      format, for :func:`write` (the cache slice itself is not returned: see the module
      docstring).
    """
    if layer_cache is None:
        out = attention.dot_product_attention(
            q, k, v, causal=True, segment_ids=segment_ids, implementation=implementation
        )
        return out, None
    if segment_ids is not None:
        raise ValueError("segment_ids are not supported with a KV cache")
    ck, cv = layer_cache
    new_k, new_v = _encode(ck, k), _encode(cv, v)
    start = (0, index, 0, 0)  # this layer's keys with the new ones (as later steps see them)
    keys = jax.lax.dynamic_update_slice(_read(ck, q.dtype), _read(new_k, q.dtype), start)
    values = jax.lax.dynamic_update_slice(_read(cv, q.dtype), _read(new_v, q.dtype), start)
    # query s sits at position index + s and sees keys <= index + s; the zeros beyond are
    # masked by the same rule
    out = attention.dot_product_attention(
        q, keys, values, causal=True, q_offset=index, implementation=implementation
    )
    return out, (new_k, new_v)

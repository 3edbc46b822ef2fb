"""Blocked attention with an online softmax: the FlashAttention algorithm in plain JAX.

``implementation="chunked"`` of :func:`jaxfit.models.attention.dot_product_attention`.
The queries are cut into blocks of ``q_chunk`` and the keys into blocks of ``kv_chunk``;
one ``lax.scan`` visits the (query block, key block) pairs a query block needs, row by
row, keeping the running row maximum ``m``, normaliser ``l`` and unnormalised output
``acc`` of the block (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax", arXiv:1805.02867; Dao et al. 2022, "FlashAttention", arXiv:2205.14135,
Algorithm 1). A causal self-attention visits only the pairs on or below the diagonal
(half the work).

Memory is ``O(seq)`` per head, as cuDNN's flash attention: the forward pass keeps the
output and the row log-sum-exp ``lse = m + log(l)`` (float32 ``[batch, heads, q_len]``)
for the backward pass, which recomputes each block's probabilities from them
(``jax.custom_vjp``; Dao et al. 2022, Algorithm 4). The largest temporaries are one
block's float32 scores ``[batch, heads, q_chunk, kv_chunk]`` and the float32 key/value
gradient accumulators ``[batch, kv_len, kv_heads, head_dim]``; no ``[q_len, kv_len]``
array exists, forward or backward.

Lengths that are not a multiple of the block are padded (padded keys are masked, padded
queries dropped). A query that may attend no key at all gets a zero output (the XLA
reference would average every value); such rows carry no loss in jaxfit (padding).

Matmuls take the inputs' dtype and accumulate in float32
(``preferred_element_type=float32``), the softmax is float32 and the probabilities are cast
to the values' dtype before the second matmul: the precision of ``jax.nn``'s XLA
reference (``_dot_product_attention_core``: ``BF16_BF16_F32``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Scores of masked pairs. Finite, so a fully masked block leaves m unchanged: exp(0) = 1
# rescales nothing, and the where() below zeroes its probabilities.
_MASKED = -1e30


def _pairs(n_q: int, n_kv: int, bq: int, bk: int, triangle: bool) -> np.ndarray:
    """int32 ``[P, 4]`` rows ``(i, j, first, last)``: the block pairs, row-major, with
    flags for the first and last pair of each query row. ``triangle``: only pairs with a
    key at or before the block's last query (causal self-attention from position 0)."""
    rows = []
    for i in range(n_q):
        js = [j for j in range(n_kv) if not triangle or j * bk <= (i + 1) * bq - 1]
        rows += [(i, j, j == js[0], j == js[-1]) for j in js]
    return np.asarray(rows, np.int32)


def _pad(x, axis: int, size: int, value=0):
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _block(x, start, size: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


class _Masks:
    """The block mask of pair ``(i, j)``, bool broadcastable to ``[B, K, G, bq, bk]``."""

    def __init__(self, args, *, causal, bq, bk, kv_len, num_kv_heads):
        self.q_offset, self.kv_mask, self.q_seg, self.kv_seg, self.mask = args
        self.causal, self.bq, self.bk, self.kv_len, self.kvh = causal, bq, bk, kv_len, num_kv_heads

    def __call__(self, i, j):
        q0, k0 = i * self.bq, j * self.bk
        k_pos = k0 + jnp.arange(self.bk, dtype=jnp.int32)
        allowed = (k_pos < self.kv_len)[None, None, None, None, :]  # padding of the blocks
        if self.causal:
            q_pos = self.q_offset + q0 + jnp.arange(self.bq, dtype=jnp.int32)
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None, None]
        if self.kv_mask is not None:
            allowed = allowed & _block(self.kv_mask, k0, self.bk, 1)[:, None, None, None, :]
        if self.q_seg is not None:
            qs = _block(self.q_seg, q0, self.bq, 1)
            ks = _block(self.kv_seg, k0, self.bk, 1)
            allowed = allowed & (qs[:, :, None] == ks[:, None, :])[:, None, None]
        if self.mask is not None:  # [mb, mn, Tp, Sp] with mn in (1, heads)
            m = _block(_block(self.mask, q0, self.bq, 2), k0, self.bk, 3)
            mb, mn = m.shape[:2]
            groups = mn // self.kvh if mn > 1 else 1
            allowed = allowed & m.reshape(mb, min(mn, self.kvh), groups, self.bq, self.bk)
        return allowed


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, masks):
    return _flash_fwd(static, q, k, v, masks)[0]


def _flash_fwd(static, q, k, v, masks):
    causal, bq, bk, kv_len, triangle, scale = static
    b, tp, kvh, g, d = q.shape
    block_mask = _Masks(masks, causal=causal, bq=bq, bk=bk, kv_len=kv_len, num_kv_heads=kvh)
    pairs = _pairs(tp // bq, k.shape[1] // bk, bq, bk, triangle)
    f32 = jnp.float32

    def step(carry, pair):
        m, norm, acc, out, lse = carry
        i, j, first, last = pair[0], pair[1], pair[2] > 0, pair[3] > 0
        m = jnp.where(first, _MASKED, m)
        norm = jnp.where(first, 0.0, norm)
        acc = jnp.where(first, 0.0, acc)
        qb, kb, vb = _block(q, i * bq, bq, 1), _block(k, j * bk, bk, 1), _block(v, j * bk, bk, 1)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=f32) * scale
        allowed = block_mask(i, j)
        s = jnp.where(allowed, s, _MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        norm = norm * corr + p.sum(-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vb, preferred_element_type=f32)
        acc = acc * corr[..., None] + pv
        o = (acc / jnp.where(norm > 0, norm, 1.0)[..., None]).transpose(0, 3, 1, 2, 4)
        safe = jnp.where(norm > 0, norm, 1.0)
        row_lse = jnp.where(norm > 0, m_new + jnp.log(safe), -_MASKED)
        o = jnp.where(last, o.astype(out.dtype), _block(out, i * bq, bq, 1))
        row_lse = jnp.where(last, row_lse, _block(lse, i * bq, bq, 3))
        out = jax.lax.dynamic_update_slice_in_dim(out, o, i * bq, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, row_lse, i * bq, axis=3)
        return (m_new, norm, acc, out, lse), None

    init = (
        jnp.full((b, kvh, g, bq), _MASKED, f32),
        jnp.zeros((b, kvh, g, bq), f32),
        jnp.zeros((b, kvh, g, bq, d), f32),
        jnp.zeros_like(q),
        jnp.zeros((b, kvh, g, tp), f32),
    )
    (_, _, _, out, lse), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(static, residuals, d_out):
    causal, bq, bk, kv_len, triangle, scale = static
    q, k, v, masks, out, lse = residuals
    kvh, d = q.shape[2], q.shape[4]
    block_mask = _Masks(masks, causal=causal, bq=bq, bk=bk, kv_len=kv_len, num_kv_heads=kvh)
    pairs = _pairs(q.shape[1] // bq, k.shape[1] // bk, bq, bk, triangle)
    f32 = jnp.float32
    # D_i = sum_d dO_id O_id (Dao et al. 2022, Algorithm 4 line 19 / FlashAttention-2 eq. 5)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(f32), out.astype(f32))

    def step(carry, pair):
        dq_acc, dq, dk, dv = carry
        i, j, first, last = pair[0], pair[1], pair[2] > 0, pair[3] > 0
        dq_acc = jnp.where(first, 0.0, dq_acc)
        qb, kb, vb = _block(q, i * bq, bq, 1), _block(k, j * bk, bk, 1), _block(v, j * bk, bk, 1)
        dob = _block(d_out, i * bq, bq, 1)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=f32) * scale
        allowed = block_mask(i, j)
        p = jnp.where(allowed, jnp.exp(s - _block(lse, i * bq, bq, 3)[..., None]), 0.0)
        dv_blk = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), dob, preferred_element_type=f32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=f32)
        ds = p * (dp - _block(delta, i * bq, bq, 3)[..., None]) * scale
        dk_blk = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qb, preferred_element_type=f32)
        dq_acc = dq_acc + jnp.einsum(
            "bkgqs,bskd->bqkgd", ds.astype(k.dtype), kb, preferred_element_type=f32
        )
        dk = jax.lax.dynamic_update_slice_in_dim(dk, _block(dk, j * bk, bk, 1) + dk_blk, j * bk, 1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, _block(dv, j * bk, bk, 1) + dv_blk, j * bk, 1)
        new = jnp.where(last, dq_acc.astype(dq.dtype), _block(dq, i * bq, bq, 1))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, new, i * bq, axis=1)
        return (dq_acc, dq, dk, dv), None

    init = (
        jnp.zeros((*q.shape[:1], bq, *q.shape[2:4], d), f32),
        jnp.zeros_like(q),
        jnp.zeros(k.shape, f32),
        jnp.zeros(v.shape, f32),
    )
    (_, dq, dk, dv), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    no_grad = jax.tree.map(lambda _: None, masks)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    q_offset: jax.Array | int | None = None,
    kv_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    q_chunk: int = 512,
    kv_chunk: int = 512,
) -> jax.Array:
    """Attention ``softmax(q k^T / sqrt(head_dim)) v`` by blocks (see the module docstring).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``; ``num_heads % num_kv_heads == 0``
        (grouped-query attention: query head ``h`` reads key/value head
        ``h // (num_heads // num_kv_heads)``).
      causal: query ``s`` attends keys at positions ``<= q_offset + s``.
      q_offset: position of query 0 among the keys (int or int32 scalar; default 0): a
        KV-cached step whose queries sit at ``index + s``.
      kv_mask: optional ``[batch, kv_len]`` bool, True for keys that may be attended.
      segment_ids: optional ``[batch, len]`` int (``q_len == kv_len``): attend within
        equal ids only.
      mask: optional bool broadcastable to ``[batch, num_heads, q_len, kv_len]``, True
        where allowed (batch and head axes of size 1 or full).
      q_chunk, kv_chunk: block sizes (a sequence shorter than its block is one block).

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q``'s dtype; differentiable in ``q``,
      ``k``, ``v``.

    Raises:
      ValueError: ``segment_ids`` with ``q_len != kv_len``, or heads that do not group.
    """
    b, t, n, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if n % kvh:
        raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
    if segment_ids is not None and t != s:
        raise ValueError(f"segment_ids need q_len == kv_len, got {t} and {s}")
    bq, bk = min(q_chunk, t), min(kv_chunk, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    triangle = causal and q_offset is None and t == s
    offset = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
        mask = _pad(_pad(mask, 2, tp, False), 3, sp, False)
    masks = (
        offset,
        _pad(None if kv_mask is None else kv_mask.astype(bool), 1, sp, False),
        _pad(seg, 1, tp, -1),
        _pad(seg, 1, sp, -1),
        mask,
    )
    qg = _pad(q, 1, tp).reshape(b, tp, kvh, n // kvh, d)
    # Tie the masks to q. Inside a scan over layers, the block masks depend only on
    # layer-invariant inputs (segment ids, positions), and jax's scan partial evaluation
    # hoists loop-invariant residuals out of the loop: it would precompute every block
    # pair's mask, [pairs, batch, heads, q_chunk, kv_chunk] booleans (17 GiB for 32k
    # tokens). Through the barrier they depend on q, so each block builds its own.
    qg, masks = jax.lax.optimization_barrier((qg, masks))
    static = (bool(causal), bq, bk, s, triangle, float(1.0 / np.sqrt(d)))
    out = _flash(static, qg, _pad(k, 1, sp), _pad(v, 1, sp), masks)
    return out.reshape(b, tp, n, d)[:, :t]

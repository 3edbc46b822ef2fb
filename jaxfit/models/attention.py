"""Attention for every jaxfit model: cuDNN flash attention, the blocked form of
:mod:`jaxfit.models.flash` or the XLA reference, and the choice between them.

:func:`dot_product_attention` runs one of the three; :func:`choose_attention` decides for
``implementation="auto"`` from the backend, dtype, head size, lengths and masks
(:func:`cudnn_problems` says why cuDNN cannot take a call), logging the choice once.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from jaxfit import target
from jaxfit.models import flash

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked")
# Block sizes of implementation="chunked" (jaxfit.models.flash): queries and keys per block.
ATTENTION_CHUNK = 512
ATTENTION_KV_CHUNK = 512
# A fallback from cuDNN runs the XLA reference while its [q_len, kv_len] scores have at most
# SHORT_SEQ_LEN**2 entries per head (512 x 512: 1 MiB of float32), the blocked form beyond.
SHORT_SEQ_LEN = 512
# cuDNN through jax.nn takes packed documents only as a dense boolean mask, which jax turns
# into a [batch, 1, q_len, kv_len] bias in the compute dtype and whose gradient (same size)
# the backward pass computes (see cudnn_problems). Allowed while bias + gradient stay below
# this (B=1: up to 8,192 tokens in bf16).
CUDNN_MASK_MAX_BYTES = 256 * 2**20
_CUDNN_DTYPES = ("bfloat16", "float16")

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    """Log ``message`` once per process (attention is traced once per layer stack and
    compile; the choice is the same every time)."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def gpu_compute_capability() -> str | None:
    """The compute capability of the GPU that will run the program (``"8.9"`` for an RTX
    4070 Ti): :func:`jaxfit.target.compute_capability` (a compile target's, else this
    machine's first GPU's), ``None`` without a GPU."""
    return target.compute_capability()


def _capability(cc: str | None) -> tuple[int, int] | None:
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def cudnn_problems(
    dtype: Any,
    head_dim: int,
    *,
    q_len: int,
    kv_len: int | None = None,
    batch: int = 1,
    dense_mask: bool = False,
    compute_capability: str | None = None,
) -> list[str]:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot (or should not)
    run these shapes; empty when it can. Each reason names the jax 0.10/0.11 source it
    rests on (``jax/_src/cudnn/fused_attention_stablehlo.py``, below ``fused_attention``):

    * dtype: ``check_layout`` raises unless q/k/v are fp16, bf16 (or fp8, not used here).
    * head_dim: ``check_is_flash_attention`` needs ``head_dim % 8 == 0`` and ``head_dim <=
      128`` before Hopper, ``<= 256`` from compute capability 9.0 (cuDNN's support matrix
      says the same for the backward pass; with an unknown capability 128 is assumed).
    * compute capability below 8.0: cuDNN's SDPA "requires SM80 (Ampere) or newer"
      (cuDNN frontend documentation, Attention, support matrix); jax does not check it.
    * ``dense_mask`` (packed documents' segment ids, or any boolean mask beyond a single
      query): ``jax.nn.dot_product_attention`` has no segment ids, and a mask reaches
      cuDNN through ``combine_bias_and_mask`` as a dense ``[batch, 1, q_len, kv_len]``
      bias in the compute dtype; ``should_export_dbias`` returns True, so the backward
      pass materialises its gradient too. Allowed while the two stay within
      :data:`CUDNN_MASK_MAX_BYTES`; ``check_is_flash_attention`` also rejects a bias in
      training with an odd length. (cuDNN's packed ``q_offsets`` layout is reachable
      only through jax's private ``fused_attention_stablehlo.dot_product_attention`` and
      only from compute capability 9.0: not used.)

    Args:
      dtype: the compute dtype of q/k/v.
      head_dim: per-head size.
      q_len, kv_len: query / key lengths (``kv_len`` defaults to ``q_len``).
      batch: sequences per call (the bias is per sequence).
      dense_mask: the call needs a boolean mask (see above).
      compute_capability: ``"major.minor"`` of the GPU, ``None`` if unknown.

    Returns:
      A list of human-readable reasons.
    """
    problems = []
    name = jnp.dtype(dtype).name
    if name not in _CUDNN_DTYPES:
        problems.append(f"cuDNN flash attention takes fp16/bf16, not {name} (check_layout)")
    cap = _capability(compute_capability)
    if cap is not None and cap < (8, 0):
        problems.append(f"cuDNN attention needs compute capability >= 8.0, the GPU has {cap}")
    h_max = 256 if cap is not None and cap >= (9, 0) else 128
    if head_dim % 8 or head_dim > h_max:
        problems.append(
            f"cuDNN flash attention needs head_dim % 8 == 0 and <= {h_max} on this GPU, got "
            f"{head_dim} (check_is_flash_attention)"
        )
    if dense_mask:
        kv_len = kv_len or q_len
        nbytes = 2 * batch * q_len * kv_len * jnp.dtype(dtype).itemsize
        if nbytes > CUDNN_MASK_MAX_BYTES:
            problems.append(
                f"packed documents (segment ids) reach cuDNN as a dense [{batch}, 1, {q_len}, "
                f"{kv_len}] bias and its gradient ({nbytes / 2**20:.0f} MiB > "
                f"{CUDNN_MASK_MAX_BYTES / 2**20:.0f} MiB; combine_bias_and_mask, "
                "should_export_dbias)"
            )
        elif q_len % 2 or kv_len % 2:
            problems.append(
                f"cuDNN with a bias needs even lengths in training, got {q_len} x {kv_len} "
                "(check_is_flash_attention)"
            )
    return problems


def fallback_attention(q_len: int, kv_len: int | None = None) -> str:
    """The implementation used where cuDNN is not: ``"xla"`` while the scores have at most
    ``SHORT_SEQ_LEN**2`` entries per head, else ``"chunked"`` (no ``[q_len, kv_len]``
    array at all)."""
    return "xla" if q_len * (kv_len or q_len) <= SHORT_SEQ_LEN**2 else "chunked"


def choose_attention(
    backend: str,
    dtype: Any,
    head_dim: int,
    *,
    seq_len: int,
    kv_len: int | None = None,
    batch: int = 1,
    segment_ids: bool = False,
    compute_capability: str | None = None,
) -> tuple[str, str]:
    """The attention implementation ``"auto"`` stands for, and why.

    * Not a GPU: ``"xla"``, the reference (``jax.nn.dot_product_attention`` with
      ``implementation=None`` is also XLA: "defaults to XLA for now",
      ``jax/_src/nn/functions.py``), on TPU ``"chunked"`` past :data:`SHORT_SEQ_LEN`.
    * GPU and :func:`cudnn_problems` finds none: ``"cudnn"``; a causal mask becomes cuDNN's
      ``MaskType.CAUSAL``, key padding becomes sequence lengths (``PADDING_CAUSAL`` /
      ``PADDING``; ``jax.nn.dot_product_attention``'s ``case 'cudnn'``), GQA is native.
    * GPU otherwise: :func:`fallback_attention`, with the problems as the reason.

    Args:
      backend: ``jaxfit.target.backend()``: of the machine that will run it.
      dtype: compute dtype; head_dim: per-head size.
      seq_len: query length (training: the sequence length); kv_len: key length
        (default ``seq_len``).
      batch: sequences per call (the micro-batch).
      segment_ids: the calls pass packed-document ids.
      compute_capability: the GPU's (``gpu_compute_capability()``), ``None`` if unknown.

    Returns:
      ``(implementation, reason)``: one of ``"xla"``, ``"cudnn"``, ``"chunked"``, and a
      sentence for the log.
    """
    kv_len = kv_len or seq_len
    if backend != "gpu":
        if backend == "tpu" and seq_len * kv_len > SHORT_SEQ_LEN**2:
            return "chunked", f"{backend}: no cuDNN; blocked attention past {SHORT_SEQ_LEN} tokens"
        return "xla", f"{backend}: the XLA reference (cuDNN flash attention is GPU-only)"
    problems = cudnn_problems(
        dtype,
        head_dim,
        q_len=seq_len,
        kv_len=kv_len,
        batch=batch,
        dense_mask=segment_ids,
        compute_capability=compute_capability,
    )
    if problems:
        impl = fallback_attention(seq_len, kv_len)
        return impl, f"{impl} instead of cuDNN: " + "; ".join(problems)
    how = "causal as MaskType.CAUSAL, padding as sequence lengths"
    if segment_ids:
        nbytes = 2 * batch * seq_len * kv_len * jnp.dtype(dtype).itemsize
        how += f", packed documents as a dense bias (+ gradient: {nbytes / 2**20:.0f} MiB)"
    return "cudnn", f"cuDNN flash attention ({how})"


def _dense_mask(segment_ids, mask):
    """The boolean ``[batch, 1, q_len, kv_len]`` mask of segment ids AND ``mask``, or None."""
    out = None
    if segment_ids is not None:
        out = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        out = mask if out is None else out & mask
    return out


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    padding_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    q_offset: jax.Array | int | None = None,
    implementation: str | None = "auto",
) -> jax.Array:
    """Scaled dot-product attention (``softmax(q k^T / sqrt(head_dim)) v``), by one of
    three implementations.

    * ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the reference;
      it materialises the ``[batch, heads, q_len, kv_len]`` float32 scores.
    * ``"cudnn"``: the same call with ``implementation="cudnn"``: cuDNN's fused flash
      attention (GPU; fp16/bf16): causal as its causal mask, ``padding_mask`` as key
      sequence lengths (it must be right padding: ones, then zeros), a single decoding
      query at ``q_offset`` as key length ``q_offset + 1``; segment ids and ``mask`` as a
      dense bias (:func:`cudnn_problems`). Where cuDNN cannot run the call (a
      :func:`cudnn_problems` reason, not a GPU, or several queries at a traced
      ``q_offset``, which cuDNN's causal mask cannot shift) it falls back to
      :func:`fallback_attention`'s choice and logs why.
    * ``"chunked"``: :func:`jaxfit.models.flash.blocked_attention` in blocks of
      :data:`ATTENTION_CHUNK` queries x :data:`ATTENTION_KV_CHUNK` keys: flash attention's
      algorithm and ``O(seq)`` memory in plain XLA, any device, every mask, any length.
    * ``"auto"`` (also ``None`` / ``""``): :func:`choose_attention` for this backend and
      these shapes. ``jax.nn.dot_product_attention``'s own default (``implementation=None``)
      is the XLA reference on every backend in jax 0.10/0.11; it never picks cuDNN.

    Grouped-query attention: ``k``/``v`` may have fewer heads than ``q`` (query head ``h``
    reads key/value head ``h // (num_heads // num_kv_heads)``) in all three.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``.
      causal: query ``s`` sees keys ``<= s`` (``<= q_offset + s`` with ``q_offset``).
      padding_mask: optional ``[batch, kv_len]`` bool/int, 1 for real tokens.
      segment_ids: optional ``[batch, len]`` int; tokens attend only within equal ids
        (packed documents); requires ``q_len == kv_len``.
      mask: optional bool array broadcastable to ``[batch, num_heads, q_len, kv_len]``,
        True where a query may attend a key; combined (AND) with the masks above.
      q_offset: position of query 0 among the keys (int32 scalar; KV-cached decoding,
        where query ``s`` of a step sits at ``index + s`` of the cache), with ``causal``.
      implementation: ``"auto"``, ``"xla"``, ``"cudnn"`` or ``"chunked"``.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
      ValueError: an unknown implementation.
    """
    impl = implementation or "auto"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; one of {ATTENTION_IMPLS}")
    b, t, _, d = q.shape
    s = k.shape[1]
    backend = target.backend()  # of the machine that will run it (jaxfit.target)
    dense = segment_ids is not None or (mask is not None and t > 1)
    stepped = q_offset is not None and t > 1  # several queries at a traced position
    if impl == "auto":
        impl, reason = choose_attention(
            backend,
            q.dtype,
            d,
            seq_len=t,
            kv_len=s,
            batch=b,
            segment_ids=dense,
            compute_capability=gpu_compute_capability() if backend == "gpu" else None,
        )
        if impl == "cudnn" and stepped:
            impl = fallback_attention(t, s)
        _log_once(logging.DEBUG, f"attention [{b}, {t}/{s}, {d}] auto -> {impl}: {reason}")
    elif impl == "cudnn":
        problems = [] if backend == "gpu" else [f"the {backend} backend has no cuDNN"]
        cc = gpu_compute_capability() if backend == "gpu" else None
        problems += cudnn_problems(
            q.dtype, d, q_len=t, kv_len=s, batch=b, dense_mask=dense, compute_capability=cc
        )
        if problems or stepped:
            fallback = fallback_attention(t, s)
            level = logging.WARNING if problems else logging.DEBUG
            why = "; ".join(problems) or "several queries at a cache offset"
            _log_once(level, f"attention [{b}, {t}/{s}, {d}]: {fallback} instead of cuDNN: {why}")
            impl = fallback
    if impl == "chunked":
        return flash.blocked_attention(
            q,
            k,
            v,
            causal=causal,
            q_offset=q_offset,
            kv_mask=None if padding_mask is None else padding_mask.astype(bool),
            segment_ids=segment_ids,
            mask=mask,
            q_chunk=ATTENTION_CHUNK,
            kv_chunk=ATTENTION_KV_CHUNK,
        )
    kv_lengths = None
    if impl == "cudnn":
        is_causal = causal and q_offset is None
        if q_offset is not None and causal:  # one query at position q_offset
            kv_lengths = jnp.full((b,), q_offset, jnp.int32) + 1
        if padding_mask is not None:  # right padding: the number of real tokens
            lengths = padding_mask.astype(jnp.int32).sum(-1)
            kv_lengths = lengths if kv_lengths is None else jnp.minimum(kv_lengths, lengths)
        dense_mask = _dense_mask(segment_ids, mask)
    else:
        is_causal = causal and q_offset is None
        dense_mask = _dense_mask(segment_ids, mask)
        if padding_mask is not None:
            pad = padding_mask.astype(bool)[:, None, None, :]
            dense_mask = pad if dense_mask is None else dense_mask & pad
        if q_offset is not None and causal:
            q_pos = q_offset + jnp.arange(t, dtype=jnp.int32)
            shifted = (jnp.arange(s)[None, :] <= q_pos[:, None])[None, None]
            dense_mask = shifted if dense_mask is None else dense_mask & shifted
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=dense_mask,
        is_causal=is_causal,
        key_value_seq_lengths=kv_lengths,
        implementation=impl,
    )

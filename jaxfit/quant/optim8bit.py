"""8-bit AdamW: Adam's moments stored with blockwise dynamic quantisation (bitsandbytes).

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"
(https://arxiv.org/abs/2110.02861), section 2, as implemented by bitsandbytes'
``optim.AdamW8bit`` (``Optimizer2State(optim_bits=8)``, bitsandbytes 0.50):

* each moment tensor is flattened row-major and split into blocks of 256 elements; a block
  keeps ``absmax = max |m|`` in float32 and one uint8 code per element, the index of the
  nearest value of a 256-entry map to ``m / absmax`` (section 2.1, "Block-wise
  Quantization"); the first moment uses the SIGNED dynamic map and the second moment
  (non-negative) the UNSIGNED one, ``create_dynamic_map(signed=True / False)``
  (:func:`jaxfit.quant.nf4.dynamic_map`, section 2.2 "Dynamic Quantization");
* every step dequantises both moments to float32, applies Adam's update in float32
  (``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, bias correction), computes the
  parameter update from these float32 moments, then requantises them (new absmax per
  block) for the next step;
* tensors with fewer than ``min_8bit_size`` (4096) elements keep float32 moments
  (``Optimizer8bit.init_state``: ``p.numel() < min_8bit_size``), as do biases and norms.

Memory of the moments per parameter: float32 Adam keeps 8 bytes (two float32 moments);
this keeps 2 bytes of codes + ``2 * 4 / 256`` bytes of absmax = 2.03125 bytes
(25.4 % of float32 Adam) for 8-bit leaves; small leaves keep their 8 bytes. XLA may hold
a float32 copy of one leaf's moments while it is being updated (bitsandbytes' CUDA kernel
keeps them in registers).

The rounding is bitsandbytes' reference backend (``backends/default/ops.py``:
``quantize_blockwise`` with ``torch.bucketize`` on the float32 code midpoints, ties to the
lower index, the same as :func:`jaxfit.quant.nf4.quantize_blockwise`): the state after
quantising is bit for bit ``bitsandbytes.functional.quantize_blockwise(m, code,
blocksize=256)`` of that backend. Known differences from bitsandbytes, none in the format:

* bitsandbytes' CUDA kernel (``kOptimizerStatic8bit2StateBlockwise``) rounds with a
  quadrant search and then moves a first-moment code that changed the sign of ``m``
  (e.g. a small negative value rounded to 0) one step towards the right sign; its CPU
  path (``backends/cpu/ops.py``) and this module round to the nearest code only;
  bitsandbytes' native CPU quantiser (used by its CPU ``AdamW8bit``) picks a non-nearest
  code for ~0.1 % of signed-map values and ~3 % of unsigned-map values (tiny second
  moments, up to 7 codes away).
* Weight decay is optax's (``p - lr * (u + wd * p)``), the same as bitsandbytes' CPU and
  Triton paths (``p * (1 - lr * wd) - lr * u``) up to rounding; the CUDA kernel decays
  after the Adam step (a difference of order ``lr^2 * wd``).
* An all-zero last partial block stores ``absmax = 0`` (bitsandbytes stores 1e-38, a
  subnormal that XLA flushes); the dequantised values are the same (zero).

A non-finite gradient turns the moments of its whole block into NaN (float32 Adam: of
that element); the trainer stops on a non-finite gradient norm anyway.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxfit.quant import nf4

PyTree = Any

BLOCK_SIZE = 256  # bitsandbytes' Optimizer2State blocksize (fixed there)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size


def _code(signed: bool) -> np.ndarray:
    """The dynamic map of a moment: signed for the first, unsigned for the second."""
    return nf4.dynamic_map(signed=signed)


def _nearest_code(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest ``code`` value to each element of ``x`` (values in [-1, 1]).

    The number of float32 midpoints ``(code[i] + code[i+1]) / 2`` strictly below ``x``
    (``torch.bucketize(x, midpoints)``, ties to the lower index), found by a branchless
    binary search: 7 gathers from the 255 midpoints after one scalar compare, which XLA
    fuses into one elementwise loop (on CPU ~50 ns per element, 2 cores; faster than
    ``jnp.searchsorted``'s methods or 255 fused compares). Returns int32 in ``[0, 255]``.
    """
    mids = nf4._midpoints(code)
    if mids.size != 255:
        raise ValueError(f"8-bit code needs 256 sorted values, got {code.size}")
    # The first probe is the same for every element: a scalar compare (a gather at constant
    # indices would be constant-folded by XLA into a tensor-sized literal).
    pos = jnp.where(mids[127] < x, 128, 0).astype(jnp.int32)
    mids = jnp.asarray(mids)
    for k in (64, 32, 16, 8, 4, 2, 1):
        pos = jnp.where(mids[pos + (k - 1)] < x, pos + k, pos)
    return pos


def quantize_blockwise(
    x: jax.Array, code: np.ndarray, block_size: int = BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
    """Jittable 8-bit blockwise quantisation (bitsandbytes ``quantize_blockwise``).

    The traced counterpart of the host-numpy :func:`jaxfit.quant.nf4.quantize_blockwise`
    (same rounding): ``x`` is flattened row-major into blocks of ``block_size``; full
    blocks are scaled by the reciprocal of their absmax, a last partial block is divided by
    its absmax (as bitsandbytes' reference backend), values are clipped to [-1, 1] and
    rounded to the nearest code. All-zero blocks get ``absmax = 0`` and the code of 0.

    Args:
      x: float array, any shape (``n`` elements), computed in float32.
      code: sorted float32 ``[256]`` map (e.g. ``nf4.dynamic_map(signed=...)``).
      block_size: elements per block.

    Returns:
      ``(codes uint8 with x's shape, absmax float32 [ceil(n / block_size)])``.
    """
    shape = jnp.shape(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.size
    nb = -(-n // block_size)
    pad = nb * block_size - n
    blocks = jnp.pad(flat, (0, pad)).reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    inv = jnp.where(absmax > 0, 1.0 / absmax, 0.0)
    scaled = blocks * inv[:, None]
    if pad:
        am = absmax[-1]
        scaled = scaled.at[-1].set(jnp.where(am > 0, blocks[-1] / am, 0.0))
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[:n]
    return _nearest_code(scaled, code).astype(jnp.uint8).reshape(shape), absmax


def dequantize_blockwise(
    codes: jax.Array, absmax: jax.Array, code: np.ndarray, block_size: int = BLOCK_SIZE
) -> jax.Array:
    """``code[codes] * absmax[block]`` in float32 (bitsandbytes ``dequantize_blockwise``).

    The same values as :func:`jaxfit.quant.nf4.dequantize_blockwise`, which expands
    ``absmax`` with ``jnp.repeat`` (8x slower on CPU than the reshape into blocks here).

    Args:
      codes: uint8, any shape (``n`` elements, row-major blocks).
      absmax: float32 ``[ceil(n / block_size)]``.
      code: float32 ``[256]`` map.

    Returns:
      float32 with ``codes``' shape.
    """
    shape = jnp.shape(codes)
    flat = jnp.ravel(codes)
    n = flat.size
    pad = absmax.shape[0] * block_size - n
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
    values = jnp.asarray(code)[blocks.astype(jnp.int32)] * absmax[:, None]
    return values.reshape(-1)[:n].reshape(shape)


# Jitted per map and block size, so that the optimizer also runs fast op by op (outside jit).
@functools.partial(jax.jit, static_argnames=("signed", "block_size"))
def _quantize_moment(x, *, signed, block_size):
    return quantize_blockwise(x, _code(signed), block_size)


@functools.partial(jax.jit, static_argnames=("signed", "block_size"))
def _dequantize_moment(codes, absmax, *, signed, block_size):
    return dequantize_blockwise(codes, absmax, _code(signed), block_size)


class QuantizedMoment(struct.PyTreeNode):
    """One moment tensor in 8 bits (bitsandbytes' ``state1``/``absmax1`` pair).

    Attributes:
      codes: uint8, the parameter's shape: index into the dynamic map of each element.
      absmax: float32 ``[ceil(n / block_size)]``, per-block scale over the row-major
        flattened tensor.
      signed: static; which dynamic map (signed for the first moment, unsigned for the
        second).
      block_size: static; elements per block (256).
    """

    codes: jax.Array
    absmax: jax.Array
    signed: bool = struct.field(pytree_node=False, default=True)
    block_size: int = struct.field(pytree_node=False, default=BLOCK_SIZE)

    @classmethod
    def quantize(
        cls, x: jax.Array, *, signed: bool, block_size: int = BLOCK_SIZE
    ) -> QuantizedMoment:
        """Quantise a float tensor (see :func:`quantize_blockwise`); jittable."""
        codes, absmax = _quantize_moment(x, signed=signed, block_size=block_size)
        return cls(codes, absmax, signed=signed, block_size=block_size)

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...], *, signed: bool, block_size: int = BLOCK_SIZE
    ) -> QuantizedMoment:
        """The quantisation of a zero tensor (the code of 0, ``absmax = 0``), built without
        tracing the quantiser (``quantize(zeros)`` gives the same arrays)."""
        zero = int(np.searchsorted(nf4._midpoints(_code(signed)), 0.0, side="left"))
        nb = -(-int(np.prod(shape, dtype=np.int64)) // block_size)
        return cls(
            jnp.full(shape, zero, jnp.uint8),
            jnp.zeros((nb,), jnp.float32),
            signed=signed,
            block_size=block_size,
        )

    def dequantize(self) -> jax.Array:
        """float32 tensor of ``codes``' shape (see :func:`dequantize_blockwise`)."""
        return _dequantize_moment(
            self.codes, self.absmax, signed=self.signed, block_size=self.block_size
        )


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit` (fields as ``optax.ScaleByAdamState``).

    ``mu`` / ``nu`` have the parameters' structure; a leaf is a :class:`QuantizedMoment`
    (``size >= min_8bit_size``) or a float32 array.
    """

    count: jax.Array  # int32 [], number of updates applied
    mu: PyTree
    nu: PyTree


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments stored in 8 bits (see the module doc).

    The update is ``m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)`` and
    ``v_hat = v / (1 - b2^t)`` (Kingma & Ba 2015, Algorithm 1), computed from the float32
    moments before they are requantised. Leaves with fewer than ``min_8bit_size`` elements
    keep float32 moments and follow ``optax.scale_by_adam`` operation for operation (the
    same bits as ``optax.adamw`` for float32 parameters). Moments and updates are float32
    whatever the parameters' dtype (``apply_updates`` casts back).

    Args:
      b1, b2: moment decay rates.
      eps: added to ``sqrt(v_hat)``.
      block_size: elements per quantisation block (bitsandbytes uses 256).
      min_8bit_size: leaves with fewer elements keep float32 moments (bitsandbytes' 4096).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`
      (a pytree of arrays: checkpointable with orbax, shardable, jittable).

    Raises:
      ValueError: ``block_size < 1`` or ``min_8bit_size < 0``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")

    def init_fn(params):
        def moment(p, signed):
            if int(np.prod(p.shape, dtype=np.int64)) >= min_8bit_size:
                return QuantizedMoment.zeros(p.shape, signed=signed, block_size=block_size)
            return jnp.zeros(p.shape, jnp.float32)

        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: moment(p, True), params),
            nu=jax.tree.map(lambda p: moment(p, False), params),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        quant = [isinstance(m, QuantizedMoment) for m in treedef.flatten_up_to(state.mu)]

        def dequantized(moments):
            flat = treedef.flatten_up_to(moments)
            return treedef.unflatten([m.dequantize() if q else m for m, q in zip(flat, quant)])

        g = treedef.unflatten(
            [x.astype(jnp.float32) if q else x for x, q in zip(leaves, quant, strict=True)]
        )
        # optax.scale_by_adam's operations on whole trees (so that its jitted bias
        # correction compiles to the same program: float32 leaves get the same bits).
        mu = optax.tree.update_moment(g, dequantized(state.mu), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(g, dequantized(state.nu), b2, 2)
        count_inc = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
        # "+ 0.0": optax's eps_root default, kept so the operations are the same.
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)

        def requantized(moments, signed):
            flat = treedef.flatten_up_to(moments)
            return treedef.unflatten(
                [
                    QuantizedMoment.quantize(m, signed=signed, block_size=block_size) if q else m
                    for m, q in zip(flat, quant)
                ]
            )

        return updates, ScaleByAdam8bitState(
            count=count_inc, mu=requantized(mu, True), nu=requantized(nu, False)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """AdamW with 8-bit moments: ``optax.adamw`` with :func:`scale_by_adam_8bit`.

    ``chain(scale_by_adam_8bit, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, the chain of ``optax.adamw``
    (decoupled weight decay, Loshchilov & Hutter 2019); the counterpart of
    ``bitsandbytes.optim.AdamW8bit``. Arguments as ``optax.adamw`` (``mask``: a bool
    pytree or a callable of the params returning one) plus those of
    :func:`scale_by_adam_8bit`.
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def state_nbytes(state: PyTree) -> int:
    """Bytes held by the arrays of an optimizer state (codes, absmax, float32 moments,
    counters), from shapes and dtypes (works on ``jax.eval_shape`` output)."""
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
    )

"""NF4 (4-bit NormalFloat) weights in the exact layout of bitsandbytes.

NormalFloat4 is QLoRA's data type (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", https://arxiv.org/abs/2305.14314, section 3 and Appendix E): 16 values at
quantiles of N(0, 1), normalised to [-1, 1], with an exact zero. The storage format here is
bit-for-bit the one of ``bitsandbytes.functional.quantize_4bit(A, blocksize=64,
compress_statistics=..., quant_type="nf4")`` (bitsandbytes 0.50), so NF4 checkpoints move
between bitsandbytes/transformers and jaxfit (:mod:`jaxfit.hf.bnb`):

* the weight in Hugging Face layout ``[out, in]`` is flattened row-major and split into
  blocks of ``blocksize`` (64) consecutive elements; ``absmax[b] = max |w|`` per block;
* each element becomes the index of the nearest :data:`NF4_CODE` value to
  ``clip(w * (1 / absmax[b]), -1, 1)``; nearest means "compare with the float32 midpoints
  ``(code[i] + code[i+1]) / 2``, a value equal to a midpoint takes the lower index" (the
  ``torch.bucketize`` of bitsandbytes' reference backend ``backends/default/ops.py``; the
  thresholds of the CUDA kernel's ``dQuantizeNF4`` decision tree are the same midpoints);
* two 4-bit indices per ``uint8``: element ``2k`` in the high nibble, ``2k+1`` in the low;
* double quantisation (``compress_statistics=True``, QLoRA section 3 "Double
  Quantization"): ``offset = mean(absmax)``; ``absmax - offset`` is quantised by
  :func:`quantize_blockwise` in blocks of 256 with bitsandbytes' signed 8-bit dynamic map
  (:func:`dynamic_map`), keeping a float32 ``nested_absmax`` per 256-block;
* dequantisation: ``absmax = nested_code[q] * nested_absmax + offset`` (two float32
  roundings, no fused multiply-add), ``w = NF4_CODE[index] * absmax`` in float32, then
  cast to the compute dtype.

Known differences from bitsandbytes (all sub-ulp, none in the stored format):
``offset`` is the float64 mean rounded to float32, while torch takes a float32 reduction
whose order depends on the backend (bitsandbytes' own CPU and CUDA paths differ the same
way): the two agree within a few ulps. Blocks with a subnormal absmax are treated as zero
(XLA flushes subnormals). The nested 8-bit step follows the reference backend; bitsandbytes'
native CPU kernel (``cquantize_blockwise_cpu_fp32``) picks a non-nearest code for ~0.3 % of
values near code midpoints.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfit.quant import base

# The 16 NF4 values, bitsandbytes ``functional.get_4bit_type("nf4")`` (= QLoRA Appendix E,
# ``create_normal_map(offset=0.9677083)``), as float32.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# Block sizes bitsandbytes' quantize_4bit accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) -> quantize_blockwise(256)
_TINY = np.float32(1e-38)  # bitsandbytes' absmax.clamp(min=1e-38) before the reciprocal


def _midpoints(code: np.ndarray) -> np.ndarray:
    """Float32 decision thresholds between consecutive sorted code values."""
    code = np.asarray(code, np.float32)
    return ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (torch 2.x on
    x86): a float32 ``step = (end - start) / (steps - 1)``, then each value rounded once
    from the exact ``start + step * i`` (first half) or ``end - step * (steps - 1 - i)``
    (second half), which is what torch's kernel computes with fused multiply-adds."""
    s, e = np.float32(start), np.float32(end)
    step = float(np.float32(np.float32(e - s) / np.float32(steps - 1)))
    i = np.arange(steps)
    values = np.where(i < steps // 2, float(s) + step * i, float(e) - step * (steps - 1 - i))
    return values.astype(np.float32)


@functools.cache
def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit quantisation map, float32 ``[256]`` sorted ascending.

    A port of ``bitsandbytes.functional.create_dynamic_map`` (dynamic tree quantisation,
    Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning",
    https://arxiv.org/abs/1511.04561): for exponent ``i`` the midpoints of
    ``linspace(0.1, 1, 2**i + 1)`` scaled by ``10**(i - 6)`` (and negated when signed),
    plus 0 and 1. ``signed=True`` is the map of NF4 double quantisation. The result is
    read-only and cached.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def add(scale: float, means: np.ndarray) -> None:
        data.append(np.float32(scale) * means)
        if signed:
            data.append(np.float32(-scale) * means)

    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        items = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        b = _linspace32(0.1, 1.0, items)
        add(10.0 ** (-(max_exponent_bits - 1) + i), (b[:-1] + b[1:]) / np.float32(2))
    if additional_items > 0:
        b = _linspace32(0.1, 1.0, additional_items + 1)
        add(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), (b[:-1] + b[1:]) / 2)
    values = np.concatenate([*data, np.array([0.0, 1.0], np.float32)]).astype(np.float32)
    if values.size != 2**total_bits:
        raise ValueError(f"dynamic map has {values.size} values, expected {2**total_bits}")
    values = np.sort(np.concatenate([values, np.zeros(256 - values.size, np.float32)]))
    values.setflags(write=False)
    return values


def quantize_blockwise(
    x: np.ndarray, code: np.ndarray, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise quantisation of a float32 vector (bitsandbytes ``quantize_blockwise``).

    Host numpy, exact IEEE float32 (the statistics are small: one value per 64 weights).
    Mirrors bitsandbytes' reference backend (``backends/default/ops.py``): full blocks are
    scaled by the reciprocal of their absmax, a final partial block is divided by its
    absmax (clamped to 1e-38, and stored clamped), values clipped to [-1, 1] and rounded to
    the nearest code (float32 midpoints, ties to the lower index).

    Args:
      x: float32 ``[m]``.
      code: sorted float32 ``[256]`` map (e.g. :func:`dynamic_map`).
      blocksize: elements per block.

    Returns:
      ``(q uint8 [m], absmax float32 [ceil(m / blocksize)])``.
    """
    x = np.asarray(x, np.float32).reshape(-1)
    m = x.size
    rem = m % blocksize
    full = m - rem
    a = x[:full].reshape(-1, blocksize)
    absmax = np.abs(a).max(axis=1) if full else np.zeros((0,), np.float32)
    inv = np.float32(1.0) / np.maximum(absmax, _TINY)
    scaled = np.clip(a * inv[:, None], -1, 1).reshape(-1)
    if rem:
        am = np.maximum(np.abs(x[full:]).max(), _TINY).astype(np.float32)
        absmax = np.concatenate([absmax, am[None]])
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, -1, 1)])
    q = np.searchsorted(_midpoints(code), scaled.astype(np.float32), side="left")
    return q.astype(np.uint8), absmax.astype(np.float32)


def dequantize_blockwise(q: jax.Array, absmax: jax.Array, code: jax.Array, blocksize: int):
    """``code[q] * absmax[block]`` in float32 (bitsandbytes ``dequantize_blockwise``).

    Args:
      q: uint8 ``[..., m]``; absmax: float32 ``[..., ceil(m / blocksize)]``;
      code: float32 ``[..., 256]``.

    Returns:
      float32 ``[..., m]``.
    """
    m = q.shape[-1]
    values = jnp.take_along_axis(code, q.astype(jnp.int32), axis=-1)
    # Each scale repeated blocksize times by a broadcast and a reshape. (jnp.repeat with
    # total_repeat_length builds its gather indices from a cumulative sum of constants,
    # s32[n] for n scaled values, which XLA then constant-folds at compile time: the
    # "slow_operation_alarm: Constant folding ... s32[57344,16]" of an 8B NF4 step.)
    scale = jnp.broadcast_to(absmax[..., None], (*absmax.shape, blocksize))
    scale = scale.reshape(*absmax.shape[:-1], absmax.shape[-1] * blocksize)
    return values * scale[..., :m]


@functools.partial(jax.jit, static_argnames=("blocksize", "transpose"))
def _quantize_4bit(w: jax.Array, *, blocksize: int, transpose: bool):
    """``w [out, in]`` (or ``[in, out]`` with ``transpose``) -> ``(packed uint8 [n/2],
    absmax float32 [n/blocksize])``, bitsandbytes' NF4 ``quantize_4bit`` (see module doc)."""
    w = w.T if transpose else w
    a = w.astype(jnp.float32).reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(a), axis=1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.maximum(absmax, _TINY), 0.0)
    scaled = jnp.clip(a * inv[:, None], -1.0, 1.0).reshape(-1)
    # Index = number of midpoints strictly below the value (searchsorted side="left"):
    # 15 fused compares, cheaper to compile and run than a binary search.
    idx = sum((scaled > m).astype(jnp.uint8) for m in _midpoints(NF4_CODE).tolist())
    idx = idx.reshape(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1], absmax


def _double_quant(absmax: np.ndarray, *, code: np.ndarray, offset=None):
    """bitsandbytes' double quantisation of the float32 block scales (host numpy):
    ``absmax - offset`` (offset = their mean, accumulated in float64 and rounded once:
    deterministic on every backend) in 8-bit blocks of 256 with the dynamic map.

    Returns:
      ``(q uint8 [n], nested_absmax float32 [ceil(n / 256)], offset float32 scalar)``.
    """
    am = np.asarray(absmax, np.float32)
    off = np.float32(np.mean(am, dtype=np.float64) if offset is None else offset)
    q, nested = quantize_blockwise(am - off, code, NESTED_BLOCKSIZE)
    return q, nested, np.asarray(off, np.float32)


def _check_blocksize(n: int, blocksize: int, what: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    if n % blocksize:
        raise ValueError(
            f"{what}: {n} elements is not a multiple of the NF4 blocksize {blocksize}; "
            "bitsandbytes would quantise a partial last block, which jaxfit does not support"
        )


@base.register("nf4")
class NF4Weight(struct.PyTreeNode, base.WeightLeaf):
    """An NF4-quantised linear weight (bitsandbytes layout), a weight leaf for ``Dense``.

    Arrays may carry leading layer axes ``[L, ...]`` (stacked ``nn.scan`` parameters, one
    quantisation per layer); the static fields describe one layer. ``n = out * in``.

    Attributes:
      packed: uint8 ``[..., n/2]``, two NF4 indices per byte, first in the high nibble
        (bitsandbytes stores it as ``[n/2, 1]``).
      absmax: per 64-block scale: uint8 ``[..., n/blocksize]`` codes of ``absmax -
        offset`` with double quantisation, else float32 ``[..., n/blocksize]``.
      nested_absmax: float32 ``[..., ceil(n/blocksize/256)]`` (double quantisation) or None.
      nested_code: float32 ``[..., 256]``, the 8-bit map of ``absmax`` (double quantisation;
        :func:`dynamic_map` unless a checkpoint stored another), or None.
      offset: float32 ``[...]``, the mean subtracted before double quantisation, or None.
      hf_shape: per-layer weight shape in Hugging Face layout ``(out, in)`` (bitsandbytes'
        ``quant_state.shape``).
      blocksize: elements per absmax block (64).
      nested_blocksize: absmax values per nested block (256).
      dtype: name of the float dtype :meth:`dequantize` returns by default (bitsandbytes'
        ``quant_state.dtype``, the dtype of the weight that was quantised).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_code: jax.Array | None
    offset: jax.Array | None
    hf_shape: tuple[int, int] = struct.field(pytree_node=False)
    blocksize: int = struct.field(pytree_node=False, default=64)
    nested_blocksize: int = struct.field(pytree_node=False, default=NESTED_BLOCKSIZE)
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """Per-layer jaxfit kernel shape ``(in, out)``."""
        return (self.hf_shape[1], self.hf_shape[0])

    @property
    def num_weights(self) -> int:
        """Number of quantised weights, all layers included."""
        return (
            int(np.prod(self.packed.shape[:-1], dtype=np.int64))
            * self.hf_shape[0]
            * self.hf_shape[1]
        )

    # The options of quantize and their defaults (bitsandbytes' quantize_4bit defaults
    # for QLoRA: blocksize 64, compress_statistics=True).
    defaults = {"blocksize": 64, "double_quant": True}

    @classmethod
    def bits_per_weight(
        cls,
        in_features: int | None = None,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        nested_blocksize: int = NESTED_BLOCKSIZE,
    ) -> float:
        """Storage bits per weight, closed form (QLoRA, https://arxiv.org/abs/2305.14314,
        section 3 "Double Quantization"): ``4 + 32 / blocksize`` without double
        quantisation (a float32 absmax per block) and ``4 + 8 / blocksize + 32 /
        (blocksize * nested_blocksize)`` with it (an 8-bit absmax per block, a float32
        scale per 256 blocks): 4.127 for 64 / 256. Per-tensor constants (the offset and
        the 256-entry map) are not counted; ``in_features`` does not matter."""
        if double_quant:
            return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
        return 4 + 32 / blocksize

    @classmethod
    def quantize(
        cls,
        w: Any,
        *,
        layout: str = "kernel",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: Any = None,
        offset: Any = None,
    ) -> NF4Weight:
        """Quantise a float weight to NF4, exactly as bitsandbytes' ``quantize_4bit``.

        Args:
          w: float array, a jaxfit kernel ``[..., in, out]`` (``layout="kernel"``) or a
            Hugging Face weight ``[..., out, in]`` (``layout="hf"``); leading axes are
            layers, each quantised on its own.
          layout: ``"kernel"`` or ``"hf"`` (blocks always run over the HF row-major order).
          blocksize: elements per absmax block (bitsandbytes' valid sizes, default 64).
          double_quant: quantise the absmax values too (``compress_statistics=True``).
          dtype: :attr:`dtype` of the leaf (default: ``w``'s dtype).
          offset: override the double-quantisation offset (scalar or one per layer), e.g.
            to reproduce a bitsandbytes state whose float32 mean was reduced in another
            order; default ``mean(absmax)``.

        Returns:
          An :class:`NF4Weight` with arrays stacked over the leading axes of ``w``.

        Raises:
          ValueError: ``w`` has fewer than 2 dims, an unknown layout or blocksize, or a
            per-layer size ``out * in`` that ``blocksize`` does not divide (names both).
        """
        if layout not in ("kernel", "hf"):
            raise ValueError(f"layout must be 'kernel' or 'hf', got {layout!r}")
        if np.ndim(w) < 2:
            raise ValueError(f"NF4 quantises matrices; got shape {np.shape(w)}")
        lead = tuple(np.shape(w)[:-2])
        rows, cols = np.shape(w)[-2:]
        hf_shape = (cols, rows) if layout == "kernel" else (rows, cols)
        _check_blocksize(rows * cols, blocksize, f"weight of shape {tuple(np.shape(w))}")
        dtype = jnp.dtype(jnp.result_type(w) if dtype is None else dtype).name
        offsets = None if offset is None else np.broadcast_to(np.float32(offset), lead)
        code = dynamic_map() if double_quant else None
        layers_ = []
        for idx in np.ndindex(*lead):
            packed, absmax = _quantize_4bit(
                w[idx], blocksize=blocksize, transpose=layout == "kernel"
            )
            nested_absmax = nested_code = off = None
            if double_quant:
                n = np.shape(absmax)[0]
                shapes = (
                    jax.ShapeDtypeStruct((n,), jnp.uint8),
                    jax.ShapeDtypeStruct((-(-n // NESTED_BLOCKSIZE),), jnp.float32),
                    jax.ShapeDtypeStruct((), jnp.float32),
                )
                fixed = None if offsets is None else offsets[idx]
                absmax, nested_absmax, off = base.on_host(
                    functools.partial(_double_quant, code=code, offset=fixed),
                    absmax,
                    result_shapes=shapes,
                )
                nested_code = code
            layers_.append((packed, absmax, nested_absmax, nested_code, off))
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(layers_)):
            stack = lambda *xs: jnp.stack(xs).reshape((*lead, *np.shape(xs[0])))  # noqa: E731
        else:  # stack on the host (no per-shape compilation), one transfer per array
            stack = lambda *xs: jnp.asarray(  # noqa: E731
                np.stack([np.asarray(x) for x in xs]).reshape((*lead, *np.shape(xs[0])))
            )
        arrays = jax.tree.map(stack, *layers_)
        return cls(*arrays, hf_shape=hf_shape, blocksize=blocksize, dtype=dtype)

    def absmax_float(self) -> jax.Array:
        """The per-block scales as float32 ``[..., n/blocksize]`` (nested dequantisation:
        ``nested_code[q] * nested_absmax + offset``, as bitsandbytes' ``dequantize_4bit``)."""
        if not self.double_quant:
            return self.absmax.astype(jnp.float32)
        scaled = dequantize_blockwise(
            self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize
        )
        # bitsandbytes rounds the product before adding the offset; XLA:CPU would contract
        # the two into a fused multiply-add (optimization_barrier is expanded away before
        # fusion). A select between product and add blocks the contraction; it changes
        # no value (NaN stays NaN).
        scaled = jnp.where(jnp.isnan(scaled), jnp.float32(jnp.nan), scaled)
        return scaled + self.offset[..., None]

    def dequantize_hf(self, dtype: Any = None) -> jax.Array:
        """The weight in Hugging Face layout ``[..., out, in]`` (bitsandbytes'
        ``dequantize_4bit``): ``NF4_CODE[index] * absmax`` in float32, cast to ``dtype``
        (default :attr:`dtype`)."""
        return _dequantize(self, jnp.dtype(self.dtype if dtype is None else dtype).name, False)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The jaxfit kernel ``[..., in, out]`` in ``dtype`` (default :attr:`dtype`)."""
        return _dequantize(self, jnp.dtype(self.dtype if dtype is None else dtype).name, True)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """``x [..., in] @ kernel -> [..., out]`` in ``dtype``; the kernel is dequantised
        inside the traced computation (one layer: no leading axes on the arrays)."""
        if self.packed.ndim != 1:
            raise ValueError(
                f"NF4Weight.matmul needs one layer's weight; arrays have leading axes "
                f"{self.packed.shape[:-1]} (use it inside nn.scan, or index a layer)"
            )
        return jnp.matmul(x.astype(dtype), self.dequantize(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize(leaf: NF4Weight, dtype: str, kernel_layout: bool) -> jax.Array:
    """``[..., out, in]`` (or the kernel ``[..., in, out]``) in ``dtype``."""
    lead = leaf.packed.shape[:-1]
    idx = jnp.stack([leaf.packed >> 4, leaf.packed & 0x0F], axis=-1).astype(jnp.int32)
    values = jnp.asarray(NF4_CODE)[idx].reshape(*lead, -1, leaf.blocksize)
    w = (values * leaf.absmax_float()[..., None]).reshape(*lead, *leaf.hf_shape)
    return (jnp.swapaxes(w, -1, -2) if kernel_layout else w).astype(dtype)

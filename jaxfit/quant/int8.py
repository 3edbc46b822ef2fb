"""Symmetric int8 weights with one absmax scale per output channel.

The weight half of LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339,
section 3.1 "vector-wise quantization"): each output channel ``o`` (a row of the Hugging
Face ``[out, in]`` weight, a column of the jaxfit kernel ``[in, out]``) is scaled by its
absolute maximum, ``q = round(w * 127 / absmax[o])`` (half to even), ``scale = absmax /
127``. The codes equal bitsandbytes' ``int8_vectorwise_quant(W)`` (``CB``, with ``SCB =
absmax``) for the same float32 weight; the matmul dequantises inside the jitted function
and accumulates in float32: ``y = (x @ q) * scale``. Outlier decomposition (the
activation half of LLM.int8()) is not done: activations stay in the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfit.quant import base


@functools.partial(jax.jit, static_argnames="transpose")
def _quantize(w: jax.Array, transpose: bool) -> tuple[jax.Array, jax.Array]:
    """``w [..., in, out]`` (``[..., out, in]`` with ``transpose``) -> ``(q int8 [..., in,
    out], absmax float32 [..., out])``."""
    w = (jnp.swapaxes(w, -1, -2) if transpose else w).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    # 127 / absmax then multiply, in float32, as bitsandbytes' int8_vectorwise_quant; an
    # all-zero channel gets scale 0 and codes 0 (bitsandbytes would produce NaN).
    inv = jnp.where(absmax > 0, 127.0 / absmax, 0.0)
    q = jnp.round(w * inv[..., None, :]).astype(jnp.int8)
    return q, absmax


@functools.partial(jax.jit, static_argnums=2)
def _dequantize(q: jax.Array, scale: jax.Array, dtype: str) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


@base.register("int8")
class Int8Weight(struct.PyTreeNode, base.WeightLeaf):
    """An int8 kernel with per-output-channel float32 scales; a weight leaf for ``Dense``.

    Attributes:
      q: int8 ``[..., in, out]`` codes in ``[-127, 127]`` (jaxfit kernel layout; leading
        axes are stacked layers).
      scale: float32 ``[..., out]``, ``absmax / 127`` of each output channel.
      dtype: name of the float dtype :meth:`dequantize` returns by default.
    """

    q: jax.Array
    scale: jax.Array
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """Per-layer kernel shape ``(in, out)``."""
        return tuple(self.q.shape[-2:])

    @property
    def num_weights(self) -> int:
        return int(np.prod(self.q.shape, dtype=np.int64))

    # No options: one absmax scale per output channel is the whole format.
    defaults = {}

    @classmethod
    def bits_per_weight(cls, in_features: int | None = None) -> float:
        """Storage bits per weight, closed form: ``8 + 32 / in_features`` (an int8 code
        per weight, one float32 scale per output channel of ``in_features`` weights).

        Raises:
          ValueError: ``in_features`` not given (the cost depends on it).
        """
        if not in_features:
            raise ValueError("int8 bits per weight depends on in_features")
        return 8 + 32 / in_features

    @classmethod
    def quantize(cls, w: Any, *, layout: str = "kernel", dtype: Any = None) -> Int8Weight:
        """Quantise a float weight.

        Args:
          w: a kernel ``[..., in, out]`` (``layout="kernel"``) or a Hugging Face weight
            ``[..., out, in]`` (``layout="hf"``); leading axes are layers.
          layout: ``"kernel"`` or ``"hf"``.
          dtype: :attr:`dtype` of the leaf (default: ``w``'s dtype).

        Returns:
          An :class:`Int8Weight` with ``q`` in kernel layout.

        Raises:
          ValueError: fewer than 2 dims, or an unknown layout.
        """
        if layout not in ("kernel", "hf"):
            raise ValueError(f"layout must be 'kernel' or 'hf', got {layout!r}")
        if np.ndim(w) < 2:
            raise ValueError(f"int8 quantises matrices; got shape {np.shape(w)}")
        dtype = jnp.dtype(jnp.result_type(w) if dtype is None else dtype).name
        q, absmax = _quantize(w, transpose=layout == "hf")
        # On the host: XLA would turn the division by a constant into a multiplication.
        scale = base.on_host(
            lambda a: np.asarray(a, np.float32) / np.float32(127),
            absmax,
            result_shapes=jax.ShapeDtypeStruct(np.shape(absmax), jnp.float32),
        )
        return cls(q=q, scale=jnp.asarray(scale), dtype=dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel ``[..., in, out]``: ``q * scale`` in float32, cast to ``dtype``
        (default :attr:`dtype`)."""
        return _dequantize(
            self.q, self.scale, jnp.dtype(self.dtype if dtype is None else dtype).name
        )

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """``x [..., in] -> [..., out]`` in ``dtype``: ``(x @ q) * scale`` with the codes
        cast to ``dtype`` (exact: |q| <= 127 fits bfloat16's mantissa) and float32
        accumulation; one layer (no leading axes on the arrays)."""
        if self.q.ndim != 2:
            raise ValueError(
                f"Int8Weight.matmul needs one layer's weight; q has shape {self.q.shape}"
            )
        y = jnp.matmul(x.astype(dtype), self.q.astype(dtype), preferred_element_type=jnp.float32)
        return (y * self.scale).astype(dtype)

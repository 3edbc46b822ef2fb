"""The weight-leaf base class, the registry of quantisation formats, and host statistics.

A *weight leaf* (see :func:`jaxfit.models.layers.matmul`) stands in the parameter tree
where a ``kernel [in, out]`` array would be and implements ``matmul(x, dtype)``. A
quantisation format is a :class:`WeightLeaf` subclass that registers itself under a name
with :func:`register` (``@register("nf4")``): :func:`format_class` finds it by that name
(``config.base_format``, ``quantize_params(method=...)``), and every leaf reports its
format (``leaf.kind``) and its storage (``leaf.nbytes``), so no code matches class names.
Adding a format (fp8, a GPTQ-style int4) is one module with one registered class.

Why the leaves are also flax ``AxisMetadata`` boxes: ``Module.param`` checks the first
array of an existing parameter against the initializer's ``[in, out]`` shape
(``ScopeParamShapeError``), and an NF4 leaf's first array is the packed ``uint8
[in*out/2]`` code vector. ``param`` *unboxes* ``AxisMetadata`` before that check, and a
leaf unboxes to a :class:`KernelView`, a plain object with ``shape == (in, out)`` and the
same ``matmul``, so ``layers.Dense`` runs quantised weights without a code change. The
box's ``add_axis`` / ``remove_axis`` (called by ``nn.scan``) are identities: the layer
axis lives in the arrays, the static metadata is per layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxfit import placement

# name -> leaf class, filled by @register in the format modules (int8.py, nf4.py).
FORMATS: dict[str, type] = {}


def register(name: str):
    """Class decorator: register a :class:`WeightLeaf` subclass as format ``name`` (sets
    its ``kind``). ``ValueError`` when the name is taken by another class."""

    def deco(cls):
        if FORMATS.get(name, cls) is not cls:
            raise ValueError(f"quantisation format {name!r} is already registered")
        cls.kind = name
        FORMATS[name] = cls
        return cls

    return deco


def format_class(name: str) -> type:
    """The leaf class registered as ``name``; ``ValueError`` listing the known formats."""
    if name not in FORMATS:
        raise ValueError(
            f"unknown quantisation method (format) {name!r}; expected one of {sorted(FORMATS)}"
        )
    return FORMATS[name]


class KernelView:
    """What a layer sees when it reads a quantised leaf through ``Module.param``.

    Not a pytree: it only lives inside a traced ``apply``. ``shape`` is the logical
    per-layer kernel shape ``(in, out)`` (what flax compares against the initializer);
    ``matmul`` forwards to the leaf.
    """

    def __init__(self, leaf: WeightLeaf):
        self.leaf = leaf
        self.shape = tuple(leaf.kernel_shape)
        self.ndim = len(self.shape)
        self.dtype = jnp.dtype(leaf.dtype)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """The leaf's ``matmul``, its arrays gathered first under FSDP
        (:func:`jaxfit.placement.gathered`: the codes and statistics, not a dequantised copy)."""
        return placement.gathered(self.leaf).matmul(x, dtype)

    def __repr__(self) -> str:
        return f"KernelView({type(self.leaf).__name__}, shape={self.shape})"


class WeightLeaf(meta.AxisMetadata):
    """Mixin of the quantised leaves: the flax box protocol (see the module docstring).

    Subclasses provide ``kernel_shape`` (per-layer ``(in, out)``), ``dtype`` (name of the
    float dtype ``dequantize`` returns by default), ``matmul(x, dtype)`` and
    ``dequantize(dtype=None)``, and are registered with :func:`register`, which sets
    ``kind`` (the format's name).
    """

    kind: ClassVar[str] = ""

    @property
    def nbytes(self) -> int:
        """Bytes the leaf stores: codes and statistics (arrays or ``ShapeDtypeStruct``)."""
        return int(
            sum(
                np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(self)
                if hasattr(x, "shape") and hasattr(x, "dtype")
            )
        )

    def unbox(self) -> KernelView:
        return KernelView(self)

    def replace_boxed(self, val: Any) -> WeightLeaf:
        if isinstance(val, KernelView):
            return val.leaf
        raise TypeError(
            f"cannot replace the contents of a {type(self).__name__} with {type(val).__name__}"
        )

    def add_axis(self, index: int, params: dict) -> WeightLeaf:
        return self

    def remove_axis(self, index: int, params: dict) -> WeightLeaf:
        return self


def on_host(fn, *args, result_shapes):
    """``fn(*args)`` in host numpy: directly for concrete arrays, through
    ``jax.pure_callback`` when an argument is traced (under ``jit`` / ``eval_shape``, e.g.
    planning a quantised base without its weights), so the exact float32 host arithmetic of
    the bitsandbytes-compatible statistics is the same either way.

    Args:
      fn: numpy function of ``args`` returning arrays shaped like ``result_shapes``.
      result_shapes: pytree of ``jax.ShapeDtypeStruct`` of ``fn``'s results.
    """
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
        return jax.pure_callback(fn, result_shapes, *args)
    return fn(*(np.asarray(a) for a in args))


def is_weight_leaf(x: Any) -> bool:
    """True for a quantised leaf (an instance of a registered format)."""
    return isinstance(x, WeightLeaf)

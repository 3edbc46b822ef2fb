"""The weight-leaf base class, the registry of quantisation formats, and host statistics.

A *weight leaf* (see :func:`jaxfit.models.layers.matmul`) stands in the parameter tree
where a ``kernel [in, out]`` array would be and implements ``matmul(x, dtype)``. A
quantisation format is a :class:`WeightLeaf` subclass that registers itself under a name
with :func:`register` (``@register("nf4")``) and owns everything that varies by format:

* ``quantize(w, *, layout, dtype, **options)`` and ``dequantize`` / ``matmul``;
* ``defaults``: its options and their default values (NF4: ``blocksize``,
  ``double_quant``), which :func:`options` checks and completes for every caller;
* ``bits_per_weight(in_features, **options)``: its storage cost in closed form (the
  report, :func:`jaxfit.quant.report.bits_per_weight`);
* ``calibrate``: ``None``, or ``calibrate(w, x, **options) -> leaf``, a quantisation that
  looks at activations ``x [n, in]`` (GPTQ / AWQ-style formats), used by
  :func:`jaxfit.quant.quantize_params` when calibration data is given.

:func:`format_class` finds a format by name (``config.base_format``,
``quantize_params(method=...)``, ``load_pretrained(quantize=...)``), :func:`names` lists
them (the CLIs' ``--quant`` choices), and every leaf reports its format (``leaf.kind``)
and its storage (``leaf.nbytes``), so no code matches class or format names. Adding a
format (fp8, a GPTQ-style int4) is one module with one registered class, imported by
``jaxfit/quant/__init__.py``.

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

import inspect
from collections.abc import Callable, Mapping
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
    its ``kind``).

    Raises:
      ValueError: the name is taken by another class, or a key of the class's
        ``defaults`` is not a keyword argument of its ``quantize``.
      TypeError: the class does not implement ``quantize`` and ``bits_per_weight``.
    """

    def deco(cls):
        if FORMATS.get(name, cls) is not cls:
            raise ValueError(f"quantisation format {name!r} is already registered")
        if not issubclass(cls, WeightLeaf) or "quantize" not in dir(cls):
            raise TypeError(f"format {name!r}: {cls.__name__} is not a WeightLeaf with quantize")
        if cls.bits_per_weight.__func__ is WeightLeaf.bits_per_weight.__func__:
            raise TypeError(f"format {name!r}: {cls.__name__} does not define bits_per_weight")
        keywords = set(inspect.signature(cls.quantize).parameters)
        if bad := sorted(set(cls.defaults) - keywords):
            raise ValueError(
                f"format {name!r}: defaults {bad} are not keyword arguments of "
                f"{cls.__name__}.quantize"
            )
        cls.kind = name
        FORMATS[name] = cls
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove format ``name`` from the registry (a format registered by a test);
    ``KeyError`` if it is not registered."""
    del FORMATS[name]


def names() -> tuple[str, ...]:
    """The registered format names, sorted: the choices of every ``--quant`` flag."""
    return tuple(sorted(FORMATS))


def format_class(name: str) -> type:
    """The leaf class registered as ``name``; ``ValueError`` listing the known formats."""
    if name not in FORMATS:
        raise ValueError(
            f"unknown quantisation method (format) {name!r}; expected one of {list(names())}"
        )
    return FORMATS[name]


def options(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Format ``name``'s options: its ``defaults`` updated with ``given``.

    Raises:
      ValueError: an unknown format, or a key of ``given`` that is not one of the
        format's options (names the format and its options).
    """
    cls = format_class(name)
    given = dict(given or {})
    if bad := sorted(set(given) - set(cls.defaults)):
        raise ValueError(
            f"quantisation format {name!r} has no option(s) {bad}; its options are "
            f"{dict(cls.defaults)}"
        )
    return {**cls.defaults, **given}


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

    Subclasses provide ``kernel_shape`` (per-layer ``(in, out)``), ``num_weights``,
    ``dtype`` (name of the float dtype ``dequantize`` returns by default), the classmethod
    ``quantize(w, *, layout="kernel", dtype=None, **options)`` (``w`` a float kernel
    ``[..., in, out]``, or ``[..., out, in]`` with ``layout="hf"``; leading axes are
    layers), ``matmul(x, dtype)``, ``dequantize(dtype=None)``, :attr:`defaults`,
    :meth:`bits_per_weight` and optionally :attr:`calibrate`; they are registered with
    :func:`register`, which sets ``kind`` (the format's name).
    """

    kind: ClassVar[str] = ""
    # The format's options (keyword arguments of ``quantize``) and their defaults.
    defaults: ClassVar[Mapping[str, Any]] = {}
    # None, or ``calibrate(w [in, out], x [n, in], **options) -> leaf``: quantise one
    # layer's kernel using calibration activations ``x`` (see the module docstring).
    calibrate: ClassVar[Callable[..., WeightLeaf] | None] = None

    @classmethod
    def bits_per_weight(cls, in_features: int | None = None, **options) -> float:
        """Storage bits per weight in closed form for ``options`` (the format's
        ``defaults`` completed); ``in_features`` for formats with per-channel statistics.
        Every format overrides it (its source in its docstring)."""
        raise NotImplementedError(f"{cls.__name__} does not define bits_per_weight")

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


def is_quantized(x: Any) -> bool:
    """True for a quantised leaf (an instance of a :class:`WeightLeaf` format); any weight
    leaf, LoRA ones included, is :func:`jaxfit.models.layers.is_weight_leaf`."""
    return isinstance(x, WeightLeaf)

"""Quantised weight leaves and the parameter-tree transform that installs them.

A *weight leaf* (see :func:`jaxfit.models.layers.matmul`) stands in the parameter tree
where a ``kernel [in, out]`` array would be and implements ``matmul(x, dtype)``. The
quantised leaves (:class:`~jaxfit.quant.int8.Int8Weight`,
:class:`~jaxfit.quant.nf4.NF4Weight`) are ``flax.struct`` pytrees of integer codes and
float statistics, so ``jax.jit``, ``nn.scan`` (which slices every array on the leading
layer axis) and the path-string rules of :mod:`jaxfit.params` see ordinary arrays.

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

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxfit import params as params_lib

# Every kernel inside a stack of layers: ``layers/...`` (Llama, CLIP towers) and ``h/...``
# (GPT-2). Embeddings, norms and the LM head stay float, as transformers' bitsandbytes
# integration keeps them (``get_keys_to_not_convert``: the output embedding is skipped).
DEFAULT_RULES: tuple[str, ...] = (r"(^|/)(layers|h)/.*kernel$",)

METHODS = ("nf4", "int8")


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
        return self.leaf.matmul(x, dtype)

    def __repr__(self) -> str:
        return f"KernelView({type(self.leaf).__name__}, shape={self.shape})"


class WeightLeaf(meta.AxisMetadata):
    """Mixin of the quantised leaves: the flax box protocol (see the module docstring).

    Subclasses provide ``kernel_shape`` (per-layer ``(in, out)``), ``dtype`` (name of the
    float dtype ``dequantize`` returns by default), ``matmul(x, dtype)`` and
    ``dequantize(dtype=None)``.
    """

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
    """True for a quantised leaf (``Int8Weight`` / ``NF4Weight``)."""
    return isinstance(x, WeightLeaf)


def leaf_class(method: str):
    """The leaf class of a method name (``"nf4"`` or ``"int8"``); ``ValueError`` if unknown."""
    from jaxfit.quant.int8 import Int8Weight
    from jaxfit.quant.nf4 import NF4Weight

    classes = {"nf4": NF4Weight, "int8": Int8Weight}
    if method not in classes:
        raise ValueError(f"unknown quantisation method {method!r}; expected one of {METHODS}")
    return classes[method]


def quantize_params(
    params: Any,
    rules: Sequence[str] | None = None,
    method: str = "nf4",
    *,
    exclude: Sequence[str] = (),
    float_dtype: Any = jnp.bfloat16,
    **quant_kwargs,
) -> Any:
    """Replace the kernels selected by ``rules`` with quantised weight leaves.

    Selection is :func:`jaxfit.params.match` over path strings (``"layers/mlp/up_proj/
    kernel"``): a leaf is quantised when a pattern of ``rules`` matches and none of
    ``exclude`` does. Kernels are ``[in, out]`` or stacked ``[num_layers, in, out]``
    (quantised per layer). The model code is unchanged: ``layers.Dense`` calls the leaf.

    Args:
      params: a parameter tree of float arrays (nested dicts).
      rules: regular expressions; default :data:`DEFAULT_RULES` (every kernel under a
        layer stack; embeddings, norms and the LM head stay float).
      method: ``"nf4"`` (:class:`~jaxfit.quant.nf4.NF4Weight`) or ``"int8"``
        (:class:`~jaxfit.quant.int8.Int8Weight`).
      exclude: patterns of leaves to leave float even if ``rules`` match.
      float_dtype: dtype of every leaf that stays float (default bfloat16, as
        transformers loads the rest of a 4-bit model in ``torch_dtype``); ``None`` keeps
        each leaf's dtype.
      **quant_kwargs: forwarded to the leaf's ``quantize`` (NF4: ``blocksize``,
        ``double_quant``).

    Returns:
      A tree of the same structure with quantised leaves in place of the selected
      kernels.

    Raises:
      ValueError: unknown method, a rule that matches no leaf (names it), a selected leaf
        that is not a 2-D/3-D float kernel or is already quantised (names its path).
    """
    cls = leaf_class(method)
    rules = tuple(DEFAULT_RULES if rules is None else rules)
    if bad := params_lib.unmatched(params, rules):
        raise ValueError(
            f"quantisation rules match no parameter: {bad}; parameter paths look like "
            f"{list(params_lib.flatten(params))[:6]}"
        )
    selected = params_lib.match(params, rules)
    excluded = params_lib.match(params, tuple(exclude))

    def convert(path, x, sel, exc):
        name = params_lib.path_str(path)
        # Under an existing leaf the masks are trees of bools: any of its arrays selected.
        sel, exc = any(jax.tree.leaves(sel)), any(jax.tree.leaves(exc))
        if sel and not exc:
            if is_weight_leaf(x):
                raise ValueError(f"parameter {name!r} is already quantised")
            if np.ndim(x) not in (2, 3) or not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(
                    f"parameter {name!r} with shape {np.shape(x)} and dtype {x.dtype} is not "
                    "a float kernel [in, out] or a stacked [num_layers, in, out] kernel"
                )
            return cls.quantize(x, **quant_kwargs)
        if is_weight_leaf(x):
            return x
        if float_dtype is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x, float_dtype)
        return x

    return jax.tree_util.tree_map_with_path(
        convert, params, selected, excluded, is_leaf=is_weight_leaf
    )


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """Replace every quantised leaf by its float kernel (``leaf.dequantize(dtype)``)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_weight_leaf(x) else x, params, is_leaf=is_weight_leaf
    )

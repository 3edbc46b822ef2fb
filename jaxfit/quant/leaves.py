"""The parameter-tree transforms that install quantised weight leaves, and undo them.

:func:`quantize_params` replaces the kernels selected by rules over parameter paths
(:func:`jaxfit.params.select`) with leaves of a registered format
(:mod:`jaxfit.quant.base`); :func:`dequantize_params` undoes it. Which kernels a model
quantises by default is a fact about its family (``jaxfit.hf.families.DEFAULT_QUANT_RULES``:
every kernel under a layer stack), so the caller passes the rules in. The leaves are
``flax.struct`` pytrees of integer codes and float statistics, so ``jax.jit``, ``nn.scan``
(which slices every array on the leading layer axis) and the path-string rules see
ordinary arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import params as params_lib
from jaxfit.quant import base
from jaxfit.quant.base import is_quantized


def selected_kernels(params: Any, rules: Sequence[str], exclude: Sequence[str] = ()) -> set[str]:
    """The path strings :func:`quantize_params` quantises (:func:`jaxfit.params.select`,
    a quantised leaf counting as one parameter).

    Raises:
      ValueError: a rule that matches no parameter (names it).
    """
    return set(
        params_lib.select(
            params, rules, exclude=exclude, is_leaf=is_quantized, what="quantisation rules"
        )
    )


def check_kernel(name: str, shape: tuple[int, ...], dtype: Any) -> None:
    """``ValueError`` naming ``name`` unless it is a float kernel ``[in, out]`` or a stacked
    ``[num_layers, in, out]`` one (what a format quantises)."""
    if len(shape) not in (2, 3) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"parameter {name!r} with shape {tuple(shape)} and dtype {dtype} is not a float "
            "kernel [in, out] or a stacked [num_layers, in, out] kernel"
        )


def quantize_params(
    params: Any,
    rules: Sequence[str],
    method: str = "nf4",
    *,
    exclude: Sequence[str] = (),
    float_dtype: Any = jnp.bfloat16,
    calibration: Mapping[str, Any] | None = None,
    **options,
) -> Any:
    """Replace the kernels selected by ``rules`` with quantised weight leaves.

    Selection is :func:`jaxfit.params.select` over path strings (``"layers/mlp/up_proj/
    kernel"``): a leaf is quantised when a pattern of ``rules`` matches and none of
    ``exclude`` does. Kernels are ``[in, out]`` or stacked ``[num_layers, in, out]``
    (quantised per layer). The model code is unchanged: ``layers.Dense`` calls the leaf.

    Args:
      params: a parameter tree of float arrays (nested dicts).
      rules: regular expressions over parameter paths, e.g. a model family's
        ``jaxfit.hf.families.DEFAULT_QUANT_RULES`` (every kernel under a layer stack;
        embeddings, norms and the LM head stay float).
      method: a registered format name (:func:`jaxfit.quant.base.names`: ``"nf4"``,
        ``"int8"``, ...).
      exclude: patterns of leaves to leave float even if ``rules`` match.
      float_dtype: dtype of every leaf that stays float (default bfloat16, as
        transformers loads the rest of a 4-bit model in ``torch_dtype``); ``None`` keeps
        each leaf's dtype.
      calibration: for a format with a ``calibrate`` hook, activations entering
        selected kernels by path: ``[n, in]`` for a kernel ``[in, out]``, ``[L, n, in]``
        for a stack; those kernels are quantised with ``calibrate(w, x, **options)``,
        the others with ``quantize``.
      **options: the format's options (its ``defaults`` fill the rest; NF4:
        ``blocksize``, ``double_quant``).

    Returns:
      A tree of the same structure with quantised leaves in place of the selected
      kernels.

    Raises:
      ValueError: unknown method or option, a rule that matches no leaf (names it), a
        selected leaf that is not a 2-D/3-D float kernel or is already quantised (names
        its path), calibration for a format without a hook, for a path that is not
        selected, or of the wrong shape (names it).
    """
    cls = base.format_class(method)
    opts = base.options(method, options)
    selected = selected_kernels(params, rules, exclude)
    calibration = dict(calibration or {})
    if calibration and cls.calibrate is None:
        raise ValueError(f"quantisation format {method!r} has no calibration step")
    if bad := sorted(set(calibration) - selected):
        raise ValueError(f"calibration data for parameters that are not quantised: {bad}")

    def convert(path, x):
        name = params_lib.path_str(path)
        if name in selected:
            if is_quantized(x):
                raise ValueError(f"parameter {name!r} is already quantised")
            check_kernel(name, np.shape(x), jnp.result_type(x))
            if name in calibration:
                return _calibrated(cls, name, x, calibration[name], opts)
            return cls.quantize(x, **opts)
        if is_quantized(x):
            return x
        if float_dtype is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x, float_dtype)
        return x

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_quantized)


def _calibrated(cls, name: str, w: Any, x: Any, opts: dict) -> Any:
    """``cls.calibrate`` of one kernel, per layer for a stack (leaves stacked on axis 0)."""
    if (
        np.ndim(x) != np.ndim(w)
        or np.shape(x)[-1] != np.shape(w)[-2]
        or (np.ndim(w) == 3 and np.shape(x)[0] != np.shape(w)[0])
    ):
        raise ValueError(
            f"calibration activations for {name!r} have shape {np.shape(x)}; the kernel "
            f"{np.shape(w)} needs [n, in] (or [num_layers, n, in] for a stack)"
        )
    if np.ndim(w) == 2:
        return cls.calibrate(w, x, **opts)
    layers = [cls.calibrate(w[i], x[i], **opts) for i in range(np.shape(w)[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """Replace every quantised leaf by its float kernel (``leaf.dequantize(dtype)``)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )

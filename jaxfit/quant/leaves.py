"""The parameter-tree transforms that install quantised weight leaves, and where they go.

:func:`quantize_params` replaces the kernels selected by rules over parameter paths
(:mod:`jaxfit.params`) with leaves of a registered format (:mod:`jaxfit.quant.base`;
importing this module registers ``int8`` and ``nf4``); :func:`dequantize_params` undoes it.
The leaves are ``flax.struct`` pytrees of integer codes and float statistics, so
``jax.jit``, ``nn.scan`` (which slices every array on the leading layer axis) and the
path-string rules see ordinary arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import params as params_lib
from jaxfit.hf import families
from jaxfit.quant import base, int8, nf4  # noqa: F401  (int8 / nf4 register their formats)
from jaxfit.quant.base import is_weight_leaf

# Every kernel inside a layer stack of any family (the registry's ``Family.stack``:
# ``layers/...`` for Llama, Qwen2 and the CLIP towers, ``h/...`` for GPT-2). Embeddings,
# norms and the LM head stay float, as transformers' bitsandbytes integration keeps them
# (``get_keys_to_not_convert``: the output embedding is skipped).
DEFAULT_RULES: tuple[str, ...] = families.DEFAULT_QUANT_RULES


def leaf_class(method: str):
    """The leaf class of a format name (``"nf4"``, ``"int8"``, any registered format);
    ``ValueError`` if unknown."""
    return base.format_class(method)


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

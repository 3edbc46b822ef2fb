"""Which kernels get LoRA adapters: target rules over parameter paths.

A *target* is one of

* a PEFT-style module short name, any string of word characters (``q_proj``, ``c_attn``,
  ``fc1``, ``text_projection``): it selects every linear kernel whose path has a component
  equal to the name followed by ``kernel`` (regex ``(^|/)NAME/kernel$``). jaxfit paths
  mirror the Hugging Face module tree, so the names PEFT users write in
  ``LoraConfig(target_modules=[...])`` work unchanged (:data:`PEFT_SHORT_NAMES`);
* ``"all-linear"``: every linear kernel except the LM head, like PEFT's
  ``INCLUDE_LINEAR_LAYERS_SHORTHAND`` (``peft/tuners/tuners_utils.py``,
  ``_maybe_include_all_linear_layers``: every ``nn.Linear``/``Conv1D`` minus
  ``model.get_output_embeddings()``);
* anything else: a regular expression ``re.search``-ed on the path string of each linear
  kernel, as everywhere in jaxfit: short names and regexes are selection rules of
  :func:`jaxfit.params.select`, the same mechanism that picks what is quantised, e.g.
  ``r"layers/self_attn/(q|v)_proj/kernel$"``.

A *linear kernel* is a leaf whose path ends in ``kernel`` and whose (logical) shape is
``[in, out]``, or ``[L, in, out]`` inside an ``nn.scan`` stack: the kernels of
:class:`jaxfit.models.layers.Dense`. Convolution kernels (4-D) and embeddings are never
targets. A weight leaf (quantised or LoRA, anything with ``matmul``:
:func:`jaxfit.models.layers.is_weight_leaf`) counts as one leaf of its logical kernel shape
(:func:`kernel_shape`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from jaxfit import params as params_lib
from jaxfit.hf import families
from jaxfit.models.layers import is_weight_leaf

PyTree = Any

ALL_LINEAR = "all-linear"

# The PEFT ``target_modules`` names of each family (HF module names = jaxfit path parts),
# from the family registry (``Family.peft_targets``).
PEFT_SHORT_NAMES: dict[str, tuple[str, ...]] = {
    name: family.peft_targets for name, family in families.FAMILIES.items()
}

# The output head that "all-linear" leaves out (PEFT excludes get_output_embeddings()).
LM_HEAD = r"(^|/)lm_head/kernel$"

_SHORT_NAME = re.compile(r"\w+")


def kernel_shape(leaf: Any) -> tuple[int, ...]:
    """Logical shape ``[in, out]`` / ``[L, in, out]`` of a kernel leaf.

    Arrays and ``ShapeDtypeStruct`` give ``.shape``; a LoRA leaf the shape of its base; a
    quantised leaf of :mod:`jaxfit.quant` (per-layer ``kernel_shape``, no ``.shape``) the
    shape of its ``dequantize()``, found by ``jax.eval_shape`` (nothing is computed; the
    leading layer axes of a stack included). Other weight leaves must expose ``.shape``.

    Raises:
      TypeError: a weight leaf with neither ``shape`` nor ``dequantize``.
    """
    base = getattr(leaf, "base", None)
    if is_weight_leaf(leaf) and base is not None:
        return kernel_shape(base)
    shape = getattr(leaf, "shape", None)
    if shape is None and is_weight_leaf(leaf) and hasattr(leaf, "dequantize"):
        shape = _dequantized_shape(leaf)
    if shape is None:
        raise TypeError(
            f"{type(leaf).__name__} has no .shape; weight leaves must expose the logical kernel "
            "shape [in, out] (or [L, in, out] in a scanned stack) or a dequantize() method"
        )
    return tuple(int(d) for d in shape)


_SHAPE_CACHE: dict = {}


def _dequantized_shape(leaf: Any) -> tuple[int, ...]:
    """``dequantize()``'s output shape, traced once per (treedef, array shapes/dtypes)."""
    arrays, treedef = jax.tree_util.tree_flatten(leaf)
    key = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in arrays))
    if key not in _SHAPE_CACHE:
        _SHAPE_CACHE[key] = tuple(jax.eval_shape(lambda x: x.dequantize(), leaf).shape)
    return _SHAPE_CACHE[key]


def _is_kernel_like(leaf: Any) -> bool:
    return hasattr(leaf, "shape") or (is_weight_leaf(leaf) and hasattr(leaf, "dequantize"))


def linear_kernels(params: PyTree) -> dict[str, Any]:
    """``{path_str: leaf}`` of every linear kernel (see the module docstring), tree order."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]
    for path, leaf in leaves:
        name = params_lib.path_str(path)
        if name.rsplit("/", 1)[-1] != "kernel" or not _is_kernel_like(leaf):
            continue
        if len(kernel_shape(leaf)) in (2, 3):
            out[name] = leaf
    return out


def rule_regex(target: str) -> str:
    """The path regex of one target: short names become ``(^|/)NAME/kernel$``."""
    if _SHORT_NAME.fullmatch(target):
        return rf"(^|/){target}/kernel$"
    return target


def _as_list(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    return list(targets)


def select(params: PyTree, targets: str | Sequence[str]) -> list[str]:
    """Path strings of the linear kernels that ``targets`` select, in tree order.

    Args:
      params: a parameter tree (arrays, ``ShapeDtypeStruct`` or weight leaves).
      targets: one target or a sequence of them (short names, ``"all-linear"``, regexes).

    Returns:
      The selected paths, e.g. ``["h/attn/c_attn/kernel", "h/mlp/c_fc/kernel"]``.

    Raises:
      ValueError: no targets, an invalid regex, or a target that selects no linear kernel
        (the message names it and lists the available kernels).
    """
    targets = _as_list(targets)
    if not targets:
        raise ValueError("no LoRA targets given")
    kernels = linear_kernels(params)
    head = re.compile(LM_HEAD)
    chosen: set[str] = set()
    if any(t.lower() == ALL_LINEAR for t in targets):
        chosen = {k for k in kernels if not head.search(k)}
    rules = [rule_regex(t) for t in targets if t.lower() != ALL_LINEAR]
    if rules:
        chosen |= set(
            params_lib.select(
                kernels,
                rules,
                is_leaf=is_weight_leaf,
                what=f"LoRA targets {targets} as path regexes",
            )
        )
    return [k for k in kernels if k in chosen]

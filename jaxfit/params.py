"""Selecting parameters by name: the one way jaxfit picks leaves of a parameter tree.

Every leaf of a pytree has a *path string*, its keys joined by ``/``
(``"text_model/layers/mlp/fc1/kernel"``). Rules are regular expressions applied with
``re.search`` to that string (the big_vision convention of regex rules over parameter
names), so one set of names serves every feature:

* :func:`select` (rules and exclusions -> the selected paths, a rule that selects nothing
  is an error): what gets quantised (:func:`jaxfit.quant.quantize_params`,
  :func:`jaxfit.quant.random_init.random_quantized_params`, and
  :func:`jaxfit.hf.load_pretrained` while streaming) and the regex LoRA targets
  (:func:`jaxfit.lora.targets.select`);
* :func:`match` (a boolean tree): weight-decay masks (``optim.py``);
* :func:`assign` (first matching rule's value): parameter shardings (``sharding.py``).

Trees that mirror the parameters (optimizer states) find their parameter with
:func:`longest_contained`.

Works on any pytree: nested dicts of arrays, ``jax.ShapeDtypeStruct`` trees from
``jax.eval_shape``, ``flax.struct`` dataclasses (attribute names become path parts) and
lists/tuples (the index becomes a path part).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

PyTree = Any
T = TypeVar("T")


def _key_str(key: Any) -> str:
    """One path entry (``jax.tree_util`` key or plain value) as a string."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: tuple) -> str:
    """Join a pytree key path into ``"a/b/c"``.

    Args:
      path: a key path as produced by ``jax.tree_util.tree_flatten_with_path``
        (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ``FlattenedIndexKey`` entries) or a
        tuple of plain strings/ints.

    Returns:
      The entries joined by ``/``, e.g. ``"text_model/layers/mlp/fc1/kernel"``.
    """
    return "/".join(_key_str(k) for k in path)


def flatten(params: PyTree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Flatten a pytree into ``{path_str: leaf}`` in tree-flatten order.

    Args:
      params: any pytree.
      is_leaf: as ``jax.tree_util``'s: nodes for which it is true are leaves (e.g. a
        quantised weight leaf counts as one parameter, not as its arrays).

    Raises:
      ValueError: two leaves map to the same path string (e.g. a dict key containing ``/``).
    """
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]:
        name = path_str(path)
        if name in out:
            raise ValueError(f"two parameters share the path string {name!r}")
        out[name] = leaf
    return out


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise TypeError(f"patterns must be a sequence of strings, got the string {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"invalid parameter pattern {pattern!r}: {e}") from e
    return compiled


def match(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """Boolean tree: True where any pattern ``re.search``es the leaf's path string.

    Args:
      params: any pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
      patterns: regular expressions, e.g. ``[r"(^|/)bias$", r"norm"]``. An empty
        sequence matches nothing.

    Returns:
      A pytree with the structure of ``params`` and Python ``bool`` leaves (usable as an
      ``optax`` mask).

    Raises:
      ValueError: a pattern is not a valid regular expression.
      TypeError: ``patterns`` is a single string (a common slip: wrap it in a list).
    """
    compiled = _compile(patterns)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.search(path_str(path)) for c in compiled), params
    )


def assign(params: PyTree, rules: Sequence[tuple[str, T]], default: T) -> PyTree:
    """Tree of values chosen per leaf by the FIRST rule whose pattern matches its path.

    Args:
      params: any pytree.
      rules: ``(pattern, value)`` pairs tried in order, e.g. sharding rules
        ``[(r"embedding$", P("fsdp", None)), (r"kernel$", P(None, "fsdp"))]``.
      default: value for leaves no rule matches.

    Returns:
      A pytree with the structure of ``params`` holding the chosen values. Values that are
      themselves pytrees (tuples, ``PartitionSpec``) become leaves of the result only if
      the caller treats the result with ``is_leaf``; prefer leaf-like values.

    Raises:
      ValueError: a pattern is not a valid regular expression.
    """
    compiled = list(zip(_compile([p for p, _ in rules]), [v for _, v in rules]))

    def pick(path, _):
        name = path_str(path)
        for pattern, value in compiled:
            if pattern.search(name):
                return value
        return default

    return jax.tree_util.tree_map_with_path(pick, params)


def unmatched(params: PyTree, patterns: Sequence[str]) -> list[str]:
    """The patterns that match no leaf path of ``params`` (in the given order).

    Use it to catch typos in LoRA targets, freeze lists or decay masks:
    ``if bad := unmatched(params, cfg.lora.targets): raise ValueError(...)``.
    """
    names = list(flatten(params))
    return [p for p, c in zip(patterns, _compile(patterns)) if not any(c.search(n) for n in names)]


def select(
    params: PyTree,
    rules: Sequence[str],
    *,
    exclude: Sequence[str] = (),
    is_leaf: Callable[[Any], bool] | None = None,
    what: str = "rules",
) -> list[str]:
    """The path strings selected by ``rules``: a leaf is selected when a pattern of
    ``rules`` ``re.search``-es its path and no pattern of ``exclude`` does.

    The one answer to "which parameters does this feature touch" (quantisation, LoRA
    regex targets): every rule must select at least one leaf, so a typo fails loudly.

    Args:
      params: any pytree (arrays, ``jax.ShapeDtypeStruct``, weight leaves with
        ``is_leaf``), or a flat ``{path_str: leaf}`` dict of candidates.
      rules: regular expressions, e.g. ``[r"(^|/)layers/.*kernel$"]``.
      exclude: patterns of paths left out even when a rule selects them (they may match
        nothing).
      is_leaf: passed to :func:`flatten` (nodes to treat as one leaf).
      what: what the rules are called in the error message (``"quantisation rules"``).

    Returns:
      The selected path strings in tree-flatten order.

    Raises:
      ValueError: a rule that matches no path (names it and shows some paths), or an
        invalid regular expression.
      TypeError: ``rules`` or ``exclude`` is a single string.
    """
    names = list(flatten(params, is_leaf=is_leaf))
    compiled, excluded = _compile(rules), _compile(exclude)
    if bad := [p for p, c in zip(rules, compiled) if not any(c.search(n) for n in names)]:
        raise ValueError(
            f"{what} match no parameter: {bad}; the candidate paths are {names[:12]}"
            + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        )
    return [
        n
        for n in names
        if any(c.search(n) for c in compiled) and not any(c.search(n) for c in excluded)
    ]


def longest_contained(path: str, names) -> str | None:
    """The longest of ``names`` (path strings) that is a run of whole components of
    ``path``, or None.

    How a leaf of a tree that mirrors the parameters is matched to its parameter: an
    optax state leaf ``"1/0/mu/h/attn/kernel"`` or an 8-bit moment's
    ``"1/0/nu/h/attn/kernel/codes"`` contains the parameter path ``"h/attn/kernel"``
    (``jaxfit.sharding.follow_params``). ``names`` may be any container with ``in``.
    """
    parts = path.split("/")
    best, best_len = None, 0
    for i in range(len(parts)):
        for j in range(len(parts), i + best_len, -1):
            name = "/".join(parts[i:j])
            if name in names:
                best, best_len = name, j - i
                break
    return best


def count(params: PyTree) -> int:
    """Total number of scalar elements over all leaves (arrays or ``ShapeDtypeStruct``)."""
    leaves = jax.tree_util.tree_leaves(params)
    return int(sum(int(np.prod(x.shape if hasattr(x, "shape") else np.shape(x))) for x in leaves))

"""Name maps between Hugging Face state dicts and jaxfit parameter trees.

A model family declares a list of :class:`Rule` s. Each rule ties one Hugging Face tensor
name (with ``{i}`` standing for the layer index when the tensor is per layer) to one
jaxfit parameter path, with the conversion between the two layouts. Per-layer tensors
map onto a parameter stacked by ``nn.scan`` (leading axis = layer).

Conventions (PyTorch -> jaxfit): ``nn.Linear.weight [out, in]`` -> ``kernel [in, out]``
(:func:`linear`); ``nn.Conv2d.weight [O, I, H, W]`` -> ``kernel [H, W, I, O]``
(:func:`conv2d`); everything else unchanged (:data:`IDENTITY`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import traverse_util

Array = np.ndarray


@dataclass(frozen=True)
class Transform:
    """A layout conversion: ``to_jax`` (HF -> jaxfit) and its inverse ``to_hf``."""

    to_jax: Callable[[Array], Array]
    to_hf: Callable[[Array], Array]


IDENTITY = Transform(lambda x: x, lambda x: x)
linear = Transform(lambda x: x.T, lambda x: x.T)
conv2d = Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


@dataclass(frozen=True)
class Rule:
    """One tensor of the name map.

    Attributes:
      hf: HF tensor name; ``{i}`` marks the layer index of a per-layer tensor.
      path: jaxfit parameter path (tuple of keys under ``params``).
      transform: layout conversion.
      num_layers: for per-layer rules, the number of layers stacked on axis 0.
    """

    hf: str
    path: tuple[str, ...]
    transform: Transform = IDENTITY
    num_layers: int | None = None

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf]
        return [self.hf.format(i=i) for i in range(self.num_layers)]


def _check_rules(rules: list[Rule], shapes: Mapping[tuple[str, ...], tuple]) -> None:
    paths = {r.path for r in rules}
    missing = sorted("/".join(p) for p in shapes if p not in paths)
    unknown = sorted("/".join(p) for p in paths if p not in shapes)
    if missing or unknown:
        raise ValueError(
            f"name map does not match the model: parameters without a rule {missing}, "
            f"rules for parameters the model lacks {unknown}"
        )


def load_params(
    rules: list[Rule],
    read: Callable[[str], Array],
    abstract_params,
    *,
    dtype=None,
    available: set[str] | None = None,
    ignore: tuple[str, ...] = (),
    place: Callable[[tuple[str, ...], Array], jax.Array] | None = None,
):
    """Build a parameter tree by reading HF tensors one at a time.

    Args:
      rules: the family's name map.
      read: tensor name -> host array (e.g. a :class:`jaxfit.hf.io.TensorReader`).
      abstract_params: the model's parameter tree of ``jax.ShapeDtypeStruct`` (from
        ``jax.eval_shape(model.init, ...)``); gives the expected shape of every leaf.
      dtype: storage dtype of the result (default: the abstract leaf's dtype).
      available: the names the checkpoint holds; when given, checkpoint tensors that no
        rule reads (other than names matching ``ignore`` substrings) raise.
      ignore: substrings of HF names that may be present without a rule (buffers such as
        ``position_ids``).
      place: ``(path, host_array) -> device array``; default ``jax.device_put``.

    Returns:
      The parameter tree (nested dicts), leaves placed by ``place``.

    Raises:
      ValueError: a rule/model mismatch, a shape mismatch (names the tensor and both
        shapes), or unexpected checkpoint tensors.
      KeyError: a tensor the rules need is missing from the checkpoint.
    """
    flat_abs = traverse_util.flatten_dict(abstract_params)
    _check_rules(rules, {k: v.shape for k, v in flat_abs.items()})
    place = place or (lambda path, x: jax.device_put(x))
    out = {}
    used = set()
    for rule in rules:
        spec = flat_abs[rule.path]
        target_dtype = dtype or spec.dtype
        names = rule.hf_names()
        per_layer_shape = spec.shape[1:] if rule.num_layers is not None else spec.shape
        buf = np.empty(spec.shape, dtype=target_dtype) if rule.num_layers is not None else None
        for li, name in enumerate(names):
            x = rule.transform.to_jax(read(name))
            if tuple(x.shape) != tuple(per_layer_shape):
                raise ValueError(
                    f"tensor {name!r}: checkpoint shape {tuple(x.shape)} (after layout "
                    f"conversion) does not match the model's {tuple(per_layer_shape)} at "
                    f"{'/'.join(rule.path)}"
                )
            used.add(name)
            if buf is not None:
                buf[li] = x.astype(target_dtype)
            else:
                buf = np.asarray(x, dtype=target_dtype)
        out[rule.path] = place(rule.path, buf)
    if available is not None:
        extra = sorted(n for n in available if n not in used and not any(s in n for s in ignore))
        if extra:
            raise ValueError(f"checkpoint tensors not used by the name map: {extra[:20]}")
    return traverse_util.unflatten_dict(out)


def export_params(rules: list[Rule], params, *, dtype=None) -> Iterator[tuple[str, Array]]:
    """Yield ``(hf_name, host_array)`` for every tensor of the name map.

    Args:
      rules: the family's name map.
      params: the jaxfit parameter tree.
      dtype: output dtype (default: the parameter's dtype).
    """
    flat = traverse_util.flatten_dict(params)
    _check_rules(rules, {k: v.shape for k, v in flat.items()})
    for rule in rules:
        value = np.asarray(jax.device_get(flat[rule.path]))
        if dtype is not None:
            value = value.astype(dtype)
        if rule.num_layers is None:
            # order="C" rather than np.ascontiguousarray, which turns 0-d tensors into [1].
            yield rule.hf, np.asarray(rule.transform.to_hf(value), order="C")
        else:
            for i, name in enumerate(rule.hf_names()):
                yield name, np.asarray(rule.transform.to_hf(value[i]), order="C")

"""Load a Hugging Face checkpoint straight into quantised parameters.

:func:`load_quantized` streams tensors as :func:`jaxfit.hf.load_pretrained` does and
quantises each selected weight right after reading it, so the full-precision model never
exists: host memory holds one checkpoint tensor (plus its float32 copy while it is
quantised) beyond the result. A bitsandbytes 4-bit checkpoint (``*-bnb-4bit``) is read
as stored, without requantising (:mod:`jaxfit.quant.bnb_checkpoint`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxfit import hf
from jaxfit.hf import io, mapping
from jaxfit.quant import bnb_checkpoint
from jaxfit.quant.leaves import DEFAULT_RULES, leaf_class
from jaxfit.quant.nf4 import NF4Weight


def _stack(leaves: list, what: str):
    """Stack per-layer leaves on a new leading axis (static fields must agree)."""
    try:
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *leaves)
    except ValueError as e:
        raise ValueError(f"{what}: layers were quantised with different settings ({e})") from e


def load_quantized(
    path_or_name: str | os.PathLike,
    method: str | None = "nf4",
    *,
    rules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    dtype: Any = jnp.bfloat16,
    compute_dtype: Any = None,
    blocksize: int = 64,
    double_quant: bool = True,
    **config_overrides,
):
    """Load an HF checkpoint as ``(model, params)`` with quantised weight leaves.

    Args:
      path_or_name: a checkpoint directory or Hub name (as ``load_pretrained``).
      method: ``"nf4"`` or ``"int8"`` for a float checkpoint. A bitsandbytes 4-bit
        checkpoint is always read as stored (:class:`~jaxfit.quant.nf4.NF4Weight`);
        ``method`` must then be ``"nf4"`` or ``None``.
      rules: regular expressions over jaxfit parameter paths of the weights to quantise
        (default :data:`~jaxfit.quant.leaves.DEFAULT_RULES`: every kernel under a layer
        stack); ignored for bitsandbytes checkpoints (their quantised set is stored).
      exclude: patterns of paths to keep float even if ``rules`` match.
      dtype: storage dtype of the float parameters (bfloat16 by default, like
        transformers' 4-bit loading) and the model's ``param_dtype``.
      compute_dtype: the model's compute ``dtype`` (default: ``dtype``).
      blocksize, double_quant: NF4 settings (:meth:`NF4Weight.quantize`).
      **config_overrides: fields of the family's config to replace.

    Returns:
      ``(model, params)``; the quantised leaves carry the checkpoint tensor's dtype as
      their default ``dequantize`` dtype.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: a rule that matches no weight (named), a selected weight that is not a
        matrix, a tensor whose shape does not fit the model, unused checkpoint tensors,
        missing bitsandbytes statistics (named), or ``method`` with a bnb checkpoint.
    """
    directory = io.resolve(path_or_name)
    model, family, hf_config = hf.model_from_config(
        directory, dtype=dtype, compute_dtype=compute_dtype, **config_overrides
    )
    config = model.config
    flat_abs = traverse_util.flatten_dict(hf.abstract_params(model, family))
    all_rules = family.rules(config)
    prequantized = bnb_checkpoint.is_bnb_4bit(hf_config)
    if prequantized and method not in (None, "nf4"):
        raise ValueError(f"{str(directory)!r} is a bitsandbytes NF4 checkpoint; method={method!r}")
    with io.TensorReader(directory) as reader:
        names = family.stored_names(reader.keys())
        stored = lambda name: names.get(name, name)  # noqa: E731
        read = lambda name: reader[stored(name)]  # noqa: E731

        if prequantized:
            quant_rules = [
                r for r in all_rules if bnb_checkpoint.has_bnb_stats(names, r.hf_names()[0])
            ]
        else:
            quant_rules = _select(all_rules, rules, exclude)
        quant_paths = {r.path for r in quant_rules}
        out: dict[tuple[str, ...], Any] = {}
        used: set[str] = set()
        for rule in quant_rules:
            spec = flat_abs[rule.path]
            per_layer = rule.num_layers is not None
            kernel_shape = tuple(spec.shape[1:] if per_layer else spec.shape)
            where = "/".join(rule.path)
            if len(kernel_shape) != 2:
                raise ValueError(f"{where}: shape {spec.shape} is not a (stacked) kernel")
            layer_leaves = []
            for name in rule.hf_names():
                if prequantized:
                    leaf = bnb_checkpoint.nf4_from_bnb(_Renamed(reader, stored), name)
                    used.update(f"{name}.{s}" for s in bnb_checkpoint.STAT_SUFFIXES)
                    got = leaf.kernel_shape
                else:
                    x = read(name)
                    got = tuple(rule.transform.to_jax(x).shape)
                if got != kernel_shape:
                    raise ValueError(
                        f"tensor {name!r}: checkpoint shape {got} (after layout conversion) "
                        f"does not match the model's {kernel_shape} at {where}"
                    )
                if not prequantized:
                    leaf = _quantize(x, rule, method, blocksize, double_quant)
                    del x
                used.add(name)
                layer_leaves.append(leaf)
            out[rule.path] = _stack(layer_leaves, where) if per_layer else layer_leaves[0]

        float_rules = [r for r in all_rules if r.path not in quant_paths]
        float_abs = {k: v for k, v in flat_abs.items() if k not in quant_paths}
        float_params = mapping.load_params(
            float_rules, read, traverse_util.unflatten_dict(float_abs), dtype=dtype
        )
        used.update(n for r in float_rules for n in r.hf_names())
        extra = sorted(n for n in names if n not in used and not any(s in n for s in family.ignore))
        if extra:
            raise ValueError(f"checkpoint tensors not used by the name map: {extra[:20]}")
    out.update(traverse_util.flatten_dict(float_params))
    return model, traverse_util.unflatten_dict(out)


class _Renamed:
    """A reader view that looks canonical names up under their stored names."""

    def __init__(self, reader, stored):
        self.reader, self.stored = reader, stored

    def __contains__(self, name: str) -> bool:
        return self.stored(name) in self.reader

    def __getitem__(self, name: str):
        return self.reader[self.stored(name)]


def _select(all_rules, patterns, exclude) -> list:
    """The name-map rules whose jaxfit path matches ``patterns`` and no ``exclude``."""
    patterns = tuple(DEFAULT_RULES if patterns is None else patterns)
    compiled = [re.compile(p) for p in patterns]
    excluded = [re.compile(p) for p in exclude]
    paths = {"/".join(r.path): r for r in all_rules}
    if bad := [p for p, c in zip(patterns, compiled) if not any(c.search(n) for n in paths)]:
        raise ValueError(
            f"quantisation rules match no parameter: {bad}; paths look like {list(paths)[:6]}"
        )
    return [
        r
        for n, r in paths.items()
        if any(c.search(n) for c in compiled) and not any(c.search(n) for c in excluded)
    ]


def _quantize(x, rule, method: str, blocksize: int, double_quant: bool):
    """Quantise one host tensor in the layout of ``rule`` (HF layout when it is a plain
    transpose, skipping a copy)."""
    cls = leaf_class(method)
    kwargs = dict(blocksize=blocksize, double_quant=double_quant) if cls is NF4Weight else {}
    if rule.transform is mapping.linear:
        return cls.quantize(x, layout="hf", **kwargs)
    return cls.quantize(rule.transform.to_jax(x), layout="kernel", **kwargs)

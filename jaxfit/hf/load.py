"""The one loader of Hugging Face checkpoints: plain, sharded and bitsandbytes 4-bit.

:func:`load_pretrained` reads ``config.json`` (its ``quantization_config`` included) and
streams the tensors one at a time (:class:`jaxfit.hf.io.TensorReader`, which follows
``model.safetensors.index.json`` for sharded checkpoints) into the parameter tree, each
weight ending up as one of:

* a float array in ``dtype``: a float tensor converted, or a bitsandbytes NF4 tensor
  dequantised exactly (bit for bit ``bitsandbytes.functional.dequantize_4bit``, then cast);
* an :class:`~jaxfit.quant.nf4.NF4Weight` as stored in a bitsandbytes checkpoint
  (``quantize="nf4"``);
* a weight leaf quantised right after reading (``quantize="nf4"`` / ``"int8"`` over a
  float checkpoint), so the full-precision model never exists: host memory holds one
  checkpoint tensor (plus its float32 copy while it is quantised) beyond the result.

What is refused, with the reason: bitsandbytes LLM.int8 and FP4 checkpoints and other
``quant_method`` s (:func:`jaxfit.hf.bnb.stored_format`), and ``quantize="int8"`` over an
NF4 checkpoint (re-quantising compounds two rounding errors).

Which weights are quantised is chosen here, by the family's rules
(:data:`jaxfit.hf.families.DEFAULT_QUANT_RULES` unless ``rules`` are given) through
:func:`jaxfit.params.select`; how is the registered format's business
(:mod:`jaxfit.quant.base`: its class, its options and their defaults). ``jaxfit.quant``
imports nothing of ``jaxfit.hf``; :func:`load_quantized` is the quantised load with
transformers' 4-bit defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxfit import params as params_lib
from jaxfit import quant
from jaxfit.hf import bnb, families, io, mapping
from jaxfit.hf.families import Family
from jaxfit.quant.nf4 import NF4Weight

log = logging.getLogger(__name__)


def abstract_params(model, family: Family):
    """Parameter tree of ``jax.ShapeDtypeStruct`` for ``model`` (no memory allocated)."""
    inputs = family.init_inputs(model.config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    return shapes["params"]


def _check_quantize(stored: str | None, quantize: str | None, where: str) -> None:
    """Refuse a ``quantize`` request the stored format cannot honour (see module doc)."""
    if quantize is not None and quantize not in quant.names():
        raise ValueError(f"quantize={quantize!r}; expected None or one of {quant.names()}")
    if stored == "nf4" and quantize not in (None, "nf4"):
        raise ValueError(
            f"{where} is a bitsandbytes NF4 checkpoint; jaxfit does not re-quantise it to "
            f"{quantize} (base_format / quantize={quantize!r}): rounding weights that are "
            "already rounded to 4 bits again to another grid compounds the two quantisation "
            "errors. Use nf4 to keep the stored weights as they are, or a float precision "
            "(fp32 / bf16, base_format=float) to dequantise them exactly"
        )


def model_from_config(
    path_or_name: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    quantize: str | None = None,
    **config_overrides,
):
    """The linen module of an HF checkpoint from its ``config.json`` alone (no weights read;
    for a Hub name only ``config.json`` is fetched).

    Args:
      path_or_name, dtype, compute_dtype, quantize, config_overrides: as
        :func:`load_pretrained`; ``quantize`` is only checked against the stored format,
        so a request :func:`load_pretrained` would refuse fails here, before any weight
        is read.

    Returns:
      ``(model, family, hf_config)``: the module, its :class:`~jaxfit.hf.families.Family`
      and the raw ``config.json`` dict.

    Raises:
      FileNotFoundError: no such directory / Hub repository, or no config.json in it.
      ValueError: an unsupported ``model_type``, a stored format jaxfit does not read
        (LLM.int8, FP4, GPTQ, ...), or ``quantize`` refused for this checkpoint.
    """
    directory = io.resolve(path_or_name, patterns=("config.json",))
    hf_config = io.read_config(directory)
    _check_quantize(bnb.stored_format(hf_config, str(path_or_name)), quantize, str(path_or_name))
    family = families.for_model_type(hf_config.get("model_type", ""))
    config = family.config_from_hf(hf_config)
    config = dataclasses.replace(
        config, dtype=compute_dtype or dtype, param_dtype=dtype, **config_overrides
    )
    return family.model_class(config), family, hf_config


def stored_quantization(path_or_name: str | os.PathLike) -> str | None:
    """``"nf4"`` when the checkpoint's weights are stored as bitsandbytes NF4, ``None`` for
    float weights (reads ``config.json`` only): ``load_pretrained(path,
    quantize=stored_quantization(path))`` loads a checkpoint as it is stored.

    Raises:
      FileNotFoundError, ValueError: as :func:`model_from_config`.
    """
    directory = io.resolve(path_or_name, patterns=("config.json",))
    return bnb.stored_format(io.read_config(directory), str(path_or_name))


def load_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    quantize: str | None = None,
    rules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    quant_options: Mapping[str, Any] | None = None,
    **config_overrides,
):
    """Load an HF checkpoint (local directory or Hub name) as ``(model, params)``.

    Tensors are streamed from ``model.safetensors`` (or the shards of
    ``model.safetensors.index.json``) one at a time and converted on the host; torch is
    not needed. ``config.json``'s ``quantization_config`` says how they are stored:

    * float weights: float in ``dtype`` (``quantize=None``), or quantised tensor by tensor
      (``"nf4"`` / ``"int8"``);
    * bitsandbytes NF4 (``*-bnb-4bit``): dequantised exactly to ``dtype`` (``None``), kept
      as stored (``"nf4"``), refused (``"int8"``);
    * LLM.int8, FP4, GPTQ, ...: refused, naming the format.

    "Exactly" means every weight equals bitsandbytes' ``dequantize_4bit`` (in the
    checkpoint's ``quant_state.dtype``) cast to ``dtype``: what a bitsandbytes model
    multiplies with. A log line (logger ``jaxfit.hf.load``, INFO) says what was done.

    Args:
      path_or_name: a directory with ``config.json`` + safetensors, or a Hub name.
      dtype: storage dtype of the float parameters (``param_dtype``), float32 by default;
        quantised leaves report it as their default ``dequantize`` dtype unless the
        checkpoint stored one.
      compute_dtype: the model's compute ``dtype`` (default: same as ``dtype``).
      quantize: ``None`` (float weights) or a registered format name
        (:func:`jaxfit.quant.names`: ``"int8"``, ``"nf4"``; quantised weight leaves, see
        the table).
      rules: regular expressions over jaxfit parameter paths of the weights to quantise
        when quantising a float checkpoint (default
        :data:`jaxfit.hf.families.DEFAULT_QUANT_RULES`: every kernel under a layer stack);
        ignored for an NF4 checkpoint (its quantised set is stored).
      exclude: patterns of paths to keep float even if ``rules`` match.
      quant_options: the format's options when quantising (its ``defaults`` fill the
        rest; NF4: ``blocksize``, ``double_quant``).
      **config_overrides: fields of the family's config to replace (e.g.
        ``remat_policy="full"``).

    Returns:
      ``(model, params)``: a linen module and its ``params`` tree (nested dicts).

    Raises:
      FileNotFoundError: no such directory / Hub repository, or no weights in it.
      ValueError: an unsupported ``model_type``; a stored format jaxfit does not read or a
        refused ``quantize`` (the message says why); a tensor that does not fit the model
        (names it and both shapes); unused checkpoint tensors; missing bitsandbytes
        statistics (named); a quantisation rule that matches no weight.
    """
    directory = io.resolve(path_or_name)
    where = str(path_or_name)
    model, family, _ = model_from_config(
        directory, dtype=dtype, compute_dtype=compute_dtype, quantize=quantize, **config_overrides
    )
    abstract = abstract_params(model, family)
    flat_abs = traverse_util.flatten_dict(abstract)
    all_rules = family.rules(model.config)
    opts = quant.options(quantize, quant_options) if quantize else {}
    with io.TensorReader(directory) as reader:
        names = family.stored_names(reader.keys())
        bnb.check_names(names, where)
        tensors = _Renamed(reader, names)
        packed = {n for r in all_rules for n in r.hf_names() if bnb.has_bnb_stats(names, n)}
        _check_quantize("nf4" if packed else None, quantize, where)
        if packed and quantize:
            leaf_rules = [r for r in all_rules if r.hf_names()[0] in packed]
        elif quantize:
            rules = families.DEFAULT_QUANT_RULES if rules is None else rules
            chosen = set(
                params_lib.select(abstract, rules, exclude=exclude, what="quantisation rules")
            )
            leaf_rules = [r for r in all_rules if "/".join(r.path) in chosen]
        else:
            leaf_rules = []

        out: dict[tuple[str, ...], Any] = {}
        for rule in leaf_rules:
            out[rule.path] = _leaf_param(rule, flat_abs[rule.path], tensors, packed, quantize, opts)
        leaf_paths = {r.path for r in leaf_rules}
        float_rules = [r for r in all_rules if r.path not in leaf_paths]
        float_abs = {k: v for k, v in flat_abs.items() if k not in leaf_paths}

        def read(name: str) -> np.ndarray:
            return _dequantize(tensors, name) if name in packed else tensors[name]

        float_params = mapping.load_params(
            float_rules, read, traverse_util.unflatten_dict(float_abs), dtype=dtype
        )
        used = {n for r in all_rules for n in r.hf_names()}
        used |= {f"{n}.{s}" for n in packed for s in bnb.STAT_SUFFIXES}
        extra = sorted(n for n in names if n not in used and not any(s in n for s in family.ignore))
        if extra:
            raise ValueError(f"checkpoint tensors not used by the name map: {extra[:20]}")
    out.update(traverse_util.flatten_dict(float_params))
    _log_load(where, packed, leaf_rules, quantize, dtype)
    return model, traverse_util.unflatten_dict(out)


def _log_load(where: str, packed: set[str], leaf_rules, quantize, dtype) -> None:
    if packed and not quantize:
        log.info(
            "%s: bitsandbytes NF4 checkpoint; %d weights dequantised exactly to %s (bit for "
            "bit bitsandbytes' dequantize_4bit, then cast); quantize='nf4' / base_format=nf4 "
            "keeps them 4-bit",
            where,
            len(packed),
            jnp.dtype(dtype).name,
        )
    elif packed:
        log.info("%s: bitsandbytes NF4 checkpoint; %d weights kept as stored", where, len(packed))
    elif leaf_rules:
        n = sum(len(r.hf_names()) for r in leaf_rules)
        log.info("%s: %d float weights quantised to %s while loading", where, n, quantize)


class _Renamed:
    """A reader view that looks canonical (rule) names up under their stored names."""

    def __init__(self, reader, names: dict[str, str]):
        self.reader, self.names = reader, names

    def __contains__(self, name: str) -> bool:
        return self.names.get(name, name) in self.reader

    def __getitem__(self, name: str):
        return self.reader[self.names.get(name, name)]


def _host_nf4(tensors, name: str) -> NF4Weight:
    """The stored NF4 weight ``name`` with its arrays on the host CPU device."""
    with jax.default_device(jax.devices("cpu")[0]):
        return bnb.nf4_from_bnb(tensors, name)


def _dequantize(tensors, name: str) -> np.ndarray:
    """A stored NF4 weight as the float tensor ``[out, in]`` a float checkpoint would hold:
    ``dequantize_4bit`` bit for bit, in the checkpoint's ``quant_state.dtype`` (on the host
    CPU device, so the arithmetic is the float32 one tested against bitsandbytes)."""
    leaf = _host_nf4(tensors, name)
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(leaf.dequantize_hf())


def _leaf_param(rule, spec, tensors, packed, quantize, opts):
    """The weight leaf of one rule: stored NF4 (``name in packed``) or quantised from the
    float tensor; per-layer leaves stacked on a leading axis."""
    per_layer = rule.num_layers is not None
    kernel_shape = tuple(spec.shape[1:] if per_layer else spec.shape)
    where = "/".join(rule.path)
    if len(kernel_shape) != 2:
        raise ValueError(f"{where}: shape {spec.shape} is not a (stacked) kernel")
    layers = []
    for name in rule.hf_names():
        if name in packed:
            leaf = _host_nf4(tensors, name)
            got = leaf.kernel_shape
        else:
            x = tensors[name]
            got = tuple(rule.transform.to_jax(x).shape)
        if got != kernel_shape:
            raise ValueError(
                f"tensor {name!r}: checkpoint shape {got} (after layout conversion) "
                f"does not match the model's {kernel_shape} at {where}"
            )
        if name not in packed:
            leaf = _quantize(x, rule, quantize, opts)
            del x
        layers.append(leaf)
    return _stack(layers, where) if per_layer else _stack(layers, where, stack=False)


def _stack(leaves: list, what: str, *, stack: bool = True):
    """Stack per-layer leaves on a new leading axis on the host, then place them once on
    the default device (static fields must agree); ``stack=False``: place one leaf."""
    if not stack:
        return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), leaves[0])
    try:
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *leaves)
    except ValueError as e:
        raise ValueError(f"{what}: layers were quantised with different settings ({e})") from e


def _quantize(x, rule, method: str, opts: dict):
    """Quantise one host tensor in the layout of ``rule`` (HF layout when it is a plain
    transpose, skipping a copy) with the format's options ``opts``."""
    cls = quant.format_class(method)
    if rule.transform is mapping.linear:
        return cls.quantize(x, layout="hf", **opts)
    return cls.quantize(rule.transform.to_jax(x), layout="kernel", **opts)


def load_quantized(
    path_or_name: str | os.PathLike,
    method: str | None = "nf4",
    *,
    rules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    dtype: Any = jnp.bfloat16,
    compute_dtype: Any = None,
    quant_options: Mapping[str, Any] | None = None,
    **config_overrides,
):
    """Load an HF checkpoint as ``(model, params)`` with quantised weight leaves:
    :func:`load_pretrained` with ``quantize=method`` and bfloat16 float parameters by
    default (like transformers' 4-bit loading). A float checkpoint is quantised tensor by
    tensor while it streams; a bitsandbytes 4-bit checkpoint is read as stored.

    Args:
      path_or_name: a checkpoint directory or Hub name (as ``load_pretrained``).
      method: a registered format (:func:`jaxfit.quant.names`) for a float checkpoint. A
        bitsandbytes 4-bit checkpoint is read as stored (:class:`NF4Weight`); ``method``
        must then be ``"nf4"`` or ``None`` (``None``: ``"nf4"``).
      rules, exclude, quant_options: as :func:`load_pretrained` (default rules
        :data:`~jaxfit.hf.families.DEFAULT_QUANT_RULES`; ignored for bitsandbytes
        checkpoints, whose quantised set is stored).
      dtype: storage dtype of the float parameters and the model's ``param_dtype``.
      compute_dtype: the model's compute ``dtype`` (default: ``dtype``).
      **config_overrides: fields of the family's config to replace.

    Returns:
      ``(model, params)``; the quantised leaves carry the checkpoint tensor's dtype as
      their default ``dequantize`` dtype.

    Raises:
      FileNotFoundError, ValueError: as :func:`load_pretrained` (``int8`` over an NF4
      checkpoint is refused there, with the reason).
    """
    return load_pretrained(
        path_or_name,
        dtype=dtype,
        compute_dtype=compute_dtype,
        quantize=method or "nf4",
        rules=rules,
        exclude=exclude,
        quant_options=quant_options,
        **config_overrides,
    )


def load_model_and_tokenizer(path_or_name: str | os.PathLike, *, quantize: str | None = None):
    """``(model, params, tokenizer)`` of an HF model directory or Hub name, to sample from.

    ``quantize`` (a registered format) quantises a float checkpoint while loading
    (:func:`load_quantized`); without it the weights load as stored
    (:func:`stored_quantization`: a bitsandbytes 4-bit checkpoint as NF4 leaves, a float
    one in float32). The tokenizer is ``transformers.AutoTokenizer`` of the same
    directory.

    Raises:
      FileNotFoundError, ValueError: as :func:`load_pretrained`.
    """
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is needed

    if quantize:
        model, params = load_quantized(path_or_name, quantize)
    else:
        model, params = load_pretrained(path_or_name, quantize=stored_quantization(path_or_name))
    tokenizer = AutoTokenizer.from_pretrained(str(io.resolve(path_or_name)))
    return model, params, tokenizer

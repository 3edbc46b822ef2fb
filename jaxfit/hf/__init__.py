"""Hugging Face checkpoint import and export for every jaxfit model family.

Public API::

    model, params = jaxfit.hf.load_pretrained("openai/clip-vit-base-patch32")
    jaxfit.hf.save_pretrained(model, params, "out_dir")  # transformers can load out_dir

The families and their name maps are entries of the registry,
:mod:`jaxfit.hf.families` (one :class:`~jaxfit.hf.families.Family` each: model types,
config and module classes, ``config_from_hf`` / ``config_to_hf``, ``rules``, ...); tensor
I/O (:mod:`jaxfit.hf.io`) and the rule engine (:mod:`jaxfit.hf.mapping`) are shared.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxfit.hf import families, io, mapping
from jaxfit.hf.families import Family

# The family of an HF ``model_type`` (``ValueError`` if none) and of a jaxfit model
# (``TypeError`` if none).
family_for_model_type = families.for_model_type
family_for_model = families.for_model


def abstract_params(model, family: Family):
    """Parameter tree of ``jax.ShapeDtypeStruct`` for ``model`` (no memory allocated)."""
    inputs = family.init_inputs(model.config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    return shapes["params"]


def model_from_config(
    path_or_name: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    **config_overrides,
):
    """The linen module of an HF checkpoint from its ``config.json`` alone (no weights read;
    for a Hub name only ``config.json`` is fetched).

    Args:
      path_or_name, dtype, compute_dtype, config_overrides: as :func:`load_pretrained`.

    Returns:
      ``(model, family, hf_config)``: the module, its :class:`~jaxfit.hf.families.Family`
      and the raw ``config.json`` dict.

    Raises:
      FileNotFoundError: no such directory / Hub repository, or no config.json in it.
      ValueError: an unsupported ``model_type``.
    """
    directory = io.resolve(path_or_name, patterns=("config.json",))
    hf_config = io.read_config(directory)
    family = family_for_model_type(hf_config.get("model_type", ""))
    config = family.config_from_hf(hf_config)
    config = dataclasses.replace(
        config, dtype=compute_dtype or dtype, param_dtype=dtype, **config_overrides
    )
    return family.model_class(config), family, hf_config


def load_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    **config_overrides,
):
    """Load an HF checkpoint (local directory or Hub name) as ``(model, params)``.

    Tensors are streamed from ``model.safetensors`` (or its shards) one at a time and
    converted to ``dtype`` on the host; torch is not needed.

    Args:
      path_or_name: a directory with ``config.json`` + safetensors, or a Hub name.
      dtype: parameter storage dtype (``param_dtype``), float32 by default.
      compute_dtype: the model's compute ``dtype`` (default: same as ``dtype``).
      **config_overrides: fields of the family's config to replace (e.g.
        ``remat_policy="full"``).

    Returns:
      ``(model, params)``: a linen module and its ``params`` tree (nested dicts).

    Raises:
      FileNotFoundError: no such directory / Hub repository, or no weights in it.
      ValueError: an unsupported ``model_type`` or a tensor that does not fit the model.
    """
    directory = io.resolve(path_or_name)
    model, family, _ = model_from_config(
        directory, dtype=dtype, compute_dtype=compute_dtype, **config_overrides
    )
    shapes = abstract_params(model, family)
    with io.TensorReader(directory) as reader:
        names = family.stored_names(reader.keys())
        params = mapping.load_params(
            family.rules(model.config),
            lambda name: reader[names.get(name, name)],
            shapes,
            dtype=dtype,
            available=set(names),
            ignore=family.ignore,
        )
    return model, params


def save_pretrained(model, params, out_dir: str | os.PathLike, *, dtype: Any = None) -> Path:
    """Write ``config.json`` + safetensors that ``transformers`` ``from_pretrained`` loads.

    Args:
      model: a jaxfit model (its ``.config`` gives the architecture).
      params: its parameter tree.
      out_dir: output directory (created).
      dtype: tensor dtype in the files (default: the parameters' dtype).

    Returns:
      ``out_dir`` as a ``Path``.
    """
    family = family_for_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.write_tensors(mapping.export_params(family.rules(model.config), params, dtype=dtype), out)
    io.write_config(family.config_to_hf(model.config), out)
    return out


__all__ = ["load_pretrained", "save_pretrained", "family_for_model_type", "family_for_model"]

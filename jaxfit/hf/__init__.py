"""Hugging Face checkpoint import and export for every jaxfit model family.

Public API::

    model, params = jaxfit.hf.load_pretrained("openai/clip-vit-base-patch32")
    model, params = jaxfit.hf.load_pretrained("unsloth/Llama-3.2-1B-bnb-4bit")  # dequantised
    model, qparams = jaxfit.hf.load_pretrained(DIR, quantize="nf4")  # stored / on reading
    model, qparams = jaxfit.hf.load_quantized("meta-llama/Llama-3.2-1B", "nf4")  # bf16 rest
    model, params, tokenizer = jaxfit.hf.load_model_and_tokenizer(DIR)  # to sample from
    jaxfit.hf.save_pretrained(model, params, "out_dir")  # transformers can load out_dir
    jaxfit.hf.save_bnb_pretrained(model, qparams, "out_dir")  # NF4 leaves, bitsandbytes format

:func:`load_pretrained` (:mod:`jaxfit.hf.load`) is the one loader: plain, sharded and
bitsandbytes 4-bit checkpoints, float or quantised weight leaves; everything that reads a
checkpoint (``init_from``, ``jaxfit.generate``, :func:`~jaxfit.hf.load.load_quantized`)
calls it, and it picks what to quantise (the family's rules) and hands the tensors to the
registered format (:mod:`jaxfit.quant`, which imports nothing of ``hf``).
The families and their name maps are entries of the registry,
:mod:`jaxfit.hf.families` (one :class:`~jaxfit.hf.families.Family` each: model types,
config and module classes, ``config_from_hf`` / ``config_to_hf``, ``rules``, ...); tensor
I/O (:mod:`jaxfit.hf.io`), the rule engine (:mod:`jaxfit.hf.mapping`) and the
bitsandbytes format (:mod:`jaxfit.hf.bnb`) are shared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxfit.hf import families, io, mapping
from jaxfit.hf.bnb import save_bnb_pretrained
from jaxfit.hf.load import (
    abstract_params,
    load_model_and_tokenizer,
    load_pretrained,
    load_quantized,
    model_from_config,
    stored_quantization,
)

# The family of an HF ``model_type`` (``ValueError`` if none) and of a jaxfit model
# (``TypeError`` if none).
family_for_model_type = families.for_model_type
family_for_model = families.for_model


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


__all__ = [
    "abstract_params",
    "family_for_model",
    "family_for_model_type",
    "load_model_and_tokenizer",
    "load_pretrained",
    "load_quantized",
    "model_from_config",
    "save_bnb_pretrained",
    "save_pretrained",
    "stored_quantization",
]

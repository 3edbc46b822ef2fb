"""Load a Hugging Face checkpoint straight into quantised parameters.

:func:`load_quantized` is :func:`jaxfit.hf.load_pretrained` with ``quantize`` set (and
bfloat16 float parameters by default, like transformers' 4-bit loading): a float
checkpoint is quantised tensor by tensor while it streams, a bitsandbytes 4-bit
checkpoint (``*-bnb-4bit``) is read as stored. The one loader lives in
:mod:`jaxfit.hf.load`; this module only picks the defaults of a quantised load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from jaxfit import hf


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
        checkpoint is read as stored (:class:`~jaxfit.quant.nf4.NF4Weight`); ``method``
        must then be ``"nf4"`` or ``None`` (``None``: ``"nf4"``).
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
      FileNotFoundError, ValueError: as :func:`jaxfit.hf.load_pretrained` (``int8`` over
      an NF4 checkpoint is refused there, with the reason).
    """
    return hf.load_pretrained(
        path_or_name,
        dtype=dtype,
        compute_dtype=compute_dtype,
        quantize=method or "nf4",
        rules=rules,
        exclude=exclude,
        blocksize=blocksize,
        double_quant=double_quant,
        **config_overrides,
    )

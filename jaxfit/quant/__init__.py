"""Weight quantisation: int8 and NF4 weight leaves, tree transforms, bitsandbytes I/O.

::

    qparams = jaxfit.quant.quantize_params(params, method="nf4")   # same model code
    model, qparams = jaxfit.quant.load_quantized("meta-llama/Llama-3.2-1B", "nf4")
    model, qparams = jaxfit.quant.load_quantized("unsloth/Llama-3.2-1B-bnb-4bit")
    jaxfit.quant.save_bnb_pretrained(model, qparams, "out")       # transformers loads it

Leaves: :class:`NF4Weight` (bitsandbytes' NF4 layout, :mod:`jaxfit.quant.nf4`) and
:class:`Int8Weight` (per-output-channel absmax, :mod:`jaxfit.quant.int8`); both implement
the weight-leaf protocol of :func:`jaxfit.models.layers.matmul`.
"""

from jaxfit.quant.bnb_checkpoint import nf4_from_bnb, nf4_to_bnb, save_bnb_pretrained
from jaxfit.quant.int8 import Int8Weight
from jaxfit.quant.leaves import (
    DEFAULT_RULES,
    dequantize_params,
    is_weight_leaf,
    quantize_params,
)
from jaxfit.quant.load import load_quantized
from jaxfit.quant.nf4 import NF4_CODE, NF4Weight, dynamic_map
from jaxfit.quant.report import bits_per_weight, error_report, leaf_bits, quantization_error

__all__ = [
    "DEFAULT_RULES",
    "Int8Weight",
    "NF4Weight",
    "NF4_CODE",
    "bits_per_weight",
    "dequantize_params",
    "dynamic_map",
    "error_report",
    "is_weight_leaf",
    "leaf_bits",
    "load_quantized",
    "nf4_from_bnb",
    "nf4_to_bnb",
    "quantization_error",
    "quantize_params",
    "save_bnb_pretrained",
]

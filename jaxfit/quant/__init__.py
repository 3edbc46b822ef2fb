"""Weight quantisation: int8 and NF4 weight leaves, tree transforms, bitsandbytes I/O.

::

    qparams = jaxfit.quant.quantize_params(params, method="nf4")   # same model code
    model, qparams = jaxfit.quant.load_quantized("meta-llama/Llama-3.2-1B", "nf4")
    model, qparams = jaxfit.quant.load_quantized("unsloth/Llama-3.2-1B-bnb-4bit")
    jaxfit.hf.save_bnb_pretrained(model, qparams, "out")          # transformers loads it

``load_quantized`` is :func:`jaxfit.hf.load_pretrained` with ``quantize=`` (the one
loader); the bitsandbytes checkpoint format (``nf4_from_bnb``, ``nf4_to_bnb``,
``save_bnb_pretrained``) is :mod:`jaxfit.hf.bnb`.

Layering: the leaf modules (``base``, ``nf4``, ``int8``) import nothing of ``jaxfit.hf``,
which imports them; ``leaves``, ``load`` and ``random_init`` sit above ``jaxfit.hf``. As
importing any ``jaxfit.quant`` module runs this file first, it must import no name of a
``jaxfit.hf`` module that imports ``jaxfit.quant`` (``hf.bnb``, ``hf.load``): when
``jaxfit.hf`` is imported first, those are half-initialised at that moment.

Leaves: :class:`NF4Weight` (bitsandbytes' NF4 layout, :mod:`jaxfit.quant.nf4`) and
:class:`Int8Weight` (per-output-channel absmax, :mod:`jaxfit.quant.int8`); both implement
the weight-leaf protocol of :func:`jaxfit.models.layers.matmul`.
"""

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
    "quantization_error",
    "quantize_params",
]

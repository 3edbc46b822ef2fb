"""Weight quantisation: the registry of formats (int8, NF4), tree transforms, reports.

::

    rules = jaxfit.hf.families.DEFAULT_QUANT_RULES                 # what a family quantises
    qparams = jaxfit.quant.quantize_params(params, rules, "nf4")   # same model code
    jaxfit.quant.names()                                           # ("int8", "nf4")

Each format is one module with one registered :class:`~jaxfit.quant.base.WeightLeaf`
class that owns its options (``defaults``), its storage cost (``bits_per_weight``) and,
where it has one, a calibration step (``calibrate``); :mod:`jaxfit.quant.base` holds the
registry. The formats are registered by importing them here: a new format is one module
plus one import line below. Everything else (``jaxfit.hf.load_pretrained(quantize=)``,
``config.base_format``, the CLIs' ``--quant`` choices, :func:`bits_per_weight`) reads the
registry.

Layering: ``jaxfit.quant`` imports nothing of ``jaxfit.hf``. Loading a checkpoint into
quantised leaves (``jaxfit.hf.load_pretrained(quantize=...)``,
:func:`jaxfit.hf.load_quantized`) and the bitsandbytes checkpoint format
(:mod:`jaxfit.hf.bnb`) live in ``hf``, which imports this package and passes its
family's selection rules in.

Leaves: :class:`NF4Weight` (bitsandbytes' NF4 layout, :mod:`jaxfit.quant.nf4`) and
:class:`Int8Weight` (per-output-channel absmax, :mod:`jaxfit.quant.int8`); both implement
the weight-leaf protocol of :func:`jaxfit.models.layers.matmul`.
"""

# The formats: importing a format module registers it.
from jaxfit.quant import int8, nf4  # noqa: F401
from jaxfit.quant.base import format_class, is_quantized, names, options, register
from jaxfit.quant.int8 import Int8Weight
from jaxfit.quant.leaves import dequantize_params, quantize_params
from jaxfit.quant.nf4 import NF4_CODE, NF4Weight, dynamic_map
from jaxfit.quant.report import bits_per_weight, error_report, leaf_bits, quantization_error

__all__ = [
    "Int8Weight",
    "NF4Weight",
    "NF4_CODE",
    "bits_per_weight",
    "dequantize_params",
    "dynamic_map",
    "error_report",
    "format_class",
    "is_quantized",
    "leaf_bits",
    "names",
    "options",
    "quantization_error",
    "quantize_params",
    "register",
]

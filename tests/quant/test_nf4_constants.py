"""An NF4 matmul builds no large constant at compile time.

XLA constant-folds any instruction whose operands are all constants. A dequantisation
that derives index arrays from constants (``jnp.repeat`` with ``total_repeat_length``
builds its gather indices from a cumulative sum over constant repeats) makes XLA evaluate
an ``s32`` array of one element per block at compile time: on a GPU, "slow_operation_alarm:
Constant folding an instruction is taking > 8s: s32[57344,16]" for each 8B MLP weight.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit.quant.nf4 import NF4Weight

LIMIT = 64 * 1024  # bytes
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\((.*)$")
# never foldable: their value is not known at compile time, or XLA does not fold them
_OPAQUE = ("parameter", "rng", "rng-bit-generator", "custom-call", "while", "infeed")
_NOT_FOLDED = ("constant", "iota", "broadcast")  # XLA's constant folding skips these
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "s32": 4,
          "u32": 4, "f32": 4}  # fmt: skip


def foldable_arrays(hlo_text: str) -> list[tuple[str, str, str, int]]:
    """``(name, opcode, dtype[dims], bytes)`` of every instruction of an unoptimised HLO
    module that XLA's constant folding would evaluate: all operands are constants or
    iotas, or themselves foldable (``call``s of foldable arguments included)."""
    foldable: dict[str, bool] = {}
    found = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op, rest = m.groups()
        operands = [o.strip().lstrip("%") for o in rest.split(")")[0].split(",") if o.strip()]
        if op in ("constant", "iota"):
            fold = True
        elif op in _OPAQUE:
            fold = False
        else:
            fold = bool(operands) and all(foldable.get(o, False) for o in operands)
        foldable[name] = fold
        if fold and op not in _NOT_FOLDED and dims:
            size = int(np.prod([int(d) for d in dims.split(",")])) * _BYTES.get(dtype, 8)
            found.append((name, op, f"{dtype}[{dims}]", size))
    return found


def _lowered_hlo(hf_shape: tuple[int, int], double_quant: bool = True) -> str:
    out_features, in_features = hf_shape
    w = jax.ShapeDtypeStruct((in_features, out_features), jnp.bfloat16)
    leaf = jax.eval_shape(lambda w: NF4Weight.quantize(w, double_quant=double_quant), w)
    x = jax.ShapeDtypeStruct((8, in_features), jnp.bfloat16)
    return jax.jit(lambda leaf, x: leaf.matmul(x, jnp.bfloat16)).lower(leaf, x).as_text("hlo")


def test_nf4_matmul_of_an_8b_mlp_weight_folds_no_large_constant():
    hlo = _lowered_hlo((14336, 4096))  # Llama-3-8B gate/up_proj: 917,504 absmax blocks
    big = [f for f in foldable_arrays(hlo) if f[3] > LIMIT]
    assert not big, big


def test_without_double_quantisation_too():
    assert not [f for f in foldable_arrays(_lowered_hlo((4096, 14336), False)) if f[3] > LIMIT]


def test_the_detector_finds_a_repeat_of_constant_length():
    def old_style(absmax):  # what nf4.dequantize_blockwise did before
        return jnp.repeat(absmax, 256, axis=-1, total_repeat_length=absmax.shape[-1] * 256)

    hlo = jax.jit(old_style).lower(jax.ShapeDtypeStruct((3584,), jnp.float32)).as_text("hlo")
    sizes = [f[3] for f in foldable_arrays(hlo)]
    assert max(sizes) >= 3584 * 256 * 4, sizes  # the s32 gather indices of every element

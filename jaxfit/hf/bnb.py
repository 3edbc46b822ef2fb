"""bitsandbytes checkpoints (the ``*-bnb-4bit`` models of the Hub) <-> NF4 leaves.

transformers saves a ``bnb.nn.Linear4bit`` weight ``W [out, in]`` as these tensors
(``Linear4bit._save_to_state_dict`` + ``QuantState.as_dict(packed=True)``, bitsandbytes
0.50), ``<name>`` being e.g. ``model.layers.0.mlp.up_proj.weight``:

* ``<name>``: uint8 ``[out*in/2, 1]``, two NF4 indices per byte, first in the high nibble
  (another ``bnb_4bit_quant_storage`` dtype holds the same bytes);
* ``<name>.absmax``: uint8 ``[n/blocksize]`` with double quantisation, else float32;
* ``<name>.quant_map``: float32 ``[16]``, the NF4 table;
* ``<name>.nested_absmax``: float32 ``[ceil(n/blocksize/256)]`` (double quantisation);
* ``<name>.nested_quant_map``: float32 ``[256]``, the 8-bit dynamic map (double quant.);
* ``<name>.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON object
  ``{"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
  "nested_offset"}`` (``bitsandbytes.utils.pack_dict_to_tensor``).

``config.json`` carries ``quantization_config`` with ``quant_method: "bitsandbytes"`` and
``load_in_4bit: true``. :func:`stored_format` reads it (and refuses what jaxfit does not
read: LLM.int8, FP4, other ``quant_method`` s); :func:`nf4_from_bnb` / :func:`nf4_to_bnb`
convert one weight; :func:`save_bnb_pretrained` writes a whole model that ``transformers``
loads; :func:`jaxfit.hf.load_pretrained` reads one (kept NF4, or dequantised exactly).

This module is the checkpoint format, so it sits in ``jaxfit.hf``; the NF4 leaf it
produces (:mod:`jaxfit.quant.nf4`) imports nothing of ``jaxfit.hf``, so ``hf`` can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxfit.hf import families, io, mapping
from jaxfit.quant.nf4 import BLOCKSIZES, NF4_CODE, NF4Weight

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
STAT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)
_DTYPES = ("float32", "bfloat16", "float16")

# What jaxfit reads instead of an 8-bit or FP4 checkpoint (the end of each refusal).
_INT8_ADVICE = (
    "LLM.int8 stores int8 weights with per-row SCB scales for bitsandbytes' mixed-precision "
    "outlier matmul, a format jaxfit does not implement; load the float checkpoint instead "
    "(base_format=int8 / quantize='int8' quantises it to jaxfit's int8 while loading)"
)
_FP4_ADVICE = (
    "jaxfit reads bitsandbytes 4-bit checkpoints in NF4 only (bnb_4bit_quant_type='nf4'); "
    "load the float checkpoint instead (base_format=nf4 quantises it to NF4 while loading)"
)


def stored_format(hf_config: dict, where: str = "checkpoint") -> str | None:
    """How an HF ``config.json`` says the weights are stored: ``"nf4"`` for a
    bitsandbytes 4-bit NF4 checkpoint, ``None`` for float weights.

    Args:
      hf_config: the ``config.json`` dict (its ``quantization_config``).
      where: the checkpoint's name, for messages.

    Raises:
      ValueError: a format jaxfit does not read, named: bitsandbytes LLM.int8
        (``load_in_8bit``), bitsandbytes FP4 (``bnb_4bit_quant_type="fp4"``) or another
        ``quant_method`` (GPTQ, AWQ, ...).
    """
    qc = hf_config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if not method:
        return None
    if method != "bitsandbytes":
        raise ValueError(
            f"{where}: quantization_config.quant_method={method!r} is not supported; jaxfit "
            "reads float checkpoints and bitsandbytes 4-bit NF4 ones"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(
            f"{where} is a bitsandbytes LLM.int8 checkpoint (load_in_8bit): {_INT8_ADVICE}"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return None
    quant_type = qc.get("bnb_4bit_quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(
            f"{where} is a bitsandbytes 4-bit {str(quant_type).upper()} checkpoint "
            f"(bnb_4bit_quant_type={quant_type!r}): {_FP4_ADVICE}"
        )
    return "nf4"


def check_names(names: Iterable[str], where: str = "checkpoint") -> None:
    """Refuse tensors of the bitsandbytes formats jaxfit does not read, whatever
    ``config.json`` says: LLM.int8's ``<module>.SCB`` / ``weight_format`` and FP4's
    ``<name>.quant_state.bitsandbytes__fp4``.

    Raises:
      ValueError: naming the format and one such tensor.
    """
    for name in names:
        if name.endswith((".SCB", ".weight_format")):
            raise ValueError(
                f"{where} holds bitsandbytes LLM.int8 tensors ({name!r}): {_INT8_ADVICE}"
            )
        if name.endswith(".quant_state.bitsandbytes__fp4"):
            raise ValueError(f"{where} holds bitsandbytes FP4 tensors ({name!r}): {_FP4_ADVICE}")


def has_bnb_stats(names, name: str) -> bool:
    """Whether the checkpoint names hold a 4-bit quant state for weight ``name``."""
    return f"{name}.{QUANT_STATE_KEY}" in names or f"{name}.absmax" in names


def _get(tensors, key: str, name: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(
            f"bitsandbytes 4-bit weight {name!r}: missing statistics tensor {key!r} "
            f"(expected {name} plus {[f'{name}.{s}' for s in STAT_SUFFIXES]})"
        )
    return np.asarray(tensors[key])


def nf4_from_bnb(tensors, name: str) -> NF4Weight:
    """One bitsandbytes NF4 weight as an :class:`NF4Weight` (one layer, no leading axes).

    Args:
      tensors: anything with ``in`` and ``[]`` over checkpoint names (a dict, a
        :class:`jaxfit.hf.io.TensorReader`), holding ``name`` and its statistics (the
        arrays are placed on JAX's default device: wrap the call in
        ``jax.default_device`` to keep them on the host).
      name: the packed weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
      The leaf (arrays as stored; ``nested_code`` is the checkpoint's own map, which
      bitsandbytes' ``dequantize_blockwise`` uses too).

    Raises:
      ValueError: a missing statistics tensor (named), a quant type other than nf4, an
        unsupported blocksize or dtype, or sizes that disagree with the stored shape.
    """
    packed = _get(tensors, name, name)
    state = json.loads(bytes(_get(tensors, f"{name}.{QUANT_STATE_KEY}", name)).decode("utf-8"))
    if state.get("quant_type") != "nf4":
        raise ValueError(
            f"{name!r}: quant_type {state.get('quant_type')!r}; jaxfit reads bitsandbytes NF4 "
            "weights only (not FP4)"
        )
    shape, blocksize = tuple(int(s) for s in state["shape"]), int(state["blocksize"])
    if len(shape) != 2:
        raise ValueError(f"{name!r}: quantised shape {shape} is not a matrix [out, in]")
    n = shape[0] * shape[1]
    if blocksize not in BLOCKSIZES or n % blocksize:
        raise ValueError(
            f"{name!r}: {n} elements with blocksize {blocksize} (jaxfit needs one of "
            f"{BLOCKSIZES} dividing the size)"
        )
    if state.get("dtype") not in _DTYPES:
        raise ValueError(f"{name!r}: unsupported quant_state dtype {state.get('dtype')!r}")
    if packed.dtype != np.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes
        packed = np.ascontiguousarray(packed).view(np.uint8)
    packed = packed.reshape(-1)
    if packed.size != n // 2:
        raise ValueError(
            f"{name!r}: {packed.size} packed bytes for shape {shape}, expected {n // 2}"
        )
    quant_map = _get(tensors, f"{name}.quant_map", name)
    # bitsandbytes dequantises with its built-in NF4 table; a different stored map means
    # the tensor is not what it claims to be.
    if quant_map.shape != (16,) or not np.allclose(quant_map, NF4_CODE, rtol=0, atol=1e-6):
        raise ValueError(f"{name!r}: quant_map is not the NF4 table")
    absmax = _get(tensors, f"{name}.absmax", name).reshape(-1)
    nblocks = n // blocksize
    if absmax.size != nblocks:
        raise ValueError(f"{name!r}: {absmax.size} absmax values, expected {nblocks}")
    if "nested_offset" not in state and absmax.dtype != np.uint8:
        return NF4Weight(
            packed=jnp.asarray(packed),
            absmax=jnp.asarray(absmax, jnp.float32),
            nested_absmax=None,
            nested_code=None,
            offset=None,
            hf_shape=shape,
            blocksize=blocksize,
            dtype=state["dtype"],
        )
    nested_absmax = _get(tensors, f"{name}.nested_absmax", name).reshape(-1)
    nested_code = _get(tensors, f"{name}.nested_quant_map", name).reshape(-1)
    nested_blocksize = int(state.get("nested_blocksize", 256))
    if "nested_offset" not in state:
        raise ValueError(f"{name!r}: uint8 absmax but no nested_offset in the quant state")
    if state.get("nested_dtype", "float32") != "float32" or absmax.dtype != np.uint8:
        raise ValueError(f"{name!r}: double quantisation must store uint8 absmax, float32 stats")
    if nested_code.size != 256 or nested_absmax.size != -(-nblocks // nested_blocksize):
        raise ValueError(
            f"{name!r}: nested_quant_map of {nested_code.size} values / nested_absmax of "
            f"{nested_absmax.size} values do not fit {nblocks} blocks of {nested_blocksize}"
        )
    return NF4Weight(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        nested_absmax=jnp.asarray(nested_absmax, jnp.float32),
        nested_code=jnp.asarray(nested_code, jnp.float32),
        offset=jnp.asarray(np.float32(state["nested_offset"])),
        hf_shape=shape,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
        dtype=state["dtype"],
    )


def nf4_to_bnb(leaf: NF4Weight, name: str) -> dict[str, np.ndarray]:
    """The bitsandbytes tensors of one layer's :class:`NF4Weight` (inverse of
    :func:`nf4_from_bnb`; byte-identical to ``QuantState.as_dict(packed=True)``).

    Raises:
      ValueError: ``leaf`` has leading layer axes (index one layer first).
    """
    if leaf.packed.ndim != 1:
        raise ValueError(f"{name!r}: export one layer at a time; packed has {leaf.packed.shape}")
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": leaf.blocksize,
        "dtype": leaf.dtype,
        "shape": list(leaf.hf_shape),
    }
    out = {name: np.asarray(leaf.packed).reshape(-1, 1)}
    out[f"{name}.absmax"] = np.asarray(leaf.absmax)
    out[f"{name}.quant_map"] = NF4_CODE.copy()
    if leaf.double_quant:
        out[f"{name}.nested_absmax"] = np.asarray(leaf.nested_absmax, np.float32)
        out[f"{name}.nested_quant_map"] = np.asarray(leaf.nested_code, np.float32)
        state.update(
            nested_blocksize=leaf.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.float32(leaf.offset)),
        )
    out[f"{name}.{QUANT_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
    return out


def export_tensors(rules, params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for a parameter tree with NF4 leaves: bitsandbytes
    tensors for every :class:`NF4Weight`, float tensors (converted by the rule) otherwise.

    Raises:
      ValueError: an int8 leaf (bitsandbytes' 8-bit format is not written).
    """
    flat = traverse_util.flatten_dict(params)
    for rule in rules:
        value = flat[rule.path]
        per_layer = rule.num_layers is not None
        for i, name in enumerate(rule.hf_names()):
            if isinstance(value, NF4Weight):
                layer = jax.tree.map(lambda a, i=i: a[i], value) if per_layer else value
                yield from nf4_to_bnb(layer, name).items()
            elif hasattr(value, "matmul"):
                raise ValueError(
                    f"{name!r}: cannot export a {type(value).__name__} to bitsandbytes"
                )
            else:
                x = np.asarray(jax.device_get(value[i] if per_layer else value))
                yield name, np.asarray(rule.transform.to_hf(x), order="C")


def save_bnb_pretrained(model, params, out_dir: str | os.PathLike) -> Path:
    """Write a bitsandbytes NF4 checkpoint that ``transformers`` loads with its 4-bit
    quantizer (``from_pretrained(out_dir)``; float tensors in their stored dtype).

    The ``quantization_config`` lists every float linear layer in
    ``llm_int8_skip_modules`` so transformers converts exactly the quantised ones.

    Args:
      model: a jaxfit model (its family gives the name map and ``config.json``).
      params: its parameter tree with :class:`NF4Weight` leaves (all with the same
        blocksize and double quantisation setting).
      out_dir: output directory (created).

    Returns:
      ``out_dir`` as a ``Path``.

    Raises:
      ValueError: no NF4 leaf, or leaves with different settings.
    """
    family = families.for_model(model)
    rules = family.rules(model.config)
    flat = traverse_util.flatten_dict(params)
    quantised = [flat[r.path] for r in rules if isinstance(flat[r.path], NF4Weight)]
    settings = {(q.blocksize, q.double_quant, q.dtype) for q in quantised}
    if len(settings) != 1:
        raise ValueError(
            f"need NF4 leaves with one (blocksize, double_quant, dtype); got {settings}"
        )
    _, double_quant, dtype = settings.pop()
    skip = [
        name.removesuffix(".weight")
        for r in rules
        if r.transform is mapping.linear and not isinstance(flat[r.path], NF4Weight)
        for name in r.hf_names()
    ]
    out = Path(out_dir)
    io.write_tensors(export_tensors(rules, params), out)
    hf_config = family.config_to_hf(model.config)
    hf_config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
    }
    io.write_config(hf_config, out)
    return out

"""How much a quantisation costs: per-tensor errors, a model summary, bits per weight."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxfit.quant.base import is_weight_leaf


def bits_per_weight(
    method: str = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = 256,
    in_features: int | None = None,
) -> float:
    """Storage bits per weight of a quantisation scheme, closed form.

    NF4 (QLoRA, https://arxiv.org/abs/2305.14314, section 3 "Double Quantization"):
    ``4 + 32 / blocksize`` without double quantisation (a float32 absmax per block) and
    ``4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)`` with it (an 8-bit absmax
    per block, a float32 scale per 256 blocks): 4.127 for 64 / 256. int8:
    ``8 + 32 / in_features`` (one float32 scale per output channel). Per-tensor constants
    (the double-quantisation offset and 256-entry map) are not counted.

    Raises:
      ValueError: unknown method, or int8 without ``in_features``.
    """
    if method == "nf4":
        if double_quant:
            return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
        return 4 + 32 / blocksize
    if method == "int8":
        if not in_features:
            raise ValueError("int8 bits per weight depends on in_features")
        return 8 + 32 / in_features
    raise ValueError(f"unknown method {method!r}")


def leaf_bits(leaf: Any) -> float:
    """Measured storage bits per weight of a quantised leaf (every array it holds)."""
    nbytes = sum(x.nbytes for x in jax.tree.leaves(leaf))
    return 8 * nbytes / leaf.num_weights


def quantization_error(w: Any, q: Any) -> dict[str, Any]:
    """Error of a quantised weight against its float original.

    Args:
      w: the float kernel ``[in, out]`` or stacked ``[L, in, out]``.
      q: the quantised leaf (``dequantize()`` gives the same layout) or a float array.

    Returns:
      ``{"rel_frobenius": ||w - q||_F / ||w||_F, "max_abs": max |w - q|}`` in float64,
      Python floats for a 2-D kernel and ``np.ndarray [L]`` (one per layer) for a stack.

    Raises:
      ValueError: shapes differ.
    """
    w = np.asarray(jax.device_get(w), np.float64)
    deq = q.dequantize("float32") if is_weight_leaf(q) else q
    deq = np.asarray(jax.device_get(deq), np.float64)
    if w.shape != deq.shape:
        raise ValueError(f"float weight {w.shape} and quantised weight {deq.shape} differ")
    axes = (-2, -1) if w.ndim >= 2 else None
    diff = w - deq
    num = np.sqrt(np.sum(diff**2, axis=axes))
    den = np.sqrt(np.sum(w**2, axis=axes))
    rel = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    max_abs = np.max(np.abs(diff), axis=axes)
    if np.ndim(rel) == 0:
        return {"rel_frobenius": float(rel), "max_abs": float(max_abs)}
    return {"rel_frobenius": rel, "max_abs": max_abs}


def error_report(params: Any, qparams: Any) -> dict[str, Any]:
    """Per-tensor quantisation errors and a model summary.

    Args:
      params: the float parameter tree.
      qparams: the same tree after :func:`jaxfit.quant.quantize_params` (or loaded with
        :func:`jaxfit.quant.load.load_quantized`).

    Returns:
      ``{"tensors": {path: {"rel_frobenius", "max_abs", "bits_per_weight"}}, "summary":
      {...}}``; stacked tensors give per-layer lists. The summary has ``num_tensors``,
      ``num_weights`` (quantised), ``rel_frobenius`` (``||W - Q||_F / ||W||_F`` over all
      quantised weights together), ``max_rel_frobenius`` (worst tensor or layer),
      ``max_abs``, ``bits_per_weight`` (measured, quantised weights only),
      ``quantized_bytes`` and ``float_bytes`` (the float parameters as given) over the
      whole tree.

    Raises:
      ValueError: the trees have different paths.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    qflat = traverse_util.flatten_dict(qparams, sep="/")
    if set(flat) != set(qflat):
        raise ValueError(f"parameter trees differ: {sorted(set(flat) ^ set(qflat))[:10]}")
    tensors: dict[str, Any] = {}
    sq_err = sq_ref = 0.0
    max_abs = max_rel = 0.0
    num_weights = 0
    q_bits = 0.0
    for path, q in qflat.items():
        if not is_weight_leaf(q):
            continue
        err = quantization_error(flat[path], q)
        rel = np.atleast_1d(err["rel_frobenius"])
        w = np.asarray(jax.device_get(flat[path]), np.float64).reshape(len(rel), -1)
        ref = np.sum(w**2, axis=1)
        sq_err += float(np.sum(rel**2 * ref))
        sq_ref += float(np.sum(ref))
        max_rel = max(max_rel, float(rel.max()))
        max_abs = max(max_abs, float(np.max(err["max_abs"])))
        bits = leaf_bits(q)
        num_weights += q.num_weights
        q_bits += bits * q.num_weights
        tensors[path] = {
            "rel_frobenius": err["rel_frobenius"].tolist()
            if isinstance(err["rel_frobenius"], np.ndarray)
            else err["rel_frobenius"],
            "max_abs": err["max_abs"].tolist()
            if isinstance(err["max_abs"], np.ndarray)
            else err["max_abs"],
            "bits_per_weight": bits,
        }
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    summary = {
        "num_tensors": len(tensors),
        "num_weights": num_weights,
        "rel_frobenius": float(np.sqrt(sq_err / sq_ref)) if sq_ref else 0.0,
        "max_rel_frobenius": max_rel,
        "max_abs": max_abs,
        "bits_per_weight": q_bits / num_weights if num_weights else 0.0,
        "quantized_bytes": nbytes(qparams),
        "float_bytes": nbytes(params),
    }
    return {"tensors": tensors, "summary": summary}

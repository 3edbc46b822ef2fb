"""How much a quantisation costs: per-tensor errors, a model summary, bits per weight.

Nothing here depends on the format: errors compare ``leaf.dequantize()`` with the float
weight, measured bits count the arrays a leaf holds, and the closed-form cost is the
registered format's ``bits_per_weight`` (:mod:`jaxfit.quant.base`)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxfit.quant import base
from jaxfit.quant.base import is_quantized


def bits_per_weight(method: str = "nf4", *, in_features: int | None = None, **options) -> float:
    """Storage bits per weight of a quantisation format, closed form: the registered
    format's ``bits_per_weight`` (:mod:`jaxfit.quant.base`) with its default options
    updated by ``options`` (NF4: 4.127 for blocksize 64 with double quantisation; int8:
    ``8 + 32 / in_features``; each format's docstring gives its source).

    Raises:
      ValueError: unknown method or option, or a format whose cost needs
        ``in_features`` without it.
    """
    cls = base.format_class(method)
    accepted = set(inspect.signature(cls.bits_per_weight).parameters)
    if bad := sorted(set(options) - accepted):
        raise ValueError(f"{method} bits_per_weight takes no option(s) {bad}")
    return cls.bits_per_weight(in_features, **{**cls.defaults, **options})


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
    deq = q.dequantize("float32") if is_quantized(q) else q
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
        :func:`jaxfit.hf.load_quantized`).

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
        if not is_quantized(q):
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

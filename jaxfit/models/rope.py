"""Rotary position embeddings (RoPE) with Hugging Face's ``rotate_half`` layout.

RoPE (Su et al. 2021, "RoFormer", https://arxiv.org/abs/2104.09864, eq. 34) rotates each
pair of query/key features by an angle ``position * inv_freq[j]`` with
``inv_freq[j] = theta ** (-2j / head_dim)``. Hugging Face Llama pairs feature ``j`` with
feature ``j + head_dim / 2`` (``rotate_half`` in ``transformers/models/llama/
modeling_llama.py``), not adjacent features as in the paper; checkpoints converted to HF
layout depend on that convention, so jaxfit follows it.

Frequency scalings (``transformers/modeling_rope_utils.py``): ``linear`` (position
interpolation, Chen et al. 2023, https://arxiv.org/abs/2306.15595: ``inv_freq / factor``)
and ``llama3`` (Llama 3.1, ``_compute_llama3_parameters``: long wavelengths divided by
``factor``, short ones kept, a smooth interpolation in between).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling (HF ``rope_parameters`` / ``rope_scaling`` minus theta).

    Attributes:
      rope_type: ``"linear"`` or ``"llama3"``.
      factor: frequency divisor for long wavelengths (``8`` for Llama 3.1).
      low_freq_factor, high_freq_factor: ``llama3`` only (``1`` and ``4`` for Llama 3.1).
      original_max_position_embeddings: ``llama3`` only, the pre-training context (8192).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; jaxfit implements {ROPE_TYPES}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None, max_position_embeddings: int):
        """Parse an HF ``rope_parameters`` / ``rope_scaling`` dict; ``None`` for plain RoPE.

        Accepts the 4.x spelling (``type``) and the 5.x one (``rope_type``); extra keys such
        as ``rope_theta`` are ignored. Raises ``ValueError`` for types jaxfit lacks (yarn,
        dynamic, longrope).
        """
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type == "linear":
            return cls("linear", float(d["factor"]))
        return cls(
            rope_type,
            float(d["factor"]),
            float(d.get("low_freq_factor", 1.0)),
            float(d.get("high_freq_factor", 4.0)),
            int(d.get("original_max_position_embeddings", max_position_embeddings)),
        )

    def to_hf(self) -> dict:
        """The HF dict (without ``rope_theta``)."""
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {"rope_type": self.rope_type, **dataclasses.asdict(self)}


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32 (host array, a compile-time constant).

    Computed in float32 in the same order as ``transformers`` (``_compute_default_rope_
    parameters``, ``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``)
    so that logits match to float32 rounding.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: transformers.modeling_rope_utils._compute_llama3_parameters
    factor = np.float32(scaling.factor)
    lo, hi = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    old_len = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` tables ``[batch, seq, head_dim]`` float32 of int ``positions [batch, seq]``.

    The frequencies are repeated twice along the last axis (``emb = cat(freqs, freqs)`` in
    ``LlamaRotaryEmbedding.forward``).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """``cat(-x2, x1)`` for ``x = cat(x1, x2)`` split in halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` by tables ``[batch, seq, head_dim]``.

    ``x * cos + rotate_half(x) * sin`` (``apply_rotary_pos_emb`` in HF Llama), computed in
    float32 and returned in ``x``'s dtype.
    """
    x32 = x.astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)

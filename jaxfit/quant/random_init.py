"""Random quantised parameters of a model too big to exist in float.

``quantize_params(model.init(rng, ...)["params"])`` first builds the whole float model: 16 GB
in bfloat16 for an 8B Llama, more than the 12 GiB a QLoRA benchmark allows.
:func:`random_quantized_params` builds a tree of the same structure (same quantised
leaves, same shapes and dtypes) from the *abstract* parameters
(``jax.eval_shape(model.init, ...)``) without that: every layer of every selected stacked
kernel ``[L, in, out]`` is drawn on its own (normal, ``stddev``), quantised at once
(``NF4Weight.quantize`` / ``Int8Weight.quantize``) and moved to the host; the layers are
stacked on the host and placed once, as :func:`jaxfit.hf.load_pretrained` does for a
checkpoint streamed layer by layer. The transient device memory beyond the result is one
layer's float kernel and its quantisation temporaries. The leaves that stay float
(embeddings, norms, the LM head under ``jaxfit.hf.families.DEFAULT_QUANT_RULES``) are drawn
directly in ``float_dtype``, in row chunks of at most ``chunk_bytes`` written in place.

The values are for benchmarks and tests (throughput and memory do not depend on them):
kernels and embeddings ``N(0, stddev^2)``, norm gains (``.../scale``) 1, biases 0.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import params as params_lib
from jaxfit.quant import base
from jaxfit.quant.leaves import check_kernel, selected_kernels

PyTree = Any

# Float leaves larger than this are drawn in row chunks (an 8B Llama's embedding is 1 GB in
# bf16, and jax.random's bits for it as much again).
CHUNK_BYTES = 256 * 2**20


def _leaf_key(rng: jax.Array, path: str) -> jax.Array:
    """A key for one parameter, a function of (rng, path) only."""
    if not jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "stddev"))
def _normal(key: jax.Array, *, shape: tuple[int, ...], dtype: Any, stddev: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * stddev).astype(dtype)


def _draw_layer(key: jax.Array, shape: tuple[int, ...], dtype: Any, stddev: float) -> jax.Array:
    """One layer's float kernel ``[in, out]`` (the only float copy of a quantised kernel that
    ever exists). A module-level function so that tests can watch what is drawn."""
    return _normal(key, shape=tuple(shape), dtype=jnp.dtype(dtype), stddev=float(stddev))


@functools.partial(jax.jit, static_argnames=("rows", "stddev"), donate_argnums=0)
def _fill_rows(buf: jax.Array, key: jax.Array, start: jax.Array, *, rows: int, stddev: float):
    chunk = jax.random.normal(key, (rows, *buf.shape[1:]), jnp.float32) * stddev
    index = (start,) + (0,) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, chunk.astype(buf.dtype), index)


def _draw_float(
    key: jax.Array, shape: tuple[int, ...], dtype: Any, stddev: float, chunk_bytes: int
) -> jax.Array:
    """``N(0, stddev^2)`` of ``shape`` in ``dtype``; large arrays are filled in place, a
    chunk of rows at a time (the last chunk's start is clamped: it redraws a few rows)."""
    dtype = jnp.dtype(dtype)
    nbytes = math.prod(shape) * max(dtype.itemsize, 4)  # float32 draws
    if len(shape) < 2 or nbytes <= chunk_bytes:
        return _draw_layer(key, shape, dtype, stddev)
    row_bytes = math.prod(shape[1:]) * max(dtype.itemsize, 4)
    rows = max(1, min(shape[0], chunk_bytes // row_bytes))
    buf = jnp.zeros(shape, dtype)
    for i, start in enumerate(range(0, shape[0], rows)):
        start = min(start, shape[0] - rows)
        buf = _fill_rows(
            buf, jax.random.fold_in(key, i), jnp.int32(start), rows=rows, stddev=float(stddev)
        )
    return buf


def _stack_host(layers: list) -> Any:
    """Stack per-layer quantised leaves (host arrays) on a new leading axis, then place."""
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *layers)


def random_quantized_params(
    abstract: PyTree,
    rng: jax.Array,
    rules: Sequence[str],
    method: str = "nf4",
    *,
    exclude: Sequence[str] = (),
    float_dtype: Any = jnp.bfloat16,
    stddev: float = 0.02,
    chunk_bytes: int = CHUNK_BYTES,
    **options,
) -> PyTree:
    """Random parameters, quantised as :func:`~jaxfit.quant.quantize_params` would, built
    one layer at a time (see the module docstring).

    Args:
      abstract: the parameter tree as ``jax.ShapeDtypeStruct`` leaves, e.g.
        ``jax.eval_shape(model.init, rng, ids)["params"]``; a selected leaf's dtype is the
        ``dtype`` recorded in its quantised leaf (as ``quantize_params`` records the dtype
        of the float kernel it was given).
      rng: PRNG key (typed or raw); each leaf's values depend on ``(rng, path)`` only.
      rules, exclude, method, float_dtype, **options: as ``quantize_params``
        (``float_dtype=None`` keeps each float leaf's abstract dtype).
      stddev: standard deviation of kernels and embeddings.
      chunk_bytes: float leaves whose float32 draw exceeds this are drawn in row chunks.

    Returns:
      A tree of device arrays and quantised leaves with the structure, shapes and dtypes
      of ``quantize_params`` applied to concrete parameters of ``abstract``'s shapes.

    Raises:
      ValueError: an unknown method or option, a rule matching no leaf, a selected leaf
        that is not a 2-D / 3-D float kernel (as ``quantize_params``).
    """
    cls = base.format_class(method)
    opts = base.options(method, options)
    selected = selected_kernels(abstract, rules, exclude)

    def build(path, spec):
        name = params_lib.path_str(path)
        key = _leaf_key(rng, name)
        shape, dtype = tuple(spec.shape), jnp.dtype(spec.dtype)
        if name in selected:
            check_kernel(name, shape, dtype)
            if len(shape) == 2:
                return cls.quantize(_draw_layer(key, shape, dtype, stddev), **opts)
            layers = []
            for i in range(shape[0]):
                w = _draw_layer(jax.random.fold_in(key, i), shape[1:], dtype, stddev)
                layers.append(jax.device_get(cls.quantize(w, **opts)))
                del w
            return _stack_host(layers)
        out_dtype = dtype
        if float_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            out_dtype = jnp.dtype(float_dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(shape, out_dtype)
        if name.endswith("scale"):  # norm gains
            return jnp.ones(shape, out_dtype)
        if name.endswith("bias"):
            return jnp.zeros(shape, out_dtype)
        return _draw_float(key, shape, out_dtype, stddev, chunk_bytes)

    return jax.tree_util.tree_map_with_path(build, abstract)

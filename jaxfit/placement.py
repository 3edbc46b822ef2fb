"""Where the arrays of a traced step live under a device mesh: activations split over the
batch, weights gathered whole where a layer uses them (FSDP).

Inside a step traced under :func:`spmd_mesh` (``jaxfit.step`` traces the train and eval
steps in it), the models say where their arrays live, as MaxText's and levanter's
annotate theirs: the residual stream entering each layer is split over the batch axes
(:func:`constrain_batch`), and every weight is gathered whole where a layer uses it
(:func:`gathered`), in its storage format (NF4 codes and absmax, not a dequantised copy),
cast to the compute dtype before the gather. Left to itself, XLA's partitioner keeps a
weight split over ``fsdp`` and moves the activations instead (all-gathers and
all-reduces of ``[batch, seq, hidden]`` in every layer: 314 GiB of collectives per step
for an 8B NF4 QLoRA at ``fsdp=4``, 30.7 GiB with these constraints, docs/BENCHMARKS.md).
Outside :func:`spmd_mesh`, or on a mesh of one device, every function here is the
identity. The mesh and the parameters' shardings are :mod:`jaxfit.sharding`'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfit import sharding

PyTree = Any

_SPMD_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "jaxfit_spmd_mesh", default=None
)


@contextlib.contextmanager
def spmd_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Trace the code inside for ``mesh``: :func:`constrain_batch` and :func:`gathered`
    act only in this context (a trace-time, per-thread setting; no effect on a mesh of
    one device). ``jaxfit.step`` traces the train and eval steps in it."""
    token = _SPMD_MESH.set(mesh if mesh is not None and mesh.size > 1 else None)
    try:
        yield
    finally:
        _SPMD_MESH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` (``[batch, ...]``) with its leading axis split over the batch axes
    (``with_sharding_constraint``), under :func:`spmd_mesh`; unchanged outside it or when
    the batch axes do not divide ``x.shape[0]`` (e.g. one sequence being generated)."""
    mesh = _SPMD_MESH.get()
    if mesh is None or not x.ndim or x.shape[0] % sharding.num_batch_shards(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))


def gathered(weight: PyTree, dtype=None, *, unless_split_on: int | None = None) -> PyTree:
    """A weight (an array or a weight leaf: NF4 / int8 codes with their scales, a LoRA
    adapter over a base) whole on every device, under :func:`spmd_mesh` with ``fsdp > 1``:
    FSDP's all-gather of one layer's weights where they are used. Unchanged otherwise.

    Args:
      weight: an array or a pytree of arrays (split over ``fsdp`` or not).
      dtype: optional compute dtype: floating arrays are cast to it BEFORE the gather (a
        float32 master weight used in bfloat16 moves half the bytes; the result is the
        same as casting after), and cast back before their gradient is reduce-scattered
        (the sum over devices runs in the weight's own dtype). Without a mesh the arrays
        are returned uncast.
      unless_split_on: an axis: an array whose FSDP split
        (:func:`jaxfit.sharding.fsdp_spec`) falls on it is left split (an LM head split
        over the vocabulary: XLA then splits the logits instead, gathering the hidden
        states, which are far smaller).

    Returns:
      The same structure; under FSDP every array constrained to be replicated, its
      cotangent (each device's partial sum) constrained to the array's FSDP sharding
      (:func:`jaxfit.sharding.fsdp_spec`), which XLA lowers to a reduce-scatter where the
      backend has one.
    """
    mesh = _SPMD_MESH.get()
    if mesh is None or sharding.fsdp_size(mesh) == 1:
        return weight
    whole = sharding.replicated(mesh)

    def gather(a):
        if not jnp.issubdtype(a.dtype, jnp.inexact):  # codes: no gradient
            return jax.lax.with_sharding_constraint(a, whole)
        spec = sharding.fsdp_spec(a.shape, sharding.fsdp_size(mesh))
        if spec is not None and unless_split_on is not None and spec[unless_split_on]:
            return a
        split = whole if spec is None else NamedSharding(mesh, spec)
        to = np.dtype(dtype) if dtype is not None else np.dtype(a.dtype)
        return _gather(a, whole, split, to)

    return jax.tree.map(gather, weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather(a: jax.Array, whole: NamedSharding, split: NamedSharding, dtype) -> jax.Array:
    """``a`` cast to ``dtype`` and constrained to ``whole``; its cotangent cast back to
    ``a``'s dtype and constrained to ``split`` (the transpose of a plain constraint would
    keep the gradient whole, an all-reduce where a reduce-scatter will do)."""
    return jax.lax.with_sharding_constraint(a.astype(dtype), whole)


def _gather_fwd(a, whole, split, dtype):
    return _gather(a, whole, split, dtype), jax.ShapeDtypeStruct(a.shape, a.dtype)


def _gather_bwd(whole, split, dtype, source, cotangent):
    return (jax.lax.with_sharding_constraint(cotangent.astype(source.dtype), split),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def constrain_vocab(logits: jax.Array) -> jax.Array:
    """``logits [..., vocab]`` split over ``fsdp`` on the vocabulary axis (rows over
    ``data``), under :func:`spmd_mesh` with ``fsdp > 1`` and a vocabulary ``fsdp``
    divides: the layout the vocabulary-parallel head computes them in, kept for the loss
    and, transposed, for the logits' gradient, whose two parts (the softmax's and the
    target's) then add without a reshuffle. Unchanged otherwise."""
    mesh = _SPMD_MESH.get()
    n = sharding.fsdp_size(mesh) if mesh is not None else 1
    if n == 1 or logits.shape[-1] % n:
        return logits
    rows = (
        "data" if "data" in mesh.axis_names and logits.shape[0] % mesh.shape["data"] == 0 else None
    )
    spec = PartitionSpec(rows, *([None] * (logits.ndim - 2)), sharding.FSDP_AXIS)
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))

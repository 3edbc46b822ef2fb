"""Device mesh and shardings.

Today jaxfit is data-parallel: a 1-D mesh with axis ``"data"``, batches split along their
leading axis, parameters replicated. The pieces are written for more axes: a batch is
split over every *batch axis* present in the mesh (``BATCH_AXES``: ``data`` and, later,
``fsdp``), and parameter shardings come from regex rules over parameter paths
(:func:`param_shardings`, via :func:`jaxfit.params.assign`), so an ``fsdp``/``model`` axis
is a new mesh shape plus a list of rules.

Single-process only for now: :func:`shard_batch` expects the GLOBAL batch on this host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfit import params as params_lib

PyTree = Any

# Mesh axes that split the batch (in this order) whenever they exist in the mesh.
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    axis_name: str = "data",
    *,
    axes: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Mesh over all (or the given) devices.

    Args:
      axis_name: name of the single axis when ``axes`` is None (all devices on it).
      axes: optional ``{name: size}`` for a multi-axis mesh, in major-to-minor order, e.g.
        ``{"data": 2, "fsdp": 4}``; one size may be ``-1`` (the rest of the devices).
      devices: defaults to ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh``.

    Raises:
      ValueError: the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if axes is None:
        axes = {axis_name: n}
    names, sizes = list(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = n // known if known and n % known == 0 else -1
    if int(np.prod(sizes)) != n or min(sizes) < 1:
        raise ValueError(f"mesh axes {dict(axes)} do not fit {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), tuple(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch's leading dimension is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh) -> int:
    """Number of pieces the global batch is split into (product of the batch axes)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the batch axes, every other axis replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(
    params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = ()
) -> PyTree:
    """Tree of ``NamedSharding`` for ``params`` (arrays or ``ShapeDtypeStruct``).

    Each leaf gets the ``PartitionSpec`` of the first rule whose regex ``re.search``es its
    path (:func:`jaxfit.params.assign`); default fully replicated. Use as
    ``jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init, rng), mesh))``.
    """
    specs = params_lib.assign(params, [(p, i) for i, (p, _) in enumerate(rules)], -1)
    return jax.tree.map(
        lambda i: NamedSharding(mesh, rules[i][1] if i >= 0 else PartitionSpec()), specs
    )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a host batch on the mesh, split along the leading (batch) axis.

    Args:
      batch: dict of numpy arrays sharing the global batch size ``B`` as leading axis.
      mesh: from :func:`make_mesh`.

    Returns:
      Dict of global ``jax.Array`` with :func:`batch_sharding`.

    Raises:
      ValueError: leaves disagree on ``B``, or ``B`` is not divisible by the number of
        batch shards (devices on the batch axes); the message names both numbers.
    """
    shards = num_batch_shards(mesh)
    sizes = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in batch.items()}
    if len(set(sizes.values())) > 1 or None in sizes.values():
        raise ValueError(f"batch leaves need one common leading axis, got sizes {sizes}")
    if sizes:
        b = next(iter(sizes.values()))
        if b % shards:
            raise ValueError(
                f"batch size {b} is not divisible by the {shards} devices of mesh axes "
                f"{batch_axes(mesh)}"
            )
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}

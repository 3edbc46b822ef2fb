"""Device mesh and shardings: data parallelism, FSDP, and batches of several processes.

The mesh has two axes, ``("data", "fsdp")`` (:class:`MeshSpec`, from
``config.mesh``; a ``tensor`` axis would be a third). The batch's leading axis is split
over both (``BATCH_AXES``). Parameters, gradients and optimizer state are split over
``fsdp`` (ZeRO-3 / FSDP: each device holds ``1/fsdp`` of them and XLA's SPMD partitioner
gathers a layer's weights where they are used) and replicated over ``data``:

* :func:`fsdp_shardings`: the sharding of each array of a parameter tree, chosen by rules
  over parameter paths (:data:`FSDP_RULES`, through :func:`jaxfit.params.assign`): the
  largest dimension that the ``fsdp`` size divides; never the layer axis of an
  ``nn.scan`` stack (so each scan iteration slices its layer locally); replicated when
  no dimension fits (reported in one log line). Quantised leaves (NF4 codes, absmax and
  code tables; int8 codes and scales) are arrays of the tree like any other.
* :func:`follow_params`: optimizer state follows the parameters it mirrors (an optax state
  leaf whose path ends in a parameter's path and has its shape gets its sharding; blockwise
  8-bit statistics and counters are replicated, reported).
* :func:`shard_batch`: the global batch from each process's rows
  (``jax.make_array_from_process_local_data``); :func:`process_batch_rows` says which rows
  a process reads.
Where the arrays of a traced step live (activations split over the batch, weights
gathered where used) is :mod:`jaxfit.placement`'s.

With ``fsdp=1`` every sharding is the replicated one: plain data parallelism.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfit import params as params_lib
from jaxfit import target

log = logging.getLogger(__name__)

PyTree = Any

# The axes of a config's mesh, major to minor (``config.mesh.<axis>``). ``fsdp`` is minor:
# its devices are neighbours (one host's GPUs), where the per-layer all-gathers of weights
# and reduce-scatters of gradients run; ``data`` may span hosts: once per step it
# all-reduces the (already fsdp-scattered) gradients.
MESH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
# Mesh axes that split the batch (in this order) whenever they exist in the mesh.
BATCH_AXES = ("data", "fsdp")

# Paths of parameters stacked by ``nn.scan`` (``jaxfit.models.layers.stack_layers``): their
# leading axis is the layer axis. GPT-2's stack is ``h``; Llama/Qwen2's ``layers``;
# CLIP's ``text_model/layers`` and ``vision_model/layers``. A new family whose stack has
# another name adds its pattern here.
STACKED_PATTERNS = (r"(^|/)layers/", r"^h/")

# FSDP rules: (pattern, which dimensions may be split), first match wins (re.search on the
# path, jaxfit.params). "inner": any but the leading (layer) axis; "any": any dimension;
# "replicate": none.
FSDP_RULES: tuple[tuple[str, str], ...] = (
    *((p, "inner") for p in STACKED_PATTERNS),
    (r".", "any"),
)


# --- the mesh ---------------------------------------------------------------------------


def _ordered(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Devices by (process, id): each process's devices are neighbours in the mesh, so its
    rows of the batch are one contiguous block (:func:`process_batch_rows`)."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


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
      devices: defaults to ``jaxfit.target.devices()`` (``jax.devices()``, every
        process's, unless a compile target names others), ordered by process.

    Returns:
      A ``jax.sharding.Mesh``.

    Raises:
      ValueError: the axis sizes do not multiply to the number of devices (the message
        names the sizes and the device count).
    """
    devices = _ordered(target.devices() if devices is None else devices)
    n = len(devices)
    if axes is None:
        axes = {axis_name: n}
    names, sizes = list(axes), [int(s) for s in axes.values()]
    shown = " x ".join(f"{k}={v}" for k, v in axes.items())
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shown}: at most one axis may be -1 (the rest of the devices)")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh {shown}: sizes must be positive, or -1 for the rest")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if n % known:
            raise ValueError(
                f"mesh axes {shown} do not fit {n} devices: {known} does not divide {n}"
            )
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh axes {shown} do not fit {n} devices: they need {int(np.prod(sizes))}; "
            "make the product the device count, or set one axis to -1 (the rest)"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), tuple(names))


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The device mesh a run asks for (``config.mesh``), resolved once
    (``jaxfit.tasks.resolve_config``) and built over the devices by :meth:`build`.

    Attributes:
      data: data-parallel devices (parameters replicated over them); ``-1``: the rest.
      fsdp: devices splitting parameters, gradients and optimizer state; ``-1``: the rest.
    """

    data: int = -1
    fsdp: int = 1

    @classmethod
    def from_config(cls, config) -> MeshSpec:
        """``config.mesh`` (defaults ``data=-1, fsdp=1`` when the config has no ``mesh``:
        a config saved before meshes existed).

        Raises:
          ValueError: an unknown axis, a non-integer size, or ``tensor`` other than 1;
            the message names ``config.mesh.<axis>``.
        """
        cfg = config.get("mesh") if hasattr(config, "get") else None
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
        unknown = sorted(set(values) - {*MESH_AXES, "tensor"})
        if unknown:
            raise ValueError(f"config.mesh has unknown axes {unknown}; known: {list(MESH_AXES)}")
        if int(values.pop("tensor", 1)) != 1:
            raise ValueError("config.mesh.tensor: tensor parallelism is not implemented; use 1")
        for k, v in values.items():
            if isinstance(v, bool) or int(v) != v:
                raise ValueError(f"config.mesh.{k}={v!r}: an integer (or -1 for the rest)")
        return cls(**{k: int(v) for k, v in values.items()})

    @property
    def axes(self) -> dict[str, int]:
        """``{"data": d, "fsdp": f}``, major to minor (``-1``: the rest of the devices)."""
        return {"data": self.data, "fsdp": self.fsdp}

    def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The ``("data", "fsdp")`` mesh over all devices (every process's) or ``devices``.

        Raises:
          ValueError: the sizes do not multiply to the device count; the message names
            ``config.mesh``, the device count and the processes.
        """
        n = len(devices) if devices is not None else target.device_count()
        try:
            return make_mesh(axes=self.axes, devices=devices)
        except ValueError as e:
            procs = jax.process_count()
            where = f"{n} devices" + (f" over {procs} processes" if procs > 1 else "")
            raise ValueError(
                f"config.mesh {self.axes} does not fit this run's {where} ({e}); e.g. "
                f"--config.mesh.data=-1 --config.mesh.fsdp={n} shards parameters over all "
                "of them"
            ) from None


def check_batch_sizes(config, mesh: Mesh) -> None:
    """Refuse a micro-batch that the mesh's batch axes do not divide, before any work:
    each micro-batch (``config.micro_batch_size``; the whole ``batch_size`` without one) is
    split evenly over the ``data x fsdp`` devices. (Evaluation batches are rounded up
    instead, :func:`eval_batch_size`.)

    Raises:
      ValueError: naming the field, its value, the mesh and a size that would do.
    """
    n = num_batch_shards(mesh)
    size = int(config.get("micro_batch_size") or config.get("batch_size") or 0)
    field = "micro_batch_size" if config.get("micro_batch_size") else "batch_size"
    if n > 1 and size % n:
        shown = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh))
        raise ValueError(
            f"config.{field}={size} is not a multiple of the {n} devices of mesh {shown}, "
            f"over which each micro-batch is split; use a multiple of {n}, e.g. "
            f"--config.{field}={max(n, size // n * n)}"
        )


def eval_batch_size(size: int, mesh: Mesh | None) -> int:
    """``size`` rounded up to a multiple of the mesh's batch shards: the evaluation batch
    (padded rows count for nothing in the metrics, so the results do not change)."""
    n = num_batch_shards(mesh) if mesh is not None else 1
    return -(-int(size) // n) * n


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


def fsdp_size(mesh: Mesh) -> int:
    """Devices on the ``fsdp`` axis (1 when the mesh has none)."""
    return int(mesh.shape.get(FSDP_AXIS, 1))


# --- parameters -------------------------------------------------------------------------


def param_shardings(
    params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = ()
) -> PyTree:
    """Tree of ``NamedSharding`` for ``params`` (arrays or ``ShapeDtypeStruct``) from
    explicit ``(pattern, PartitionSpec)`` rules.

    Each leaf gets the ``PartitionSpec`` of the first rule whose regex ``re.search``es its
    path (:func:`jaxfit.params.assign`); default fully replicated. Use as
    ``jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init, rng), mesh))``.
    """
    specs = params_lib.assign(params, [(p, i) for i, (p, _) in enumerate(rules)], -1)
    return jax.tree.map(
        lambda i: NamedSharding(mesh, rules[i][1] if i >= 0 else PartitionSpec()), specs
    )


def fsdp_spec(shape: Sequence[int], size: int, dims: str = "any") -> PartitionSpec | None:
    """The ``PartitionSpec`` that splits the largest dimension of ``shape`` that ``size``
    divides over ``"fsdp"`` (the first of equal ones), or None when none does.

    Args:
      shape: the array's shape.
      size: devices on the ``fsdp`` axis.
      dims: ``"any"``, ``"inner"`` (not dimension 0: the layer axis of a scanned stack) or
        ``"replicate"`` (always None).
    """
    if dims not in ("any", "inner", "replicate"):
        raise ValueError(f"FSDP rule value must be any | inner | replicate, got {dims!r}")
    first = 1 if dims == "inner" else 0
    fits = [d for d in range(first, len(shape)) if shape[d] >= size and shape[d] % size == 0]
    if dims == "replicate" or not fits:
        return None
    d = max(fits, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(FSDP_AXIS if i == d else None for i in range(len(shape))))


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _report(what: str, names: list[str], leaves: list, size: int, why: str) -> None:
    if not names:
        return
    total = sum(_nbytes(x) for x in leaves)
    shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
    log.info(
        "FSDP over %d devices: %d %s array(s) replicated (%.3g MB per device; %s): %s",
        size,
        len(names),
        what,
        total / 1e6,
        why,
        shown,
    )


def fsdp_shardings(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, str]] = FSDP_RULES,
    what: str = "parameter",
) -> PyTree:
    """``NamedSharding`` of every array of a parameter tree (arrays or ``ShapeDtypeStruct``;
    quantised and LoRA weight leaves are pytrees of arrays and shard array by array).

    Each array gets :func:`fsdp_spec` of its shape under the first rule whose pattern
    matches its path (default :data:`FSDP_RULES`: inner dimensions of scanned stacks, any
    dimension elsewhere). Arrays no dimension of which the ``fsdp`` size divides are
    replicated and listed in one INFO log line (``what`` names them). On a mesh without
    an ``fsdp`` axis, or with ``fsdp=1``, everything is replicated.

    Returns:
      A tree of ``NamedSharding`` with the structure of ``tree``.
    """
    size = fsdp_size(mesh)
    repl = replicated(mesh)
    if size == 1:
        return jax.tree.map(lambda _: repl, tree)
    dims = params_lib.assign(tree, list(rules), "any")
    left: list[tuple[str, Any]] = []

    def pick(path, x, how):
        spec = fsdp_spec(x.shape, size, how)
        if spec is None:
            if how != "replicate" and x.shape:
                left.append((params_lib.path_str(path), x))
            return repl
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(pick, tree, dims)
    _report(what, [n for n, _ in left], [x for _, x in left], size, f"no dimension of {size}")
    return out


def follow_params(opt_state: PyTree, params: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of an optimizer state that follow the parameters' (``shardings``).

    optax states mirror the parameter tree (``mu``, ``nu``, 8-bit ``codes``): a state leaf
    whose path contains a parameter's path (whole components; the longest such) and has
    that parameter's shape gets the parameter's sharding. Every other leaf (step counters,
    the blockwise ``absmax`` of 8-bit moments, whose blocks run over the flattened
    parameter) is replicated; the non-scalar ones are listed in one INFO log line.

    Args:
      opt_state: the state (arrays or ``ShapeDtypeStruct``), e.g.
        ``jax.eval_shape(optimizer.init, params)``.
      params: the parameter tree it was built from (arrays or shapes).
      shardings: the parameters' shardings (:func:`fsdp_shardings`).
      mesh: the mesh (for the replicated sharding).

    Returns:
      A tree of ``NamedSharding`` with the structure of ``opt_state``.
    """
    repl = replicated(mesh)
    flat_p = params_lib.flatten(params)
    flat_s = params_lib.flatten(shardings)
    left: list[tuple[str, Any]] = []
    found: dict[str, str | None] = {}

    def pick(path, x):
        name = params_lib.path_str(path)
        key = found.setdefault(name, params_lib.longest_contained(name, flat_p))
        if key is not None and tuple(flat_p[key].shape) == tuple(x.shape):
            return flat_s[key]
        if x.shape and fsdp_size(mesh) > 1:
            left.append((name, x))
        return repl

    out = jax.tree_util.tree_map_with_path(pick, opt_state)
    _report(
        "optimizer-state", [n for n, _ in left], [x for _, x in left], fsdp_size(mesh),
        "not shaped like a parameter",
    )  # fmt: skip
    return out


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """``jax.lax.with_sharding_constraint`` of ``tree`` to ``shardings`` (inside ``jit``);
    e.g. gradients to their parameters' shardings, so XLA reduce-scatters them over
    ``fsdp`` instead of all-reducing whole copies."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def bytes_per_device(tree: PyTree) -> dict[int, int]:
    """``{device id: bytes}`` that the arrays of ``tree`` hold on each device of this
    process, read from their shards (``addressable_shards``); ``ShapeDtypeStruct`` leaves
    with a ``sharding`` count their shard shape on each of its devices."""
    out: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                out[shard.device.id] = out.get(shard.device.id, 0) + int(shard.data.nbytes)
        elif getattr(x, "sharding", None) is not None:
            shape = x.sharding.shard_shape(x.shape)
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
            for d in x.sharding.addressable_devices:
                out[d.id] = out.get(d.id, 0) + size
    return out


# --- batches ----------------------------------------------------------------------------


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global batch whose shards live on this process's
    devices, so the rows its data pipeline reads (all of them for one process).

    Raises:
      ValueError: ``global_batch_size`` is not divisible by the batch shards, or this
        process's rows are not one contiguous block (a mesh not built by
        :func:`make_mesh`).
    """
    shards = num_batch_shards(mesh)
    if global_batch_size % shards:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {shards} devices of mesh "
            f"axes {batch_axes(mesh)}"
        )
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    spans = sorted(
        {(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
         for s in index.values()}
    )  # fmt: skip
    start, stop = spans[0]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous rows {spans}")
        stop = max(stop, b)
    return start, stop


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a host batch on the mesh, split along the leading (batch) axis.

    Args:
      batch: dict of numpy arrays sharing a leading axis: the GLOBAL batch in a
        single-process run; with several processes, this process's rows of it
        (:func:`process_batch_rows`), every process giving the same number.
      mesh: from :func:`make_mesh` / :meth:`MeshSpec.build`.

    Returns:
      Dict of global ``jax.Array`` with :func:`batch_sharding` (several processes:
      assembled by ``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: leaves disagree on the leading size, or it is not divisible by the
        number of batch shards (devices on the batch axes, this process's with several);
        the message names both numbers.
    """
    procs = jax.process_count()
    sharding = batch_sharding(mesh)
    shards = num_batch_shards(mesh)
    local_shards = len({_batch_slice(i) for i in _local_indices(sharding)}) if procs > 1 else 0
    sizes = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in batch.items()}
    if len(set(sizes.values())) > 1 or None in sizes.values():
        raise ValueError(f"batch leaves need one common leading axis, got sizes {sizes}")
    if sizes:
        b = next(iter(sizes.values()))
        if procs == 1 and b % shards:
            raise ValueError(
                f"batch size {b} is not divisible by the {shards} devices of mesh axes "
                f"{batch_axes(mesh)}"
            )
        if procs > 1 and b % local_shards:
            raise ValueError(
                f"this process's {b} batch rows are not divisible by its {local_shards} "
                f"batch shards (mesh axes {batch_axes(mesh)})"
            )
    if procs == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def shard_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None) -> dict:
    """Put a batch that every process holds whole (evaluation, where each process reads
    the same rows) on the mesh, split over the batch axes: each process contributes its
    rows (:func:`process_batch_rows`). ``mesh=None``: the batch unchanged.

    Raises:
      ValueError: as :func:`shard_batch` (the batch size not divisible by the batch
        shards).
    """
    if mesh is None:
        return dict(batch)
    if jax.process_count() > 1:
        size = next(iter(np.shape(v)[0] for v in batch.values()))
        start, stop = process_batch_rows(mesh, size)
        batch = {k: np.asarray(v)[start:stop] for k, v in batch.items()}
    return shard_batch(batch, mesh)


def _local_indices(sharding: NamedSharding):
    return sharding.addressable_devices_indices_map((num_batch_shards(sharding.mesh),)).values()


def _batch_slice(index) -> tuple:
    s = index[0]
    return (s.start, s.stop)

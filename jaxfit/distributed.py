"""Start-up of a run over several processes (hosts): ``jax.distributed.initialize``.

One process per host (or per GPU) runs the same command; together they see every device
of every process as one mesh (``jaxfit.sharding``), each feeding its own rows of the batch
and writing its own shards of each checkpoint. The processes find each other through a
coordinator (process 0's address), given on the command line::

    python -m jaxfit.train ... --coordinator_address host0:1234 --num_processes 2 --process_id 0
    python -m jaxfit.train ... --coordinator_address host0:1234 --num_processes 2 --process_id 1

or detected by jax from the cluster's environment when the command runs as the tasks of
a SLURM job (``srun``), under Open MPI (``mpirun``), or with ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set (then :func:`initialize` calls
``jax.distributed.initialize()`` without arguments and jax reads them).

:func:`initialize` must run before anything touches a device (``jax.devices()``, an
array, a compile): the CLIs call it first thing after parsing their flags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
T = TypeVar("T")

# The flags jaxfit.train adds to its command line (name -> help).
FLAGS = {
    "coordinator_address": "HOST:PORT of process 0, for a run over several processes.",
    "num_processes": "Number of processes of a multi-process run (with --coordinator_address).",
    "process_id": "This process's index, 0 .. num_processes - 1 (with --coordinator_address).",
}

# Environment variables that mark a process as one task of a multi-process launch that jax
# detects by itself (jax._src.clusters: SLURM, Open MPI, its own JAX_* variables).
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "JAX_NUM_PROCESSES": "JAX_NUM_PROCESSES",
}


def detected_cluster(environ=None) -> str | None:
    """The launcher whose environment says this process is one of several (``"SLURM"``,
    ``"Open MPI"``, ``"JAX_NUM_PROCESSES"``), or None."""
    environ = os.environ if environ is None else environ
    for var, name in _CLUSTER_ENV.items():
        try:
            if int(environ.get(var, "1")) > 1:
                return name
        except ValueError:
            continue
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ=None,
) -> bool:
    """Join a multi-process run, or do nothing for a single process.

    With ``coordinator_address`` (then ``num_processes`` and ``process_id`` are required),
    calls ``jax.distributed.initialize`` with them; without it, calls it with no arguments
    when :func:`detected_cluster` finds a multi-process launch (jax reads the
    coordinator, the process count and this process's index from the environment);
    otherwise nothing happens. On CPU devices, collectives between processes use gloo.

    Returns:
      True if this process joined a multi-process run.

    Raises:
      ValueError: ``coordinator_address`` without ``num_processes`` / ``process_id``, a
        ``process_id`` out of range, or the reverse (process flags without an address).
    """
    given = {"num_processes": num_processes, "process_id": process_id}
    if not coordinator_address:
        if any(v not in (None, "") for v in given.values()):
            raise ValueError(
                "--num_processes / --process_id need --coordinator_address HOST:PORT "
                "(process 0's address)"
            )
        cluster = detected_cluster(environ)
        if cluster is None:
            return False
        _cpu_collectives()
        log.info("joining a multi-process run launched by %s", cluster)
        jax.distributed.initialize()
        return True
    missing = [f"--{k}" for k, v in given.items() if v in (None, "")]
    if missing:
        raise ValueError(f"--coordinator_address needs {' and '.join(missing)} too")
    n, i = int(num_processes), int(process_id)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--process_id {i} is not in 0 .. {n - 1} (--num_processes {n})")
    _cpu_collectives()
    log.info("process %d of %d, coordinator %s", i, n, coordinator_address)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=n, process_id=i
    )
    return True


def initialize_from_flags(flags: dict) -> bool:
    """:func:`initialize` from a CLI's parsed :data:`FLAGS` (strings or None)."""
    return initialize(
        flags.get("coordinator_address") or None,
        flags.get("num_processes") or None,
        flags.get("process_id") if flags.get("process_id") not in (None, "") else None,
    )


def _cpu_collectives() -> None:
    """Cross-process collectives for CPU devices (tests, CPU clusters): gloo. Harmless on
    GPU/TPU, whose collectives are NCCL's / the ICI's."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older jax without the option
        pass


def primary_first(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on process 0, then (after a barrier) on every other process.

    For set-up that writes shared files into the workdir (the synthetic corpus, a trained
    tokenizer, the token cache): process 0 writes them, the others then find them and only
    read (on hosts without a shared file system they write their own, identical copies).
    One process: just the call.
    """
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    if jax.process_index() == 0:
        out = fn(*args, **kwargs)
    multihost_utils.sync_global_devices(f"jaxfit: {getattr(fn, '__name__', 'set-up')} done")
    if jax.process_index() != 0:
        out = fn(*args, **kwargs)
    return out


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and ``config.json``."""
    return jax.process_index() == 0

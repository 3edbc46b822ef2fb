"""jaxfit.distributed's start-up decisions (no process group is joined here)."""

from __future__ import annotations

import pytest

from jaxfit import distributed


def test_flags_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="need --coordinator_address"):
        distributed.initialize(None, 2, 0, environ={})
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("127.0.0.1:1234", None, None, environ={})
    with pytest.raises(ValueError, match=r"--process_id 2 is not in 0 \.\. 1"):
        distributed.initialize("127.0.0.1:1234", 2, 2, environ={})
    assert distributed.initialize(None, None, None, environ={}) is False  # one process


def test_cluster_launchers_are_detected_from_their_environment():
    assert distributed.detected_cluster({}) is None
    assert distributed.detected_cluster({"SLURM_NTASKS": "1"}) is None  # one task
    assert distributed.detected_cluster({"SLURM_NTASKS": "8"}) == "SLURM"
    assert distributed.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert distributed.detected_cluster({"JAX_NUM_PROCESSES": "4"}) == "JAX_NUM_PROCESSES"
    assert distributed.detected_cluster({"SLURM_NTASKS": "x"}) is None


def test_primary_first_is_a_plain_call_in_one_process():
    assert distributed.primary_first(lambda a, b=0: a + b, 1, b=2) == 3
    assert distributed.is_primary()

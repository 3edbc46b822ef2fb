"""Fault injection: real ``python -m jaxfit.train`` subprocesses (see ``faultlib``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faultlib import train


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted tiny run (12 steps, checkpoints at 3, 6, 9, 12); read only: copy
    it (:func:`copy_run`) before running on it."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    done = train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir

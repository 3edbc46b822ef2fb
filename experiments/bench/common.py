"""What other experiments take from the benchmarks (``experiments/ablate_precision.py``):
where a run happened and the peak memory of a process. The benchmarks' own shared code
lives in :mod:`.report` (rows, machine, versions), :mod:`.procs` (workers in fresh
processes, peak RSS), :mod:`.runner` (the measured jaxfit step) and :mod:`.compare`
(framework comparisons).
"""

from __future__ import annotations

import os

from experiments.bench.procs import PeakRSS
from experiments.bench.report import cpu_count, git_commit, machine


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return os.getloadavg()


__all__ = ["PeakRSS", "cpu_count", "git_commit", "load_average", "machine"]

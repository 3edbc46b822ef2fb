"""Helpers of the multi-device / multi-process tests: subprocess environments with N forced
CPU devices, and a free port for ``jax.distributed``'s coordinator."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from xla_env import FAST_XLA_FLAGS, fast_subprocess_env

REPO = Path(__file__).resolve().parents[2]


def device_env(n: int) -> dict[str, str]:
    """The environment of a subprocess with ``n`` CPU devices (and the fast XLA compile
    flags of the test suite) that imports this checkout's jaxfit."""
    env = fast_subprocess_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n} {FAST_XLA_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port free on localhost now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

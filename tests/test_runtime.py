"""jaxfit.runtime: the persistent compilation cache is on by default and overridable; XLA
flag defaults never override the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxfit import runtime

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def jax_cache_dir():
    """Restore jax's cache directory (the suite's own, tests/conftest.py) afterwards."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_cache_directory_order(tmp_path, jax_cache_dir):
    jax.config.update("jax_compilation_cache_dir", None)
    home = str(Path("~/.cache/jaxfit/xla").expanduser())
    assert runtime.compilation_cache_dir({}) == home
    assert runtime.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    both = {"JAX_COMPILATION_CACHE_DIR": "/j", runtime.ENV_CACHE: str(tmp_path)}
    assert runtime.compilation_cache_dir(both) == str(tmp_path)  # jaxfit's variable first
    assert runtime.compilation_cache_dir({runtime.ENV_CACHE: ""}) is None  # off
    assert runtime.compilation_cache_dir({runtime.ENV_CACHE: "~/x"}) == str(Path.home() / "x")


def test_configure_sets_jax_and_the_flags(tmp_path, jax_cache_dir):
    env = {runtime.ENV_CACHE: str(tmp_path / "c"), "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    out = runtime.configure_runtime(env)
    assert out["compilation_cache"] == str(tmp_path / "c") == jax.config.jax_compilation_cache_dir
    assert (tmp_path / "c").is_dir()
    assert env["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/d ")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert runtime.configure_runtime(env) == out  # idempotent
    off = runtime.configure_runtime({runtime.ENV_CACHE: ""})
    assert off["compilation_cache"] is None and jax.config.jax_compilation_cache_dir is None


def test_the_users_xla_flags_win():
    user = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_foo=1"
    assert runtime.xla_flags(user) == user
    assert runtime.xla_flags("") == "--xla_gpu_enable_latency_hiding_scheduler=true"


def test_a_fresh_process_caches_its_compilations_in_the_default_directory(tmp_path):
    """``configure_runtime`` in a new process (as ``python -m jaxfit.train`` calls it),
    with HOME in tmp_path: compiled programs land in ``~/.cache/jaxfit/xla``."""
    env = {k: v for k, v in os.environ.items()
           if k not in (runtime.ENV_CACHE, "JAX_COMPILATION_CACHE_DIR")}  # fmt: skip
    env.update(HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    code = (
        "from jaxfit import runtime; print(runtime.configure_runtime()['compilation_cache']);"
        "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7))"
        ".block_until_ready()"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cache = tmp_path / ".cache" / "jaxfit" / "xla"
    assert proc.stdout.strip().splitlines()[-1] == str(cache)
    assert any(cache.iterdir()), "no compiled program was written to the cache"

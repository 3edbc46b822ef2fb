"""Fixtures shared by the whole test suite."""

import functools
import logging
import os
from pathlib import Path

import jax
import numpy as np
import pytest

# Many tests compile the same small programs (the same tiny model and train step built by
# different tests): XLA's persistent compilation cache turns the repeats into lookups.
_CACHE = Path(os.environ.get("JAXFIT_TEST_XLA_CACHE", Path.home() / ".cache" / "jaxfit-xla"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# XLA options for tests of tiny models on CPU, where compilation dominates the run time:
# without LLVM's optimisation passes and with the legacy (non-MLIR) fusion emitters, a
# tiny CLIP's value_and_grad compiles in ~1.5 s instead of ~10 s. Numerics stay float32.
FAST_CPU_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@pytest.fixture(scope="session")
def jit_fast():
    """``jax.jit`` that compiles with :data:`FAST_CPU_COMPILE` on CPU (plain on GPU/TPU).

    Use it for one-off compiles of tiny test models: ``jit_fast(f)(x)`` or
    ``jit_fast(f, static_argnums=...)``.
    """
    if jax.default_backend() != "cpu":
        return jax.jit
    return functools.partial(jax.jit, compiler_options=FAST_CPU_COMPILE)


@pytest.fixture
def np_rng():
    """A fresh ``np.random.Generator`` seeded with 0 (deterministic test data)."""
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _jaxfit_logger_as_found():
    """A CLI ``main`` run in-process calls ``jaxfit.logs.setup``, which gives the
    ``jaxfit`` logger its own console handler and stops propagation (so absl's root
    handler does not print records twice); restore the logger after each test so later
    tests' ``caplog`` (a root handler) still sees jaxfit's records."""
    logger = logging.getLogger("jaxfit")
    state = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(state[0])
    logger.propagate = state[1]
    logger.handlers[:] = state[2]

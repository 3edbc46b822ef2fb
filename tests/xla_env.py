"""Environment for subprocesses that tests start: ``conftest.FAST_CPU_COMPILE`` as XLA_FLAGS.

Fast XLA compilation of tiny steps (compile speed is not what those tests check).
"""

import os

FAST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)


def fast_subprocess_env() -> dict[str, str]:
    """``os.environ`` with :data:`FAST_XLA_FLAGS` appended to ``XLA_FLAGS``."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()
    return env

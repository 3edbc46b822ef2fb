"""gpu_suite part ``matmul``: the dense bf16 matmul rate of the device.

``jnp.dot`` of ``[n, n]`` bf16 matrices (n = 8192), ``inner`` chained products per jitted
call (one dispatch; values stay O(1)), the median of ``reps`` calls after ``warmup``, each
ended by ``block_until_ready``: ``2 n^3 inner / t`` FLOP/s. Every ``MFU (matmul)`` of the
suite is model FLOP/s over THIS rate (what the device really reaches on a large bf16
matmul); ``MFU`` is against the datasheet peak of ``jaxfit.perf.DEVICES``. The worker runs
with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.5`` (not preallocated), so its allocator limit / 0.5
is the device's memory, from which the suite sets the other parts' memory cap.
"""

from __future__ import annotations

import math
import statistics
import time

from experiments.bench import gpu_common

SIZES = {
    "full": dict(n=8192, inner=10, warmup=3, reps=10),
    "quick": dict(n=8192, inner=10, warmup=2, reps=5),
    "small": dict(n=256, inner=2, warmup=1, reps=3),
}
CAP_S = {"full": 90, "quick": 60, "small": 60}
MEM_FRACTION = 0.5


def worker(spec: dict, peak, save) -> dict:
    import jax
    import jax.numpy as jnp

    from experiments.bench import runner
    from jaxfit import perf

    out, memory = gpu_common.start_worker(spec, peak)
    if memory.bytes_limit:
        out["device_memory_bytes"] = memory.bytes_limit / MEM_FRACTION
    n, inner = spec["n"], spec["inner"]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, inner, lambda _, y: jnp.dot(y, w), x)

    t = time.perf_counter()
    compiled = chain.lower(a, b).compile()
    compile_s = time.perf_counter() - t
    times = runner.time_calls(
        lambda: compiled(a, b).block_until_ready(), spec["warmup"], spec["reps"]
    )
    med = statistics.median(times)
    tflops = 2 * n**3 * inner / med / 1e12
    label = out["device_label"]
    out["tflops"] = tflops
    out["measurements"] = [
        {
            "config": f"bf16 {n}^3, {inner} chained per call, median of {len(times)}",
            "step_s": med / inner,
            "examples_per_s": tflops,
            "model_tflops": tflops,
            "mfu": tflops / perf.DEVICES[label].peak_bf16_tflops if label else None,
            "compile_s": compile_s,
            "times_s": times,
            "peak_mib": memory.peak_mib(),
        }
    ]
    return out


def run(suite, spec: dict) -> dict:
    env = {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": str(MEM_FRACTION),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    r = suite.run_worker("matmul", spec, env=env, capped=False)
    r["rows"] = [gpu_common.raw_row("matmul", m, "TFLOP/s") for m in r.get("measurements", [])]
    return r

"""Run one real train step of a config on the CPU and print its extra peak RSS (JSON).

Used by test_planner.py in a subprocess: ``python measure_step.py CONFIG OVERRIDE...``.
The state and batch are placed and the step compiled first; then the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs``, value 5) and the step runs, so
``VmHWM - VmRSS(before)`` is the memory the step itself added: its temporaries and the
outputs that do not reuse a donated input (XLA's ``temporaries + outputs - aliased``).
"""

import json
import sys
import tempfile

import jax

from jaxfit import config as config_lib
from jaxfit import sharding, trainer
from jaxfit.run import build_run


def _kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main(spec, *overrides):
    config = config_lib.load_config(spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(config, workdir, abstract=False)  # what jaxfit.train builds
        task = run.task
        ckpt = trainer.checkpoint.Checkpointer(f"{workdir}/ckpt")
        state, _ = trainer.build_state(run, ckpt)
        batch = sharding.shard_batch(next(task.train_iterator()), run.mesh)
        frozen = task.frozen
        compiled = run.step.lower(state, batch, frozen).compile()
        jax.block_until_ready((state, batch, frozen))
        before = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        peak = _kib("VmHWM")
        ckpt.close()
    print(json.dumps({"step_extra_bytes": (peak - before) * 1024}))


if __name__ == "__main__":
    main(*sys.argv[1:])

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
from jaxfit import step as step_lib
from jaxfit.optim import make_optimizer
from jaxfit.tasks import build_task


def _kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main(spec, *overrides):
    config = config_lib.load_config(spec, overrides)
    mesh = sharding.make_mesh()
    with tempfile.TemporaryDirectory() as workdir:
        task = build_task(config, workdir, mesh)
        optimizer, schedule = make_optimizer(
            config.optim, config.total_steps, task.abstract_params()
        )
        ckpt = trainer.checkpoint.Checkpointer(f"{workdir}/ckpt")
        state, shardings, _ = trainer.build_state(task, optimizer, config, mesh, ckpt)
        step = step_lib.jit_train_step(task, optimizer, schedule, shardings, mesh)
        batch = sharding.shard_batch(next(task.train_iterator()), mesh)
        frozen = task.frozen
        compiled = step.lower(state, batch, frozen).compile()
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

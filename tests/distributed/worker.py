"""One process of a (multi-process) training run, for tests/distributed: started as
``python tests/distributed/worker.py OUT.json SPEC WORKDIR PROCESS_ID NUM_PROCESSES ADDRESS
[override ...]`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set.

Joins the run through :func:`jaxfit.distributed.initialize` (unless ``ADDRESS`` is
``none``; with one process that still makes its collectives gloo's),
trains ``SPEC`` with ``jaxfit.trainer.train`` and, on process 0, writes ``OUT.json``:
``losses`` (``train/loss`` by step, from ``metrics.jsonl``), ``params_<step>`` (the
trainable parameters after step ``ckpt_every`` and after the last step, gathered from
every process, as nested lists; the first only when the run passes it) and
``state_bytes`` (the most bytes of parameters + optimizer state on one device of this
process, from the arrays' shards).
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils


def main(argv: list[str]) -> None:
    out, spec, workdir, pid, nproc, address, *overrides = argv[1:]
    pid, nproc = int(pid), int(nproc)
    jax.config.update("jax_platforms", "cpu")
    from jaxfit import config as config_lib
    from jaxfit import distributed, sharding, trainer

    if address != "none":  # also one process: then its collectives are gloo's too
        distributed.initialize(address, nproc, pid)
    config = config_lib.load_config(spec, overrides)
    found = {}

    def on_step(step, state):
        if step in (config.ckpt_every, config.total_steps):  # every process takes part
            gathered = multihost_utils.process_allgather(state.params, tiled=True)
            found[f"params_{step}"] = [np.asarray(x).tolist() for x in jax.tree.leaves(gathered)]
        if step == config.total_steps:
            found["state_bytes"] = max(
                sharding.bytes_per_device((state.params, state.opt_state)).values()
            )

    trainer.train(config, workdir, on_step=on_step)
    if jax.process_index() == 0:
        rows = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
        found["losses"] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
        found["processes"] = jax.process_count()
        found["devices"] = jax.device_count()
        Path(out).write_text(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv)

"""Train one config on several meshes of this process's devices, for tests/distributed:
``python tests/distributed/fsdp_runs.py OUT.json SPEC STEPS MESH [MESH ...] -- [override ...]``
with ``MESH`` like ``data=2,fsdp=4`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

For each mesh, a fresh workdir trains ``SPEC`` for ``STEPS`` steps (``jaxfit.trainer.train``)
and ``OUT.json`` gets ``{mesh: {"losses", "eval", "bytes", "devices"}}``: ``train/loss`` per
step, the ``eval/`` metrics of the final evaluation (its batches split over the mesh),
and the most bytes one device holds of the trainable parameters, the optimizer state and
the frozen base (``bytes``: ``{"params", "opt_state", "frozen", "total"}``), read from the
arrays' shards (``jaxfit.sharding.bytes_per_device``).
"""

import json
import sys
import tempfile
from pathlib import Path

import jax


def _most(tree) -> int:
    from jaxfit import sharding

    return max(sharding.bytes_per_device(tree).values(), default=0)


def main(argv: list[str]) -> None:
    out, spec, steps, *rest = argv[1:]
    cut = rest.index("--") if "--" in rest else len(rest)
    meshes, overrides = rest[:cut], rest[cut + 1 :]
    jax.config.update("jax_platforms", "cpu")
    from jaxfit import config as config_lib
    from jaxfit import sharding, trainer
    from jaxfit.tasks import build_task

    results = {}
    for mesh in meshes:
        axes = [f"mesh.{part}" for part in mesh.split(",")]
        config = config_lib.load_config(
            spec,
            [f"total_steps={steps}", "log_every=1", f"eval_every={steps}", f"ckpt_every={steps}"]
            + overrides
            + axes,
        )
        found = {}

        def on_step(step, state, found=found):
            if step == int(steps):
                found["params"], found["opt_state"] = _most(state.params), _most(state.opt_state)
                found["total"] = _most((state.params, state.opt_state))

        with tempfile.TemporaryDirectory() as workdir:
            trainer.train(config, workdir, on_step=on_step)
            rows = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
            task = build_task(config, workdir, sharding.MeshSpec.from_config(config).build())
            found["frozen"] = _most(task.frozen) if task.frozen is not None else 0
        found["total"] += found["frozen"]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
        results[mesh] = {
            "losses": losses,
            "eval": evals,
            "bytes": found,
            "devices": jax.device_count(),
        }
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv)

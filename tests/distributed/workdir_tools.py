"""Restore, evaluate and export a workdir in this process, for tests/distributed:
``python tests/distributed/workdir_tools.py OUT.json WORKDIR EXPORT_DIR [SPEC override ...]``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

With ``SPEC``, first trains it into ``WORKDIR`` (``jaxfit.trainer.train``). Then writes
``OUT.json``: ``devices``; ``split`` (how many of the restored parameter arrays are split
over more than one device); ``eval`` (``trainer.evaluate``'s metrics) and ``files``
(SHA-256 of each file ``jaxfit.export.export`` wrote into ``EXPORT_DIR``).
"""

import hashlib
import json
import sys
from pathlib import Path

import jax


def main(argv: list[str]) -> None:
    out, workdir, export_dir, *train = argv[1:]
    jax.config.update("jax_platforms", "cpu")
    from jaxfit import config as config_lib
    from jaxfit import export, trainer

    if train:
        trainer.train(config_lib.load_config(train[0], train[1:]), workdir)
    _, _, params, _ = trainer.restore_params(workdir)
    split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    metrics = trainer.evaluate(workdir)
    path = Path(export.export(workdir, export_dir))
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }
    Path(out).write_text(
        json.dumps({"devices": jax.device_count(), "split": split, "eval": metrics, "files": files})
    )


if __name__ == "__main__":
    main(sys.argv)

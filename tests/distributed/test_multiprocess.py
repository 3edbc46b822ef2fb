"""Two processes on localhost (``jax.distributed``, gloo collectives), 2 CPU devices each,
train like one process with 4 devices; a checkpoint they write resumes in one process and
continues bit for bit.

Real subprocesses (``tests/distributed/worker.py``) on a free port, with timeouts. The
GPT-2 demo (a smaller synthetic corpus) trains 6 steps with ``mesh.fsdp=2`` (so
``data=2``: parameters split within each process, batch over all four devices), saving at
steps 3 and 6.

What is exact and what is not: each process builds only its rows of each batch, and all
of them together are the one-process batch, so the first loss is bit-for-bit the same;
the checkpoint of step 3 written by the two processes restores bit-for-bit into one
process on another mesh. What decides the rest is the collectives' summation order, which
belongs to the collectives library and the number of devices, not to the process count:
one process whose 4 devices use jax's in-process CPU collectives adds the partial sums of
gradients in another order than gloo does (measured: losses ~1e-7 relative, parameters
~1e-8 apart after 6 steps), while one process started through ``jax.distributed`` (so its
collectives are gloo's, as ``--coordinator_address ... --num_processes 1`` does) continues
the two processes' run bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from dist_env import REPO, device_env, free_port

SPEC = "configs/gpt2_scratch.py:demo"
OVERRIDES = [
    "total_steps=6", "log_every=1", "eval_every=6", "ckpt_every=3", "keep_checkpoints=5",
    "mesh.fsdp=2", "data.synthetic.num_documents=400",
]  # fmt: skip


def _launch(workdir, out, processes: int, devices: int, gloo: bool = True) -> dict:
    """Run the worker as ``processes`` processes of ``devices`` CPU devices each, joined
    through ``jax.distributed`` (gloo collectives) unless ``gloo`` is False (one process,
    jax's in-process collectives)."""
    address = f"127.0.0.1:{free_port()}" if gloo else "none"
    logs = [open(f"{workdir}.{i}.log", "w") for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/distributed/worker.py"),
                str(out),
                SPEC,
                str(workdir),
                str(i),
                str(processes),
                address,
                *OVERRIDES,
            ],
            env=device_env(devices),
            cwd=REPO,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(processes)
    ]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    if any(codes):
        tails = [open(f"{workdir}.{i}.log").read()[-3000:] for i in range(processes)]
        pytest.fail(f"exit codes {codes}:\n" + "\n---\n".join(tails))
    return json.loads(out.read_text())


def _close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.slow
def test_two_processes_train_as_one_and_their_checkpoint_resumes_in_one(tmp_path):
    two = _launch(tmp_path / "two", tmp_path / "two.json", processes=2, devices=2)
    assert (two["processes"], two["devices"]) == (2, 4)
    one = _launch(tmp_path / "one", tmp_path / "one.json", processes=1, devices=4, gloo=False)
    assert (one["processes"], one["devices"]) == (1, 4)
    assert two["losses"]["1"] == one["losses"]["1"]  # the same global batch, bit for bit
    np.testing.assert_allclose(list(two["losses"].values()), list(one["losses"].values()),
                               rtol=1e-6)  # fmt: skip
    _close(two["params_6"], one["params_6"], rtol=0, atol=1e-6)
    assert two["state_bytes"] == one["state_bytes"]  # each device holds half of the state

    # the 2-process checkpoint of step 3 restores bit-for-bit in this 1-device process
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    from jaxfit import trainer

    _, _, params, step = trainer.restore_params(resumed, step=3)
    assert step == 3 and jax.device_count() >= 1
    for saved, restored in zip(two["params_3"], jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(saved, np.float32), np.asarray(restored))

    # ... and continues in one process (4 devices, gloo) exactly as the two processes did
    cont = _launch(resumed, tmp_path / "resumed.json", processes=1, devices=4)
    assert (cont["processes"], cont["devices"]) == (1, 4)
    assert sorted(cont["losses"]) == ["1", "2", "3", "4", "5", "6"]  # rows after 3 rewritten
    assert [cont["losses"][s] for s in "456"] == [two["losses"][s] for s in "456"]
    for a, b in zip(cont["params_6"], two["params_6"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_the_train_cli_joins_a_two_process_run(tmp_path):
    """``python -m jaxfit.train ... --coordinator_address --num_processes --process_id``:
    both processes finish; process 0 alone writes config.json, metrics and train.log."""
    address = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "jaxfit.train", "--config", SPEC, "--workdir", str(workdir),
        "--config.total_steps=2", "--config.eval_every=2", "--config.ckpt_every=2",
        "--config.log_every=1", "--config.mesh.fsdp=2", "--config.data.synthetic.num_documents=300",
        "--coordinator_address", address, "--num_processes", "2",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, "--process_id", str(i)],
            env=device_env(2),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # written once
    assert json.loads((workdir / "config.json").read_text())["mesh"] == {"data": -1, "fsdp": 2}
    assert (workdir / "checkpoints" / "2").is_dir()

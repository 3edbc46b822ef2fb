"""The benchmarks measure the step ``jaxfit.train`` runs (``experiments/bench/runner.py``).

The strong check runs ``jaxfit.trainer.train`` for one step on the GPT-2 demo config, then
the benchmark runner on the same config, seed and first batch of the task's iterator: the
loss and the parameters after the step are those of the training run (its logged
``train/loss`` at step 1 and its checkpoint). It runs in a subprocess, with fast XLA
compilation (``tests/xla_env.py``).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``experiments`` is not installed (plain ``pytest``)
    sys.path.insert(0, str(REPO))

from experiments.bench import runner  # noqa: E402
from jaxfit import run as run_lib  # noqa: E402
from jaxfit.config import load_config  # noqa: E402

# One step, logged, evaluated and checkpointed; a smaller demo corpus (less BPE training).
ONE_STEP = ["total_steps=1", "log_every=1", "eval_every=1", "ckpt_every=1", "eval.max_batches=1",
            "optim.warmup_steps=0", "data.synthetic.num_documents=200"]  # fmt: skip

SCRIPT = """
import json, sys
import jax, numpy as np
from experiments.bench import runner
from jaxfit import trainer
from jaxfit.config import load_config

workdir = sys.argv[1]
config = load_config("configs/gpt2_scratch.py:demo", json.loads(sys.argv[2]))
trainer.train(config, workdir)
logged = [json.loads(line) for line in open(workdir + "/metrics.jsonl")]
train_loss = [r["train/loss"] for r in logged if r.get("step") == 1 and "train/loss" in r]
_, _, trained, _ = trainer.restore_params(workdir)

setup = runner.build(config, workdir, abstract=False)
batch = next(setup.task.train_iterator())
run = runner.StepRunner(setup, runner.fresh_state(setup), batch)
loss = run()
diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                    trained, run.state.params)
print("RESULT", json.dumps({"train": train_loss, "bench": loss,
                            "param_diff": max(jax.tree.leaves(diff))}))
"""


def test_bench_step_is_the_training_step(tmp_path):
    env = fast_subprocess_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SCRIPT),
            str(tmp_path / "run"),
            json.dumps(ONE_STEP),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line.removeprefix("RESULT "))
    assert len(res["train"]) == 1
    assert res["bench"] == pytest.approx(res["train"][0], abs=1e-6)
    assert res["param_diff"] <= 1e-6


def test_build_uses_jit_train_step(tmp_path, monkeypatch):
    """The runner builds its run with ``jaxfit.run.build_run``: its step is
    ``jaxfit.step.jit_train_step`` of the config's task, the trainer's."""
    calls = []
    real = run_lib.jit_train_step

    def spy(task, *args):
        calls.append(task)
        return real(task, *args)

    monkeypatch.setattr(run_lib, "jit_train_step", spy)  # build_run jits the step
    config = load_config("configs/gpt2_scratch.py:demo")
    setup = runner.build(config, tmp_path)
    assert calls == [setup.task] and setup.task.abstract
    assert setup.step is not None and callable(setup.step.lower)


@pytest.mark.parametrize(
    "spec, keys",
    [
        ("configs/gpt2_scratch.py:demo", {"input_ids", "labels", "loss_mask", "positions"}),
        ("configs/clip_coco.py:demo", {"pixel_values", "input_ids", "attention_mask"}),
    ],
)
def test_synthetic_batch_has_the_task_shapes(tmp_path, spec, keys):
    setup = runner.build(load_config(spec), tmp_path)
    batch = runner.synthetic_batch(setup.task, 4, seed=1)
    want = setup.task.abstract_batch(4)
    assert keys <= set(batch)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in want.items()
    }
    ids = batch["input_ids"]
    vocab = setup.task.model.config
    vocab = getattr(vocab, "vocab_size", None) or vocab.text.vocab_size
    assert ids.min() >= 0 and ids.max() < vocab
    assert "GPT-2" in runner.describe(setup.config, setup.task.model) or "CLIP" in (
        runner.describe(setup.config, setup.task.model)
    )


def test_perf_device_names():
    assert runner.perf_device("NVIDIA H200") == "h200"
    assert runner.perf_device("NVIDIA GeForce RTX 4070 Ti") == "rtx4070ti"
    assert runner.perf_device("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert runner.perf_device("NVIDIA H100 PCIe") is None  # not the SXM datasheet
    assert runner.perf_device("cpu") is None
    assert runner.device_info()["device_label"] is None or jax.default_backend() == "gpu"


class _Memory:
    """A device allocator with a 1 GiB limit (a CPU has none)."""

    measure, bytes_limit = "fake", 2**30

    def peak_mib(self) -> float:
        return 1.0


def test_measure_does_not_run_a_step_planned_over_the_limit(tmp_path, monkeypatch):
    setup = runner.build(load_config("configs/gpt2_scratch.py:demo"), tmp_path)
    monkeypatch.setattr(runner, "plan_summary", lambda config: {"planned_peak_mib": 2048.0})
    state = object()  # never touched: nothing is compiled or run
    out, same = runner.measure(setup, state, {}, warmup=0, steps=1, memory=_Memory())
    assert same is state and out["fit"] is False and out["predicted"]
    assert "RESOURCE_EXHAUSTED (foreseen" in out["error"] and "2,048 MiB > " in out["error"]
    assert runner._foreseen_oom(512.0, 2**30) == "" and runner._foreseen_oom(None, 2**30) == ""

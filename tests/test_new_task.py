"""A new task is one module plus one registry line (issue 21: "a DPO or SigLIP task would
touch about 11 files, the hidden "lm" checks being the trap").

This file is such a module: least-squares regression with a ``flax.linen.Dense`` model on
data it makes in memory. It is registered from the test (``tasks.TASKS["regression"] =
tasks.entry_of(module, RegressionTask, "regression")``, the line a real task adds to
``jaxfit/tasks/__init__.py``) and then goes through what every task goes through, with no
other file touched: ``validation.validate_values``, ``tasks.resolve_config``,
``run.build_run``, the planner (``plan.core.plan_config``) and ``trainer.train``
(checkpoints, evaluation, metrics). The numbers are checked against closed forms and
optax: the planned trainable / optimizer bytes, the model FLOPs formula, and the trained
weights against ``optax.adamw`` run by hand on the same batches.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxfit import config as config_lib
from jaxfit import tasks, validation
from jaxfit.optim import default_optim_config
from jaxfit.tasks.base import ParamSource, Task

NAME = "regression"
IN, OUT = 5, 3
# Not a language model: the planner's --search_seq_len does not apply.
SEARCHES_SEQ_LEN = False


# -- the task module: what the registry entry is made of ------------------------------------
def derive_config(config, workdir, precision):
    """Nothing derived."""
    return config


def data_files(config) -> dict:
    """No local files: the data is made in memory (:func:`prepare_data`)."""
    return {}


def validate(config) -> None:
    """``model.features`` a positive integer."""
    features = config_lib.get_field(config, "model.features")
    if not isinstance(features, int) or features < 1:
        raise config_lib.invalid("model.features", features, "must be a positive integer")


def tokens_per_step(config) -> None:
    return None


def model_flops(task, batch_size: int) -> float:
    """One dense layer: ``2 * in * out`` FLOPs per example forward, three times that with
    the backward pass (Kaplan et al. 2020, the ``6 N`` rule, here with the bias left out)."""
    return 6.0 * batch_size * IN * task.config.model.features


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``x ~ N(0, 1)`` ``[n, IN]`` float32 and ``y = x W + b + 0.01 noise`` ``[n, OUT]``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN)).astype(np.float32)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    y = x @ w + 0.5 + 0.01 * rng.standard_normal((n, OUT)).astype(np.float32)
    return x, y.astype(np.float32)


def prepare_data(spec, workdir):
    """The data step: ``{"train": (x, y), "val": (x, y)}`` (no I/O)."""
    c = spec.config.data
    x, y = make_data(c.num_examples + c.num_val, c.seed)
    n = c.num_examples
    return {"train": (x[:n], y[:n]), "val": (x[n:], y[n:])}


class Batches:
    """Batch ``i`` is rows ``[i b, (i + 1) b)`` modulo the data; state: the next ``i``."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.b, self.i = x, y, batch_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        rows = (np.arange(self.b) + self.i * self.b) % len(self.x)
        self.i += 1
        return {"x": self.x[rows], "y": self.y[rows]}

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


def mse(model, params, batch):
    return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)


class RegressionTask(Task):
    """The task interface (``jaxfit.tasks``) for least squares; built from a ``RunSpec``."""

    peft_task_type = None

    def __init__(self, spec, workdir, mesh, *, data=None):
        self.spec, self.config, self.workdir, self.mesh = spec, spec.config, Path(workdir), mesh
        self.abstract, self.data, self.tokenizer = data is None, data, None
        self.model = nn.Dense(spec.config.model.features)
        self.source = ParamSource(spec, self.model, self._init_base, abstract=self.abstract)

        def loss_and_grad(params, batch, rng, frozen=None):
            loss, grads = jax.value_and_grad(lambda p: mse(self.model, p, batch))(params)
            return (loss, {}), grads

        self.loss_and_grad = loss_and_grad

    def _init_base(self, rng):
        return self.model.init(rng, jnp.zeros((1, IN)))["params"]

    def abstract_batch(self, batch_size: int) -> dict:
        return {
            "x": jax.ShapeDtypeStruct((batch_size, IN), jnp.float32),
            "y": jax.ShapeDtypeStruct((batch_size, OUT), jnp.float32),
        }

    def train_iterator(self):
        return Batches(*self.data["train"], self.config.batch_size)

    def evaluate(self, params) -> dict[str, float]:
        return self.evaluate_examples(params)[0]

    def evaluate_examples(self, params):
        x, y = self.data["val"]
        err = np.asarray(self.model.apply({"params": params}, x)) - y
        per_example = (err**2).mean(axis=1).astype(np.float64)
        return {"mse": float(per_example.mean())}, {"mse": per_example}

    def data_fingerprint(self) -> dict:
        return {
            split: {"records": {"sha256": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()}}
            for split, (x, y) in self.data.items()
        }

    def skip_counts(self) -> dict[str, int]:
        return {}

    def throughput(self, examples_per_sec: float) -> dict[str, float]:
        return {}


def regression_config(total_steps: int = 12) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = NAME
    c.init_from = ""
    c.model = ml_collections.ConfigDict({"features": OUT, "remat_policy": "none"})
    c.data = ml_collections.ConfigDict({"num_examples": 64, "num_val": 32, "seed": 0})
    c.batch_size = c.micro_batch_size = 8
    c.optim = default_optim_config()
    c.optim.update(lr=0.05, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
    c.optim.grad_clip_norm = 0.0  # plain AdamW, the reference below
    c.eval = ml_collections.ConfigDict({"batch_size": 32})
    c.device = "rtx4070ti"
    config_lib.run_rhythm(
        c, total_steps=total_steps, log_every=4, eval_every=6, ckpt_every=6, precision="fp32"
    )
    return c


@pytest.fixture
def registered(monkeypatch):
    """The one line a new task adds to ``jaxfit/tasks/__init__.py``'s ``TASKS``."""
    entry = tasks.entry_of(sys.modules[__name__], RegressionTask, NAME)
    monkeypatch.setitem(tasks.TASKS, NAME, entry)
    return entry


def test_a_new_task_is_validated_resolved_and_refused_by_its_own_rules(registered, tmp_path):
    config = regression_config()
    validation.validate_values(config)
    spec = tasks.resolve_config(config, tmp_path)
    assert spec.task is registered and spec.lora is None
    assert spec.precision == config_lib.Precision("float32", "float", False)
    bad = config_lib.set_fields(config, {"model.features": 0})
    with pytest.raises(config_lib.ConfigError, match=r"model.features=0 is invalid"):
        validation.validate_values(bad)


def test_a_new_task_is_planned(registered):
    from jaxfit.plan import search
    from jaxfit.plan.core import plan_config

    config = regression_config()
    plan = plan_config(config)
    n_params = IN * OUT + OUT
    assert plan.params == {"total": n_params, "trainable": n_params, "frozen": 0}
    assert plan.memory["trainable"] == 4 * n_params  # float32
    # Adam's float32 mu and nu, and two int32 step counts (Adam's, the lr schedule's)
    assert plan.memory["optimizer"] == 2 * 4 * n_params + 2 * 4
    assert plan.memory["batch"] == 4 * config.batch_size * (IN + OUT)
    assert plan.flops["model"] == 6.0 * config.batch_size * IN * OUT
    assert plan.tokens_per_step is None and plan.examples_per_step == config.batch_size
    with pytest.raises(ValueError, match=r"task 'regression' has no sequence length"):
        search.search_seq_len(config, 1 << 30)


def test_a_new_task_trains_as_adamw_by_hand(registered, tmp_path):
    """``jaxfit.train``'s loop on the new task ends with the weights ``optax.adamw`` gives
    on the same batches from the same start (float32; to 1e-6), evaluates, checkpoints."""
    from jaxfit import trainer
    from jaxfit.tasks.base import param_rng

    config = regression_config(total_steps=12)
    results = trainer.train(config, tmp_path / "run")
    _, task, params, step = trainer.restore_params(tmp_path / "run")
    assert step == 12

    spec = tasks.resolve_config(config, tmp_path / "ref")
    data = prepare_data(spec, None)
    model = nn.Dense(OUT)
    ref = model.init(param_rng(config), jnp.zeros((1, IN)))["params"]
    opt = optax.adamw(0.05, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0)
    state = opt.init(ref)
    batches = Batches(*data["train"], config.batch_size)
    for _ in range(12):
        batch = next(batches)
        grads = jax.grad(mse, argnums=1)(model, ref, batch)
        updates, state = opt.update(grads, state, ref)
        ref = optax.apply_updates(ref, updates)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    x, y = data["val"]
    val = {"x": x, "y": y}
    expected = float(mse(model, ref, val))
    assert results["eval/mse"] == pytest.approx(expected, rel=1e-5)
    start = model.init(param_rng(config), jnp.zeros((1, IN)))["params"]
    assert expected < 0.5 * float(mse(model, start, val))  # it learned
    assert task.spec.task is registered

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxfit import sharding


def test_single_device_mesh_and_shardings():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert sharding.batch_sharding(mesh).spec == P(("data",))
    assert sharding.replicated(mesh).spec == P()
    out = sharding.shard_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)
    np.testing.assert_array_equal(out["x"], np.arange(8.0).reshape(4, 2))
    with pytest.raises(ValueError, match="common leading axis"):
        sharding.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros(3)}, mesh)
    with pytest.raises(ValueError, match="do not fit"):
        sharding.make_mesh(axes={"data": jax.device_count() + 1})


def test_param_shardings_from_rules():
    mesh = sharding.make_mesh()
    params = {"dense": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}}
    sh = sharding.param_shardings(params, mesh, [(r"kernel$", P(None, "data"))])
    assert sh["dense"]["kernel"].spec == P(None, "data")
    assert sh["dense"]["bias"].spec == P()


# Runs in a fresh interpreter with 4 fake CPU devices: a jitted GradCache train step with
# the batch sharded over 4 devices must match the same step on a 1-device mesh.
SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jaxfit import losses, optim, sharding, step
    assert jax.device_count() == 4, jax.devices()

    class Tower(nn.Module):
        @nn.compact
        def __call__(self, x):
            e = nn.Dense(8)(nn.tanh(nn.Dense(16)(x)))
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    tower = Tower()
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"image": tower.init(k1, jnp.zeros((1, 12)))["params"],
              "text": tower.init(k2, jnp.zeros((1, 6)))["params"],
              "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}

    def embed_fn(p, b):
        return {"image": tower.apply({"params": p["image"]}, b["image"]),
                "text": tower.apply({"params": p["text"]}, b["text"])}

    def loss_fn(p, e):
        return losses.contrastive_loss(e["image"], e["text"], p["logit_scale"])

    def loss_and_grad(p, b, rng, frozen=None):
        return losses.gradcache(embed_fn, loss_fn, p, b, 2)

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        img = rng.normal(size=(16, 12)).astype(np.float32)
        batches.append({"image": img, "text": img[:, :6] + 0.5 * rng.normal(size=(16, 6))
                        .astype(np.float32)})

    cfg = optim.default_optim_config()
    cfg.update(lr=1e-2, warmup_steps=1)
    tx, schedule = optim.make_optimizer(cfg, 10, params)

    def run(mesh):
        rep = sharding.param_shardings(params, mesh)
        p = jax.tree.map(jax.device_put, params, rep)
        state = jax.jit(lambda p: step.create_train_state(p, tx, jax.random.key(1)),
                        out_shardings=sharding.replicated(mesh))(p)
        sharded = [sharding.shard_batch(b, mesh) for b in batches]
        train_step = jax.jit(step.make_train_step(loss_and_grad, tx, schedule),
                             donate_argnums=0).lower(state, sharded[0]).compile()
        losses_ = []
        for b in sharded:
            state, m = train_step(state, b)
            losses_.append(float(m["loss"]))
        flops = train_step.cost_analysis()["flops"]
        n_shards = len(b["image"].sharding.device_set)
        flat = [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]
        return {"losses": losses_, "params": flat, "flops": flops, "n_shards": n_shards}

    out = {"four": run(sharding.make_mesh()),
           "one": run(sharding.make_mesh(devices=jax.devices()[:1]))}
    try:
        sharding.shard_batch({"x": np.zeros((6, 2))}, sharding.make_mesh())
    except ValueError as e:
        out["error"] = str(e)
    out["mesh_2x2"] = dict(sharding.make_mesh(axes={"data": -1, "fsdp": 2}).shape)
    print("RESULT" + json.dumps(out))
    """
)


def test_data_parallel_step_matches_single_device():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    four, one = out["four"], out["one"]
    assert four["n_shards"] == 4 and one["n_shards"] == 1
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    assert four["losses"][-1] < four["losses"][0]
    for a, b in zip(four["params"], one["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each device does about a quarter of the work (GradCache micro-batches stay sharded).
    assert four["flops"] < 0.5 * one["flops"], (four["flops"], one["flops"])
    assert "batch size 6" in out["error"] and "4 devices" in out["error"]
    assert out["mesh_2x2"] == {"data": 2, "fsdp": 2}

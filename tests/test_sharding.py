import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh
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


def _abstract(shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((64, 192), 8) == P(None, "fsdp")
    assert sharding.fsdp_spec((512, 64), 8) == P("fsdp", None)
    assert sharding.fsdp_spec((64, 64), 8) == P("fsdp", None)  # ties: the first
    assert sharding.fsdp_spec((8, 64, 6), 8, "inner") == P(None, "fsdp", None)
    assert sharding.fsdp_spec((32, 6), 8, "inner") is None  # never the layer axis
    assert sharding.fsdp_spec((32, 6), 8) == P("fsdp", None)
    assert sharding.fsdp_spec((), 8) is None
    assert sharding.fsdp_spec((4, 4), 8) is None  # smaller than the axis
    assert sharding.fsdp_spec((64, 64), 8, "replicate") is None
    with pytest.raises(ValueError, match="any | inner | replicate"):
        sharding.fsdp_spec((8,), 8, "all")


def test_fsdp_shardings_of_stacks_quantised_leaves_and_what_stays_replicated(caplog):
    from jaxfit.quant.nf4 import NF4Weight

    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    nf4 = jax.eval_shape(lambda w: NF4Weight.quantize(w), _abstract((2, 64, 32)))
    tree = {
        "h": {"mlp": {"kernel": _abstract((4, 64, 256)), "bias": _abstract((4, 6))}},
        "layers": {"q_proj": {"kernel": nf4}},
        "wte": {"embedding": _abstract((512, 64))},
        "logit_scale": _abstract(()),
        "odd": _abstract((6, 3)),
    }
    with caplog.at_level(logging.INFO, logger="jaxfit.sharding"):
        sh = sharding.fsdp_shardings(tree, mesh)
    assert sh["h"]["mlp"]["kernel"].spec == P(None, None, "fsdp")
    assert sh["h"]["mlp"]["bias"].spec == P()  # 4 layers divisible, but the layer axis
    assert sh["wte"]["embedding"].spec == P("fsdp", None)
    assert sh["logit_scale"].spec == P() and sh["odd"].spec == P()
    q = sh["layers"]["q_proj"]["kernel"]
    assert q.packed.spec == P(None, "fsdp") and q.absmax.spec == P(None, "fsdp")
    assert q.nested_code.spec == P(None, "fsdp")  # [layers, 256] code tables
    assert q.offset.spec == P() and q.nested_absmax.spec == P()  # [layers], [layers, 1]
    (line,) = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert "FSDP over 4 devices: 4 parameter array(s) replicated" in line
    for name in ("h/mlp/bias", "odd", "layers/q_proj/kernel/offset"):
        assert name in line
    assert "logit_scale" not in line  # scalars are not worth a word
    flat = jax.tree.leaves(sharding.fsdp_shardings(tree, AbstractMesh((8,), ("data",))))
    assert all(s.spec == P() for s in flat)  # no fsdp axis: data parallel


def test_optimizer_state_follows_the_parameters(caplog):
    from jaxfit import optim

    mesh = AbstractMesh((1, 8), ("data", "fsdp"))
    params = {"h": {"k": _abstract((2, 64, 256)), "b": _abstract((2, 256))}, "s": _abstract(())}
    shard = sharding.fsdp_shardings(params, mesh)
    for name in ("adamw", "adamw8bit"):
        cfg = optim.default_optim_config()
        cfg.name = name
        tx, _ = optim.make_optimizer(cfg, 1000, params)
        state = jax.eval_shape(tx.init, params)
        with caplog.at_level(logging.INFO, logger="jaxfit.sharding"):
            caplog.clear()
            out = sharding.follow_params(state, params, shard, mesh)
        specs = {
            jax.tree_util.keystr(k, simple=True, separator="/"): v.spec
            for k, v in jax.tree_util.tree_leaves_with_path(out)
        }
        moment = [k for k in specs if "/mu/h/k" in k]
        assert moment and all(
            specs[k] == P(None, None, "fsdp") for k in moment if "absmax" not in k
        )
        assert all(v == P() for k, v in specs.items() if k.endswith("count"))
        text = " ".join(r.getMessage() for r in caplog.records)
        if name == "adamw8bit":  # blockwise statistics over the flattened moment
            assert specs["1/0/mu/h/k/absmax"] == P()
            assert "optimizer-state array(s) replicated" in text and "mu/h/k/absmax" in text
        else:
            assert specs["1/0/nu/h/b"] == P(None, "fsdp") and "replicated" not in text


def test_mesh_spec_validates_against_the_devices():
    cfg = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1}})
    mesh = sharding.MeshSpec.from_config(cfg).build()
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    assert sharding.MeshSpec.from_config(ml_collections.ConfigDict()) == sharding.MeshSpec(-1, 1)
    n = jax.device_count()
    cfg.mesh.update(data=3, fsdp=4 * n)
    with pytest.raises(ValueError, match=rf"config.mesh .* does not fit this run's {n} device"):
        sharding.MeshSpec.from_config(cfg).build()
    cfg.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.MeshSpec.from_config(cfg).build()
    with pytest.raises(ValueError, match="tensor parallelism is not implemented"):
        sharding.MeshSpec.from_config(ml_collections.ConfigDict({"mesh": {"tensor": 2}}))
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.MeshSpec.from_config(ml_collections.ConfigDict({"mesh": {"model": 2}}))
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=1.5: an integer"):
        sharding.MeshSpec.from_config(ml_collections.ConfigDict({"mesh": {"fsdp": 1.5}}))
    assert sharding.process_batch_rows(mesh, 8 * n) == (0, 8 * n)


def test_batch_sizes_are_checked_against_the_mesh_before_any_work():
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))  # each micro-batch split 8 ways
    ok = ml_collections.ConfigDict({"batch_size": 32, "micro_batch_size": 16})
    sharding.check_batch_sizes(ok, mesh)
    bad = ml_collections.ConfigDict({"batch_size": 36, "micro_batch_size": 12})
    with pytest.raises(ValueError) as e:
        sharding.check_batch_sizes(bad, mesh)
    assert str(e.value) == (
        "config.micro_batch_size=12 is not a multiple of the 8 devices of mesh data=2 x "
        "fsdp=4, over which each micro-batch is split; use a multiple of 8, e.g. "
        "--config.micro_batch_size=8"
    )
    whole = ml_collections.ConfigDict({"batch_size": 4})  # no micro-batching
    with pytest.raises(ValueError, match=r"config.batch_size=4 .* multiple of 8"):
        sharding.check_batch_sizes(whole, mesh)
    sharding.check_batch_sizes(bad, AbstractMesh((1, 1), ("data", "fsdp")))  # one device
    # evaluation batches are rounded up instead (padded rows count for nothing)
    assert [sharding.eval_batch_size(n, mesh) for n in (1, 8, 9)] == [8, 8, 16]
    assert sharding.eval_batch_size(3, None) == 3


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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfit import optim, step


def _problem():
    """Linear regression y = x @ w_true + b_true."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(5, 2)).astype(np.float32)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    batch = {"x": x, "y": x @ w_true + 1.0}
    params = {"dense": {"kernel": jnp.zeros((5, 2)), "bias": jnp.zeros(2)}}
    return params, batch


def loss_fn(params, batch):
    pred = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss, "pred_mean": jnp.mean(pred)}


def loss_and_grad(params, batch, rng, frozen=None):
    del rng, frozen
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)


def test_create_train_state_accepts_typed_and_raw_keys():
    params, _ = _problem()
    tx = optax.adamw(1e-2)
    s1 = step.create_train_state(params, tx, jax.random.key(3))
    s2 = step.create_train_state(params, tx, jax.random.PRNGKey(3))
    assert s1.step.dtype == jnp.int32 and s1.step.shape == () and int(s1.step) == 0
    assert s1.rng.dtype == jnp.uint32 and s1.rng.shape == (2,)
    np.testing.assert_array_equal(s1.rng, s2.rng)


def test_train_step_decreases_loss_and_reports_metrics():
    params, batch = _problem()
    cfg = optim.default_optim_config()
    cfg.update(lr=5e-2, warmup_steps=5, weight_decay=0.0, grad_clip_norm=1.0)
    total = 150
    tx, schedule = optim.make_optimizer(cfg, total, params)
    state = step.create_train_state(params, tx, jax.random.key(0))
    train_step = jax.jit(step.make_train_step(loss_and_grad, tx, schedule), donate_argnums=0)

    # Metrics of the first step, checked against direct computations.
    (loss0, _), grads0 = loss_and_grad(params, batch, None)
    rng0 = np.asarray(state.rng)
    state, m = train_step(state, batch)
    assert set(m) == {"loss", "grad_norm", "lr", "mse", "pred_mean"}
    np.testing.assert_allclose(m["loss"], loss0, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], optax.global_norm(grads0), rtol=1e-6)
    assert m["grad_norm"] > cfg.grad_clip_norm  # reported before clipping
    assert m["lr"] == 0.0  # lr at step 0 of the warmup
    assert int(state.step) == 1
    assert not np.array_equal(np.asarray(state.rng), rng0)

    losses = [float(m["loss"])]
    for i in range(1, total):
        state, m = train_step(state, batch)
        np.testing.assert_allclose(m["lr"], schedule(i), rtol=1e-5)
        losses.append(float(m["loss"]))
    assert int(state.step) == total
    assert losses[-1] < 1e-2 * losses[0]
    assert train_step._cache_size() == 1  # no recompilation across steps

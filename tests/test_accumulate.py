"""Exact micro-batch accumulation against one large batch and against optax.MultiSteps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfit.accumulate import merge_micro, microbatched, split_micro


def _problem(seed=0, batch=8, mask_unequal=False):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    x = rng.normal(size=(batch, 4, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=(batch, 4)).astype(np.int32)
    mask = np.ones((batch, 4), np.float32)
    if mask_unequal:
        mask[0::4, :3] = 0  # micro-batch 0 of a strided k=4 split loses most tokens
    return params, {"x": x, "y": y, "mask": mask}


def sum_loss(params, mb, rng, frozen=None):
    logits = mb["x"] @ params["w"] + params["b"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), mb["y"][..., None], -1)[..., 0]
    return (nll * mb["mask"]).sum(), mb["mask"].sum(), {"tokens": mb["mask"].sum()}


def full_batch_reference(params, batch):
    def mean_loss(p):
        s, n, _ = sum_loss(p, batch, None)
        return s / n

    return jax.value_and_grad(mean_loss)(params)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("unequal", [False, True])
def test_equals_one_large_batch(k, unequal):
    params, batch = _problem(mask_unequal=unequal)
    (loss, metrics), grads = jax.jit(microbatched(sum_loss, k))(params, batch, jax.random.key(0))
    ref_loss, ref_grads = full_batch_reference(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )
    assert float(metrics["loss_weight"]) == batch["mask"].sum() == float(metrics["tokens"])


def _multisteps_update(params, batch, k):
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k)
    state = opt.init(params)
    micro = split_micro(batch, k)

    def mean_loss(p, mb):
        s, n, _ = sum_loss(p, mb, None)
        return s / n

    for j in range(k):
        g = jax.grad(mean_loss)(params, jax.tree.map(lambda x, j=j: x[j], micro))
        updates, state = opt.update(g, state, params)
    return updates


def test_agrees_with_optax_multisteps_when_token_counts_are_equal():
    params, batch = _problem()
    _, grads = microbatched(sum_loss, 4)(params, batch, jax.random.key(0))
    updates = _multisteps_update(params, batch, 4)  # sgd(1): update = -mean grad
    jax.tree.map(
        lambda g, u: np.testing.assert_allclose(g, -u, rtol=1e-5, atol=1e-7), grads, updates
    )


def test_exact_where_multisteps_is_not():
    params, batch = _problem(mask_unequal=True)
    _, grads = microbatched(sum_loss, 4)(params, batch, jax.random.key(0))
    _, ref = full_batch_reference(params, batch)
    updates = _multisteps_update(params, batch, 4)
    np.testing.assert_allclose(grads["w"], ref["w"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(-updates["w"], ref["w"], rtol=1e-3)  # mean of means is biased


def test_strided_split_and_errors():
    x = np.arange(8)
    np.testing.assert_array_equal(split_micro({"x": x}, 4)["x"], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="cannot be split into 3"):
        split_micro({"x": x}, 3)
    np.testing.assert_array_equal(merge_micro(split_micro({"x": x}, 4))["x"], x)

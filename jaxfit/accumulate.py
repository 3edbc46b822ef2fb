"""Gradient accumulation over micro-batches for losses that are sums over examples/tokens.

``microbatched(loss_fn, k)`` turns a micro-batch loss into a full-batch ``loss_and_grad``:
the batch is split into ``k`` micro-batches processed one after the other in a
``lax.scan`` (activation memory of one micro-batch), their summed losses and gradients are
accumulated in float32 and divided once by the TOTAL weight (e.g. the number of unmasked
tokens of the whole batch). The result equals one pass over the whole batch exactly (up to
float reassociation) even when micro-batches hold different numbers of loss tokens — which
``optax.MultiSteps``, averaging per-micro-batch means, does only when they hold the same
number (the two agree then; tests check both). For losses that couple examples of the
batch (contrastive), use ``losses.gradcache`` instead.

Micro-batch ``j`` takes examples ``j, j + k, j + 2k, ...`` (a strided split), so on a mesh
whose data axis shards the batch every micro-batch is spread over all devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Metrics = dict[str, jax.Array]
SumLossFn = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[jax.Array, jax.Array, Metrics]]


def split_micro(tree: PyTree, k: int, what: str = "batch") -> PyTree:
    """Every leaf ``[B, ...] -> [k, B // k, ...]``; micro-batch ``j`` = examples ``j::k``.

    Strided rather than contiguous: with the batch sharded in contiguous blocks over D
    devices, every micro-batch is then spread evenly over all devices (no resharding while
    ``B // k`` is divisible by D) instead of living on one device.

    Raises:
      ValueError: a leaf whose leading size is not divisible by ``k`` (names the leaf).
    """

    def split(path, x):
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} has leading size "
                f"{x.shape[0] if x.ndim else 'none'} (shape {x.shape}): it cannot be split "
                f"into {k} micro-batches (num_micro_batches={k})"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(split, tree)


def merge_micro(tree: PyTree) -> PyTree:
    """Inverse of :func:`split_micro`: ``[k, b, ...] -> [b * k, ...]`` in the original order."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree
    )


def microbatched(
    loss_fn: SumLossFn, num_micro_batches: int
) -> Callable[[PyTree, PyTree, jax.Array], tuple[tuple[jax.Array, Metrics], PyTree]]:
    """Build ``loss_and_grad(params, batch, rng, frozen=None) -> ((loss, metrics), grads)``.

    Args:
      loss_fn: ``(params, micro_batch, rng, frozen) -> (loss_sum, weight, metrics)``:
        gradients are taken w.r.t. ``params`` only (``frozen``: see
        ``jaxfit.step.make_train_step``); it returns the SUM of
        per-token (or per-example) losses of the micro-batch, the number of terms in it
        (float32 scalar), and scalar metrics (summed over micro-batches, so make them
        sums too, e.g. correct-prediction counts).
      num_micro_batches: ``k``; the batch's leading axis must be divisible by it.

    Returns:
      A pure function; ``loss = sum(loss_sum) / sum(weight)``, ``grads`` of that loss in
      each parameter's dtype, and ``metrics`` = summed micro-batch metrics plus
      ``loss_weight`` (the total weight). With ``k == 1`` no scan is built.
    """
    k = int(num_micro_batches)
    if k < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")

    def sum_and_grad(params, mb, rng, frozen):
        def f(p):
            loss_sum, weight, metrics = loss_fn(p, mb, rng, frozen)
            return loss_sum, (weight, metrics)

        (loss_sum, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss_sum, weight, metrics, grads

    def loss_and_grad(params, batch, rng, frozen=None):
        if k == 1:
            loss_sum, weight, metrics, grads = sum_and_grad(params, batch, rng, frozen)
        else:
            micro = split_micro(batch, k)
            rngs = jax.random.split(rng, k)

            def body(carry, xs):
                mb, r = xs
                loss_sum, weight, metrics, grads = sum_and_grad(params, mb, r, frozen)
                acc_loss, acc_weight, acc_metrics, acc_grads = carry
                return (
                    acc_loss + loss_sum,
                    acc_weight + weight,
                    jax.tree.map(jnp.add, acc_metrics, metrics),
                    jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads),
                ), None

            first = jax.tree.map(lambda x: x[0], micro)
            metrics_shape = jax.eval_shape(lambda: sum_and_grad(params, first, rng, frozen)[2])
            zeros = (
                jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape),
                jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            )
            (loss_sum, weight, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
        denom = jnp.maximum(weight.astype(jnp.float32), 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(jnp.result_type(p)), grads, params)
        metrics = {**metrics, "loss_weight": weight}
        return (loss_sum / denom, metrics), grads

    return loss_and_grad

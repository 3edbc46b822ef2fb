"""Training state and the pure train / eval steps.

``train_step(state, batch) -> (state, metrics)`` is a pure function of arrays: the trainer
jits it once with ``donate_argnums=0``. Everything task-specific (model, loss, GradCache)
lives in the ``loss_and_grad`` function it is built from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any
Metrics = dict[str, jax.Array]
LossAndGrad = Callable[..., tuple[tuple[jax.Array, Metrics], PyTree]]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; a plain pytree (checkpointed as is).

    Attributes:
      step: int32 scalar array, number of optimizer updates applied so far.
      params: parameter pytree.
      opt_state: ``optimizer.init(params)``.
      rng: raw ``uint32[2]`` PRNG key (``jax.random.PRNGKey`` layout) that is split once
        per step; kept raw (not a typed key) so that it checkpoints as a plain array.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


def create_train_state(
    params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Fresh state at step 0. ``rng`` may be a typed key (``jax.random.key``) or a raw key.

    Jittable: the trainer can build it directly into its shardings with
    ``jax.jit(lambda p: create_train_state(p, opt, rng), out_shardings=...)``.
    """
    if jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jnp.asarray(rng, jnp.uint32),
    )


def make_train_step(
    loss_and_grad: LossAndGrad,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, PyTree], tuple[TrainState, Metrics]]:
    """Build ``train_step(state, batch, frozen=None) -> (new_state, metrics)``.

    Args:
      loss_and_grad: ``(params, batch, rng, frozen) -> ((loss, metrics), grads)``, pure and
        jittable (e.g. a task's GradCache function). ``params`` are the TRAINABLE
        parameters (all of them, or only LoRA adapters); ``frozen`` is the rest (a frozen,
        possibly quantised base; ``None`` when everything trains). ``frozen`` is an
        argument of the jitted step, never a closure constant, so an 8B base is neither
        embedded in the program nor copied per step; gradients and optimizer state exist
        for ``params`` only.
      optimizer: from :func:`jaxfit.optim.make_optimizer` (clipping happens inside it).
      schedule: the optimizer's learning-rate schedule, only used for the ``lr`` metric.

    Returns:
      A pure function. ``metrics`` holds the loss's metrics plus ``loss`` (scalar),
      ``grad_norm`` (global L2 norm of the gradient BEFORE clipping, ``optax.global_norm``)
      and ``lr`` (learning rate applied by this update, i.e. ``schedule(state.step)``).
      Names are not namespaced; the trainer adds ``train/``.
    """

    def train_step(
        state: TrainState, batch: PyTree, frozen: PyTree = None
    ) -> tuple[TrainState, Metrics]:
        rng, step_rng = jax.random.split(state.rng)
        (loss, metrics), grads = loss_and_grad(state.params, batch, step_rng, frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def make_eval_step(
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, Metrics]],
) -> Callable[[PyTree, PyTree], Metrics]:
    """Build ``eval_step(params, batch) -> metrics`` (``loss`` plus the loss's metrics).

    ``loss_fn(params, batch) -> (loss, metrics)`` must be deterministic.
    """

    def eval_step(params: PyTree, batch: PyTree) -> Metrics:
        loss, metrics = loss_fn(params, batch)
        return {**metrics, "loss": loss}

    return eval_step

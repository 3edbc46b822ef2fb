"""Training state and the pure train / eval steps.

``train_step(state, batch, frozen) -> (state, metrics)`` is a pure function of arrays;
:func:`jit_train_step` jits it once with ``donate_argnums=0``; :func:`jaxfit.run.build_run`
calls it (and :func:`abstract_train_state`) for the trainer, the planner and the benchmarks
alike. Everything task-specific (model, loss, GradCache)
lives in the ``loss_and_grad`` function it is built from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxfit import placement, sharding

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
    grad_shardings: PyTree = None,
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
      grad_shardings: optional shardings of the gradients (the trainable parameters'):
        under FSDP the gradients are constrained to them as soon as they exist, so XLA
        reduce-scatters each over ``fsdp`` rather than all-reducing whole copies.

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
        if grad_shardings is not None:
            grads = sharding.constrain(grads, grad_shardings)
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


def abstract_train_state(task, optimizer, config, mesh):
    """Shapes and shardings of the train state, without memory.

    Args:
      task: a task (``jaxfit.tasks``): its ``abstract_params()`` give the trainable tree.
      optimizer: from :func:`jaxfit.optim.make_optimizer`.
      config: the run's config (``seed``).
      mesh: the device mesh (``jaxfit.sharding.make_mesh``).

    Returns:
      ``(abstract_state, state_shardings, make_state)``: a ``TrainState`` of
      ``jax.ShapeDtypeStruct``, the matching ``TrainState`` of shardings (parameters by
      :func:`jaxfit.sharding.fsdp_shardings`, split over the mesh's ``fsdp`` axis; the
      optimizer state following them, :func:`jaxfit.sharding.follow_params`; step and
      rng replicated), and
      ``make_state(params) -> TrainState`` (a fresh state at step 0; jittable).
    """
    state_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    abstract_params = task.abstract_params()
    param_shardings = sharding.fsdp_shardings(abstract_params, mesh, what="trainable")

    def make_state(params):
        return create_train_state(params, optimizer, state_rng)

    abstract_state = jax.eval_shape(make_state, abstract_params)
    repl = sharding.replicated(mesh)
    state_shardings = jax.tree.map(lambda _: repl, abstract_state)
    opt_shardings = sharding.follow_params(
        abstract_state.opt_state, abstract_params, param_shardings, mesh
    )
    state_shardings = state_shardings.replace(params=param_shardings, opt_state=opt_shardings)
    return abstract_state, state_shardings, make_state


def jit_train_step(task, optimizer, schedule, state_shardings, mesh):
    """The jitted ``step(state, batch, frozen) -> (state, metrics)`` every run uses (the
    trainer runs it; the planner and the benchmarks compile it): :func:`make_train_step`
    of ``task.loss_and_grad``, the state donated and kept in ``state_shardings``, the
    gradients constrained to the parameters' shardings, the metrics replicated."""
    train_step = make_train_step(task.loss_and_grad, optimizer, schedule, state_shardings.params)
    return jax.jit(
        traced_for(mesh, train_step),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def traced_for(mesh, fn: Callable) -> Callable:
    """``fn`` traced under :func:`jaxfit.placement.spmd_mesh` of ``mesh``: the models split
    activations over the batch axes and gather each weight where a layer uses it (FSDP)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with placement.spmd_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def jit_eval(fn: Callable, mesh) -> Callable:
    """``jax.jit`` of an evaluation function ``fn(params, frozen, batch, ...)`` for
    ``mesh``: traced as :func:`traced_for`, its results replicated on every device (so
    every process can read them; give it batches placed by
    :func:`jaxfit.sharding.shard_global_batch`)."""
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(traced_for(mesh, fn), out_shardings=sharding.replicated(mesh))

"""A run assembled once: config -> mesh -> task -> optimizer -> train state -> jitted step.

:func:`build_run` is the one place a train step is built. The trainer runs its step
(``jaxfit.trainer``), the planner compiles it for abstract shapes (``jaxfit.plan.core``)
and the benchmarks time it (``experiments/bench/runner.py``), so "the planner compiles
the step training runs" holds by construction, and every one of them refuses a batch the
mesh does not divide (:func:`jaxfit.sharding.check_batch_sizes`) before any work.

Building a run allocates nothing: the state is shapes and shardings
(:func:`jaxfit.step.abstract_train_state`) and the step is jitted, not compiled;
:meth:`Run.fresh_state` makes the values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from jaxfit import distributed, sharding
from jaxfit.optim import make_optimizer
from jaxfit.step import TrainState, abstract_train_state, jit_train_step
from jaxfit.tasks import RunSpec, build_task, prepare_data, resolve_config
from jaxfit.tasks.base import param_rng


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run is made of (see :func:`build_run`).

    Attributes:
      spec: the run's specs (``jaxfit.tasks.resolve_config``: config, precision, LoRA,
        mesh, task entry).
      config: ``spec.config``, the resolved config.
      task: the task (``jaxfit.tasks``); built ``abstract`` or with its data.
      mesh: the ``("data", "fsdp")`` device mesh (``spec.mesh`` built, or the one given).
      optimizer, schedule: :func:`jaxfit.optim.make_optimizer` of the trainable parameters.
      abstract_state: a ``TrainState`` of ``jax.ShapeDtypeStruct`` (no memory).
      state_shardings: the matching ``TrainState`` of shardings.
      make_state: ``params -> TrainState`` at step 0 (jittable).
      step: the jitted ``step(state, batch, frozen) -> (state, metrics)``
        (:func:`jaxfit.step.jit_train_step`; the state donated).
    """

    spec: RunSpec
    task: Any
    mesh: Mesh
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    make_state: Any
    step: Any

    @property
    def config(self):
        """The resolved config (``spec.config``)."""
        return self.spec.config

    def fresh_state(self, params=None) -> TrainState:
        """The state a fresh run starts from, in :attr:`state_shardings`: the task's
        ``initial_params`` (random from :func:`jaxfit.tasks.base.param_rng`, or loaded
        from ``init_from``), or the given ``params`` placed, through the jitted
        :attr:`make_state`. Reads weights when the task needs them (not on an abstract
        task without ``params``: ``RuntimeError``)."""
        shardings = self.state_shardings.params
        if params is None:
            params = self.task.initial_params(param_rng(self.config), shardings)
        else:
            params = jax.device_put(params, shardings)
        return jax.jit(self.make_state, out_shardings=self.state_shardings)(params)


def build_run(
    config,
    workdir: str | Path,
    *,
    abstract: bool,
    mesh: Mesh | None = None,
    check_batch: bool = True,
) -> Run:
    """Assemble the run of ``config``: nothing is allocated, compiled or trained.

    Args:
      config: a validated config (``jaxfit.validation.validate_values``), resolved here
        (:func:`jaxfit.tasks.resolve_config`), or its ``RunSpec``.
      workdir: the run directory (a task's artefacts: tokenizer, token cache).
      abstract: build the task for planning: nothing written, no data read, no tokenizer
        trained, no weights loaded (``build_task(..., abstract=True)``); else the task's
        data step runs first (:func:`jaxfit.tasks.prepare_data`: synthetic data, tokenizer,
        token files), on process 0 before the others
        (:func:`jaxfit.distributed.primary_first`: shared data files).
      mesh: the device mesh; default the spec's (:meth:`jaxfit.sharding.MeshSpec.build`;
        a reader of a finished run may pass one that fits its own devices).
      check_batch: refuse a (micro-)batch the mesh's batch axes do not divide; only a
        reader that trains nothing (:func:`jaxfit.trainer.restore_params` on another
        mesh) passes False.

    Returns:
      A :class:`Run`.

    Raises:
      jaxfit.config.ConfigError: an unknown task or impossible precision settings.
      ValueError: ``config.mesh`` does not fit the devices, or the mesh's batch axes do
        not divide the (micro-)batch (:func:`jaxfit.sharding.check_batch_sizes`).
    """
    spec = resolve_config(config, workdir)
    config = spec.config
    if mesh is None:
        mesh = spec.mesh.build()
    if check_batch:
        sharding.check_batch_sizes(config, mesh)
    # the data step (I/O, shared files: process 0 first), never for an abstract run
    data = None if abstract else distributed.primary_first(prepare_data, spec, workdir)
    task = build_task(spec, workdir, mesh, abstract=abstract, data=data)
    optimizer, schedule = make_optimizer(config.optim, config.total_steps, task.abstract_params())
    abstract_state, state_shardings, make_state = abstract_train_state(
        task, optimizer, config, mesh
    )
    step = jit_train_step(task, optimizer, schedule, state_shardings, mesh)
    return Run(
        spec=spec,
        task=task,
        mesh=mesh,
        optimizer=optimizer,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        make_state=make_state,
        step=step,
    )

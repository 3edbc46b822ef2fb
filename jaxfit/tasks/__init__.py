"""Tasks: what is trained (model, data, loss, evaluation), selected by ``config.task``.

A task object is built as ``Task(config, workdir, mesh)`` and provides:

* ``model``: the linen module;
* ``init_params(rng) -> params`` / ``abstract_params()``: the TRAINABLE parameters (all
  weights, or LoRA adapters only), pure; and their shapes without memory;
* ``initial_params(rng, shardings) -> params``: the values a fresh run starts from
  (random, or loaded from ``config.init_from``), placed with ``shardings``;
* ``abstract_batch(batch_size)`` / ``abstract_frozen()``: shapes of a training batch and
  of the frozen base, for planning without data or weights;
* ``frozen``: the frozen (possibly quantised) base of a LoRA run, else ``None``; passed
  to the jitted step as an argument;
* ``loss_and_grad(params, batch, rng, frozen) -> ((loss, metrics), grads)``: pure,
  jittable; gradients w.r.t. ``params`` only;
* ``train_iterator()``: an iterator of host batches with ``get_state()`` / ``set_state()``;
* ``evaluate(params) -> dict[str, float]``: metrics without namespace prefix;
* ``skip_counts() -> dict[str, int]``: data records skipped so far, by reason;
* ``throughput(examples_per_sec) -> dict[str, float]``: task-specific ``perf/`` metrics
  (tokens/s and MFU for language models);
* ``export(params, out_dir)``: write a Hugging Face directory (model + tokenizer);
  ``export_peft(params, out_dir)``: a LoRA run's adapters in PEFT's format.

``tasks/base.py`` (``ParamSource``, built once per task, and ``Task``, which forwards the
parameter half of the interface to it) implements the parameters for every task; the
losses are the free functions of ``jaxfit.objectives``.

The task registry (:data:`TASKS`, one :class:`TaskEntry` per task; the one list of tasks)
holds what is known of a task before it is built, so that no code outside it compares task
names: its class; ``resolve_config(config, workdir) -> config``, the fields the run derives
(a synthetic data path, the tokenizer of ``init_from``), filled in a copy before
``config.json`` is written (tasks never change the config they are given);
``data_files(config) -> {split: [files]}``, the local files the data is read from;
``validate(config)``, the task's own config rules; ``tokens_per_step(config)`` (the
planner's tokens per step, ``None`` where a step is not counted in tokens); and its model
families (those of :mod:`jaxfit.hf.families` naming it). A task object's
``data_fingerprint()`` is the content hash a resume compares
(``jaxfit.workdir.check_data``): those files' sizes and SHA-256, and what the task made of
them (token files, caption records); :func:`source_fingerprint` is its part that needs no
task (the files alone), compared before any data is prepared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from jaxfit import config as config_lib
from jaxfit.data import fingerprint
from jaxfit.hf import families as families_lib
from jaxfit.tasks import clip, lm


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """What the registry knows of one task (see the module docstring).

    Attributes:
      name: ``config.task``.
      task_class: ``(config, workdir, mesh, *, abstract) -> task``.
      resolve_config: ``(config, workdir) -> config``: the derived fields filled (a copy).
      data_files: ``(resolved config) -> {split: [local files]}``.
      validate: ``(config) -> None``: the task's rules of a from-scratch config; raises
        ``ConfigError`` naming the key.
      tokens_per_step: ``(config) -> int | None``.
      prepare_data: ``(resolved config, workdir) -> data``: the task's I/O (synthetic
        data written, tokenizer trained or loaded, records read or the corpus tokenized),
        given to ``task_class(..., data=data)``; never run when planning.
    """

    name: str
    task_class: type
    resolve_config: Callable
    data_files: Callable
    validate: Callable
    tokens_per_step: Callable
    prepare_data: Callable

    @property
    def families(self) -> list[str]:
        """The model families this task trains (:func:`jaxfit.hf.families.names`)."""
        return families_lib.names(self.name)


def _entry_of(module, task_class: type, name: str) -> TaskEntry:
    return TaskEntry(
        name=name,
        task_class=task_class,
        resolve_config=module.resolve_config,
        data_files=module.data_files,
        validate=module.validate,
        tokens_per_step=module.tokens_per_step,
        prepare_data=module.prepare_data,
    )


TASKS: dict[str, TaskEntry] = {
    "clip": _entry_of(clip, clip.CLIPTask, "clip"),
    "lm": _entry_of(lm, lm.LMTask, "lm"),
}
# every model family names a registered task
_orphans = {f.name: f.task for f in families_lib.FAMILIES.values() if f.task not in TASKS}
if _orphans:
    raise ImportError(f"model families of unregistered tasks: {_orphans}; tasks: {sorted(TASKS)}")


def entry(config) -> TaskEntry:
    """The registry entry of ``config.task``.

    Raises:
      ConfigError: an unknown (or missing) ``config.task``, listing the tasks.
    """
    name = config.get("task", None)
    if name not in TASKS:
        raise config_lib.ConfigError(f"config.task={name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def resolve_config(config, workdir: str | Path):
    """``config`` with every derived field filled (a copy; idempotent): the precision
    settings (:func:`jaxfit.config.resolve_precision`) and the task's own
    (``resolve_config`` of its module). What ``config.json`` records.

    Raises:
      ConfigError: an unknown ``config.task`` or impossible precision settings.
    """
    return entry(config).resolve_config(config_lib.resolve_precision(config), workdir)


def prepare_data(config, workdir: str | Path):
    """The data step of ``config.task`` on ``resolve_config(config)`` (its I/O: see
    :class:`TaskEntry`); what ``build_task(..., data=)`` takes.

    Raises:
      ConfigError: an unknown ``config.task``.
      jaxfit.errors.DataError / OSError: the data cannot be read.
    """
    return entry(config).prepare_data(resolve_config(config, workdir), workdir)


def build_task(config, workdir, mesh, *, abstract: bool = False, data=None):
    """Instantiate the task named by ``config.task`` on ``resolve_config(config)``.

    ``abstract=True`` builds it for planning (``jaxfit.plan``): model, loss and
    ``abstract_batch`` / ``abstract_params`` / ``abstract_frozen`` only; nothing is
    written, no data is read, no tokenizer trained and no weights loaded. Otherwise the
    task gets ``data`` (:func:`prepare_data`'s result; run here when not given). The
    task's constructor itself does no I/O beyond an ``init_from`` ``config.json``.

    Raises:
      ConfigError: an unknown ``config.task``.
    """
    config = resolve_config(config, workdir)
    if abstract:
        data = None
    elif data is None:
        data = entry(config).prepare_data(config, workdir)
    return entry(config).task_class(config, workdir, mesh, data=data)


def source_fingerprint(config) -> dict:
    """``{split: {"files": {path: {"size", "sha256"}}}}`` of a RESOLVED config's local data
    files (:func:`jaxfit.data.fingerprint.files_fingerprint`): the part of a task's
    ``data_fingerprint()`` known before the task is built.

    Raises:
      FileNotFoundError / ValueError: a data file named by the config is missing.
    """
    return {
        split: {"files": fingerprint.files_fingerprint(paths)}
        for split, paths in entry(config).data_files(config).items()
    }

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
  ``evaluate_examples(params) -> (metrics, examples)``: the same metrics and the
  per-example arrays they are the mean of (``{}`` without a validation split);
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
names: its class; ``derive_config(config, workdir, precision) -> config``, the fields the
run derives (a synthetic data path, the tokenizer of ``init_from``, the attention for this
machine), filled in a copy before ``config.json`` is written (tasks never change the
config they are given); ``data_files(config) -> {split: [files]}``, the local files the
data is read from; ``validate(config)``, the task's own config rules; the planner's hooks
(``tokens_per_step(config)``, ``None`` where a step is not counted in tokens;
``model_flops(task, batch_size)``, the model FLOPs of one step by formula, ``None`` where
the planner counts the traced step's; ``searches_seq_len``, whether ``--search_seq_len``
applies); and its model families (those of :mod:`jaxfit.hf.families` naming it). A task
object's ``data_fingerprint()`` is the content hash a resume compares
(``jaxfit.workdir.check_data``): those files' sizes and SHA-256, and what the task made of
them (token files, caption records); :func:`source_fingerprint` is its part that needs no
task (the files alone), compared before any data is prepared.

A run's config is resolved once (:func:`resolve_config`) into a :class:`RunSpec`: the
config with every derived field (what ``config.json`` records) and the frozen specs the
library takes instead of re-reading it: the :class:`~jaxfit.config.Precision` (with the
storage-dtype rule, :attr:`~jaxfit.config.Precision.base_dtype`), the
:class:`~jaxfit.lora.training.LoraSpec` (``None``: everything trains), the
:class:`~jaxfit.sharding.MeshSpec` and the task's :class:`TaskEntry`. Tasks are built from
a ``RunSpec`` (``task_class(spec, workdir, mesh, data=)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import ml_collections

from jaxfit import config as config_lib
from jaxfit import sharding
from jaxfit.data import fingerprint
from jaxfit.hf import families as families_lib
from jaxfit.lora.training import LoraSpec
from jaxfit.tasks import clip, lm


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """What the registry knows of one task (see the module docstring).

    Attributes:
      name: ``config.task``.
      task_class: ``(spec: RunSpec, workdir, mesh, *, data) -> task``.
      derive_config: ``(config, workdir, precision) -> config``: the derived fields
        filled (a copy; ``precision`` the run's :class:`~jaxfit.config.Precision`).
      data_files: ``(resolved config) -> {split: [local files]}``.
      validate: ``(config) -> None``: the task's rules of a from-scratch config; raises
        ``ConfigError`` naming the key.
      tokens_per_step: ``(config) -> int | None`` (planner hook).
      model_flops: ``(task, batch_size) -> float | None``: model FLOPs of one optimizer
        step of ``batch_size`` examples by formula (planner and benchmark hook; ``None``:
        count the traced step's).
      searches_seq_len: whether the planner's ``--search_seq_len`` applies (the task
        trains on sequences of ``config.seq_len`` tokens).
      prepare_data: ``(spec: RunSpec, workdir) -> data``: the task's I/O (synthetic
        data written, tokenizer trained or loaded, records read or the corpus tokenized),
        given to ``task_class(..., data=data)``; never run when planning.
    """

    name: str
    task_class: type
    derive_config: Callable
    data_files: Callable
    validate: Callable
    tokens_per_step: Callable
    model_flops: Callable
    searches_seq_len: bool
    prepare_data: Callable

    @property
    def families(self) -> list[str]:
        """The model families this task trains (:func:`jaxfit.hf.families.names`)."""
        return families_lib.names(self.name)


def entry_of(module, task_class: type, name: str) -> TaskEntry:
    """The registry entry of a task module: its ``derive_config``, ``data_files``,
    ``validate``, ``tokens_per_step``, ``model_flops``, ``SEARCHES_SEQ_LEN`` and
    ``prepare_data``, and ``task_class``. A new task is its module under ``jaxfit/tasks``
    plus one line in :data:`TASKS` (``tests/test_new_task.py`` registers one from a test
    and plans and trains it).

    Raises:
      AttributeError: the module lacks one of those names.
    """
    return TaskEntry(
        name=name,
        task_class=task_class,
        derive_config=module.derive_config,
        data_files=module.data_files,
        validate=module.validate,
        tokens_per_step=module.tokens_per_step,
        model_flops=module.model_flops,
        searches_seq_len=module.SEARCHES_SEQ_LEN,
        prepare_data=module.prepare_data,
    )


TASKS: dict[str, TaskEntry] = {
    "clip": entry_of(clip, clip.CLIPTask, "clip"),
    "lm": entry_of(lm, lm.LMTask, "lm"),
}
# every model family names a registered task
_orphans = {f.name: f.task for f in families_lib.FAMILIES.values() if f.task not in TASKS}
if _orphans:
    raise ImportError(f"model families of unregistered tasks: {_orphans}; tasks: {sorted(TASKS)}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's config resolved once (:func:`resolve_config`), and the frozen specs the
    library takes instead of the raw config.

    Attributes:
      config: the config with every derived field filled (what ``config.json`` records;
        a copy, never changed after resolution).
      task: the task's registry entry.
      precision: compute dtype, base format and whether only LoRA adapters train
        (:class:`jaxfit.config.Precision`; the storage dtype of a float base is its
        ``base_dtype``).
      lora: the adapters (:class:`jaxfit.lora.training.LoraSpec`; ``lora.peft_dir``
        included), ``None`` when everything trains.
      mesh: the device mesh asked for (:class:`jaxfit.sharding.MeshSpec`).
    """

    config: ml_collections.ConfigDict
    task: TaskEntry
    precision: config_lib.Precision
    lora: LoraSpec | None
    mesh: sharding.MeshSpec


def entry(config) -> TaskEntry:
    """The registry entry of ``config.task``.

    Raises:
      ConfigError: an unknown (or missing) ``config.task``, listing the tasks.
    """
    name = config.get("task", None)
    if name not in TASKS:
        raise config_lib.ConfigError(f"config.task={name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _lora_spec(config, precision: config_lib.Precision) -> LoraSpec | None:
    """The run's adapters from ``config.lora``, or ``None`` when LoRA is off
    (:attr:`jaxfit.config.Precision.lora`: ``lora.enabled`` or a quantised base)."""
    if not precision.lora:
        return None
    c = config.lora
    return LoraSpec(
        targets=c.targets,
        rank=int(c.rank),
        alpha=float(c.alpha),
        dropout=float(c.dropout),
        use_rslora=bool(c.use_rslora),
        peft_dir=c.get("peft_dir", "") or "",
    )


def resolve_config(config, workdir: str | Path) -> RunSpec:
    """The :class:`RunSpec` of ``config``: every derived field filled in a copy (the
    precision settings, :func:`jaxfit.config.resolve_precision`, then the task's own,
    ``TaskEntry.derive_config``) and the frozen specs made from it. Idempotent: a
    ``RunSpec`` is returned as it is, and resolving its ``config`` again gives the same.

    Raises:
      ConfigError: an unknown ``config.task`` or impossible precision settings.
      ValueError: a malformed ``config.mesh`` (:meth:`jaxfit.sharding.MeshSpec.from_config`).
    """
    if isinstance(config, RunSpec):
        return config
    task = entry(config)
    config, precision = config_lib.resolve_precision(config)
    config = task.derive_config(config, workdir, precision)
    return RunSpec(
        config=config,
        task=task,
        precision=precision,
        lora=_lora_spec(config, precision),
        mesh=sharding.MeshSpec.from_config(config),
    )


def prepare_data(config, workdir: str | Path):
    """The data step of ``config.task`` (a config or :class:`RunSpec`, resolved here; its
    I/O: see :class:`TaskEntry`); what ``build_task(..., data=)`` takes.

    Raises:
      ConfigError: an unknown ``config.task``.
      jaxfit.errors.DataError / OSError: the data cannot be read.
    """
    spec = resolve_config(config, workdir)
    return spec.task.prepare_data(spec, workdir)


def build_task(config, workdir, mesh, *, abstract: bool = False, data=None):
    """Instantiate the task of ``config`` (a config or :class:`RunSpec`; resolved here by
    :func:`resolve_config`).

    ``abstract=True`` builds it for planning (``jaxfit.plan``): model, loss and
    ``abstract_batch`` / ``abstract_params`` / ``abstract_frozen`` only; nothing is
    written, no data is read, no tokenizer trained and no weights loaded. Otherwise the
    task gets ``data`` (:func:`prepare_data`'s result; run here when not given). The
    task's constructor itself does no I/O beyond an ``init_from`` ``config.json``.

    Raises:
      ConfigError: an unknown ``config.task``.
    """
    spec = resolve_config(config, workdir)
    if abstract:
        data = None
    elif data is None:
        data = spec.task.prepare_data(spec, workdir)
    return spec.task.task_class(spec, workdir, mesh, data=data)


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

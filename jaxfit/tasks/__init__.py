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

A task module also has ``resolve_config(config, workdir) -> config``: the fields the run
derives (a synthetic data path, the tokenizer of ``init_from``), filled in a copy before
``config.json`` is written; tasks never change the config they are given; and
``data_files(config) -> {split: [files]}``, the local files the data is read from. A task
object's ``data_fingerprint()`` is the content hash a resume compares
(``jaxfit.workdir.check_data``): those files' sizes and SHA-256, and what the task made of
them (token files, caption records); :func:`source_fingerprint` is its part that needs no
task (the files alone), compared before any data is prepared.
"""

from __future__ import annotations

from pathlib import Path

from jaxfit import config as config_lib
from jaxfit.data import fingerprint
from jaxfit.tasks import clip, lm

TASKS = {
    "clip": (clip.CLIPTask, clip.resolve_config, clip.data_files),
    "lm": (lm.LMTask, lm.resolve_config, lm.data_files),
}


def _entry(config):
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
    return _entry(config)[1](config_lib.resolve_precision(config), workdir)


def build_task(config, workdir, mesh, *, abstract: bool = False):
    """Instantiate the task named by ``config.task`` on ``resolve_config(config)``.

    ``abstract=True`` builds it for planning (``jaxfit.plan``): model, loss and
    ``abstract_batch`` / ``abstract_params`` / ``abstract_frozen`` only; no data is read,
    no tokenizer trained and no weights loaded.

    Raises:
      ConfigError: an unknown ``config.task``.
    """
    cls = _entry(config)[0]
    return cls(resolve_config(config, workdir), workdir, mesh, abstract=abstract)


def source_fingerprint(config) -> dict:
    """``{split: {"files": {path: {"size", "sha256"}}}}`` of a RESOLVED config's local data
    files (:func:`jaxfit.data.fingerprint.files_fingerprint`): the part of a task's
    ``data_fingerprint()`` known before the task is built.

    Raises:
      FileNotFoundError / ValueError: a data file named by the config is missing.
    """
    return {
        split: {"files": fingerprint.files_fingerprint(paths)}
        for split, paths in _entry(config)[2](config).items()
    }

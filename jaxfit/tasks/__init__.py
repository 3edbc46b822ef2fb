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

``tasks/base.py`` (``ParamsMixin``) implements the parameter half for every task.
"""

from __future__ import annotations

import importlib

TASKS = {"clip": "jaxfit.tasks.clip:CLIPTask", "lm": "jaxfit.tasks.lm:LMTask"}


def build_task(config, workdir, mesh, *, abstract: bool = False):
    """Instantiate the task named by ``config.task``; ``ValueError`` if unknown.

    ``abstract=True`` builds it for planning (``jaxfit.plan``): model, loss and
    ``abstract_batch`` / ``abstract_params`` / ``abstract_frozen`` only; no data is read,
    no tokenizer trained and no weights loaded."""
    name = config.get("task", None)
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}; expected one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, workdir, mesh, abstract=abstract)

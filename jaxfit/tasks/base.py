"""What every task shares: where its parameters come from, and the task interface.

:class:`ParamSource` is built once per task from the resolved config, the model and the
model's ``init`` function. It knows the four ways a run's parameters come about (random
init; ``init_from`` a pretrained checkpoint, quantised while streaming when
``base_format`` is quantised; LoRA adapters split off a frozen base, or read from
``lora.peft_dir``; shapes only, for planning) and gives:

* ``init_params(rng)``: the TRAINABLE parameters, pure; ``abstract_params()`` their shapes
  (``jax.eval_shape``, or the shapes of adapters read from ``lora.peft_dir``);
* ``abstract_frozen()``: the frozen base's shapes (quantised leaves included), no memory;
* ``initial_params(rng, shardings)``: the values a fresh run starts from, placed;
* ``frozen``: the frozen base (``None`` without LoRA), placed; read once;
* ``full_params(params, frozen, rng=None)``: the tree the model applies;
* ``export(params, out_dir)`` / ``export_peft(...)``: an HF directory (adapters merged) /
  the adapters in PEFT's format.

Weights are read only when first needed, so building a task (and planning it,
``jaxfit.plan``) reads none. :class:`Task` forwards those names, so every task offers them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxfit import config as config_lib
from jaxfit import hf, quant, sharding
from jaxfit.lora import adapters as lora_adapters
from jaxfit.lora import peft_io
from jaxfit.lora import training as lora_training

log = logging.getLogger(__name__)


def _dtypes(precision: config_lib.Precision) -> dict:
    """The dtype and quantisation arguments of the loaders for ``precision``: float base
    weights in :attr:`~jaxfit.config.Precision.base_dtype`, matmuls in its compute dtype,
    the base quantised while loading to :attr:`~jaxfit.config.Precision.quantize`."""
    return {
        "dtype": jnp.dtype(precision.base_dtype),
        "compute_dtype": jnp.dtype(precision.compute_dtype),
        "quantize": precision.quantize,
    }


def load_base(init_from: str, precision: config_lib.Precision, **overrides):
    """``(model, params)`` of the checkpoint ``init_from`` (a local directory or Hub name)
    through the one loader (:func:`jaxfit.hf.load_pretrained`), stored as ``precision``
    says: quantised while streaming when its ``base_format`` is quantised (the
    full-precision model never exists at once; a bitsandbytes NF4 checkpoint under
    ``nf4`` kept as stored, under ``int8`` refused), float otherwise (an NF4 checkpoint
    dequantised exactly). ``overrides`` are model-config fields (e.g.
    ``remat_policy``)."""
    return hf.load_pretrained(init_from, **_dtypes(precision), **overrides)


def base_model(init_from: str, precision: config_lib.Precision, **overrides):
    """The module of the checkpoint ``init_from`` from its ``config.json`` (no weights
    read), with the dtypes :func:`load_base` gives it; a checkpoint format ``load_base``
    would refuse (LLM.int8, FP4, NF4 under ``int8``) raises here already. ``overrides``:
    model-config fields."""
    return hf.model_from_config(init_from, **_dtypes(precision), **overrides)[0]


def param_rng(config) -> jax.Array:
    """The key parameters (and LoRA adapters) are initialised from: a function of the seed
    alone, so a resumed run rebuilds the same frozen base."""
    return jax.random.fold_in(jax.random.key(config.seed), 0)


class ParamSource:
    """Where one run's parameters come from (see the module docstring).

    Args:
      spec: the run's ``jaxfit.tasks.RunSpec`` (its precision and LoRA specs; the
        config's ``init_from``, ``seed`` and ``model.remat_policy``).
      model: the linen module.
      init_base: ``rng -> params``: ``model.init`` on tiny inputs (the full float tree).
      abstract: built for planning: no weights are ever read; ``lora.peft_dir`` adapters
        are stood in for by adapters of the config's rank and targets (files cannot be
        traced).
      mesh: the device mesh the frozen base is placed on, split over its ``fsdp`` axis
        (:func:`jaxfit.sharding.fsdp_shardings`); None: the default device.
    """

    def __init__(self, spec, model, init_base: Callable, *, abstract: bool = False, mesh=None):
        self.config, self.model, self.abstract, self.mesh = spec.config, model, abstract, mesh
        self.precision: config_lib.Precision = spec.precision
        self.lora: lora_training.LoraSpec | None = spec.lora  # None: everything trains
        if abstract and self.lora is not None and self.lora.peft_dir:
            # files cannot be traced: adapters of the config's rank and targets stand in
            self.lora = dataclasses.replace(self.lora, peft_dir="")
        self._peft_dir = "" if self.lora is None else self.lora.peft_dir
        self._init_base = init_base

    @property
    def frozen_base(self) -> bool:
        """Whether the base is frozen (LoRA / QLoRA): only adapters train."""
        return self.precision.lora

    def _stored_base(self, base):
        """A from-scratch ``base`` as the run stores it (quantised when ``base_format`` is)."""
        if self.precision.quantised:
            rules = hf.families.DEFAULT_QUANT_RULES
            base = quant.quantize_params(base, rules, self.precision.base_format)
        return base

    def _split_base(self, base, rng):
        return lora_training.split(base, self.lora, rng, self.model)

    def init_params(self, rng: jax.Array):
        """The trainable parameters of a from-scratch base; pure (traceable)."""
        return self._split_base(self._init_base(rng), rng)[0]

    def abstract_params(self):
        """``jax.ShapeDtypeStruct`` tree of the trainable parameters (no memory used)."""
        if self._peft_dir:  # adapters read from files cannot be traced: their real shapes
            return _shapes(self._values[0])
        return jax.eval_shape(self.init_params, param_rng(self.config))

    def abstract_frozen(self):
        """``jax.ShapeDtypeStruct`` tree of the frozen base (``None`` without LoRA): the
        structure, shapes and dtypes of :attr:`frozen` without reading or allocating
        anything (a checkpoint's base has the shapes of a fresh one)."""
        if not self.frozen_base:
            return None
        if self._peft_dir:
            return _shapes(self._values[1])

        def frozen(rng):
            return self._split_base(self._stored_base(self._init_base(rng)), rng)[1]

        return jax.eval_shape(frozen, param_rng(self.config))

    @functools.cached_property
    def _values(self):
        """``(trainable, frozen)`` from the real base (pretrained or freshly initialised),
        computed on first use from :func:`param_rng` (the same base on every resume)."""
        if self.abstract:
            raise RuntimeError("a task built with abstract=True has no parameter values")
        rng = param_rng(self.config)
        if self.config.init_from:
            base = load_base(
                self.config.init_from,
                self.precision,
                remat_policy=self.config.model.remat_policy,
            )[1]
        else:  # quantised eagerly: its statistics are computed on the host
            base = self._stored_base(jax.jit(self._init_base)(rng))
        trainable, frozen = self._split_base(base, rng)
        if frozen is not None:
            log.info(
                "LoRA: %s", lora_adapters.trainable_summary(self.full_params(trainable, frozen))
            )
        return trainable, frozen

    def initial_params(self, rng: jax.Array, shardings):
        """The trainable parameters a fresh run starts from, placed with ``shardings``."""
        if not self.config.init_from and not self.frozen_base:
            return jax.jit(self._init_base, out_shardings=shardings)(rng)
        return jax.device_put(self._values[0], shardings)

    @functools.cached_property
    def frozen(self):
        """The placed frozen base (``None`` without LoRA), split over the mesh's ``fsdp``
        axis (quantised leaves' codes and statistics too)."""
        if not self.frozen_base:
            return None
        values = self._values[1]
        if self.mesh is None:
            return jax.device_put(values)
        return jax.device_put(values, sharding.fsdp_shardings(values, self.mesh, what="frozen"))

    @staticmethod
    def full_params(params, frozen, rng=None):
        """The tree the model applies (:func:`jaxfit.lora.training.full`)."""
        return lora_training.full(params, frozen, rng)

    def export(self, params, out_dir) -> Path:
        """Write a Hugging Face directory (adapters merged into the base)."""
        return hf.save_pretrained(
            self.model, lora_training.for_export(params, self.frozen), out_dir
        )

    def export_peft(self, params, out_dir, *, task_type: str | None) -> Path:
        """Write the adapters in PEFT's format (``adapter_config.json`` +
        ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained``.

        Raises:
          ValueError: the run trains no adapters (export it with ``format=hf``).
        """
        if self.frozen is None:
            raise ValueError("this run has no LoRA adapters; export it in the hf format")
        spec = self.lora
        return peft_io.save_peft(
            lora_adapters.combine(params, self.frozen),
            self.model,
            out_dir,
            base_model_name_or_path=self.config.init_from or None,
            rank=spec.rank,
            alpha=spec.alpha,
            dropout=spec.dropout,
            use_rslora=spec.use_rslora,
            task_type=task_type,
        )


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class Task:
    """The parameter half of the task interface (``jaxfit.tasks``), forwarded to
    ``self.source`` (a :class:`ParamSource` the subclass builds once its model exists).
    Subclasses set ``config``, ``workdir``, ``mesh``, ``abstract``, ``model``,
    ``tokenizer``, ``source`` and ``loss_and_grad``."""

    peft_task_type: str | None = "CAUSAL_LM"
    source: ParamSource

    def init_params(self, rng):
        return self.source.init_params(rng)

    def abstract_params(self):
        return self.source.abstract_params()

    def abstract_frozen(self):
        return self.source.abstract_frozen()

    def initial_params(self, rng, shardings):
        return self.source.initial_params(rng, shardings)

    @property
    def frozen(self):
        return self.source.frozen

    @property
    def frozen_base(self) -> bool:
        return self.source.frozen_base

    full_params = staticmethod(ParamSource.full_params)

    def export(self, params, out_dir) -> Path:
        """Write a Hugging Face directory (adapters merged into the base) plus tokenizer."""
        out = self.source.export(params, out_dir)
        self.tokenizer.save(out)
        return out

    def export_peft(self, params, out_dir) -> Path:
        return self.source.export_peft(params, out_dir, task_type=self.peft_task_type)

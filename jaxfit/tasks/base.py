"""What every task shares: where parameters come from and how LoRA splits them.

A task subclass sets ``self.model`` and ``self.config`` and implements ``_init_base(rng)``
(``model.init`` with tiny inputs). With ``config.init_from`` the model comes from the
checkpoint's ``config.json`` (:func:`base_model`); its weights are read only when first
needed (``initial_params`` / ``frozen``), so building a task (and planning it,
``jaxfit.plan``) reads no weights. Then:

* ``init_params(rng)``: the TRAINABLE parameters, pure; ``abstract_params()`` their
  shapes (``jax.eval_shape`` of it, or of adapters read from ``lora.peft_dir``);
* ``abstract_frozen()``: the frozen base's shapes (quantised leaves included), no memory;
* ``initial_params(rng, shardings)``: their values for a fresh run, placed;
* ``frozen``: the frozen base (``None`` without LoRA), placed; built once;
* ``full_params(params, frozen, rng=None)``: the tree the model applies;
* ``export(params, out_dir)``: an HF directory (adapters merged) plus the tokenizer.

A task built with ``abstract=True`` (for the planner) reads no data either: it only has
the model, the loss and ``abstract_batch(batch_size)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxfit import hf, quant
from jaxfit.lora import adapters as lora_adapters
from jaxfit.lora import peft_io
from jaxfit.lora import training as lora_training

log = logging.getLogger(__name__)


# Compute dtype by precision; int8 / nf4 quantise a frozen base and compute in bf16.
COMPUTE_DTYPES = {
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
    "int8": jnp.bfloat16,
    "nf4": jnp.bfloat16,
}


def base_dtype(config):
    """Storage dtype of pretrained weights: float32 master weights when they train; the
    compute dtype for a frozen LoRA base (half the memory; QLoRA keeps it in bf16)."""
    return COMPUTE_DTYPES[config.precision] if lora_training.enabled(config) else jnp.float32


QUANTISED = ("int8", "nf4")


def load_base(config, **overrides):
    """``(model, params)`` of ``config.init_from``: quantised while streaming for int8 /
    nf4 precision (the full-precision model never exists at once), float otherwise.

    ``overrides`` are model-config fields (e.g. ``remat_policy``).
    """
    dtype = COMPUTE_DTYPES[config.precision]
    if config.precision in QUANTISED:
        return quant.load_quantized(
            config.init_from, config.precision, dtype=dtype, compute_dtype=dtype, **overrides
        )
    return hf.load_pretrained(
        config.init_from, dtype=base_dtype(config), compute_dtype=dtype, **overrides
    )


def base_model(config, **overrides):
    """The module of ``config.init_from`` from its ``config.json`` (no weights read), with
    the dtypes :func:`load_base` gives it. ``overrides``: model-config fields."""
    dtype = COMPUTE_DTYPES[config.precision]
    param_dtype = dtype if config.precision in QUANTISED else base_dtype(config)
    return hf.model_from_config(
        config.init_from, dtype=param_dtype, compute_dtype=dtype, **overrides
    )[0]


def param_rng(config) -> jax.Array:
    """The key parameters (and LoRA adapters) are initialised from: a function of the seed
    alone, so a resumed run rebuilds the same frozen base."""
    return jax.random.fold_in(jax.random.key(config.seed), 0)


class ParamsMixin:
    _split_cache = None
    abstract = False  # built for planning: no data, no weights (see the module docstring)

    def _setup(self, config, workdir, mesh, abstract: bool):
        """Set ``config`` / ``workdir`` / ``mesh`` / ``abstract``; returns the config the
        task uses. Planning (``abstract``) drops ``lora.peft_dir``: adapters of the
        config's rank and targets stand in for the files' (which cannot be traced)."""
        if abstract and config.get("lora") and config.lora.get("peft_dir"):
            config = config.copy_and_resolve_references()
            with config.unlocked():
                config.lora.peft_dir = ""
        self.config, self.workdir, self.mesh, self.abstract = config, Path(workdir), mesh, abstract
        return config

    def _init_base(self, rng: jax.Array):
        raise NotImplementedError

    def init_params(self, rng: jax.Array):
        return lora_training.split(self._init_base(rng), self.config, rng, self.model)[0]

    def abstract_params(self):
        """``jax.ShapeDtypeStruct`` tree of the trainable parameters (no memory used)."""
        lora = self.config.get("lora")
        if lora is not None and lora.get("peft_dir") and not self.abstract:
            # adapters read from files cannot be traced: build them once, eagerly
            trainable = self._split(param_rng(self.config))[0]
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        return jax.eval_shape(self.init_params, param_rng(self.config))

    def _stored_base(self, base):
        """A from-scratch ``base`` as the run stores it (quantised for int8 / nf4)."""
        if self.config.precision in QUANTISED:
            base = quant.quantize_params(base, method=self.config.precision)
        return base

    @property
    def frozen_base(self) -> bool:
        """Whether the base is frozen (LoRA / QLoRA): only adapters train."""
        return lora_training.enabled(self.config)

    def abstract_frozen(self):
        """``jax.ShapeDtypeStruct`` tree of the frozen base (``None`` without LoRA): the
        same structure, shapes and dtypes as :attr:`frozen`, without reading or
        allocating anything (a checkpoint's base has the shapes of a fresh one)."""
        if not lora_training.enabled(self.config):
            return None
        if self.config.lora.get("peft_dir") and not self.abstract:
            # adapters read from files cannot be traced: the real base, built once
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.frozen)

        def frozen(rng):
            base = self._stored_base(self._init_base(rng))
            return lora_training.split(base, self.config, rng, self.model)[1]

        return jax.eval_shape(frozen, param_rng(self.config))

    def _split(self, rng: jax.Array):
        """``(trainable, frozen)`` from the real base (pretrained or freshly initialised)."""
        if self.abstract:
            raise RuntimeError("a task built with abstract=True has no parameter values")
        if self._split_cache is None:
            if self.config.init_from:
                remat = self.config.model.remat_policy
                base = load_base(self.config, remat_policy=remat)[1]
            else:  # quantised eagerly: its statistics are computed on the host
                base = self._stored_base(jax.jit(self._init_base)(rng))
            trainable, frozen = lora_training.split(base, self.config, rng, self.model)
            if frozen is not None:
                full = lora_adapters.combine(trainable, frozen)
                log.info("LoRA: %s", lora_adapters.trainable_summary(full))
            self._split_cache = (trainable, frozen)
        return self._split_cache

    def initial_params(self, rng: jax.Array, shardings):
        if not self.config.init_from and not lora_training.enabled(self.config):
            return jax.jit(self._init_base, out_shardings=shardings)(rng)
        return jax.device_put(self._split(rng)[0], shardings)

    @property
    def frozen(self):
        """The placed frozen base (``None`` without LoRA), built on first use from
        :func:`param_rng` (the same base on every resume)."""
        if not lora_training.enabled(self.config):
            return None
        if getattr(self, "_frozen", None) is None:
            self._frozen = jax.device_put(self._split(param_rng(self.config))[1])
        return self._frozen

    @staticmethod
    def full_params(params, frozen, rng=None):
        return lora_training.full(params, frozen, rng)

    def export(self, params, out_dir) -> Path:
        """Write a Hugging Face directory (adapters merged into the base) plus tokenizer."""
        out = hf.save_pretrained(self.model, lora_training.for_export(params, self.frozen), out_dir)
        self.tokenizer.save(out)
        return out

    peft_task_type: str | None = "CAUSAL_LM"

    def export_peft(self, params, out_dir) -> Path:
        """Write the adapters in PEFT's format (``adapter_config.json`` +
        ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained``.

        Raises:
          ValueError: the run trains no adapters (export it with ``format=hf``).
        """
        if self.frozen is None:
            raise ValueError("this run has no LoRA adapters; export it in the hf format")
        c = self.config.lora
        return peft_io.save_peft(
            lora_adapters.combine(params, self.frozen),
            self.model,
            out_dir,
            base_model_name_or_path=self.config.init_from or None,
            rank=int(c.rank),
            alpha=float(c.alpha),
            dropout=float(c.dropout),
            use_rslora=bool(c.use_rslora),
            task_type=self.peft_task_type,
        )

"""LoRA in a training run: the adapters' settings (:class:`LoraSpec`) and the
trainable/frozen split.

Every task uses the same three calls, so LoRA is a transform of the parameter tree and
never a branch in model or loop code:

* :func:`split` turns base parameters into ``(trainable, frozen)``: without a spec (LoRA
  off), everything trains and ``frozen`` is ``None``; with one, adapters are added at its
  ``targets`` and only they train (the frozen base, possibly quantised, is passed to the
  jitted step as an argument);
* :func:`full` rebuilds the parameter tree the model applies (and attaches per-step
  dropout keys when ``lora.dropout > 0``);
* :func:`for_export` gives a tree of plain kernels (adapters merged) for HF export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxfit.lora import adapters, peft_io

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters of a LoRA run (from ``config.lora``, built once when the run's config
    is resolved: ``jaxfit.tasks.resolve_config``).

    Attributes:
      targets: PEFT short names, ``"all-linear"`` or regexes over parameter paths
        (:mod:`jaxfit.lora.targets`).
      rank: r, the adapters' inner dimension.
      alpha: the scale numerator (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
      dropout: dropout probability on the adapters' input, in [0, 1).
      use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023).
      peft_dir: a PEFT adapter directory to start from (``""``: none); its rank, alpha
        and targets replace the fields above.
    """

    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    peft_dir: str = ""

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)


def split(
    base: PyTree, spec: LoraSpec | None, rng: jax.Array, model=None
) -> tuple[PyTree, PyTree | None]:
    """``(trainable, frozen)`` for a run; see the module docstring. With ``spec.peft_dir``
    the adapters are read from it (``model`` gives the HF module names) instead of being
    initialised.

    Raises:
      ValueError: from :func:`jaxfit.lora.add_lora` (a target matching nothing, a rank
        larger than a kernel dimension), naming the rule or tensor; a ``peft_dir``
        without ``model``.
    """
    if spec is None:
        return base, None
    if spec.peft_dir:
        if model is None:
            raise ValueError("lora.peft_dir needs the model to map PEFT module names")
        return adapters.split_trainable(peft_io.load_peft(base, model, spec.peft_dir))
    params = adapters.add_lora(
        base,
        list(spec.targets),
        rank=spec.rank,
        alpha=spec.alpha,
        rng=rng,
        use_rslora=spec.use_rslora,
        dropout=spec.dropout,
    )
    return adapters.split_trainable(params)


def full(params: PyTree, frozen: PyTree | None, rng: jax.Array | None = None) -> PyTree:
    """The tree the model applies: ``params`` alone, or adapters combined with the base
    (with dropout keys from ``rng`` when given)."""
    if frozen is None:
        return params
    tree = adapters.combine(params, frozen)
    return tree if rng is None else adapters.with_dropout_rng(tree, rng)


def for_export(params: PyTree, frozen: PyTree | None) -> PyTree:
    """Plain-kernel parameters (adapters merged into dequantised bases) for HF export."""
    return params if frozen is None else adapters.merge(adapters.combine(params, frozen))

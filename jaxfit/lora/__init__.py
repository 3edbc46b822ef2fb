"""LoRA adapters as parameter-tree leaves, with PEFT-format import and export.

* :mod:`jaxfit.lora.adapters`: :class:`LoraWeight` (a weight leaf over any base kernel),
  :func:`add_lora`, :func:`split_trainable` / :func:`combine`, :func:`merge`,
  :func:`with_dropout_rng`, :func:`trainable_report`.
* :mod:`jaxfit.lora.targets`: target rules (PEFT short names, ``"all-linear"``, regexes).
* :mod:`jaxfit.lora.peft_io`: :func:`save_peft` / :func:`load_peft`
  (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from jaxfit.lora.adapters import (
    LoraWeight,
    add_lora,
    combine,
    dense_kernel,
    init_adapter,
    is_lora,
    lora_leaves,
    lora_scale,
    map_lora,
    merge,
    split_trainable,
    trainable_report,
    trainable_summary,
    unwrap,
    with_dropout_rng,
    without_dropout_rng,
)
from jaxfit.lora.peft_io import load_peft, save_peft
from jaxfit.lora.targets import ALL_LINEAR, PEFT_SHORT_NAMES, select

__all__ = [
    "ALL_LINEAR",
    "PEFT_SHORT_NAMES",
    "LoraWeight",
    "add_lora",
    "combine",
    "dense_kernel",
    "init_adapter",
    "is_lora",
    "load_peft",
    "lora_leaves",
    "lora_scale",
    "map_lora",
    "merge",
    "save_peft",
    "select",
    "split_trainable",
    "trainable_report",
    "trainable_summary",
    "unwrap",
    "with_dropout_rng",
    "without_dropout_rng",
]

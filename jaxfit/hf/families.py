"""The model families jaxfit knows, one :class:`Family` entry each: the registry.

An entry holds everything jaxfit knows about a family: its name and task, the Hugging Face
``model_type`` s it reads, its config and linen module classes, its HF name map (the
functions of ``jaxfit/hf/<family>.py``, referenced, not copied), the name of its scanned
layer stack, its PEFT ``target_modules`` short names and, for decoders, which config
fields hold the sizes a task needs. Every place that needs a family fact reads it here:

* :mod:`jaxfit.hf`: ``model_type`` -> family (``load_pretrained``, ``model_from_config``),
  model -> family (``save_pretrained``);
* :mod:`jaxfit.lora`: PEFT short names (``targets.PEFT_SHORT_NAMES``), PEFT module names
  through the name map (``peft_io``);
* :func:`jaxfit.hf.load_pretrained` and the callers of :func:`jaxfit.quant.quantize_params`
  (tasks, the quantize CLI): the default quantisation rules (every kernel under a stack,
  :data:`DEFAULT_QUANT_RULES`, passed in to ``quant``), name maps for streaming and
  bitsandbytes;
* :mod:`jaxfit.tasks.lm`: config and module classes of ``model.family``, decoder sizes.

Adding a family is one model file (or a config variant of one, as Qwen2 is of Llama) in
``jaxfit/models/``, one name map ``jaxfit/hf/<family>.py`` (``config_from_hf``,
``config_to_hf``, ``rules``, ``IGNORE``; decoders share ``jaxfit.hf.decoder``) and one
entry in :data:`FAMILIES`.

The registry sits in ``jaxfit.hf`` because its entries reference the HF name maps (so
it cannot sit below ``hf``); ``lora`` and ``tasks``, the floors above, import it, and
nothing it imports imports them (``quant``, the floor below, never sees it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from jaxfit.hf import clip as hf_clip
from jaxfit.hf import decoder as hf_decoder
from jaxfit.hf import gpt2 as hf_gpt2
from jaxfit.hf import llama as hf_llama
from jaxfit.hf import qwen2 as hf_qwen2
from jaxfit.hf.mapping import Rule
from jaxfit.models import clip, gpt2, llama, qwen2


@dataclasses.dataclass(frozen=True)
class DecoderFields:
    """The names of a decoder config's fields behind the sizes tasks ask for."""

    num_layers: str
    hidden_size: str
    max_positions: str  # the longest sequence the model was trained for / can embed
    vocab_size: str = "vocab_size"


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: the family's name (``config.model.family`` of LM configs).
      task: the jaxfit task that trains it (``config.task``; the task registry,
        ``jaxfit.tasks.TASKS``, refuses a family of an unregistered task).
      model_types: the ``model_type`` values of HF ``config.json`` it reads.
      config_class: its frozen dataclass config (``jaxfit.models.<family>``).
      model_class: its linen module class (instances carry ``.config``).
      config_from_hf: ``(hf_config: dict) -> config``; raises ``ValueError`` for options
        jaxfit does not implement.
      config_to_hf: ``(config) -> dict``, a ``config.json`` that ``transformers`` loads.
      rules: ``(config) -> list[jaxfit.hf.mapping.Rule]``, the name map.
      init_inputs: ``(config) -> dict``, keyword inputs for ``model.init`` (tiny shapes).
      ignore: substrings of HF tensor names that may be present without a rule.
      stack: the parameter-path component of its scanned layer stacks (``h`` for GPT-2,
        ``layers`` for Llama, Qwen2 and both CLIP towers).
      peft_targets: the PEFT ``target_modules`` short names of its linear layers (HF
        module names, which jaxfit's parameter paths mirror).
      decoder: for decoder-only LMs, the config fields behind :meth:`num_layers`,
        :meth:`hidden_size`, :meth:`max_positions` and :meth:`vocab_size`; else ``None``.
      canonical_names: optional ``(stored names) -> {rule name: stored name}`` for
        checkpoints whose tensor names differ from what ``transformers`` writes today
        (the original ``gpt2`` Hub checkpoint has no ``transformer.`` prefix).
    """

    name: str
    task: str
    model_types: tuple[str, ...]
    config_class: type
    model_class: type
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    rules: Callable[[Any], list[Rule]]
    init_inputs: Callable[[Any], dict]
    ignore: tuple[str, ...]
    stack: str
    peft_targets: tuple[str, ...]
    decoder: DecoderFields | None = None
    canonical_names: Callable[[Iterable[str]], dict[str, str]] | None = None

    def stored_names(self, names: Iterable[str]) -> dict[str, str]:
        """``{rule name: stored name}`` for a checkpoint's tensor names (identity unless
        the family has ``canonical_names``)."""
        if self.canonical_names is None:
            return {n: n for n in names}
        return self.canonical_names(names)

    def _field(self, config: Any, fact: str) -> int:
        if self.decoder is None:
            raise TypeError(f"{self.name} is not a decoder-only LM: no {fact}")
        return getattr(config, getattr(self.decoder, fact))

    def num_layers(self, config: Any) -> int:
        """Number of decoder layers."""
        return self._field(config, "num_layers")

    def hidden_size(self, config: Any) -> int:
        """Width of the residual stream."""
        return self._field(config, "hidden_size")

    def max_positions(self, config: Any) -> int:
        """The longest sequence the model takes (GPT-2: learned positions; RoPE models:
        the context length they were trained for)."""
        return self._field(config, "max_positions")

    def vocab_size(self, config: Any) -> int:
        """Rows of the token embedding (and columns of the LM head)."""
        return self._field(config, "vocab_size")


_LLAMA_LIKE = dict(
    task="lm",
    init_inputs=hf_decoder.init_inputs,
    stack="layers",
    peft_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    decoder=DecoderFields("num_hidden_layers", "hidden_size", "max_position_embeddings"),
    rules=hf_llama.rules,  # Qwen2's tensors are Llama's (+ q/k/v biases: qkv_bias)
    ignore=hf_llama.IGNORE,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="clip",
            task="clip",
            model_types=("clip",),
            config_class=clip.CLIPConfig,
            model_class=clip.CLIPModel,
            config_from_hf=hf_clip.config_from_hf,
            config_to_hf=hf_clip.config_to_hf,
            rules=hf_clip.rules,
            init_inputs=hf_clip.init_inputs,
            ignore=hf_clip.IGNORE,
            stack="layers",  # text_model/layers, vision_model/layers
            peft_targets=(
                *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
                *("text_projection", "visual_projection"),
            ),
        ),
        Family(
            name="gpt2",
            task="lm",
            model_types=("gpt2",),
            config_class=gpt2.GPT2Config,
            model_class=gpt2.GPT2LMHeadModel,
            config_from_hf=hf_gpt2.config_from_hf,
            config_to_hf=hf_gpt2.config_to_hf,
            rules=hf_gpt2.rules,
            init_inputs=hf_decoder.init_inputs,
            ignore=hf_gpt2.IGNORE,
            stack="h",
            # HF GPT-2 uses transformers' Conv1D; attn.c_proj and mlp.c_proj share a name.
            peft_targets=("c_attn", "c_proj", "c_fc"),
            decoder=DecoderFields("n_layer", "n_embd", "n_positions"),
            canonical_names=hf_gpt2.canonical_names,
        ),
        Family(
            name="llama",
            model_types=("llama",),
            config_class=llama.LlamaConfig,
            model_class=llama.LlamaForCausalLM,
            config_from_hf=hf_llama.config_from_hf,
            config_to_hf=hf_llama.config_to_hf,
            **_LLAMA_LIKE,
        ),
        Family(
            name="qwen2",
            model_types=("qwen2",),
            config_class=qwen2.Qwen2Config,
            model_class=qwen2.Qwen2ForCausalLM,
            config_from_hf=hf_qwen2.config_from_hf,
            config_to_hf=hf_qwen2.config_to_hf,
            **_LLAMA_LIKE,
        ),
    )
}


def names(task: str | None = None) -> list[str]:
    """Sorted family names (of ``task`` only, when given)."""
    return sorted(n for n, f in FAMILIES.items() if task is None or f.task == task)


def get(name: str, task: str | None = None) -> Family:
    """The family called ``name``.

    Raises:
      ValueError: no such family (of ``task``, when given); the message lists the choices.
    """
    family = FAMILIES.get(name)
    if family is None or (task is not None and family.task != task):
        what = "model family" if task is None else f"{task!r} model family"
        raise ValueError(f"unknown {what} {name!r}; expected one of {names(task)}")
    return family


def for_model_type(model_type: str) -> Family:
    """The family of an HF ``model_type``; ``ValueError`` if jaxfit has none."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(f"no jaxfit model family for Hugging Face model_type {model_type!r}")


def for_model(model: Any) -> Family:
    """The family of a jaxfit model: that of the nearest class in ``type(model)``'s MRO
    (a Qwen2 model is a Llama subclass, and Qwen2's).

    Raises:
      TypeError: ``model`` is of no family.
    """
    by_class = {f.model_class: f for f in FAMILIES.values()}
    for cls in type(model).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise TypeError(f"{type(model).__name__} is the model of no jaxfit family ({names()})")


def stack_names() -> tuple[str, ...]:
    """The stack names of all families, each once, in registry order (``("layers", "h")``)."""
    return tuple(dict.fromkeys(f.stack for f in FAMILIES.values()))


# What quantisation selects by default: every kernel inside a layer stack of any family
# (``layers/...`` for Llama, Qwen2 and the CLIP towers, ``h/...`` for GPT-2). Embeddings,
# norms and the LM head stay float, as transformers' bitsandbytes integration keeps them
# (``get_keys_to_not_convert``: the output embedding is skipped). Regular expressions over
# jaxfit parameter paths (:mod:`jaxfit.params`).
DEFAULT_QUANT_RULES: tuple[str, ...] = (rf"(^|/)({'|'.join(stack_names())})/.*kernel$",)

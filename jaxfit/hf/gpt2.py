"""Hugging Face ``gpt2`` checkpoints <-> :class:`jaxfit.models.gpt2.GPT2LMHeadModel`.

HF GPT-2 uses ``Conv1D`` layers whose ``weight`` is already ``[in, out]``
(``transformers/pytorch_utils.py``), so no projection is transposed (unlike
``nn.Linear``); only an untied ``lm_head.weight`` (an ``nn.Linear``) is. Names are those
``GPT2LMHeadModel.save_pretrained`` writes (``transformer.`` prefix); the original
``gpt2`` Hub checkpoint, saved from ``GPT2Model``, has no prefix and is accepted through
:func:`canonical_names`. A tied checkpoint exports no ``lm_head.weight`` and may hold one
on import (ignored).
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxfit.hf import decoder
from jaxfit.hf.mapping import IDENTITY, Rule
from jaxfit.models.gpt2 import GPT2Config

# Causal-mask buffers of old checkpoints and the tied head (read when untied).
IGNORE = (".attn.bias", ".attn.masked_bias", decoder.TIED_HEAD)

_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


def config_from_hf(hf: dict) -> GPT2Config:
    """``GPT2Config`` from an HF ``config.json`` dict.

    Raises:
      ValueError: options jaxfit does not implement (cross-attention, unscaled attention,
        attention scaled by inverse layer index).
    """
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention is not supported")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    return GPT2Config(**decoder.read_fields(hf, GPT2Config, _FIELDS))


def config_to_hf(config: GPT2Config) -> dict:
    """An HF ``config.json`` dict that ``transformers.GPT2LMHeadModel`` loads.

    Dropout rates are written as 0 (jaxfit's GPT-2 has no dropout).
    """
    return decoder.write_fields(
        config,
        _FIELDS,
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=True,
    )


def rules(config: GPT2Config) -> list[Rule]:
    """The name map (Conv1D weights unchanged; an untied ``lm_head`` transposed)."""
    n, h = config.n_layer, "transformer.h.{i}."
    out = [
        Rule("transformer.wte.weight", ("wte", "embedding")),
        Rule("transformer.wpe.weight", ("wpe", "embedding")),
        Rule("transformer.ln_f.weight", ("ln_f", "scale")),
        Rule("transformer.ln_f.bias", ("ln_f", "bias")),
    ]
    for hf_mod, path in [
        ("ln_1", ("ln_1",)),
        ("ln_2", ("ln_2",)),
        ("attn.c_attn", ("attn", "c_attn")),
        ("attn.c_proj", ("attn", "c_proj")),
        ("mlp.c_fc", ("mlp", "c_fc")),
        ("mlp.c_proj", ("mlp", "c_proj")),
    ]:
        w = "scale" if hf_mod.startswith("ln_") else "kernel"
        out.append(Rule(h + hf_mod + ".weight", ("h", *path, w), IDENTITY, n))
        out.append(Rule(h + hf_mod + ".bias", ("h", *path, "bias"), IDENTITY, n))
    return out + decoder.head_rules(config)


def canonical_names(names: Iterable[str]) -> dict[str, str]:
    """Map ``transformer.``-prefixed names to the stored ones (prefix-less old checkpoints)."""
    names = list(names)
    if any(n.startswith("transformer.") for n in names):
        return {n: n for n in names}
    return {(n if n.startswith("lm_head.") else "transformer." + n): n for n in names}

"""Tiny random Hugging Face checkpoints for the tests that load, quantise, fine-tune or
sample one (``jaxfit.hf.load_pretrained`` and everything built on it).

Importable from every test directory as ``hf_testing`` (``tests/`` is on ``sys.path``, as
for ``xla_env`` and ``lm_testing``). Needs torch and transformers: a test without them is
skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The default shape: 2 layers of width 64, grouped-query attention (4 query, 2 KV heads).
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def tiny_llama(
    out: Path,
    *,
    family: str = "llama",
    vocab_size: int = 61,
    max_positions: int = 64,
    seed: int = 0,
    tokenizer=None,
    **fields,
):
    """A random transformers decoder of ``family`` saved to ``out`` with
    ``save_pretrained``; returns the torch model (in eval mode).

    Args:
      out: the directory to write (``config.json`` + ``model.safetensors``).
      family: ``"llama"`` (``LlamaForCausalLM``) or ``"qwen2"`` (``Qwen2ForCausalLM``,
        q/k/v biases).
      vocab_size, max_positions: the config's ``vocab_size`` and
        ``max_position_embeddings``.
      seed: ``torch.manual_seed`` right before the model is built, so the same arguments
        give the same weights.
      tokenizer: a transformers tokenizer saved next to the weights, or ``None``.
      **fields: any other config field (``hidden_size=32``, ``eos_token_id=0``, ...); they
        override :data:`SHAPE`.

    Raises:
      KeyError: an unknown ``family``.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    config = config_cls(
        **{
            **SHAPE,
            "vocab_size": vocab_size,
            "max_position_embeddings": max_positions,
            **fields,
        }
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return model

"""Built-in architectures: the sizes of well-known Hub checkpoints, as their ``config.json``.

``jaxfit.plan --generate --model llama3-8b`` plans these without a download, and recipes
that train one (``configs/llama3_8b_qlora.py``) take its sizes from here. Each entry is the
``config.json`` dict of the named Hub repository restricted to what jaxfit reads (its
``model_type`` and sizes, RoPE settings, special token ids); ``jaxfit.hf.families`` turns it
into a model config as it does a downloaded one.
"""

from __future__ import annotations

from typing import Any

_LLAMA2 = dict(
    model_type="llama",
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    bos_token_id=128000,
    eos_token_id=128001,
)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf, -13b-hf, -70b-hf
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    # meta-llama/Llama-3.1-8B, Llama-3.1-70B
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    # openai-community/gpt2
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768,
                 n_layer=12, n_head=12),
    # Qwen/Qwen2-7B
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=131072,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
}  # fmt: skip


def model_config(name: str) -> dict[str, Any]:
    """The entry ``name`` without ``model_type``: the fields of an LM recipe's
    ``model.config`` (``configs/llama3_8b_qlora.py``).

    Raises:
      KeyError: an unknown name (lists the names).
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; built in: {', '.join(ARCHITECTURES)}")
    return {k: v for k, v in ARCHITECTURES[name].items() if k != "model_type"}

"""Qwen2 (a Llama config variant): parameter layout, config checks, registry lookup,
KV-cached decoding, LoRA short names and NF4 quantisation of its stack.

Parity with ``transformers`` (import, export) is in ``tests/hf/test_lm_hf.py`` (the
``qwen2_*`` cases), PEFT interop in ``tests/lora/test_peft_io.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_testing import forward, random_params

from jaxfit import lora, quant
from jaxfit.hf import families
from jaxfit.models.llama import LlamaForCausalLM
from jaxfit.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

CFG = Qwen2Config(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
B, S = 2, 12
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model_params():
    model = Qwen2ForCausalLM(CFG)
    return model, random_params(model)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def test_config_defaults_and_refusals():
    assert CFG.head_dim == 16 and CFG.qkv_bias and not CFG.attention_bias
    default = Qwen2Config()
    assert (default.vocab_size, default.num_key_value_heads, default.head_dim) == (151936, 32, 128)
    assert default.bos_token_id is None and default.max_position_embeddings == 32768
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        Qwen2Config(use_sliding_window=True)
    with pytest.raises(ValueError, match="q/k/v only"):
        Qwen2Config(attention_bias=True)


def test_registry_knows_qwen2(model_params):
    model, _ = model_params
    family = families.for_model(model)  # a Llama subclass, but its own family
    assert family.name == "qwen2" and family.task == "lm"
    assert families.for_model(LlamaForCausalLM(CFG)).name == "llama"
    assert families.for_model_type("qwen2") is family
    assert families.get("qwen2", task="lm").config_class is Qwen2Config
    assert family.num_layers(CFG) == 2 and family.hidden_size(CFG) == 64
    assert family.max_positions(CFG) == 32768 and family.vocab_size(CFG) == 61
    with pytest.raises(ValueError, match="expected one of"):
        families.get("qwen2", task="clip")


def test_param_tree_has_qkv_biases_only(model_params):
    _, params = model_params
    attn, mlp = params["layers"]["self_attn"], params["layers"]["mlp"]
    assert attn["q_proj"]["bias"].shape == (2, 64)
    assert attn["k_proj"]["bias"].shape == attn["v_proj"]["bias"].shape == (2, 32)
    assert "bias" not in attn["o_proj"] and all("bias" not in m for m in mlp.values())
    assert "lm_head" not in params  # tied


def test_kv_cache_decode_matches_full_forward(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    full = forward(run, model, params, ids)
    cache = model.init_cache(B, S + 4)
    outs = []
    for lo, hi in [(0, 5), *((i, i + 1) for i in range(5, S))]:  # prefill, then one by one
        logits, cache = run(model, params, ids[:, lo:hi], cache, method="decode")
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_lora_short_names_and_all_linear(model_params):
    _, params = model_params
    names = lora.PEFT_SHORT_NAMES["qwen2"]
    assert names == PROJECTIONS
    for name in names:
        assert lora.select(params, name) == [
            p for p in lora.select(params, "all-linear") if p.split("/")[-2] == name
        ]
    assert len(lora.select(params, "all-linear")) == 7  # the stack's kernels; tied head
    adapted = lora.add_lora(params, list(names), rank=4, alpha=8, rng=jax.random.key(0))
    assert len(lora.lora_leaves(adapted)) == 7


def test_nf4_quantises_the_stack(model_params, run):
    """The default rules quantise every kernel of the stack (~9 % relative error per
    matrix, NF4's; biases, norms and embeddings stay float); the model runs the leaves."""
    model, params = model_params
    q = quant.quantize_params(params, families.DEFAULT_QUANT_RULES, "nf4", float_dtype=None)
    deq = quant.dequantize_params(q, jnp.float32)
    for block in ("self_attn", "mlp"):
        for name, sub in q["layers"][block].items():
            assert isinstance(sub["kernel"], quant.NF4Weight), name
            w, w_hat = params["layers"][block][name]["kernel"], deq["layers"][block][name]["kernel"]
            assert 0 < float(jnp.linalg.norm(w_hat - w) / jnp.linalg.norm(w)) < 0.12, name
    assert q["layers"]["self_attn"]["q_proj"]["bias"].dtype == jnp.float32
    assert q["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    ids = _ids((B, S))
    np.testing.assert_allclose(
        forward(run, model, q, ids), forward(run, model, deq, ids), atol=1e-5
    )

"""A tiny Llama with NF4 / int8 weight leaves: same model code, jit, gradients, loading.

Tolerances: the quantised model must equal the float model run on the dequantised
weights (float32 rounding, <= 1e-5), and differ from the original float model by a
relative logit error (``||dlogits|| / ||logits - mean||``) under 0.25 for NF4 (measured
~0.12: ~9 % weight error per matrix, 14 matrices) and 0.03 for int8 (measured ~0.008).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import hf
from jaxfit.hf import load_quantized
from jaxfit.hf.families import DEFAULT_QUANT_RULES as RULES
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM
from jaxfit.quant import (
    Int8Weight,
    NF4Weight,
    dequantize_params,
    error_report,
    quantize_params,
)

# Every projection is 64 x 64: one quantise / dequantise compilation serves all of them.
CFG = LlamaConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.02,
)
TOLERANCE = {"nf4": 0.25, "int8": 0.03}
LEAF = {"nf4": NF4Weight, "int8": Int8Weight}


@pytest.fixture(scope="module")
def setup(jit_fast):
    model = LlamaForCausalLM(CFG)
    params = jit_fast(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)

    @functools.partial(jit_fast, static_argnums=0)
    def apply(model, params, ids):
        return model.apply({"params": params}, ids)

    return model, params, ids, apply


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b - b.mean(-1, keepdims=True)))


def test_default_selection_and_float_dtype(setup):
    _, params, _, _ = setup
    q = quantize_params(params, RULES, "nf4")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(q["layers"]["self_attn"][name]["kernel"], NF4Weight)
    for name in ("gate_proj", "up_proj", "down_proj"):
        leaf = q["layers"]["mlp"][name]["kernel"]
        assert isinstance(leaf, NF4Weight) and leaf.packed.shape[0] == CFG.num_hidden_layers
    assert q["lm_head"]["kernel"].dtype == jnp.bfloat16  # float leaves: bfloat16
    assert q["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert q["layers"]["input_layernorm"]["scale"].dtype == jnp.bfloat16
    kept = quantize_params(params, RULES, "int8", exclude=[r"down_proj"], float_dtype=None)
    assert kept["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.float32
    assert isinstance(kept["layers"]["mlp"]["up_proj"]["kernel"], Int8Weight)


def test_bad_rules(setup):
    _, params, _, _ = setup
    with pytest.raises(ValueError, match=r"match no parameter: \['nonexistent'\]"):
        quantize_params(params, [r"kernel$", "nonexistent"])
    with pytest.raises(ValueError, match="not a float kernel"):
        quantize_params(params, [r"norm/scale$"])
    with pytest.raises(ValueError, match="unknown quantisation method"):
        quantize_params(params, RULES, "fp4")
    with pytest.raises(ValueError, match=r"'nf4' has no option\(s\) \['block_size'\]"):
        quantize_params(params, RULES, "nf4", block_size=32)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_logits_close_to_float_model(setup, method):
    model, params, ids, apply = setup
    q = quantize_params(params, RULES, method, float_dtype=None)
    out = apply(model, q, ids)
    np.testing.assert_allclose(out, apply(model, dequantize_params(q), ids), atol=1e-5)
    assert _rel(out, apply(model, params, ids)) < TOLERANCE[method]
    report = error_report(params, q)["summary"]
    assert report["num_tensors"] == 7
    assert report["num_weights"] == 2 * 7 * 64 * 64
    assert report["rel_frobenius"] < (0.1 if method == "nf4" else 0.01)
    assert report["quantized_bytes"] < report["float_bytes"] / (3 if method == "nf4" else 2)


def test_gradients_flow_through_quantised_layers(setup, jit_fast):
    """QLoRA-style: differentiate the float leaves (here the embedding) through frozen
    NF4 matmuls; the gradient equals that of the dequantised float model."""
    model, params, ids, _ = setup
    q = quantize_params(params, RULES, "nf4", float_dtype=None)

    def loss(emb, tree):
        tree = {**tree, "embed_tokens": {"embedding": emb}}
        return jnp.mean(model.apply({"params": tree}, ids) ** 2)

    emb = params["embed_tokens"]["embedding"]
    g = jit_fast(jax.grad(loss))(emb, q)
    g_ref = jit_fast(jax.grad(loss))(emb, dequantize_params(q))
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7)


def test_load_quantized_streams_a_float_checkpoint(setup, tmp_path):
    model, params, _, _ = setup
    hf.save_pretrained(model, params, tmp_path)
    model2, q = load_quantized(tmp_path, "nf4", dtype=jnp.float32)
    assert model2.config.num_hidden_layers == CFG.num_hidden_layers
    expected = quantize_params(params, RULES, "nf4", float_dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, q, expected)
    _, q8 = load_quantized(tmp_path, "int8", rules=[r"mlp/.*kernel$"])
    assert isinstance(q8["layers"]["mlp"]["up_proj"]["kernel"], Int8Weight)
    assert q8["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="match no parameter"):
        load_quantized(tmp_path, "nf4", rules=["no_such_layer"])

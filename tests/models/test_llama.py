"""Llama model: RoPE, GQA, packed segments, KV-cached decoding, head access, remat.

Parity with ``transformers`` is in ``tests/hf/test_lm_hf.py``. Every forward goes through
one jitted function and (mostly) one input shape, to keep compilations few.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm_testing import forward as _forward
from lm_testing import random_params as _random_params

from jaxfit.models import rope
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 8},
)
B, S = 2, 12


@pytest.fixture(scope="module")
def model_params():
    model = LlamaForCausalLM(CFG)
    return model, _random_params(model)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def test_config_defaults_and_conversion():
    assert CFG.head_dim == 8 and CFG.num_key_value_heads == 2
    assert CFG.rope_scaling == rope.RopeScaling("llama3", 4.0, 1.0, 4.0, 8)
    assert LlamaConfig(num_attention_heads=8, hidden_size=64).num_key_value_heads == 8
    hash(CFG)  # usable as a static jit argument
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_param_tree_layout(model_params):
    _, params = model_params
    attn = params["layers"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (2, 32, 32)
    assert attn["k_proj"]["kernel"].shape == (2, 32, 16)  # 2 KV heads x 8
    assert params["layers"]["mlp"]["gate_proj"]["kernel"].shape == (2, 32, 48)
    assert params["lm_head"]["kernel"].shape == (32, 61)  # untied by default
    assert "bias" not in attn["q_proj"]


def test_rope_rotation_and_llama3_frequencies():
    # Rotating by position p then taking q.k depends on the position difference only.
    inv = rope.inv_frequencies(8, 100.0)
    q, k = np.random.RandomState(0).randn(2, 1, 1, 1, 8).astype(np.float32)
    dots = []
    for p in (0, 5):
        cq, sq = rope.cos_sin(jnp.asarray([[p + 3]]), inv)
        ck, sk = rope.cos_sin(jnp.asarray([[p]]), inv)
        dots.append(float(jnp.sum(rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk))))
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-5)
    # llama3 (inv_freq = 1, .1, .01, .001; wavelengths 2*pi/inv_freq): wavelengths above
    # original / low_freq_factor are divided by the factor, below original /
    # high_freq_factor kept, in between interpolated with s = (original / wavelen - 1) / 3.
    plain = rope.inv_frequencies(8, 10000.0)
    scaled = rope.inv_frequencies(8, 10000.0, CFG.rope_scaling)  # original 8: 2*pi is medium
    s = (8 / (2 * np.pi) - 1) / 3
    np.testing.assert_allclose(scaled[0], (1 - s) / 4 + s, rtol=1e-6)
    np.testing.assert_allclose(scaled[1:], plain[1:] / 4.0, rtol=1e-6)
    kept = rope.inv_frequencies(8, 10000.0, rope.RopeScaling("llama3", 4.0, 1.0, 4.0, 32))
    np.testing.assert_allclose(kept[0], plain[0])  # 2*pi < 32 / 4


def test_gqa_equals_mha_with_repeated_kv_heads(model_params, run):
    """Query head h reads KV head h // 2 (HF ``repeat_kv``)."""
    model, params = model_params
    mha = LlamaForCausalLM(dataclasses.replace(CFG, num_key_value_heads=4))
    attn = dict(params["layers"]["self_attn"])
    for name in ("k_proj", "v_proj"):
        kern = attn[name]["kernel"]  # [L, D, 2 heads * 8]
        attn[name] = {"kernel": kern.reshape(2, 32, 2, 1, 8).repeat(2, axis=3).reshape(2, 32, 32)}
    mha_params = {**params, "layers": {**params["layers"], "self_attn": attn}}
    ids = _ids((B, S))
    np.testing.assert_allclose(
        _forward(run, mha, mha_params, ids), _forward(run, model, params, ids), atol=1e-5
    )


def test_packed_segments_match_separate_documents(model_params, run):
    """Row 0 packs documents a (5 tokens) + b (7); row 1 packs b + a."""
    model, params = model_params
    a, b = _ids((5,), 1), _ids((7,), 2)
    packed = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([b, a])])
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 7 + [2] * 5])
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(7)) + list(range(5))])
    out = _forward(run, model, params, packed, seg, pos)
    alone = _forward(run, model, params, packed)  # causal: a prefix is its document alone
    alone_swapped = _forward(run, model, params, packed[::-1])
    np.testing.assert_allclose(out[0, :5], alone[0, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone_swapped[0, :7], atol=1e-5)
    np.testing.assert_allclose(out[1, :7], alone[1, :7], atol=1e-5)
    np.testing.assert_allclose(out[1, 7:], alone_swapped[1, :5], atol=1e-5)
    mixed = _forward(run, model, params, packed, None, pos)
    assert np.abs(mixed[0, 5:] - alone_swapped[0, :7]).max() > 1e-3


def test_kv_cache_decode_matches_full_forward(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    full = _forward(run, model, params, ids)
    cache = model.init_cache(B, S + 4)  # longer than needed: unused slots are masked
    assert cache.k.shape == (2, B, S + 4, 2, 8)
    outs = []
    for lo, hi in [(0, 5), (5, 8), *((i, i + 1) for i in range(8, S))]:  # prefill, chunk, 1s
        logits, cache = run(model, params, ids[:, lo:hi], cache, method="decode")
        outs.append(logits)
    assert int(cache.index) == S
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_hidden_states_and_head_kernel(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    hidden = run(model, params, ids, method="hidden_states")
    logits = run(model, params, ids)
    np.testing.assert_allclose(run(model, params, hidden, method="logits"), logits, atol=1e-6)
    np.testing.assert_allclose(hidden @ model.head_kernel(params), logits, atol=1e-5)
    tied = LlamaForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=True))
    shapes = jax.eval_shape(tied.init, jax.random.key(1), ids)["params"]
    tparams = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    assert "lm_head" not in tparams
    assert tied.head_kernel(tparams).shape == (CFG.hidden_size, CFG.vocab_size)


def _loss_and_grad(model, params, ids):
    def f(p):
        logits = model.apply({"params": p}, ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return ce.mean(), logits

    return jax.value_and_grad(f, has_aux=True)(params)


def test_remat_policies_same_logits_and_grads(model_params, jit_fast):
    """Every policy gives the no-remat logits and gradients (one compile for all)."""
    model, params = model_params
    variants = [
        model.clone(config=dataclasses.replace(CFG, remat_policy=p)) for p in ("dots", "names")
    ]
    ids = _ids((B, S))
    results = jit_fast(lambda p: [_loss_and_grad(m, p, ids) for m in [model, *variants]])(params)
    (l0, logits0), g0 = results[0]
    for (l1, logits1), g1 in results[1:]:
        np.testing.assert_allclose(logits1, logits0, atol=1e-5)
        np.testing.assert_allclose(l1, l0, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)

"""GPT-2 model: packed segments, KV-cached decoding, head access, remat, dtypes.

Parity with ``transformers`` is in ``tests/hf/test_lm_hf.py``. Every forward goes through
one jitted function and (mostly) one input shape, to keep compilations few.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm_testing import forward as _forward
from lm_testing import random_params as _random_params

from jaxfit.models.gpt2 import GPT2Config, GPT2LMHeadModel

CFG = GPT2Config(
    vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2
)
B, S = 2, 12


@pytest.fixture(scope="module")
def model_params():
    model = GPT2LMHeadModel(CFG)
    return model, _random_params(model)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def test_param_tree_layout(model_params):
    _, params = model_params
    assert params["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
    assert params["h"]["mlp"]["c_fc"]["kernel"].shape == (2, 32, 128)
    assert params["wpe"]["embedding"].shape == (32, 32)
    assert "lm_head" not in params  # tied


def test_packed_segments_match_separate_documents(model_params, run):
    """Row 0 packs documents a (5 tokens) + b (7); row 1 packs b + a."""
    model, params = model_params
    a, b = _ids((5,), 1), _ids((7,), 2)
    packed = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([b, a])])
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 7 + [2] * 5])
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(7)) + list(range(5))])
    out = _forward(run, model, params, packed, seg, pos)
    # A document alone = the prefix of a causal forward that starts with it.
    alone = _forward(run, model, params, packed)
    alone_swapped = _forward(run, model, params, packed[::-1])
    np.testing.assert_allclose(out[0, :5], alone[0, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone_swapped[0, :7], atol=1e-5)
    np.testing.assert_allclose(out[1, :7], alone[1, :7], atol=1e-5)
    np.testing.assert_allclose(out[1, 7:], alone_swapped[1, :5], atol=1e-5)
    # Without segment_ids the second document sees the first: a real difference.
    mixed = _forward(run, model, params, packed, None, pos)
    assert np.abs(mixed[0, 5:] - alone_swapped[0, :7]).max() > 1e-3


def test_default_arguments(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    np.testing.assert_allclose(
        run(model, params, ids), _forward(run, model, params, ids), atol=1e-6
    )


def test_kv_cache_decode_matches_full_forward(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    full = _forward(run, model, params, ids)
    cache = model.init_cache(B, S)
    assert cache.k.shape == (2, B, S, 4, 8) and int(cache.index) == 0
    outs = []
    for lo, hi in [(0, 5), (5, 8), *((i, i + 1) for i in range(8, S))]:  # prefill, chunk, 1s
        logits, cache = run(model, params, ids[:, lo:hi], cache, method="decode")
        outs.append(logits)
    assert int(cache.index) == S
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_init_cache_rejects_length_past_positions():
    with pytest.raises(ValueError, match="n_positions"):
        GPT2LMHeadModel(CFG).init_cache(1, CFG.n_positions + 1)


def test_hidden_states_and_head_kernel(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    hidden = run(model, params, ids, method="hidden_states")
    assert hidden.shape == (B, S, CFG.n_embd)
    logits = run(model, params, ids)
    np.testing.assert_allclose(run(model, params, hidden, method="logits"), logits, atol=1e-6)
    kernel = model.head_kernel(params)
    assert kernel.shape == (CFG.n_embd, CFG.vocab_size)
    np.testing.assert_allclose(hidden @ kernel, logits, atol=1e-5)


def test_untied_head():
    model = GPT2LMHeadModel(dataclasses.replace(CFG, tie_word_embeddings=False))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = shapes["params"]
    assert params["lm_head"]["kernel"].shape == (CFG.n_embd, CFG.vocab_size)
    assert model.head_kernel(params) is params["lm_head"]["kernel"]


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
        model.clone(config=dataclasses.replace(CFG, remat_policy=p))
        for p in ("full", "names", "offload")
    ]
    ids = _ids((B, S))
    on_cpu = jax.default_backend() == "cpu"  # offload falls back to names, with a warning
    with pytest.warns(UserWarning, match="offload") if on_cpu else contextlib.nullcontext():
        results = jit_fast(lambda p: [_loss_and_grad(m, p, ids) for m in [model, *variants]])(
            params
        )
    (l0, logits0), g0 = results[0]
    for (l1, logits1), g1 in results[1:]:
        np.testing.assert_allclose(logits1, logits0, atol=1e-5)
        np.testing.assert_allclose(l1, l0, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)


def test_bfloat16_compute_float32_logits(model_params, run):
    model, params = model_params
    ids = _ids((B, S))
    bf16 = model.clone(config=dataclasses.replace(CFG, dtype=jnp.bfloat16))
    out = run(bf16, params, ids)
    assert out.dtype == jnp.float32
    ref = run(model, params, ids)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
    assert bf16.init_cache(1, 4).k.dtype == jnp.bfloat16


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        GPT2Config(activation_function="swish2")
    with pytest.raises(ValueError, match="remat"):
        GPT2Config(remat_policy="sometimes")

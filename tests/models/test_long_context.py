"""Long-context levers of the models: the ``offload`` remat policy (each layer's input in
pinned host memory; gradients equal ``full``) and MLP chunking over the sequence
(gradients equal the unchunked MLP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.lora import adapters as lora_adapters
from jaxfit.models import layers
from jaxfit.models.clip import CLIPConfig, CLIPModel
from jaxfit.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM

ON_GPU = jax.default_backend() == "gpu"
SEQ = 40  # not a multiple of the MLP chunk below: the padded tail is dropped


def _llama(**kw):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, **kw)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gpt2(**kw):
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, **kw))  # fmt: skip


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 97, size=(2, SEQ)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(1, 3, size=(2, SEQ)), axis=1), jnp.int32)
    return ids, seg


def _grads(model, params, ids, seg):
    def loss(p):
        return (model.apply({"params": p}, ids, seg) ** 2).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_mlp_chunking_equals_the_unchunked_mlp(make):
    ids, seg = _batch()
    plain, chunked = make(), make(mlp_chunk_size=16)
    params = plain.init(jax.random.key(0), ids)["params"]
    assert jax.tree.structure(chunked.init(jax.random.key(0), ids)["params"]) == (
        jax.tree.structure(params)
    )  # the same parameter tree: chunking is not a parameter
    l_plain, g_plain = _grads(plain, params, ids, seg)
    l_chunk, g_chunk = _grads(chunked, params, ids, seg)
    np.testing.assert_allclose(l_chunk, l_plain, rtol=1e-6)
    _assert_trees_close(g_chunk, g_plain, rtol=2e-5, atol=1e-7)
    # under full remat and inside a KV-cached decode too
    remat = make(mlp_chunk_size=16, remat_policy="full")
    _assert_trees_close(_grads(remat, params, ids, seg)[1], g_plain, rtol=2e-5, atol=1e-7)


@pytest.mark.slow
def test_clip_mlp_chunking_equals_the_unchunked_mlp():
    cfg = CLIPConfig.tiny()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, size=(3, 16)), jnp.int32)
    px = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain, chunked = CLIPModel(cfg), CLIPModel(cfg.replace(mlp_chunk_size=8))
    params = plain.init(jax.random.key(0), ids, px)["params"]

    def loss(model):
        return lambda p: model.apply({"params": p}, ids, px)["logits_per_text"].sum()

    g_plain = jax.grad(loss(plain))(params)
    g_chunk = jax.jit(jax.grad(loss(chunked)))(params)
    scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(g_plain))
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_plain), strict=True):
        # float32 summation order (x logit scale 14.3): within 1e-5 of the largest gradient
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_mlp_chunking_decodes_like_the_unchunked_model():
    ids, _ = _batch()
    plain, chunked = _llama(), _llama(mlp_chunk_size=16)
    params = plain.init(jax.random.key(0), ids)["params"]
    outs = []
    for model in (plain, chunked):
        cache = model.init_cache(2, SEQ + 1)
        logits, cache = model.apply({"params": params}, ids, cache, method="decode")
        step, _ = model.apply({"params": params}, ids[:, :1], cache, method="decode")
        outs.append((logits, step))
    _assert_trees_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_chunks_draw_their_own_lora_dropout_masks():
    """With a LoRA dropout key attached, block ``i`` of the sequence folds ``i`` into it:
    the dropout pattern does not repeat every ``mlp_chunk_size`` positions."""
    ids, seg = _batch()
    model = _llama(mlp_chunk_size=8)
    params = model.init(jax.random.key(0), ids)["params"]
    lora = lora_adapters.add_lora(params, ["up_proj"], rank=4, alpha=8, rng=jax.random.key(1),
                                  dropout=0.5)  # fmt: skip
    leaf = lora["layers"]["mlp"]["up_proj"]["kernel"]
    leaf = leaf.replace(lora_B=jnp.ones_like(leaf.lora_B))  # make the adapter path visible
    rng = jnp.asarray([[0, 7]] * 3, jnp.uint32)  # one raw key per layer
    folded = [layers._fold_dropout_keys({"k": leaf.replace(dropout_rng=rng)}, i)["k"]
              for i in (0, 1)]  # fmt: skip
    assert not np.array_equal(folded[0].dropout_rng, folded[1].dropout_rng)
    x = jnp.ones((1, 8, 32))
    one = jax.tree.map(lambda a: a[0], folded)  # layer 0's leaf
    y0, y1 = (f.matmul(x, jnp.float32) for f in one)
    assert not np.allclose(y0, y1)  # different masks on the same input


def test_offload_on_cpu_warns_and_equals_full_remat():
    ids, seg = _batch()
    full = _llama(remat_policy="full")
    params = full.init(jax.random.key(0), ids)["params"]
    if jax.default_backend() == "cpu":
        with pytest.warns(UserWarning, match="offload.*layer_input"):
            offload = _llama(remat_policy="offload")
            got = _grads(offload, params, ids, seg)
    else:
        got = _grads(_llama(remat_policy="offload"), params, ids, seg)
    want = _grads(full, params, ids, seg)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    _assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not ON_GPU, reason="pinned host memory offload needs a GPU")
def test_offload_on_gpu_moves_layer_inputs_to_the_host_and_equals_full_remat():
    ids, seg = _batch()
    full = _llama(remat_policy="full", dtype=jnp.bfloat16)
    offload = _llama(remat_policy="offload", dtype=jnp.bfloat16)
    params = full.init(jax.random.key(0), ids)["params"]
    want, got = _grads(full, params, ids, seg), _grads(offload, params, ids, seg)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    _assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-7)

    def loss(p):
        return (offload.apply({"params": p}, ids, seg) ** 2).mean()

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    assert compiled.memory_analysis().host_temp_size_in_bytes >= 3 * 2 * SEQ * 32 * 2
    assert "S(5)" in compiled.as_text()  # XLA's pinned-host memory space


def test_a_chunked_lora_mlp_does_not_repeat_its_dropout_pattern():
    import flax.linen as nn

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.Dense(16, use_bias=False, name="fc")(x)

    class Chunked(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.sequence_chunked(Proj(name="mlp"), x, 8)

    x = jnp.ones((1, 32, 16))  # every position the same input
    params = Chunked().init(jax.random.key(0), x)["params"]
    params = lora_adapters.add_lora(params, ["fc"], rank=4, alpha=8, rng=jax.random.key(1),
                                    dropout=0.5)  # fmt: skip
    leaf = params["mlp"]["fc"]["kernel"]
    params["mlp"]["fc"]["kernel"] = leaf.replace(
        lora_B=jnp.ones_like(leaf.lora_B), dropout_rng=jnp.asarray([0, 7], jnp.uint32)
    )
    y = Chunked().apply({"params": params}, x)[0]
    assert not np.allclose(y[:8], y[8:16])  # block 1 draws another mask than block 0

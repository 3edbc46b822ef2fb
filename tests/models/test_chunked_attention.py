"""Query-chunked attention equals the XLA reference, with masks, GQA and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.models import attention

B, T, H, KV, D = 2, 32, 4, 2, 16


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 8)  # 4 blocks of queries


@pytest.mark.parametrize("masks", ["causal", "causal+segments", "padding", "causal+extra"])
def test_chunked_attention_equals_reference(small_chunks, masks):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k = jax.random.normal(keys[1], (B, T, KV, D))
    v = jax.random.normal(keys[2], (B, T, KV, D))
    kw = {"causal": masks.startswith("causal")}
    if "segments" in masks:
        kw["segment_ids"] = jnp.asarray([[1] * 20 + [2] * 12, [1] * 5 + [2] * 27])
    if masks == "padding":
        kw["padding_mask"] = jnp.asarray(np.arange(T)[None] < np.array([[30], [32]]))
    if "extra" in masks:
        kw["mask"] = jnp.asarray(np.random.default_rng(0).random((B, 1, T, T)) > 0.3)
        kw["mask"] = kw["mask"] | jnp.eye(T, dtype=bool)

    def loss(impl):
        return lambda q, k, v: (
            attention.dot_product_attention(q, k, v, implementation=impl, **kw) ** 2
        ).sum()

    ref = attention.dot_product_attention(q, k, v, implementation="xla", **kw)
    out = attention.dot_product_attention(q, k, v, implementation="chunked", **kw)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_chunked_attention_never_holds_the_full_scores():
    x = jax.ShapeDtypeStruct((1, 2048, 8, 64), jnp.float32)

    def temp(impl):
        f = jax.grad(lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True,
                                                      implementation=impl).sum())  # fmt: skip
        return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    scores = 8 * 2048 * 2048 * 4  # one [heads, T, T] float32: 128 MiB
    block = scores * attention.ATTENTION_CHUNK // 2048  # one block's [heads, 512, T]: 32 MiB
    assert temp("xla") >= 2 * scores  # measured 388 MiB: scores, probabilities, gradients
    assert temp("chunked") <= 3 * block, (temp("chunked"), block)  # measured 77 MiB

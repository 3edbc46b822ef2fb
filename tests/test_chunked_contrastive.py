"""Chunked CLIP contrastive loss (``losses.chunked_contrastive_loss``).

It must be :func:`losses.contrastive_loss` to float rounding (loss, metrics and gradients
w.r.t. both embeddings and ``logit_scale``), for chunk sizes that divide the batch, that do
not, and that fall back to the unchunked loss; and its compiled backward pass must not hold
the ``[B, B]`` logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import losses


def _normed(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _problem(seed=0, n=12, d=8):
    rng = np.random.default_rng(seed)
    img, txt = _normed(rng, n, d), _normed(rng, n, d)
    txt[3], img[7] = img[3], txt[7]  # easy pairs, so accuracies are not trivially 0
    return img, txt, np.float32(np.log(1 / 0.07))


def _loss_and_grads(fn, img, txt, logit_scale, jit):
    grad_fn = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)
    return jit(grad_fn)(img, txt, logit_scale)


@pytest.mark.parametrize("chunk_size", [4, 5, 1, 11, 12, 0, -1, 100])
def test_chunked_equals_unchunked(chunk_size, jit_fast):
    img, txt, logit_scale = _problem()
    chunked = lambda i, t, s: losses.chunked_contrastive_loss(i, t, s, chunk_size=chunk_size)
    (loss, metrics), grads = _loss_and_grads(chunked, img, txt, logit_scale, jit_fast)
    (loss_ref, metrics_ref), grads_ref = _loss_and_grads(
        losses.contrastive_loss, img, txt, logit_scale, jit_fast
    )
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    assert metrics.keys() == metrics_ref.keys()
    for k in metrics_ref:
        np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-6, err_msg=k)
    assert 0 < float(metrics["accuracy_i2t"]) < 1
    for name, g, g_ref in zip(("image", "text", "logit_scale"), grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_chunked_bf16_embeddings_accumulate_in_float32(jit_fast):
    img, txt, logit_scale = _problem(seed=1)
    img, txt = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
    chunked = lambda i, t, s: losses.chunked_contrastive_loss(i, t, s, chunk_size=5)
    (loss, _), grads = _loss_and_grads(chunked, img, txt, logit_scale, jit_fast)
    (loss_ref, _), grads_ref = _loss_and_grads(
        losses.contrastive_loss, img, txt, logit_scale, jit_fast
    )
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=1e-2, atol=1e-3
        )


def test_chunked_backward_does_not_hold_full_logits():
    n, d, chunk = 2048, 64, 128
    img, txt, logit_scale = _problem(seed=2, n=n, d=d)

    def temp_bytes(fn):
        grad_fn = jax.grad(lambda i, t, s: fn(i, t, s)[0], argnums=(0, 1, 2))
        compiled = jax.jit(grad_fn).lower(img, txt, logit_scale).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * n * 4  # 16 MiB
    full = temp_bytes(losses.contrastive_loss)
    chunked = temp_bytes(lambda i, t, s: losses.chunked_contrastive_loss(i, t, s, chunk_size=chunk))
    msg = f"temp bytes: chunked {chunked:,} vs unchunked {full:,} ([B, B] f32: {logits_bytes:,})"
    assert full >= logits_bytes, msg
    assert chunked < full / 4, msg
    assert chunked < logits_bytes / 2, msg


def test_chunked_shape_error():
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
        losses.chunked_contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((5, 8)), 0.0, chunk_size=2)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 7\)"):
        losses.chunked_contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 7)), 0.0, chunk_size=0)

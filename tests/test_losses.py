import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import losses


def _normed(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_logsoftmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_clip_loss(img, txt, logit_scale):
    """float64 reference of CLIP's Fig. 3 pseudo-code."""
    scale = np.exp(min(float(logit_scale), np.log(100.0)))
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    idx = np.arange(len(img))
    loss_i = -_np_logsoftmax(logits)[idx, idx].mean()
    loss_t = -_np_logsoftmax(logits.T)[idx, idx].mean()
    return (loss_i + loss_t) / 2, logits


@pytest.mark.parametrize("logit_scale", [np.log(1 / 0.07), np.log(300.0)])
def test_contrastive_loss_matches_float64_reference(logit_scale):
    rng = np.random.default_rng(0)
    img, txt = _normed(rng, 16, 8), _normed(rng, 16, 8)
    txt[3] = img[3]  # one easy pair, so accuracies are not trivially 0
    loss, m = jax.jit(losses.contrastive_loss)(img, txt, jnp.float32(logit_scale))
    ref, logits = _np_clip_loss(img, txt, logit_scale)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(m["logit_scale"], min(np.exp(logit_scale), 100.0), rtol=1e-6)
    idx = np.arange(16)
    np.testing.assert_allclose(m["accuracy_i2t"], np.mean(logits.argmax(1) == idx))
    np.testing.assert_allclose(m["accuracy_t2i"], np.mean(logits.argmax(0) == idx))


def test_contrastive_loss_matches_transformers():
    torch = pytest.importorskip("torch")
    modeling_clip = pytest.importorskip("transformers.models.clip.modeling_clip")
    # transformers < 5 calls it clip_loss, >= 5 image_text_contrastive_loss.
    hf_loss = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss
    rng = np.random.default_rng(1)
    img, txt = _normed(rng, 12, 32), _normed(rng, 12, 32)
    logit_scale = np.float32(np.log(1 / 0.07))
    # HF: logits_per_text = text @ image.T * logit_scale.exp(); loss = clip_loss(logits_per_text)
    logits_per_text = torch.from_numpy(txt) @ torch.from_numpy(img).T * np.exp(logit_scale)
    ref = hf_loss(logits_per_text.double()).item()
    loss, _ = losses.contrastive_loss(img, txt, logit_scale)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_contrastive_loss_shape_error():
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 7\)"):
        losses.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 7)), 0.0)


# ---------------------------------------------------------------------------------------
# GradCache on a tiny two-tower model.


class Tower(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(16)(x))
        e = nn.Dense(8)(h)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


TOWER = Tower()


@functools.cache
def _init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "image": TOWER.init(k1, jnp.zeros((1, 12)))["params"],
        "text": TOWER.init(k2, jnp.zeros((1, 6)))["params"],
        "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),
    }


def embed_fn(params, batch):
    return {
        "image": TOWER.apply({"params": params["image"]}, batch["image"]),
        "text": TOWER.apply({"params": params["text"]}, batch["text"]),
    }


def loss_fn(params, emb):
    return losses.contrastive_loss(emb["image"], emb["text"], params["logit_scale"])


def full_loss(params, batch):
    return loss_fn(params, embed_fn(params, batch))


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 12)).astype(np.float32)
    # Captions correlated with images, so the loss is far from log(n) and grads are rich.
    txt = img[:, :6] + 0.5 * rng.normal(size=(n, 6)).astype(np.float32)
    return {"image": img, "text": txt}


def _assert_tree_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("k", [2, 4])
def test_gradcache_equals_full_batch_gradient(k, jit_fast):
    params, batch = _init_params(), _batch()
    (ref_loss, ref_m), ref_g = jit_fast(jax.value_and_grad(full_loss, has_aux=True))(params, batch)
    gc = jit_fast(lambda p, b: losses.gradcache(embed_fn, loss_fn, p, b, k))
    (loss, m), g = gc(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ref_m:
        np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-5)
    _assert_tree_close(g, ref_g, rtol=1e-5, atol=1e-7)
    assert np.abs(g["logit_scale"]) > 1e-3  # the direct parameter gradient is included
    assert jax.tree.map(lambda x: x.dtype, g) == jax.tree.map(lambda x: x.dtype, params)


def test_naive_microbatch_accumulation_is_not_exact(jit_fast):
    """Averaging per-micro-batch losses drops the cross-micro-batch negatives."""
    params, batch, k = _init_params(), _batch(), 4
    vg = jit_fast(jax.value_and_grad(full_loss, has_aux=True))
    (ref_loss, _), ref_g = vg(params, batch)
    micro = jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), batch)
    naive_loss, naive_g = 0.0, jax.tree.map(jnp.zeros_like, params)
    for i in range(k):
        mb = jax.tree.map(lambda x, i=i: x[i], micro)
        (li, _), gi = vg(params, mb)
        naive_loss += li / k
        naive_g = jax.tree.map(lambda a, b: a + b / k, naive_g, gi)
    assert abs(naive_loss - ref_loss) > 0.1
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), naive_g, ref_g)))
    assert diff > 1e-2


def test_gradcache_single_micro_batch_is_plain_value_and_grad():
    params, batch = _init_params(), _batch(8)
    (ref_loss, _), ref_g = jax.jit(jax.value_and_grad(full_loss, has_aux=True))(params, batch)
    (loss, _), g = jax.jit(lambda p, b: losses.gradcache(embed_fn, loss_fn, p, b, 1))(params, batch)
    assert loss == ref_loss
    jax.tree.map(np.testing.assert_array_equal, g, ref_g)


def test_gradcache_rejects_indivisible_batch():
    with pytest.raises(ValueError, match=r"leading size 30.*num_micro_batches=4"):
        losses.gradcache(embed_fn, loss_fn, _init_params(), _batch(30), 4)
    with pytest.raises(ValueError, match=">= 1"):
        losses.gradcache(embed_fn, loss_fn, _init_params(), _batch(8), 0)


# ---------------------------------------------------------------------------------------
# Causal LM.


def test_causal_lm_loss_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, :3] = 0  # prompt
    mask[2, 5:] = 0  # padding
    loss, m = jax.jit(losses.causal_lm_loss)(logits, ids, mask)

    labels = torch.from_numpy(ids[:, 1:].astype(np.int64))
    labels[torch.from_numpy(mask[:, 1:] == 0)] = -100
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).double().reshape(-1, v),
        labels.reshape(-1),
        ignore_index=-100,
    ).item()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert m["num_tokens"] == (mask[:, 1:] == 1).sum()
    pred = logits[:, :-1].argmax(-1)
    keep = mask[:, 1:] == 1
    np.testing.assert_allclose(m["accuracy"], (pred == ids[:, 1:])[keep].mean(), rtol=1e-6)

    # HF-style -100 labels without a mask give the same number.
    hf_labels = ids.copy()
    hf_labels[mask == 0] = -100
    loss2, _ = losses.causal_lm_loss(logits, hf_labels)
    np.testing.assert_allclose(loss2, ref, rtol=1e-5)


def test_causal_lm_loss_bf16_logits_and_empty_mask():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 9)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, 9, size=(2, 5)), jnp.int32)
    loss, m = losses.causal_lm_loss(logits, ids, jnp.zeros((2, 5)))
    assert loss.dtype == jnp.float32 and loss == 0.0 and m["num_tokens"] == 0
    loss, _ = losses.causal_lm_loss(logits, ids)
    s, n = losses.cross_entropy(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    np.testing.assert_allclose(loss, s / n, rtol=1e-6)

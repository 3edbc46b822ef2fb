"""CLIPModel: shapes and dtypes, logit scale, EOT pooling, remat invariance, validation.

Numerical parity with transformers is in tests/hf/test_clip_hf.py. Every model run is
jitted (``jit_fast``) once per test: compilation dominates the time of these tiny models.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.models.clip import (
    LOGIT_SCALE_MAX,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    logit_scale_value,
)

TINY = CLIPConfig.tiny()
EOS = TINY.text.eos_token_id  # 99, the largest id of the tiny vocabulary
IDS = np.array([[98, 5, 60, EOS, 0, 0], [98, 7, 8, 9, 10, EOS], [98, EOS, 0, 0, 0, 0]], np.int32)
MASK = (IDS != 0).astype(np.int32)
PIXELS = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params(jit_fast):
    return jit_fast(CLIPModel(TINY).init)(jax.random.key(0), IDS, PIXELS)["params"]


def _contrastive_loss(model, params):
    out = model.apply({"params": params}, IDS, PIXELS, MASK)
    logits = out["logits_per_text"][:2]  # text i <-> image i
    return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, -1))), out


@pytest.fixture(scope="module")
def loss_and_grad(jit_fast):
    """Jitted ``(model, params) -> ((loss, outputs), grads)``; ``model`` is static."""
    grad_fn = jax.value_and_grad(_contrastive_loss, argnums=1, has_aux=True)
    return jit_fast(grad_fn, static_argnums=0)


@pytest.fixture(scope="module")
def reference_grads(loss_and_grad, params):
    """``((loss, outputs), grads)`` of the tiny model without remat."""
    return loss_and_grad(CLIPModel(TINY), params)


def test_outputs_shapes_dtypes_and_relations(reference_grads):
    (_, out), _ = reference_grads
    assert out["image_embeds"].shape == (2, 16) and out["text_embeds"].shape == (3, 16)
    assert out["logits_per_text"].shape == (3, 2) and out["logits_per_image"].shape == (2, 3)
    for v in out.values():
        assert v.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out["logits_per_image"], out["logits_per_text"].T)
    cos = out["text_embeds"] @ out["image_embeds"].T
    np.testing.assert_allclose(out["logits_per_text"], (1 / 0.07) * cos, rtol=1e-5, atol=1e-6)


def test_param_tree_layout(params):
    assert params["logit_scale"].shape == ()
    text, vision = params["text_model"], params["vision_model"]
    assert text["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    assert text["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
    assert text["position_embedding"]["embedding"].shape == (16, 32)
    assert vision["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
    assert vision["position_embedding"]["embedding"].shape == (17, 32)
    assert vision["class_embedding"].shape == (32,)
    assert set(params["visual_projection"]) == {"kernel"}  # no bias
    assert params["text_projection"]["kernel"].shape == (32, 16)


def test_methods_agree_with_call(jit_fast, params, reference_grads):
    (_, out), _ = reference_grads
    model = CLIPModel(TINY)

    def methods(p):
        v = {"params": p}
        return (
            model.apply(v, IDS, PIXELS, MASK, method="embed"),
            model.apply(v, PIXELS, method="encode_image"),
            model.apply(v, IDS, MASK, method="encode_text"),
        )

    (img, txt), img2, txt2 = jit_fast(methods)(params)
    for a, b in [(img, out["image_embeds"]), (img2, img), (txt, out["text_embeds"]), (txt2, txt)]:
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_logit_scale_init_and_clamp(loss_and_grad, params, reference_grads):
    assert math.isclose(float(params["logit_scale"]), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(LOGIT_SCALE_MAX, math.log(100))
    assert math.isclose(float(logit_scale_value(jnp.log(50.0))), 50.0, rel_tol=1e-6)
    assert math.isclose(float(logit_scale_value(jnp.float32(10.0))), 100.0, rel_tol=1e-6)
    assert float(jax.grad(logit_scale_value)(jnp.float32(10.0))) == 0.0
    assert math.isclose(float(jax.grad(logit_scale_value)(jnp.log(50.0))), 50.0, rel_tol=1e-5)
    # the model applies the clamped value
    (_, out), grads = reference_grads
    cos = out["text_embeds"] @ out["image_embeds"].T
    np.testing.assert_allclose(out["logits_per_text"], (1 / 0.07) * cos, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads["logit_scale"])) > 0
    clamped = {**params, "logit_scale": jnp.float32(10.0)}
    (_, out), grads = loss_and_grad(CLIPModel(TINY), clamped)
    np.testing.assert_allclose(out["logits_per_text"], 100.0 * cos, rtol=1e-5, atol=1e-5)
    assert float(grads["logit_scale"]) == 0.0


@pytest.mark.parametrize("eos", [EOS, 50, 2])
def test_eot_pooling(jit_fast, params, eos):
    """Pooling ignores everything after the EOT (causal attention) and finds the EOT as
    transformers does: the first ``== eos_token_id`` position, or ``argmax(ids)`` when
    ``eos_token_id == 2``."""
    config = TINY.replace(text=dataclasses.replace(TINY.text, eos_token_id=eos))
    e = 97 if eos == 2 else eos  # with eos_token_id 2 the EOT is the largest id
    ids = np.array(
        [
            [49, 5, 60, e, e, e],  # padded with the EOT id itself: the first one counts
            [49, 5, 60, e, 1, 3],  # different tokens after the EOT
            [49, 5, e, 60, 1, 3],  # EOT one position earlier
            [49, 5, 60, e, 0, 0],  # the reference row, masked padding
        ],
        np.int32,
    )
    if eos == 2:
        ids[0, 4:] = 0  # argmax returns the first maximum; keep the test about pooling
    mask = np.ones_like(ids)
    mask[3, 4:] = 0
    enc = jit_fast(
        lambda p: CLIPModel(config).apply({"params": p}, ids, mask, method="encode_text")
    )(params)
    for row in (0, 1):
        np.testing.assert_allclose(enc[row], enc[3], atol=1e-6)
    assert not np.allclose(enc[2], enc[3], atol=1e-3)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "names"])
def test_remat_policies_same_outputs_and_grads(loss_and_grad, params, reference_grads, policy):
    got = loss_and_grad(CLIPModel(TINY.replace(remat_policy=policy)), params)
    # bitwise equal with jit_fast on CPU; other backends may fuse differently (~1e-6)
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.tree.map(check, got, reference_grads)


def test_bfloat16_compute_close_to_float32(jit_fast, params, reference_grads):
    (_, ref), _ = reference_grads
    bf16 = CLIPModel(TINY.replace(dtype=jnp.bfloat16))
    out = jit_fast(lambda p: bf16.apply({"params": p}, IDS, PIXELS, MASK))(params)
    for k in ("image_embeds", "text_embeds"):
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(out[k], ref[k], atol=5e-2)
    model = CLIPModel(TINY.replace(param_dtype=jnp.bfloat16))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), IDS, PIXELS))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_input_and_config_validation(params):
    model = CLIPModel(TINY)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(
            lambda p: model.apply(
                {"params": p}, PIXELS.transpose(0, 3, 1, 2), method="encode_image"
            ),
            params,
        )
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(
            lambda p: model.apply({"params": p}, np.ones((1, 17), np.int32), method="encode_text"),
            params,
        )
    with pytest.raises(ValueError, match="num_attention_heads"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="activation"):
        CLIPVisionConfig(hidden_act="swishy")
    with pytest.raises(ValueError, match="remat_policy"):
        TINY.replace(remat_policy="sometimes")


def test_vit_b32_defaults():
    c = CLIPConfig.vit_b32()
    assert (c.vision.image_size, c.vision.patch_size, c.vision.hidden_size) == (224, 32, 768)
    assert (c.text.hidden_size, c.text.max_position_embeddings, c.projection_dim) == (512, 77, 512)
    assert c.vision.num_patches == 49
    shapes = jax.eval_shape(
        lambda: CLIPModel(c).init(
            jax.random.key(0), np.zeros((1, 77), np.int32), np.zeros((1, 224, 224, 3))
        )
    )
    # transformers.CLIPModel(CLIPConfig()).num_parameters() (openai/clip-vit-base-patch32)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 151_277_313

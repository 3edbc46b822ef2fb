"""Which attention runs where (``attention.choose_attention``), its logged fallbacks, the
resolution of ``"auto"`` into the run's config, and the equality of every implementation
with the XLA reference (cuDNN's where a GPU is present)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import tasks
from jaxfit.models import attention

REPO = Path(__file__).resolve().parents[2]
BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16
ON_GPU = jax.default_backend() == "gpu"

# backend, dtype, head_dim, seq_len, batch, segment ids, compute capability -> impl, reason
CASES = [
    ("cpu", BF16, 128, 2048, 1, True, None, "xla", "XLA reference"),
    ("cpu", F32, 64, 32768, 1, True, None, "xla", "XLA reference"),
    ("tpu", BF16, 128, 4096, 1, True, None, "chunked", "no cuDNN"),
    ("tpu", BF16, 128, 256, 1, True, None, "xla", "XLA reference"),
    ("gpu", BF16, 128, 2048, 1, False, "8.9", "cudnn", "MaskType.CAUSAL"),
    ("gpu", F16, 64, 1024, 16, False, "8.0", "cudnn", "sequence lengths"),
    ("gpu", BF16, 128, 2048, 1, True, "8.9", "cudnn", "dense bias"),  # 16 MiB of bias
    ("gpu", BF16, 128, 8192, 1, True, "8.9", "cudnn", "256 MiB"),  # at the limit
    ("gpu", BF16, 128, 16384, 1, True, "8.9", "chunked", "should_export_dbias"),
    ("gpu", BF16, 64, 1024, 128, True, "8.9", "chunked", "should_export_dbias"),  # batch
    ("gpu", BF16, 128, 2047, 1, True, "8.9", "chunked", "even lengths"),
    ("gpu", BF16, 128, 2047, 1, False, "8.9", "cudnn", "MaskType.CAUSAL"),
    ("gpu", F32, 64, 1024, 8, True, "8.9", "chunked", "fp16/bf16, not float32"),
    ("gpu", F32, 64, 512, 8, True, "8.9", "xla", "fp16/bf16, not float32"),  # short
    ("gpu", BF16, 256, 4096, 1, False, "8.9", "chunked", "<= 128"),  # Ada: bwd <= 128
    ("gpu", BF16, 256, 4096, 1, False, "9.0", "cudnn", "MaskType.CAUSAL"),  # Hopper: 256
    ("gpu", BF16, 256, 4096, 1, False, None, "chunked", "<= 128"),  # unknown: 128
    ("gpu", BF16, 72, 4096, 1, False, "9.0", "cudnn", "MaskType.CAUSAL"),
    ("gpu", BF16, 60, 4096, 1, False, "9.0", "chunked", "head_dim % 8"),
    ("gpu", BF16, 64, 4096, 1, False, "7.5", "chunked", "compute capability >= 8.0"),
]


@pytest.mark.parametrize(
    "backend,dtype,head_dim,seq_len,batch,segments,cc,expected,words",
    CASES,
    ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-d{c[2]}-s{c[3]}-b{c[4]}-seg{int(c[5])}-cc{c[6]}"
         for c in CASES],
)  # fmt: skip
def test_choice_and_its_reason(backend, dtype, head_dim, seq_len, batch, segments, cc,
                               expected, words):  # fmt: skip
    impl, reason = attention.choose_attention(
        backend, dtype, head_dim, seq_len=seq_len, batch=batch, segment_ids=segments,
        compute_capability=cc,
    )  # fmt: skip
    assert impl == expected, reason
    assert words in reason, reason


def test_fallback_is_xla_only_for_small_scores():
    assert attention.fallback_attention(512) == "xla"
    assert attention.fallback_attention(513) == "chunked"
    assert attention.fallback_attention(1, 32768) == "xla"  # one decoding query: [1, S] scores
    assert attention.fallback_attention(2048, 4096) == "chunked"


def _qkv(b=2, t=40, h=4, kv=2, d=16, dtype=F32, s=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    s = s or t
    q = jax.random.normal(keys[0], (b, t, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, kv, d), dtype)
    v = jax.random.normal(keys[2], (b, s, kv, d), dtype)
    return q, k, v


def test_auto_on_cpu_is_the_reference():
    q, k, v = _qkv()
    seg = jnp.asarray([[1] * 25 + [2] * 15, [1] * 3 + [2] * 37])
    ref = attention.dot_product_attention(
        q, k, v, causal=True, segment_ids=seg, implementation="xla"
    )
    for impl in ("auto", None, ""):
        out = attention.dot_product_attention(
            q, k, v, causal=True, segment_ids=seg, implementation=impl
        )
        np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(ON_GPU, reason="the CPU fallback of an explicit cudnn")
def test_explicit_cudnn_off_gpu_falls_back_and_says_why(caplog):
    attention._logged.clear()
    q, k, v = _qkv(dtype=BF16)
    with caplog.at_level(logging.WARNING, logger="jaxfit.models.layers"):
        out = attention.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
    ref = attention.dot_product_attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_array_equal(out, ref)  # 40 tokens: the fallback is the reference
    assert "instead of cuDNN" in caplog.text and "has no cuDNN" in caplog.text


@pytest.mark.parametrize("impl", ["chunked", "xla"])
@pytest.mark.parametrize("b,t,h,kv,d", [(2, 40, 4, 2, 16), (1, 1030, 8, 8, 32)])
def test_chunked_equals_the_reference_with_every_mask_and_its_gradients(impl, b, t, h, kv, d):
    q, k, v = _qkv(b, t, h, kv, d)
    rng = np.random.default_rng(0)
    seg = jnp.asarray(np.sort(rng.integers(1, 4, size=(b, t)), axis=1))
    pad = jnp.asarray(np.arange(t)[None] < rng.integers(t // 2, t + 1, size=(b, 1)))
    masks = [
        dict(causal=True),
        dict(causal=True, segment_ids=seg),
        dict(causal=False, padding_mask=pad),
        dict(causal=True, padding_mask=pad),
    ]
    for kw in masks:

        def loss(f):
            return lambda q, k, v: (f(q, k, v) ** 2).sum()

        def ref(q, k, v, kw=kw):
            return attention.dot_product_attention(q, k, v, implementation="xla", **kw)

        def out(q, k, v, kw=kw):
            return attention.dot_product_attention(q, k, v, implementation=impl, **kw)

        np.testing.assert_allclose(jax.jit(out)(q, k, v), ref(q, k, v), atol=3e-6)
        g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
        g_out = jax.jit(jax.grad(loss(out), argnums=(0, 1, 2)))(q, k, v)
        for a, r in zip(g_out, g_ref, strict=True):
            np.testing.assert_allclose(a, r, atol=5e-5, rtol=1e-4)


def test_chunked_bfloat16_matches_the_reference_to_bf16_precision():
    q, k, v = _qkv(2, 1100, 8, 2, 64, dtype=BF16)
    ref = attention.dot_product_attention(q, k, v, causal=True, implementation="xla").astype(F32)
    out = attention.dot_product_attention(q, k, v, causal=True, implementation="chunked").astype(
        F32
    )
    err = jnp.abs(out - ref)  # values ~1; a bf16 ulp there is 2^-7 (8-bit mantissa)
    assert float(err.max()) <= 2**-5 and float(err.mean()) <= 2**-10, (err.max(), err.mean())


@pytest.mark.parametrize("index", [0, 7, 300])
@pytest.mark.parametrize("new", [1, 5, 600])
def test_kv_cached_steps_equal_the_reference(index, new):
    """A step of ``new`` queries at cache position ``index`` of a 1,024-entry cache."""
    q, _, _ = _qkv(2, new, 4, 2, 16)
    _, k, v = _qkv(2, new, 4, 2, 16, s=1024, seed=1)
    pos = index + jnp.arange(new)
    mask = (jnp.arange(1024)[None, :] <= pos[:, None])[None, None]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    for impl in ("xla", "chunked", "auto"):
        out = jax.jit(
            lambda q, k, v, i, impl=impl: attention.dot_product_attention(
                q, k, v, causal=True, q_offset=i, implementation=impl
            )
        )(q, k, v, jnp.int32(index))
        np.testing.assert_allclose(out, ref, atol=3e-6, err_msg=impl)


def test_chunked_gradient_memory_grows_linearly_not_quadratically():
    def temp(impl, n):
        x = jax.ShapeDtypeStruct((1, n, 8, 64), BF16)
        seg = jax.ShapeDtypeStruct((1, n), jnp.int32)

        def f(q, k, v, s):
            return attention.dot_product_attention(
                q, k, v, causal=True, segment_ids=s, implementation=impl
            )

        g = jax.grad(lambda q, k, v, s: f(q, k, v, s).astype(F32).sum(), argnums=(0, 1, 2))
        return jax.jit(g).lower(x, x, x, seg).compile().memory_analysis().temp_size_in_bytes

    scores = 8 * 4096 * 4096 * 4  # one [heads, S, S] float32 at 4,096 tokens: 512 MiB
    assert temp("xla", 4096) >= scores
    small, large = temp("chunked", 4096), temp("chunked", 8192)
    # measured on CPU: 75 MiB at 4,096 tokens (block scores and their gradients,
    # [8, 512, 512] float32 each, float32 dK/dV accumulators), 111 MiB at 8,192; the
    # reference: 1,568 MiB
    assert small <= scores // 4, small
    assert large <= 1.6 * small, (small, large)  # [S, S] terms would quadruple


def test_auto_is_resolved_into_the_config_the_run_records(tmp_path, caplog):
    gpt2 = config_lib.load_config(str(REPO / "configs" / "gpt2_scratch.py") + ":demo")
    assert gpt2.model.attention_impl == "auto"  # the configs' default
    with caplog.at_level(logging.INFO, logger="jaxfit.tasks"):
        resolved = tasks.resolve_config(gpt2, tmp_path).config
    expected = "xla" if jax.default_backend() == "cpu" else resolved.model.attention_impl
    assert resolved.model.attention_impl == expected and expected in attention.ATTENTION_IMPLS
    assert "attention: " in caplog.text
    assert tasks.resolve_config(resolved, tmp_path).config.to_dict() == resolved.to_dict()
    path = config_lib.save_config(resolved, tmp_path)
    assert config_lib.load_saved_config(tmp_path).model.attention_impl == expected, path
    explicit = config_lib.load_config(
        str(REPO / "configs" / "gpt2_scratch.py") + ":demo", ["model.attention_impl=chunked"]
    )
    assert tasks.resolve_config(explicit, tmp_path).config.model.attention_impl == "chunked"
    clip = tasks.resolve_config(config_lib.load_config(str(REPO / "configs" / "clip_coco.py")
                                                       + ":demo"), tmp_path).config  # fmt: skip
    assert clip.model.attention_impl == ("xla" if jax.default_backend() == "cpu" else "cudnn")


def test_the_task_builds_its_model_with_the_resolved_implementation(tmp_path):
    from jaxfit.sharding import make_mesh

    config = config_lib.load_config(
        str(REPO / "configs" / "gpt2_scratch.py") + ":demo", ["model.attention_impl=chunked"]
    )
    task = tasks.build_task(config, tmp_path, make_mesh(), abstract=True)
    assert task.model.config.attention_impl == "chunked"


# --- cuDNN on a GPU: the same numbers as the reference --------------------------------------

gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU")


@gpu_only
@pytest.mark.parametrize("kw", ["causal", "causal+segments", "padding", "causal+padding"])
def test_cudnn_equals_the_reference_on_a_gpu(kw):
    b, t = 2, 256
    q, k, v = _qkv(b, t, 8, 2, 64, dtype=BF16)
    args = {"causal": kw.startswith("causal")}
    if "segments" in kw:
        args["segment_ids"] = jnp.asarray(np.repeat([[1, 2, 3, 4]], b, 0).repeat(t // 4, 1))
    if "padding" in kw:
        args["padding_mask"] = jnp.asarray(np.arange(t)[None] < np.array([[200], [256]]))
    cc = attention.gpu_compute_capability()
    choice = attention.choose_attention(
        "gpu", BF16, 64, seq_len=t, batch=b, segment_ids="segments" in kw, compute_capability=cc
    )
    assert choice[0] == "cudnn", choice

    def loss(impl):
        return lambda q, k, v: (
            attention.dot_product_attention(q, k, v, implementation=impl, **args).astype(F32) ** 2
        ).sum()

    ref = attention.dot_product_attention(q, k, v, implementation="xla", **args).astype(F32)
    out = jax.jit(
        lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cudnn", **args)
    )
    np.testing.assert_allclose(out(q, k, v).astype(F32), ref, atol=2e-2)
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g_out, g_ref, strict=True):
        scale = float(jnp.abs(r.astype(F32)).max())
        assert float(jnp.abs(a.astype(F32) - r.astype(F32)).max()) <= 2e-2 * scale
    hlo = jax.jit(out).lower(q, k, v).compile().as_text()
    assert "__cudnn$fmha" in hlo  # the fused kernel ran, not a fallback


@gpu_only
def test_cudnn_decoding_step_equals_the_reference_on_a_gpu():
    q, _, _ = _qkv(2, 1, 8, 2, 64, dtype=BF16)
    _, k, v = _qkv(2, 1, 8, 2, 64, dtype=BF16, s=512, seed=1)
    for index in (0, 100, 511):
        mask = (jnp.arange(512) <= index)[None, None, None]
        ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        out = attention.dot_product_attention(q, k, v, causal=True, q_offset=jnp.int32(index),
                               implementation="cudnn")  # fmt: skip
        np.testing.assert_allclose(out.astype(F32), ref.astype(F32), atol=2e-2)

"""Int8 per-output-channel weights: bitsandbytes parity, error bound, layouts, matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.quant import Int8Weight, quantization_error


def _weight(rng, shape=(96, 40)):
    """HF-layout ``[out, in]`` weights with channel scales over three decades."""
    return (rng.standard_normal(shape) * np.logspace(-2, 1, shape[0])[:, None]).astype(np.float32)


def test_matches_bitsandbytes_int8_vectorwise_quant(np_rng):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight(np_rng)
    cb, scb, _ = F.int8_vectorwise_quant(torch.from_numpy(w.copy()))
    leaf = Int8Weight.quantize(w, layout="hf")
    np.testing.assert_array_equal(np.asarray(leaf.q).T, cb.numpy())
    np.testing.assert_array_equal(np.asarray(leaf.scale), scb.numpy() / np.float32(127))
    deq = F.int8_vectorwise_dequant(cb, scb).numpy()
    np.testing.assert_allclose(np.asarray(leaf.dequantize()).T, deq, rtol=1e-6, atol=0)


def test_error_within_half_a_step(np_rng):
    w = _weight(np_rng).T  # kernel [in, out]
    leaf = Int8Weight.quantize(w)
    scale = np.asarray(leaf.scale)
    err = np.abs(w - np.asarray(leaf.dequantize()))
    assert np.all(err <= scale / 2 * (1 + 1e-5))
    assert np.abs(np.asarray(leaf.q)).max() == 127
    assert quantization_error(w, leaf)["rel_frobenius"] < 0.01


def test_zero_channel_and_stacked_layers(np_rng):
    w = np.stack([_weight(np_rng).T, _weight(np_rng).T])  # [2, in=40, out=96]
    w[1, :, 5] = 0
    leaf = Int8Weight.quantize(w)
    assert leaf.q.shape == (2, 40, 96) and leaf.scale.shape == (2, 96)
    assert leaf.kernel_shape == (40, 96) and leaf.num_weights == 2 * 40 * 96
    assert float(leaf.scale[1, 5]) == 0 and not np.any(np.asarray(leaf.q)[1, :, 5])
    for i in range(2):
        one = Int8Weight.quantize(w[i].T, layout="hf")
        np.testing.assert_array_equal(leaf.q[i], one.q)
        np.testing.assert_array_equal(leaf.scale[i], one.scale)
    assert np.all(np.isfinite(leaf.dequantize()))


def test_matmul_dtypes_and_gradient(np_rng):
    leaf = Int8Weight.quantize(_weight(np_rng).T)
    x = jnp.asarray(np_rng.standard_normal((3, 40)), jnp.float32)
    f = jax.jit(lambda lf, x: lf.matmul(x, jnp.float32))
    np.testing.assert_allclose(f(leaf, x), x @ leaf.dequantize(), rtol=1e-5, atol=1e-5)
    y16 = leaf.matmul(x, jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    ref16 = x.astype(jnp.bfloat16).astype(jnp.float32) @ leaf.dequantize()  # codes are exact
    np.testing.assert_allclose(y16.astype(jnp.float32), ref16, rtol=1e-2, atol=1e-3)
    g = jax.grad(lambda x: leaf.matmul(x, jnp.float32).sum())(x)
    np.testing.assert_allclose(g[0], leaf.dequantize().sum(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one layer"):
        Int8Weight.quantize(np.ones((2, 4, 4), np.float32)).matmul(x[:, :4], jnp.float32)

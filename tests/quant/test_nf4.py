"""NF4 against bitsandbytes (CPU): code tables, packed bytes, statistics, dequantisation.

The reference is ``bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64)``
and ``dequantize_4bit``. Its nested 8-bit step runs, on CPU, a native kernel whose
binary search picks a non-nearest code for ~0.3 % of values near midpoints; the exact
comparison of those bytes is against bitsandbytes' reference backend (the
``CompositeExplicitAutograd`` kernel of ``bitsandbytes::quantize_blockwise``, the
``torch.bucketize`` path of ``backends/default/ops.py``), which is what NF4Weight mirrors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.quant import NF4Weight, bits_per_weight, leaf_bits, nf4, quantization_error

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 256), (64, 64), (3, 448)]  # HF layout [out, in]


def _weight(shape, seed):
    """Gaussian weights with, in every block, all 16 exact code values and all 15
    midpoints (the rounding ties) scaled by the block's absmax."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2)).astype(np.float32)
    blocks = w.reshape(-1, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    blocks[:, 1:17] = nf4.NF4_CODE * absmax
    blocks[:, 17:32] = nf4._midpoints(nf4.NF4_CODE) * absmax
    return w


def _reference_blockwise(x, code, blocksize):
    """bitsandbytes' reference-backend ``quantize_blockwise`` (see module docstring)."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    q, absmax = op.redispatch(keys, x, code, blocksize)
    return q.numpy(), absmax.numpy()


def test_code_tables_match_bitsandbytes():
    np.testing.assert_array_equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(nf4.dynamic_map(), F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes_without_double_quant(shape):
    w = _weight(shape, seed=sum(shape))
    packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    leaf = NF4Weight.quantize(w, layout="hf", double_quant=False)
    np.testing.assert_array_equal(np.asarray(leaf.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(leaf.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize_hf()), F.dequantize_4bit(packed, state).numpy()
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes_with_double_quant(shape):
    w = _weight(shape, seed=sum(shape) + 1)
    t = torch.from_numpy(w)
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    leaf = NF4Weight.quantize(w, layout="hf")
    np.testing.assert_array_equal(np.asarray(leaf.packed), packed.numpy().reshape(-1))
    # The offset is a float32 mean; torch reduces in another order: a few ulps apart.
    offset = np.float32(state.offset.item())
    assert abs(float(leaf.offset) - float(offset)) <= 4 * np.spacing(offset)

    # With bitsandbytes' offset, the 8-bit statistics are the reference backend's bytes.
    leaf = NF4Weight.quantize(w, layout="hf", offset=offset)
    _, plain = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
    ref_q, ref_nested = _reference_blockwise(plain.absmax - state.offset, state.state2.code, 256)
    np.testing.assert_array_equal(np.asarray(leaf.absmax), ref_q)
    np.testing.assert_array_equal(np.asarray(leaf.nested_absmax), ref_nested)
    np.testing.assert_array_equal(np.asarray(leaf.nested_code), state.state2.code.numpy())
    # ... and the native CPU kernel agrees except for rare near-midpoint picks.
    assert np.mean(np.asarray(leaf.absmax) != state.absmax.numpy()) < 0.02
    np.testing.assert_array_equal(np.asarray(leaf.nested_absmax), state.state2.absmax.numpy())

    # bitsandbytes dequantises our statistics to exactly our weights.
    state.absmax = torch.from_numpy(np.array(leaf.absmax))
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize_hf()), F.dequantize_4bit(packed, state).numpy()
    )


def test_rounding_ties_codes_and_zero_blocks():
    mids = nf4._midpoints(nf4.NF4_CODE)
    block = np.concatenate([nf4.NF4_CODE, mids, np.zeros(33, np.float32)])  # absmax 1
    w = np.stack([block, np.zeros(64, np.float32)])  # second block all zero
    leaf = NF4Weight.quantize(w, layout="hf", double_quant=False)
    p = np.asarray(leaf.packed)
    idx = np.stack([p >> 4, p & 15], -1).reshape(-1)
    np.testing.assert_array_equal(idx[:16], np.arange(16))  # exact values -> their code
    np.testing.assert_array_equal(idx[16:31], np.arange(15))  # a midpoint -> lower code
    np.testing.assert_array_equal(idx[64:], 7)  # zero block -> the exact zero
    np.testing.assert_array_equal(np.asarray(leaf.absmax), [1.0, 0.0])
    ref, _ = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(p, ref.numpy().reshape(-1))


def test_layouts_and_stacked_layers():
    rng = np.random.default_rng(0)
    kernels = rng.standard_normal((3, 64, 96)).astype(np.float32)  # [L, in, out]
    stacked = NF4Weight.quantize(kernels)
    assert stacked.packed.shape == (3, 64 * 96 // 2) and stacked.offset.shape == (3,)
    assert stacked.hf_shape == (96, 64) and stacked.kernel_shape == (64, 96)
    for i in range(3):
        one = NF4Weight.quantize(kernels[i].T, layout="hf")
        layer = jax.tree.map(lambda a, i=i: a[i], stacked)
        jax.tree.map(np.testing.assert_array_equal, layer, one)
    deq = stacked.dequantize()
    assert deq.shape == (3, 64, 96) and deq.dtype == jnp.float32
    np.testing.assert_array_equal(deq, jnp.swapaxes(stacked.dequantize_hf(), -1, -2))
    assert stacked.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_blocksize_must_divide_the_size():
    with pytest.raises(ValueError, match=r"30 elements .* blocksize 64"):
        NF4Weight.quantize(np.ones((3, 10), np.float32))
    with pytest.raises(ValueError, match="blocksize 48"):
        NF4Weight.quantize(np.ones((4, 96), np.float32), blocksize=48)


def test_error_on_gaussian_weights():
    """NF4 of N(0, 1) weights, blocksize 64: relative Frobenius error ~0.092 (documented
    bound 0.1); every element within half the widest code gap of its
    block's absmax without double quantisation (-1 .. -0.6962, 0.152)."""
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    for double_quant in (True, False):
        leaf = NF4Weight.quantize(w, double_quant=double_quant)
        err = quantization_error(w, leaf)
        assert 0.085 < err["rel_frobenius"] < 0.1, err
    deq = np.asarray(leaf.dequantize_hf()).reshape(-1, 64)
    absmax = np.abs(w.T).reshape(-1, 64).max(-1, keepdims=True)
    half_gap = np.diff(nf4.NF4_CODE).max() / 2
    assert np.all(np.abs(w.T.reshape(-1, 64) - deq) <= absmax * half_gap * (1 + 1e-6))


def test_bits_per_weight():
    assert bits_per_weight("nf4") == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits_per_weight("nf4"), 3) == 4.127
    assert bits_per_weight("nf4", double_quant=False) == 4.5
    assert bits_per_weight("int8", in_features=256) == 8.125
    n = 1024 * 1024
    leaf = NF4Weight.quantize(np.ones((1024, 1024), np.float32))
    # measured = closed form + the per-tensor offset (float32) and 256-entry float32 map
    assert leaf_bits(leaf) == pytest.approx(bits_per_weight("nf4") + 8 * (4 + 1024) / n)


def test_matmul_under_jit_and_input_gradient():
    rng = np.random.default_rng(1)
    leaf = NF4Weight.quantize(rng.standard_normal((64, 128)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    y = jax.jit(lambda lf, x: lf.matmul(x, jnp.float32))(leaf, x)
    np.testing.assert_allclose(y, x @ leaf.dequantize(), rtol=1e-6, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(leaf.matmul(x, jnp.float32)))(x)
    np.testing.assert_allclose(g[0, 0], leaf.dequantize().sum(-1), rtol=1e-5, atol=1e-5)
    assert leaf.matmul(x, jnp.bfloat16).dtype == jnp.bfloat16

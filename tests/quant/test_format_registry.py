"""A weight format is one registered class: a test-only int4 format proves it.

``Int4GroupWeight`` below is a symmetric int4 format with one absmax scale per group of 64
input features (the GPTQ / AWQ storage layout without their calibration): registered from
this test with one decorator line, it quantises a tiny Llama through
``jaxfit.quant.quantize_params``, loads a checkpoint through ``jaxfit.hf.load_pretrained``,
reports its cost through ``jaxfit.quant.bits_per_weight`` and appears in every CLI's
``--quant`` / ``--method`` choices, with no edit outside this file. (A real format would
be ``jaxfit/quant/int4.py`` plus one import line in ``jaxfit/quant/__init__.py``.)

References are closed forms and numpy: the codes and scales equal a numpy port of the
definition bit for bit; the dequantised matmul equals numpy's ``x @ (q * scale)`` and its
error against the float matmul is within ``|x| @ (scale / 2)`` (rounding to nearest moves
each weight by at most half a step); the calibration hook picks the clip ratio a numpy
grid search picks (AWQ's ``auto_clip``, Lin et al. 2023, https://arxiv.org/abs/2306.00978,
section 3.2, minimising ``||x w - x Q(w)||``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxfit import evaluate_code, generate, hf, quant, quantize
from jaxfit.hf.families import DEFAULT_QUANT_RULES as RULES
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM
from jaxfit.plan import __main__ as plan_cli
from jaxfit.quant import base

NAME = "int4g_test"
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # the calibration grid


@functools.partial(jax.jit, static_argnames=("group_size", "transpose", "clip"))
def _quantize(w, *, group_size: int, transpose: bool, clip: float):
    w = (jnp.swapaxes(w, -1, -2) if transpose else w).astype(jnp.float32)
    *lead, n_in, n_out = w.shape
    groups = w.reshape(*lead, n_in // group_size, group_size, n_out)
    scale = jnp.max(jnp.abs(groups), axis=-2) * np.float32(clip / 7)  # [..., in/g, out]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None, :]
    q = jnp.clip(jnp.round(groups / safe), -7, 7).reshape(w.shape).astype(jnp.int8)
    nibbles = (q + 8).astype(jnp.uint8)  # 1..15
    packed = (nibbles[..., 0::2, :] << 4) | nibbles[..., 1::2, :]  # [..., in/2, out]
    return packed, scale


class Int4GroupWeight(struct.PyTreeNode, base.WeightLeaf):
    """Symmetric int4 codes in ``[-7, 7]``, two per byte along the input axis, and a
    float32 scale ``absmax * clip / 7`` per group of ``group_size`` inputs and output.

    Attributes:
      packed: uint8 ``[..., in/2, out]``, code ``+ 8`` of input ``2k`` in the high nibble.
      scale: float32 ``[..., in/group_size, out]``.
    """

    packed: jax.Array
    scale: jax.Array
    group_size: int = struct.field(pytree_node=False, default=64)
    dtype: str = struct.field(pytree_node=False, default="float32")

    defaults = {"group_size": 64}

    @classmethod
    def bits_per_weight(cls, in_features: int | None = None, *, group_size: int = 64) -> float:
        """``4 + 32 / group_size``: a 4-bit code per weight, a float32 scale per group."""
        return 4 + 32 / group_size

    @classmethod
    def quantize(cls, w, *, layout="kernel", dtype=None, group_size=64, clip=1.0):
        if np.shape(w)[-1 if layout == "hf" else -2] % group_size:
            raise ValueError(f"in_features of {np.shape(w)} is not a multiple of {group_size}")
        dtype = jnp.dtype(jnp.result_type(w) if dtype is None else dtype).name
        packed, scale = _quantize(
            w, group_size=group_size, transpose=layout == "hf", clip=float(clip)
        )
        return cls(packed=packed, scale=scale, group_size=group_size, dtype=dtype)

    @staticmethod
    def calibrate(w, x, *, group_size=64):
        """The clip ratio of :data:`CLIPS` minimising ``||x w - x Q(w)||_F`` (float32)."""
        w, x = jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)
        leaves = [Int4GroupWeight.quantize(w, group_size=group_size, clip=c) for c in CLIPS]
        errs = [float(jnp.linalg.norm(x @ w - x @ leaf.dequantize("float32"))) for leaf in leaves]
        return leaves[int(np.argmin(errs))]

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return (2 * self.packed.shape[-2], self.packed.shape[-1])

    @property
    def num_weights(self) -> int:
        return 2 * int(np.prod(self.packed.shape, dtype=np.int64))

    def codes(self) -> jax.Array:
        """int8 ``[..., in, out]`` in ``[-7, 7]``."""
        hi = (self.packed >> 4).astype(jnp.int8) - 8
        lo = (self.packed & 15).astype(jnp.int8) - 8
        return jnp.stack([hi, lo], axis=-2).reshape(*self.packed.shape[:-2], -1, hi.shape[-1])

    def dequantize(self, dtype: Any = None) -> jax.Array:
        scale = jnp.repeat(self.scale, self.group_size, axis=-2)
        return (self.codes().astype(jnp.float32) * scale).astype(dtype or self.dtype)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        w = self.dequantize(jnp.float32).astype(dtype)
        return jnp.matmul(x.astype(dtype), w, preferred_element_type=jnp.float32).astype(dtype)


def np_reference(w: np.ndarray, group_size: int = 64, clip: float = 1.0):
    """The format's definition in numpy: ``(codes int8 [in, out], scale float32 [in/g, out])``."""
    w = np.asarray(w, np.float32)
    groups = w.reshape(w.shape[0] // group_size, group_size, w.shape[1])
    scale = np.abs(groups).max(axis=1) * np.float32(clip / 7)
    safe = np.where(scale > 0, scale, np.float32(1))[:, None, :]
    q = np.clip(np.round(groups / safe), -7, 7).reshape(w.shape).astype(np.int8)
    return q, scale.astype(np.float32)


CFG = LlamaConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.02,
)


@pytest.fixture
def int4():
    """The test format, registered for one test (one line), then removed again."""
    cls = base.register(NAME)(Int4GroupWeight)
    yield cls
    base.unregister(NAME)


@pytest.fixture(scope="module")
def tiny(jit_fast):
    model = LlamaForCausalLM(CFG)
    params = jit_fast(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    return model, params, ids


def test_registered_everywhere_while_registered(int4):
    assert NAME in quant.names() and quant.format_class(NAME) is int4
    assert quant.options(NAME) == {"group_size": 64}
    assert quant.bits_per_weight(NAME) == 4.5
    assert quant.bits_per_weight(NAME, group_size=128) == 4 + 32 / 128
    for parser, flag in (
        (generate.parser(), "--quant"),
        (evaluate_code.parser(), "--quant"),
        (quantize.parser(), "--method"),
        (plan_cli.generate_parser(), "--quant"),
    ):
        (action,) = [a for a in parser._actions if flag in a.option_strings]
        assert NAME in action.choices, (parser.prog, action.choices)
    base.unregister(NAME)
    try:
        assert NAME not in quant.names()
        assert NAME not in generate.parser()._option_string_actions["--quant"].choices
    finally:
        base.register(NAME)(Int4GroupWeight)


def test_quantises_a_tiny_model_exactly_and_round_trips(int4, tiny):
    model, params, ids = tiny
    q = quant.quantize_params(params, RULES, NAME, float_dtype=None)
    up = q["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, int4) and up.packed.shape == (2, 32, 128)  # [L, in/2, out]
    for path, w in (("up_proj", params["layers"]["mlp"]["up_proj"]["kernel"]),
                    ("down_proj", params["layers"]["mlp"]["down_proj"]["kernel"])):  # fmt: skip
        leaf = q["layers"]["mlp"][path]["kernel"]
        for layer in range(CFG.num_hidden_layers):
            codes, scale = np_reference(np.asarray(w[layer]))
            np.testing.assert_array_equal(np.asarray(leaf.codes()[layer]), codes)
            np.testing.assert_array_equal(np.asarray(leaf.scale[layer]), scale)
            deq = np.asarray(leaf.dequantize("float32")[layer])
            np.testing.assert_array_equal(deq, codes * np.repeat(scale, 64, axis=0))
    # round trip: the dequantised weights lie on the grid, so they quantise to the same
    # codes (the scale is recomputed as absmax / 7 from 7 * scale: equal within an ulp)
    deq = quant.dequantize_params(q, jnp.float32)
    again = quant.quantize_params(deq, RULES, NAME, float_dtype=None)
    for name in ("up_proj", "down_proj", "gate_proj"):
        a, b = again["layers"]["mlp"][name]["kernel"], q["layers"]["mlp"][name]["kernel"]
        np.testing.assert_array_equal(a.packed, b.packed)
        np.testing.assert_allclose(a.scale, b.scale, rtol=2e-7)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-7),
        quant.dequantize_params(again, jnp.float32),
        deq,
    )
    # the model runs the leaves: the same logits as the float model on dequantised weights
    apply = jax.jit(lambda p: model.apply({"params": p}, ids))
    np.testing.assert_allclose(apply(q), apply(quant.dequantize_params(q)), atol=1e-5)
    # the report needs nothing format-specific: measured bits are the closed form
    report = quant.error_report(params, q)["summary"]
    assert report["num_tensors"] == 7
    assert report["bits_per_weight"] == quant.bits_per_weight(NAME) == 4.5
    assert 0 < report["rel_frobenius"] < 0.2


def test_dequantised_matmul_error_has_the_closed_form_bound(int4, np_rng):
    w = np_rng.standard_normal((128, 48)).astype(np.float32) * 0.02
    x = np_rng.standard_normal((5, 128)).astype(np.float32)
    leaf = int4.quantize(w)
    y = np.asarray(leaf.matmul(jnp.asarray(x), jnp.float32), np.float64)
    codes, scale = np_reference(w)
    deq = codes.astype(np.float64) * np.repeat(scale, 64, axis=0)
    np.testing.assert_allclose(y, x.astype(np.float64) @ deq, rtol=1e-5, atol=1e-6)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(y - exact, x.astype(np.float64) @ deq - exact, atol=1e-6)
    bound = np.abs(x.astype(np.float64)) @ (np.repeat(scale, 64, axis=0) / 2)
    assert np.all(np.abs(y - exact) <= bound * (1 + 1e-5) + 1e-6)


def test_loads_a_checkpoint_through_hf_with_its_options(int4, tiny, tmp_path):
    model, params, _ = tiny
    hf.save_pretrained(model, params, tmp_path)
    _, q = hf.load_pretrained(tmp_path, quantize=NAME, quant_options={"group_size": 32})
    ref = quant.quantize_params(params, RULES, NAME, float_dtype=jnp.float32, group_size=32)
    jax.tree.map(np.testing.assert_array_equal, q, ref)
    assert q["layers"]["self_attn"]["q_proj"]["kernel"].group_size == 32
    with pytest.raises(ValueError, match=r"has no option\(s\) \['blocksize'\]"):
        hf.load_pretrained(tmp_path, quantize=NAME, quant_options={"blocksize": 32})


def test_calibration_hook_picks_the_numpy_grid_search_clip(int4, tiny, np_rng):
    _, params, _ = tiny
    path = "layers/mlp/down_proj/kernel"
    w = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"])  # [L, 128, 64]
    # outlier-heavy activations: clipping the largest weights pays off on some layers
    x = (np_rng.standard_normal((2, 16, 128)) * np_rng.gamma(0.5, 2.0, (2, 1, 128))).astype(
        np.float32
    )
    q = quant.quantize_params(params, RULES, NAME, float_dtype=None, calibration={path: x})
    leaf = q["layers"]["mlp"]["down_proj"]["kernel"]
    chosen = []
    for layer in range(CFG.num_hidden_layers):
        errs = []
        for clip in CLIPS:
            codes, scale = np_reference(w[layer], clip=clip)
            deq = codes.astype(np.float64) * np.repeat(scale, 64, axis=0)
            errs.append(np.linalg.norm(x[layer] @ w[layer] - x[layer] @ deq))
        chosen.append(CLIPS[int(np.argmin(errs))])
        codes, scale = np_reference(w[layer], clip=chosen[-1])
        np.testing.assert_array_equal(np.asarray(leaf.codes()[layer]), codes)
        np.testing.assert_array_equal(np.asarray(leaf.scale[layer]), scale)
    assert min(chosen) < 1.0, chosen  # calibration changed something
    # kernels without calibration data are quantised plainly
    plain = np_reference(np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][0]))[0]
    np.testing.assert_array_equal(
        np.asarray(q["layers"]["mlp"]["up_proj"]["kernel"].codes()[0]), plain
    )
    with pytest.raises(ValueError, match="not quantised"):
        quant.quantize_params(params, RULES, NAME, calibration={"lm_head/kernel": x[0]})
    with pytest.raises(ValueError, match=r"needs \[n, in\]"):
        quant.quantize_params(params, RULES, NAME, calibration={path: x[0]})
    with pytest.raises(ValueError, match="'nf4' has no calibration step"):
        quant.quantize_params(params, RULES, "nf4", calibration={path: x})


def test_registering_checks_the_format(int4):
    with pytest.raises(ValueError, match="already registered"):
        base.register(NAME)(quant.NF4Weight)

    class NoCost(struct.PyTreeNode, base.WeightLeaf):
        @classmethod
        def quantize(cls, w, *, layout="kernel", dtype=None):
            raise NotImplementedError

    with pytest.raises(TypeError, match="does not define bits_per_weight"):
        base.register("no_cost")(NoCost)

    class BadDefaults(Int4GroupWeight):
        defaults = {"groupsize": 64}

    with pytest.raises(ValueError, match=r"defaults \['groupsize'\] are not keyword"):
        base.register("bad_defaults")(BadDefaults)
    assert "no_cost" not in quant.names() and "bad_defaults" not in quant.names()

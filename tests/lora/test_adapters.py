"""LoRA leaves: the matmul against materialised ``W0 + scale A B``, PEFT's init, targets,
the trainable/frozen split with optax, merging, dropout, and a quantised base (QLoRA).

Models are tiny jaxfit GPT-2 / Llama with random weights (parameters drawn on the host from
``jax.eval_shape`` so no init program is compiled).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from jaxfit import checkpoint, lora
from jaxfit import params as params_lib
from jaxfit import step as step_lib
from jaxfit.hf import clip as hf_clip
from jaxfit.hf import families
from jaxfit.lora import targets
from jaxfit.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from jaxfit.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM

IDS = np.random.RandomState(0).randint(0, 61, (2, 8))


def _random_params(model, seed=0, std=0.2):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), shapes["params"]
    )


MODELS = {
    "gpt2": GPT2LMHeadModel(
        GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    ),
    "llama": LlamaForCausalLM(
        LlamaConfig(
            vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1,
        )
    ),
}  # fmt: skip
# GPT-2: a regex for the attention c_proj only; Llama: every linear kernel but the head.
TARGETS = {"gpt2": ["c_attn", "attn/c_proj", "c_fc"], "llama": ["all-linear"]}


@pytest.fixture(scope="module")
def apply(jit_fast):
    return jit_fast(lambda model, p, ids: model.apply({"params": p}, ids), static_argnums=0)


def _randomise(params, seed=1, std=0.3):
    """Non-zero A and B in every adapter."""
    rng = np.random.default_rng(seed)

    def fill(_, leaf):
        a = jnp.asarray(rng.normal(0, std, leaf.lora_A.shape), leaf.lora_A.dtype)
        b = jnp.asarray(rng.normal(0, std, leaf.lora_B.shape), leaf.lora_B.dtype)
        return leaf.replace(lora_A=a, lora_B=b)

    return lora.map_lora(fill, params)


def _materialise(params):
    """Reference: ``W0 + scale * A @ B`` computed in float64 numpy."""

    def fold(_, leaf):
        w = np.asarray(leaf.base, np.float64)
        ab = np.matmul(np.asarray(leaf.lora_A, np.float64), np.asarray(leaf.lora_B, np.float64))
        return jnp.asarray(w + leaf.scale * ab, jnp.float32)

    return lora.map_lora(fold, params)


# The smallest weight leaf: int8 codes with one scale per output column, a logical
# ``.shape``, no ``dequantize`` (merging goes through its matmul with the identity).
@struct.dataclass
class ToyInt8:
    codes: jax.Array  # [(L,) in, out] int8
    scales: jax.Array  # [(L,) 1, out] float32

    @classmethod
    def quantise(cls, w):
        s = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        return cls(jnp.round(w / s).astype(jnp.int8), s)

    @property
    def shape(self):
        return self.codes.shape

    def matmul(self, x, dtype):
        return jnp.matmul(x.astype(dtype), self.codes.astype(dtype)) * self.scales.astype(dtype)


def test_matmul_is_eq3_without_materialising():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    leaf = lora.LoraWeight(w, a, b, scale=0.75)
    ref = np.asarray(x, np.float64) @ (
        np.asarray(w, np.float64) + 0.75 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    )
    np.testing.assert_allclose(leaf.matmul(x, jnp.float32), ref, rtol=1e-5, atol=1e-5)
    out16 = leaf.matmul(x, jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, rtol=0.05, atol=0.3)
    # No [in, out] intermediate other than the base kernel itself is formed.
    hlo = jax.jit(lambda x, a, b: lora.LoraWeight(w, a, b, 0.75).matmul(x, jnp.float32))
    dots = [d for d in str(hlo.lower(x, a, b).as_text()).splitlines() if "dot_general" in d]
    assert len(dots) == 3 and not any("tensor<12x10xf32>" in d.split("->")[-1] for d in dots)


def test_init_like_peft_and_scale():
    p = {"a": {"kernel": jnp.ones((400, 30))}, "s": {"kernel": jnp.ones((3, 40, 50))}}
    out = lora.add_lora(p, ["a", "s"], rank=4, alpha=8, rng=jax.random.key(0))
    la, ls = out["a"]["kernel"], out["s"]["kernel"]
    assert la.lora_A.shape == (400, 4) and la.lora_B.shape == (4, 30)
    assert ls.lora_A.shape == (3, 40, 4) and ls.lora_B.shape == (3, 4, 50)
    assert la.scale == 2.0 and la.dropout == 0.0 and la.lora_A.dtype == jnp.float32
    # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    bound = 1 / math.sqrt(400)
    assert np.abs(la.lora_A).max() <= bound and np.abs(la.lora_A).max() > 0.95 * bound
    assert abs(float(jnp.std(la.lora_A)) - bound / math.sqrt(3)) < 0.05 * bound
    assert np.abs(ls.lora_A).max() <= 1 / math.sqrt(40)
    assert not np.any(la.lora_B) and not np.any(ls.lora_B)
    assert not np.allclose(ls.lora_A[0], ls.lora_A[1])  # layers differ
    rs = lora.add_lora(p, ["a"], rank=4, alpha=8, rng=jax.random.key(0), use_rslora=True)
    assert rs["a"]["kernel"].scale == 8 / math.sqrt(4)
    # An adapter depends on (rng, path) only, not on the other targets.
    np.testing.assert_array_equal(rs["a"]["kernel"].lora_A, la.lora_A)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_fresh_is_identity_merged_equals_unmerged(family, apply):
    model = MODELS[family]
    params = _random_params(model)
    ref = apply(model, params, IDS)
    adapted = lora.add_lora(params, TARGETS[family], rank=4, alpha=8, rng=jax.random.key(1))
    np.testing.assert_array_equal(apply(model, adapted, IDS), ref)  # B = 0: exactly

    adapted = _randomise(adapted)
    out = apply(model, adapted, IDS)
    assert np.abs(out - ref).max() > 0.1
    merged = lora.merge(adapted)
    assert not lora.lora_leaves(merged)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(apply(model, merged, IDS), out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(apply(model, _materialise(adapted), IDS), out, rtol=1e-4, atol=1e-4)
    unwrapped = lora.unwrap(adapted)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), unwrapped, params))


def test_targets_short_names_all_linear_regex():
    llama = _random_params(MODELS["llama"])
    assert targets.select(llama, ["q_proj", "v_proj"]) == [
        "layers/self_attn/q_proj/kernel",
        "layers/self_attn/v_proj/kernel",
    ]
    all_linear = targets.select(llama, "all-linear")
    assert len(all_linear) == 7 and "lm_head/kernel" not in all_linear
    assert targets.select(llama, [r"mlp/(gate|up)_proj"]) == [
        "layers/mlp/gate_proj/kernel",
        "layers/mlp/up_proj/kernel",
    ]
    gpt2 = _random_params(MODELS["gpt2"])
    assert targets.select(gpt2, ["c_proj"]) == ["h/attn/c_proj/kernel", "h/mlp/c_proj/kernel"]
    assert len(targets.select(gpt2, ["all-linear"])) == 4  # tied head: no lm_head kernel

    clip_cfg = CLIPConfig(
        text=CLIPTextConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8,
        ),
        vision=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4,
        ),
        projection_dim=8,
    )  # fmt: skip
    inputs = hf_clip.init_inputs(clip_cfg)
    shapes = jax.eval_shape(lambda: CLIPModel(clip_cfg).init(jax.random.key(0), **inputs))["params"]
    names = targets.PEFT_SHORT_NAMES["clip"]
    got = targets.select(shapes, names)
    assert len(got) == 2 * 6 + 2 and "text_projection/kernel" in got
    assert set(targets.select(shapes, "all-linear")) == set(got)  # conv patch kernel excluded


def test_bad_input_raises():
    params = _random_params(MODELS["llama"])
    kw = dict(alpha=8, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="'qproj'"):
        lora.add_lora(params, ["q_proj", "qproj"], rank=4, **kw)
    with pytest.raises(ValueError, match=r"match no parameter: \['norm/scale'\]"):
        lora.add_lora(params, [r"norm/scale"], rank=4, **kw)
    with pytest.raises(
        ValueError, match=r"rank 9 exceeds min\(in, out\) = 8 of layers/self_attn/k"
    ):
        lora.add_lora(params, ["k_proj"], rank=9, **kw)
    for rank in (0, -1, 2.0):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            lora.add_lora(params, ["q_proj"], rank=rank, **kw)
    with pytest.raises(ValueError, match="dropout"):
        lora.add_lora(params, ["q_proj"], rank=2, dropout=1.0, **kw)
    adapted = lora.add_lora(params, ["q_proj"], rank=2, **kw)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(adapted, ["q_proj"], rank=2, **kw)
    with pytest.raises(ValueError, match="stacked leaves"):
        adapted["layers"]["self_attn"]["q_proj"]["kernel"].matmul(jnp.ones((1, 16)), jnp.float32)


def test_split_combine_optax_trains_adapters_only(jit_fast):
    model = MODELS["gpt2"]
    params = _random_params(model)
    adapted = lora.add_lora(params, ["c_attn", "c_fc"], rank=2, alpha=4, rng=jax.random.key(0))
    trainable, frozen = lora.split_trainable(adapted)
    assert set(params_lib.flatten(trainable)) == {
        "h/attn/c_attn/kernel/lora_A",
        "h/attn/c_attn/kernel/lora_B",
        "h/mlp/c_fc/kernel/lora_A",
        "h/mlp/c_fc/kernel/lora_B",
    }
    n_adapter = params_lib.count(trainable)
    assert n_adapter == 2 * (16 * 2 + 2 * 48) + 2 * (16 * 2 + 2 * 64)
    assert lora.trainable_report(adapted) == {
        "trainable": n_adapter,
        "total": params_lib.count(params) + n_adapter,
        "percent": 100 * n_adapter / (params_lib.count(params) + n_adapter),
    }
    assert lora.trainable_summary(adapted).startswith(f"trainable params: {n_adapter:,d} || ")
    # The frozen half holds no adapter arrays; combine restores the tree exactly.
    assert params_lib.count(frozen) == params_lib.count(params)
    restored = lora.combine(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(adapted)

    opt = optax.adamw(1e-2)
    opt_state = opt.init(trainable)
    assert params_lib.count(opt_state) == 2 * n_adapter + 1  # mu, nu (+ the step count)

    def loss(t, frozen, ids):
        logits = model.apply({"params": lora.combine(t, frozen)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jit_fast
    def step(t, s, frozen, ids):  # frozen is an argument, not a baked-in constant
        value, g = jax.value_and_grad(loss)(t, frozen, ids)
        updates, s = opt.update(g, s, t)
        return optax.apply_updates(t, updates), s, value, g

    new_t, _, _, grads = step(trainable, opt_state, frozen, IDS)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    b_grad = grads["h"]["mlp"]["c_fc"]["kernel"]["lora_B"]
    assert float(jnp.abs(b_grad).max()) > 0  # B = 0 gets a gradient through A
    assert float(jnp.abs(new_t["h"]["mlp"]["c_fc"]["kernel"]["lora_B"]).max()) > 0
    with pytest.raises(ValueError, match="no lora_A/lora_B for the adapted kernel h/mlp/c_fc"):
        lora.combine({"h": {"attn": trainable["h"]["attn"]}}, frozen)
    with pytest.raises(ValueError, match="does not adapt"):
        lora.combine({**trainable, "x": {"kernel": {"lora_A": 0, "lora_B": 0}}}, frozen)


def test_dropout_keep_rate_scaling_and_exact_zero_path():
    n = 64
    eye = jnp.eye(n)
    leaf = lora.LoraWeight(jnp.zeros((n, n)), eye, eye, scale=1.0, dropout=0.25)
    x = jnp.ones((256, n))
    np.testing.assert_array_equal(leaf.matmul(x, jnp.float32), x)  # no key: deterministic
    tree = lora.with_dropout_rng({"k": leaf}, jax.random.key(0))
    y = np.asarray(tree["k"].matmul(x, jnp.float32))
    # Inverted dropout: kept inputs are scaled by 1 / (1 - p).
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.01 and abs(y.mean() - 1.0) < 0.02
    y2 = lora.with_dropout_rng({"k": leaf}, jax.random.key(1))["k"].matmul(x, jnp.float32)
    assert not np.array_equal(y, y2)
    assert lora.without_dropout_rng(tree)["k"].dropout_rng is None
    # dropout = 0: no key attached, the tree (and every result) is unchanged.
    exact = leaf.replace(dropout=0.0)
    assert lora.with_dropout_rng({"k": exact}, jax.random.key(0))["k"] is exact


def test_dropout_in_scanned_model(apply):
    model = MODELS["llama"]
    params = _random_params(model)
    adapted = lora.add_lora(
        params, ["q_proj", "down_proj"], rank=2, alpha=2, rng=jax.random.key(0), dropout=0.5
    )
    adapted = _randomise(adapted)
    keyed = lora.with_dropout_rng(adapted, jax.random.key(3))
    key = keyed["layers"]["mlp"]["down_proj"]["kernel"].dropout_rng
    assert key.shape == (2, 2) and key.dtype == jnp.uint32 and not np.array_equal(key[0], key[1])
    det = apply(model, adapted, IDS)
    a = apply(model, keyed, IDS)
    b = apply(model, lora.with_dropout_rng(adapted, jax.random.key(4)), IDS)
    assert np.abs(a - det).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(apply(model, keyed, IDS), a)  # same key, same mask


def test_lora_over_toy_weight_leaf():
    """The adapter wraps any weight leaf; the base product is the leaf's own."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 12, 10)), jnp.float32)
    q = ToyInt8.quantise(w)
    tree = lora.add_lora({"k": {"kernel": q}}, ["k"], rank=2, alpha=2, rng=jax.random.key(0))
    leaf = _randomise(tree)["k"]["kernel"]
    deq = lora.dense_kernel(q)
    assert np.abs(deq - w).max() < 0.05  # the toy int8 round trip
    merged = lora.merge({"k": leaf})["k"]
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(merged, deq + leaf.scale * leaf.lora_A @ leaf.lora_B, atol=1e-5)
    x = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
    per_layer = jax.tree.map(lambda t: t[1], leaf)
    np.testing.assert_allclose(per_layer.matmul(x, jnp.float32), x @ merged[1], atol=1e-4)
    assert lora.trainable_report({"k": leaf})["total"] == 3 * 12 * 10 + 3 * (12 * 2 + 2 * 10)


def test_trainable_half_is_a_checkpointable_train_state(tmp_path):
    """TrainState(params=trainable) saves and restores with jaxfit's orbax Checkpointer."""
    params = _random_params(MODELS["llama"])
    adapted = lora.add_lora(params, ["q_proj", "v_proj"], rank=2, alpha=4, rng=jax.random.key(0))
    trainable, frozen = lora.split_trainable(_randomise(adapted))
    state = step_lib.create_train_state(trainable, optax.adamw(1e-3), jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
        restored, _ = ckpt.restore(checkpoint.to_abstract(jax.eval_shape(lambda: state)))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    combined = lora.combine(restored.params, frozen)
    np.testing.assert_array_equal(
        combined["layers"]["self_attn"]["v_proj"]["kernel"].lora_B,
        trainable["layers"]["self_attn"]["v_proj"]["kernel"]["lora_B"],
    )


def test_qlora_over_nf4(apply, jit_fast):
    """QLoRA (Dettmers et al. 2023): LoRA over jaxfit.quant's NF4 leaves in a scanned model."""
    quant = pytest.importorskip("jaxfit.quant")
    model = MODELS["llama"]
    params = _random_params(model)
    rules = families.DEFAULT_QUANT_RULES
    qparams = quant.quantize_params(params, rules, "nf4", float_dtype=None)
    adapted = lora.add_lora(qparams, "all-linear", rank=2, alpha=4, rng=jax.random.key(0))
    leaf = adapted["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(leaf.base, quant.NF4Weight) and leaf.lora_A.shape == (2, 16, 2)
    np.testing.assert_array_equal(apply(model, adapted, IDS), apply(model, qparams, IDS))
    report = lora.trainable_report(adapted)
    assert report["total"] == params_lib.count(params) + report["trainable"]

    adapted = _randomise(adapted)
    out = apply(model, adapted, IDS)
    merged = jit_fast(lora.merge)(adapted)  # dequantised + delta: float32 kernels
    assert merged["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(apply(model, merged, IDS), out, rtol=1e-4, atol=1e-4)

    trainable, frozen = lora.split_trainable(adapted)
    loss = lambda t, f: model.apply({"params": lora.combine(t, f)}, IDS).mean()
    grads = jit_fast(jax.grad(loss))(trainable, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert float(jnp.abs(grads["layers"]["self_attn"]["q_proj"]["kernel"]["lora_A"]).max()) > 0

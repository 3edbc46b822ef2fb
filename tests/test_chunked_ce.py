"""Chunked cross-entropy (``losses.chunked_cross_entropy``) and its use in ``LMTask``.

It must be the unchunked loss to float rounding (loss and gradients w.r.t. the hidden
states and whatever the head closes over, including LoRA / NF4 weight leaves), and its
compiled backward pass must not hold the ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import losses, objectives, quant
from jaxfit.hf import families
from jaxfit.lora import adapters
from jaxfit.lora import training as lora_training
from jaxfit.models import gpt2, llama

REPO = Path(__file__).resolve().parents[1]


def _assert_trees_close(actual, expected, rtol=1e-5):
    """Leaf-wise ``|a - e| <= rtol * (|e| + max|e|)``: relative, with an absolute floor at
    ``rtol`` of the leaf's scale so that near-zero entries do not fail on rounding."""
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        e = np.asarray(e, np.float64)
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=rtol * scale)


# -- the function on random data ----------------------------------------------------------


def _random_problem(seed=0, shape=(3, 11), d=16, vocab=50):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((*shape, d), np.float32)
    kernel = rng.standard_normal((d, vocab), np.float32) / np.float32(np.sqrt(d))
    targets = rng.integers(0, vocab, shape, dtype=np.int32)
    targets[0, :3] = -100  # HF's ignore index
    mask = (rng.random(shape) > 0.3).astype(np.float32)
    return hidden, kernel, targets, mask


@pytest.mark.parametrize(
    "chunk_size,masked",  # N = 33 tokens: chunks that divide it, that do not, larger than it
    [(1, True), (4, True), (7, True), (11, True), (33, True), (1000, True), (7, False)],
)
def test_chunked_equals_unchunked_loss_and_grads(chunk_size, masked, jit_fast):
    hidden, kernel, targets, mask = _random_problem()
    mask = mask if masked else None

    def unchunked(h, w):
        return losses.cross_entropy(h @ w, targets, mask)

    def chunked(h, w):
        head_fn = lambda x: x @ w
        return losses.chunked_cross_entropy(h, head_fn, targets, mask, chunk_size=chunk_size)

    def value_and_grads(fn):  # ((loss_sum, count), (d mean / d hidden, d mean / d kernel))
        mean = lambda h, w: (lambda s, n: (s / n, (s, n)))(*fn(h, w))
        grad_fn = jax.grad(mean, argnums=(0, 1), has_aux=True)
        return jit_fast(lambda h, w: grad_fn(h, w)[::-1])(hidden, kernel)

    (s_ref, n_ref), grads_ref = value_and_grads(unchunked)
    (s, n), grads = value_and_grads(chunked)
    assert float(n) == float(n_ref) > 0
    np.testing.assert_allclose(s, s_ref, rtol=1e-6)
    assert grads[0].shape == hidden.shape and grads[1].shape == kernel.shape
    _assert_trees_close(grads, grads_ref)
    if masked:  # ignored / masked tokens get exactly zero gradient
        dead = (mask == 0) | (targets < 0)
        assert np.all(np.asarray(grads[0])[dead] == 0.0)


def test_chunked_low_precision_hidden_and_logits(jit_fast):
    # bf16 hidden states and bf16 head output (a bf16 model): the loss still runs in float32
    hidden, kernel, targets, mask = _random_problem(seed=1)
    hidden, kernel = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    head_fn = lambda x: x @ kernel
    s_ref, n_ref = jit_fast(losses.cross_entropy)(head_fn(hidden), targets, mask)
    chunked = lambda h: losses.chunked_cross_entropy(h, head_fn, targets, mask, chunk_size=8)
    s, n = jit_fast(chunked)(hidden)
    assert s.dtype == n.dtype == jnp.float32
    # bf16 matmuls of different shapes may round differently (bf16 eps = 8e-3)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4)
    assert float(n) == float(n_ref)


def test_chunked_rejects_bad_arguments():
    hidden, kernel, targets, mask = _random_problem()
    head_fn = lambda x: x @ kernel
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_cross_entropy(hidden, head_fn, targets, mask, chunk_size=0)
    with pytest.raises(ValueError, match="targets shape"):
        losses.chunked_cross_entropy(hidden, head_fn, targets[:, :-1], None, chunk_size=4)
    with pytest.raises(ValueError, match="mask shape"):
        losses.chunked_cross_entropy(hidden, head_fn, targets, mask[:, :-1], chunk_size=4)


# -- objectives.lm_sum_loss on tiny GPT-2 / Llama ------------------------------------------------

SEQ, VOCAB = 16, 128


def _lm_batch(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    # two packed documents per row: segment ids and positions restart at the boundary
    segment_ids = np.repeat(np.array([[1] * 7 + [2] * 9], np.int32), batch, 0)
    positions = np.repeat(np.array([list(range(7)) + list(range(9))], np.int32), batch, 0)
    loss_mask = (rng.random((batch, SEQ)) > 0.25).astype(np.float32)
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, SEQ), dtype=np.int32),
        "labels": rng.integers(0, VOCAB, (batch, SEQ), dtype=np.int32),
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def _random_params(model, seed=0):
    """Random parameters from the model's shapes (numpy: eager ``model.init`` of a scanned
    stack costs seconds of op-by-op compiles). Norm scales near 1, the rest ~N(0, 0.2)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(seed)

    def sample(path, x):
        noise = 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(noise + (jax.tree_util.keystr(path).endswith("['scale']")))

    return jax.tree_util.tree_map_with_path(sample, shapes["params"])


def _sum_loss_fn(model, chunk_size):
    """The LM objective the task trains with (``objectives.lm_sum_loss``)."""

    def sum_loss(params, batch, frozen=None):
        full = lora_training.full(params, frozen)
        return objectives.lm_sum_loss(model, full, batch, chunk_size=chunk_size)

    return sum_loss


def _mean_loss_and_grads(model, params, batch, chunk_size, jit_fast, frozen=None):
    sum_loss = _sum_loss_fn(model, chunk_size)

    def mean(p):
        loss_sum, count, _ = sum_loss(p, batch, frozen)
        return loss_sum / count

    return jit_fast(jax.value_and_grad(mean))(params)


TINY_MODELS = {
    "gpt2_tied": lambda: gpt2.GPT2LMHeadModel(
        gpt2.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ),
    "llama_untied": lambda: llama.LlamaForCausalLM(
        llama.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ),
}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_lm_task_chunked_loss_matches_unchunked(family, jit_fast):
    model = TINY_MODELS[family]()
    params = _random_params(model)
    batch = _lm_batch()
    loss_ref, grads_ref = _mean_loss_and_grads(model, params, batch, 0, jit_fast)
    # 32 tokens in chunks of 5: the last chunk is padding but for 2 tokens
    loss, grads = _mean_loss_and_grads(model, params, batch, 5, jit_fast)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    _assert_trees_close(grads, grads_ref)


def test_lm_task_chunked_loss_with_nf4_and_lora_weight_leaves(jit_fast):
    # The head itself a weight leaf (LoRA over an NF4 lm_head, beyond what the recipes do):
    # head_fn closes over the leaf, so the chunked loss sees it like the model does.
    model = TINY_MODELS["llama_untied"]()
    lm_head = r"(^|/)lm_head/kernel$"

    def adapted(base):  # jitted: an eager adapter init is op-by-op compiles
        full = adapters.add_lora(
            base, ["all-linear", lm_head], rank=4, alpha=8.0, rng=jax.random.key(1)
        )
        return adapters.split_trainable(full)

    base = quant.quantize_params(_random_params(model), families.DEFAULT_QUANT_RULES + (lm_head,))
    trainable, frozen = jit_fast(adapted)(base)
    assert isinstance(frozen["lm_head"]["kernel"].base, quant.NF4Weight)
    # B = 0 at init would give A no gradient: perturb every adapter
    rng = np.random.default_rng(2)
    noise = lambda x: np.float32(0.05) * rng.standard_normal(x.shape, np.float32)
    trainable = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + noise(x)), trainable)
    batch = _lm_batch(seed=1)
    loss_ref, grads_ref = _mean_loss_and_grads(model, trainable, batch, 0, jit_fast, frozen)
    loss, grads = _mean_loss_and_grads(model, trainable, batch, 6, jit_fast, frozen)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    _assert_trees_close(grads, grads_ref)
    assert float(jnp.abs(grads["lm_head"]["kernel"]["lora_A"]).max()) > 0


# -- memory ------------------------------------------------------------------------------


def test_chunked_backward_does_not_hold_all_logits():
    """XLA's own buffer assignment (CPU): the gradient of the unchunked loss needs
    ``[N, V]`` float32 temporaries (logits and their gradient); chunked, one chunk's."""
    n, d, vocab, chunk = 2048, 64, 32_000, 256
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    targets = jnp.zeros((n,), jnp.int32)
    mask = jnp.ones((n,), jnp.float32)

    def unchunked(h, w):
        return losses.cross_entropy(h @ w, targets, mask)[0]

    def chunked(h, w):
        head_fn = lambda x: x @ w
        return losses.chunked_cross_entropy(h, head_fn, targets, mask, chunk_size=chunk)[0]

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, kernel).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * vocab * 4
    full, chunked_bytes = temp_bytes(unchunked), temp_bytes(chunked)
    assert full >= logits_bytes  # the whole [N, V] logits (here 262 MB) exist
    assert chunked_bytes < full / 4, (chunked_bytes, full)
    assert chunked_bytes < logits_bytes / 2


def test_a_frozen_bf16_head_is_not_copied_transposed():
    """Rows of a ``[R, S, D]`` batch reach the head as one flat ``[R * c, D]`` chunk: a 3-D
    head matmul made XLA:CPU keep a transposed float32 copy of a frozen bf16 head (the
    8B QLoRA plan's 2 GiB regression at 8e9146e), beside the float32 copy of the head as
    stored that every bf16 matmul on a CPU makes. Only the latter may be a temporary."""
    rows, seq, d, vocab = 2, 512, 64, 8192
    hidden = jax.ShapeDtypeStruct((rows, seq, d), jnp.bfloat16)
    head = jax.ShapeDtypeStruct((d, vocab), jnp.bfloat16)
    seen = []

    def loss(h, w):
        def head_fn(x):
            seen.append(x.shape)
            return x @ w

        targets = jnp.zeros((rows, seq), jnp.int32)
        return losses.chunked_cross_entropy(h, head_fn, targets, chunk_size=256)[0]

    compiled = jax.jit(jax.grad(loss)).lower(hidden, head).compile()
    text = compiled.as_text()
    assert f"f32[{vocab},{d}]" not in text  # no transposed float32 copy of the head
    assert set(seen) == {(256, d)}  # 128 positions of each of the 2 rows, flat


# -- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,arg,chunked",
    [
        ("gpt2_scratch", "", False),
        ("gpt2_scratch", "demo", False),
        ("gpt2_finetune", "", False),
        ("gpt2_lora", "", False),
        ("llama_finetune", "", True),
        ("llama_qlora", "", True),
        ("llama_qlora", "demo", False),
    ],
)
def test_lm_configs_set_loss_chunk_size(name, arg, chunked):
    spec = str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else "")
    config = config_lib.load_config(spec)
    size = config.loss_chunk_size
    assert isinstance(size, int) and size >= 0
    assert (size > 0) == chunked
    if chunked:  # a chunk is smaller than the micro-batch's tokens, or it saves nothing
        assert size < config.micro_batch_size * config.seq_len

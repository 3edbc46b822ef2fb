"""``jaxfit.sampling``: greedy decoding token-for-token against ``transformers``' ``generate``,
EOS handling, sampling filters against HF's logits warpers, seeded sampling."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import jaxfit.hf as jhf
from jaxfit import sampling
from jaxfit.models import kv_cache

VOCAB, PROMPT, NEW = 53, 6, 10

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
            initializer_range=0.3, bos_token_id=None, eos_token_id=None,
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
            bos_token_id=None, eos_token_id=None,
        )
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    hf_model = HF_CONFIGS[request.param]().eval()
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    model, params = jhf.load_pretrained(path)
    prompts = np.random.RandomState(0).randint(0, VOCAB, (2, PROMPT))
    return hf_model, model, params, prompts


def _hf_greedy(hf_model, prompts, eos=None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
    return out[:, prompts.shape[1] :].numpy()


def test_greedy_matches_transformers(family):
    hf_model, model, params, prompts = family
    ref = _hf_greedy(hf_model, prompts)
    assert ref.shape == (2, NEW)
    out = sampling.generate(model, params, prompts, max_new_tokens=NEW, temperature=0)
    np.testing.assert_array_equal(out, ref)

    # Stop at EOS: make the 3rd token of sequence 0 the EOS id (not earlier in either row).
    eos = int(ref[0, 2])
    if eos in ref[0, :2] or eos in ref[1, :2]:
        pytest.skip("degenerate random model for this EOS test")
    ref_eos = _hf_greedy(hf_model, prompts, eos)
    out_eos = sampling.generate(
        model, params, prompts, max_new_tokens=NEW, temperature=0, eos_token_id=eos
    )
    n = ref_eos.shape[1]  # HF stops once every row is done; jaxfit always returns NEW
    np.testing.assert_array_equal(out_eos[:, :n], ref_eos)
    assert (out_eos[:, n:] == eos).all()
    np.testing.assert_array_equal(out_eos[0, :3], ref[0, :3])
    assert (out_eos[0, 3:] == eos).all()  # padded with the EOS id after the first EOS


def test_greedy_bf16_weights_match_transformers_bf16(family, tmp_path):
    """bf16 weights and compute on both sides (torch ``.to(bfloat16)``, jaxfit
    ``dtype=bfloat16``): the same greedy tokens, up to a near-tie. The frameworks round
    different intermediates to bf16, so where transformers' two best logits are within
    bf16 rounding the choice may differ; the first differing token (if any) must be such a
    tie (within 2% of the step's logit range in transformers' own scores), and at least
    the first 4 tokens of each row must agree."""
    hf_model, _, _, prompts = family
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16).eval()
    hf_bf16.save_pretrained(tmp_path)
    model, params = jhf.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = sampling.generate(model, params, prompts, max_new_tokens=NEW, temperature=0)
    for row in range(len(prompts)):
        with torch.no_grad():
            ref = hf_bf16.generate(
                torch.tensor(prompts[row : row + 1]), do_sample=False, max_new_tokens=NEW,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                attention_mask=torch.ones((1, prompts.shape[1]), dtype=torch.long),
            )  # fmt: skip
        tokens = ref.sequences[0, prompts.shape[1] :].numpy()
        differ = np.flatnonzero(tokens != out[row])
        if differ.size:
            i = int(differ[0])
            scores = ref.scores[i][0].float().numpy()
            assert i >= 4, (row, i, tokens, out[row])
            gap = scores[tokens[i]] - scores[out[row, i]]
            assert 0 <= gap <= 0.02 * (scores.max() - scores.min()), (row, i, gap)


def test_prompt_lengths_share_one_compiled_program(family):
    """Prompts of 3 to 16 tokens are padded to one bucket (16): one compile, and still
    token-for-token transformers' greedy continuation of each unpadded prompt."""
    hf_model, model, params, _ = family
    rng = np.random.RandomState(1)
    before = sampling._generate._cache_size()
    for length in (3, 7, 11, 16):
        prompts = rng.randint(0, VOCAB, (2, length))
        out = sampling.generate(model, params, prompts, max_new_tokens=NEW, temperature=0)
        np.testing.assert_array_equal(out, _hf_greedy(hf_model, prompts), err_msg=str(length))
    assert sampling._generate._cache_size() - before <= 1
    assert [sampling.prompt_bucket(n) for n in (1, 16, 17, 400)] == [16, 16, 32, 512]
    assert sampling.prompt_bucket(17, limit=20) == 20  # GPT-2: the cache within n_positions
    assert sampling.prompt_bucket(30, limit=20) == 30  # never below the prompt


def test_prefill_in_chunks_matches_transformers(family):
    """A prompt run through the model in chunks of 4 tokens (the KV cache filled chunk by
    chunk, only the last token's logits computed): the last prompt token's logits equal
    transformers' to 1e-5, and greedy decoding is token-for-token transformers'."""
    hf_model, model, params, _ = family
    rng = np.random.RandomState(2)
    for length in (5, 13):  # 2 of 2 chunks and 4 of 4 chunks of the 16-wide bucket
        prompts = rng.randint(0, VOCAB, (2, length))
        assert sampling.prompt_width(length, None, 4) == (16, 4)
        out = sampling.generate(
            model, params, prompts, max_new_tokens=NEW, temperature=0, prefill_chunk=4
        )
        np.testing.assert_array_equal(out, _hf_greedy(hf_model, prompts), err_msg=str(length))
        padded = np.zeros((2, 16), np.int32)
        padded[:, :length] = prompts
        cache = model.init_cache(2, 16)
        last, cache = sampling._prefill(
            model, {"params": params}, jnp.asarray(padded), jnp.int32(length), cache, 4
        )
        with torch.no_grad():
            ref = hf_model(torch.tensor(prompts)).logits[:, -1].numpy()
        np.testing.assert_allclose(np.asarray(last), ref, atol=1e-5, rtol=1e-5)
        assert int(cache.index) == length
    # a width that would pass GPT-2's positions runs in one step
    assert sampling.prompt_width(17, 20, 8) == (20, 0)
    assert sampling.prompt_width(600, None, 512) == (1024, 512)
    assert sampling.prompt_width(9, None, 512) == (16, 0)


def test_int8_kv_cache_error_is_bounded(family):
    """An int8 KV cache (per-(token, head) absmax): each stored value within half a step
    (``scale / 2``) of the float key/value; the cache's bytes by the closed form
    (``head_dim + 4`` per token and head); the logits after a prefill and 4 decoding steps
    within 1% (mean) and 10% (max) of the logits' spread of the float cache's (printed:
    the figures docs/generation.md quotes)."""
    hf_model, model, params, prompts = family
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * 3.0
    codes = kv_cache.Int8KV.quantize(x)
    err = np.abs(np.asarray(codes.dequantize(jnp.float32) - x))
    assert (err <= np.asarray(codes.scale) / 2 + 1e-6).all()
    assert kv_cache.nbytes(32, 1, 8192, 8, 128, jnp.bfloat16) == 2 * 32 * 8192 * 8 * 128 * 2
    assert kv_cache.nbytes(32, 1, 8192, 8, 128, jnp.bfloat16, "int8") == 2 * 32 * 8192 * 8 * 132

    def logits(quant):
        cache = model.init_cache(2, 16, quant)
        out, cache = model.apply({"params": params}, jnp.asarray(prompts), cache, method="decode")
        rows = [out[:, -1]]
        for t in range(4):
            step = jnp.asarray(prompts[:, t : t + 1])
            out, cache = model.apply({"params": params}, step, cache, method="decode")
            rows.append(out[:, -1])
        return np.stack([np.asarray(r) for r in rows])

    ref, got = logits(None), logits("int8")
    assert model.init_cache(2, 16, "int8").k.q.dtype == jnp.int8
    mean, worst = (np.abs(got - ref).mean() / ref.std(), np.abs(got - ref).max() / ref.std())
    print(f"int8 KV cache: |logit error| / logit std: mean {mean:.2e}, max {worst:.2e}")
    assert 0 < mean < 0.01 and worst < 0.1, (mean, worst)


def test_stream_sees_every_token_and_can_stop_a_row(family):
    """``stream`` gets each step's tokens in order (equal to the returned ones, the
    reference being transformers' greedy output) and ends row 0 after its 4th token: row 0
    is padded after it, row 1 runs on unchanged."""
    hf_model, model, params, prompts = family
    if isinstance(hf_model, transformers.LlamaForCausalLM):
        pytest.skip("family-independent; one family keeps compiles few")
    ref = _hf_greedy(hf_model, prompts)
    seen = []

    def stream(tokens, finished):
        seen.append((np.array(tokens), np.array(finished)))
        stop = np.zeros(len(tokens), bool)
        stop[0] = len(seen) == 4
        return stop

    out = sampling.generate(
        model, params, prompts, max_new_tokens=NEW, temperature=0, pad_token_id=0, stream=stream
    )
    assert len(seen) == NEW
    np.testing.assert_array_equal(np.stack([t for t, _ in seen], 1)[1], ref[1])
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_array_equal(out[0, :4], ref[0, :4])
    assert (out[0, 4:] == 0).all()
    assert [bool(f[0]) for _, f in seen] == [False] * 4 + [True] * (NEW - 4)


def test_weights_on_host_generate_the_same_tokens(family):
    """The layer stack in pinned host memory, one layer copied to the device at a time
    (``weights_on_host``): the greedy tokens of the model on the device, and the stack's
    arrays really live in host memory."""
    import dataclasses

    hf_model, model, params, prompts = family
    host_model = type(model)(dataclasses.replace(model.config, weights_on_host=True))
    out = sampling.generate(host_model, params, prompts, max_new_tokens=NEW, temperature=0)
    np.testing.assert_array_equal(out, _hf_greedy(hf_model, prompts))
    placed = host_model.host_params(params)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(placed[model.STACK])}
    assert kinds == {"pinned_host"}
    rest = [v for k, v in placed.items() if k != model.STACK]
    assert {x.sharding.memory_kind for x in jax.tree.leaves(rest)} == {"device"}


def test_single_prompt(family):
    hf_model, model, params, prompts = family
    if isinstance(hf_model, transformers.LlamaForCausalLM):
        pytest.skip("family-independent; one family keeps compiles few")
    out = sampling.generate(model, params, prompts[0], max_new_tokens=NEW, temperature=0)
    batch = sampling.generate(model, params, prompts, max_new_tokens=NEW, temperature=0)
    assert out.shape == (NEW,)
    np.testing.assert_array_equal(out, batch[0])


def test_sampling_top_k1_is_greedy_and_seeded(family):
    _, model, params, prompts = family
    greedy = sampling.generate(model, params, prompts, max_new_tokens=NEW, temperature=0)
    top1 = sampling.generate(
        model, params, prompts, max_new_tokens=NEW, temperature=0.7, top_k=1,
        rng=jax.random.key(3),
    )  # fmt: skip
    np.testing.assert_array_equal(top1, greedy)

    def sample(seed):
        return sampling.generate(
            model, params, prompts, max_new_tokens=NEW, temperature=1.5, top_p=0.95,
            rng=jax.random.key(seed),
        )  # fmt: skip

    a, b, c = sample(0), sample(0), sample(1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, NEW) and a.min() >= 0 and a.max() < VOCAB
    assert (a != c).any()


def test_filters_match_transformers_warpers():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 50).astype(np.float32) * 3
    tied = logits.copy()
    tied[0, :5] = tied[0, 10]  # ties with the k-th value are kept, as in HF
    for k in (1, 5, 50, 80):
        ref = TopKLogitsWarper(k)(None, torch.tensor(tied)).numpy()
        np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(tied, k)), ref)
    for p in (0.05, 0.5, 0.9, 1.0):
        ref = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(sampling.top_p_filter(logits, p)), ref)
    for k, p in ((3, 0.9), (20, 0.5), (20, 0.99)):  # HF order: top-k, then top-p
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, torch.tensor(logits)))
        out = sampling.filter_logits(jnp.asarray(logits), jnp.int32(k), jnp.float32(p))
        np.testing.assert_array_equal(np.asarray(out), ref.numpy())


def test_argument_errors(family):
    _, model, params, prompts = family
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(model, params, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, params, prompts, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        sampling.generate(model, params, np.zeros((1, 0), np.int32), max_new_tokens=2)

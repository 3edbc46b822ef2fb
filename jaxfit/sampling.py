"""Autoregressive generation with a KV cache for the jaxfit causal language models.

``generate`` prefills the prompt in one call of ``model.decode``, then produces one token
per iteration of a ``lax.while_loop`` (which stops early once every sequence has emitted
EOS); prefill and loop are compiled together, once per (model, batch, prompt-length
bucket, ``max_new_tokens``, number of EOS ids). A prompt is padded on the right to its
bucket (:func:`prompt_bucket`: the next power of two, at least 16): the padding comes after
every real token, so causal attention keeps it out of their keys and values, the first
new token is read at the prompt's last position, and decoding starts writing the cache
there, over the padding (a position beyond the write index is masked). So HumanEval's
164 prompts (121 distinct lengths, 54 to 628 GPT-2 tokens) compile 5 programs, not 121.
Temperature, top-k, top-p, the EOS ids, the seed and the true prompt length are run-time
values: changing them does not recompile.

Sampling follows ``transformers``' ``generate`` (``transformers/generation/utils.py``,
``_get_logits_processor``): logits are divided by the temperature
(``TemperatureLogitsWarper``), then filtered by top-k (``TopKLogitsWarper``) and top-p
(``TopPLogitsWarper``, nucleus sampling, Holtzman et al. 2019,
https://arxiv.org/abs/1904.09751), in that order (all in
``transformers/generation/logits_process.py``), and a token is drawn with
``jax.random.categorical``. ``temperature=0`` is greedy decoding (argmax).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxfit.models import kv_cache as kv_cache_lib


def filter_logits(logits: jax.Array, top_k: jax.Array | int, top_p: jax.Array | float) -> jax.Array:
    """Top-k then top-p filtering (``TopKLogitsWarper`` then ``TopPLogitsWarper``).

    One ascending sort serves both filters, and ``top_k``/``top_p`` may be traced values,
    so changing them does not recompile. Tokens whose logit is below the k-th largest are
    set to ``-inf`` (ties with it kept, as in HF); then, over what remains, tokens in the
    low-probability tail whose cumulative probability (ascending order) is ``<= 1 - top_p``
    are removed, always keeping the most likely token (HF, ``min_tokens_to_keep=1``).
    Both removals are applied as a threshold on the logit value, so tokens tied exactly at
    the top-p boundary are all kept where HF's scatter may drop some of them.

    Args:
      logits: ``[..., vocab]`` float32.
      top_k: int in ``[1, vocab]`` (``vocab`` = off; larger values are clipped).
      top_p: float in ``(0, 1]`` (``1`` = off, as HF skips the warper).

    Returns:
      ``logits`` with filtered entries set to ``-inf``.
    """
    vocab = logits.shape[-1]
    asc = jnp.sort(logits, axis=-1)
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
    kth = jax.lax.dynamic_index_in_dim(asc, vocab - k, axis=asc.ndim - 1, keepdims=True)
    asc = jnp.where(asc < kth, -jnp.inf, asc)
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    remove = (cum <= 1 - top_p).at[..., -1].set(False)
    first_kept = jnp.argmax(~remove, axis=-1)[..., None]
    tp = jnp.take_along_axis(asc, first_kept, axis=-1)
    tp = jnp.where(jnp.asarray(top_p) >= 1, -jnp.inf, tp)
    return jnp.where(logits < jnp.maximum(kth, tp), -jnp.inf, logits)


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """``TopKLogitsWarper``: logits below the ``k``-th largest set to ``-inf``."""
    return filter_logits(logits, k, 1.0)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """``TopPLogitsWarper`` (nucleus): keep the most likely tokens holding mass ``> p``."""
    return filter_logits(logits, logits.shape[-1], p)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array,
    top_k: int | jax.Array,
    top_p: float | jax.Array,
) -> jax.Array:
    """Next tokens ``[batch]`` int32 from ``logits [batch, vocab]`` float32.

    ``temperature == 0`` is argmax (a ``lax.cond``, so the sort is skipped at run time);
    otherwise ``categorical(filter_logits(logits / temperature, top_k, top_p))``.
    """

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        filtered = filter_logits(scaled, top_k, top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, draw, None)


MIN_BUCKET = 16


def prompt_bucket(length: int, limit: int | None = None) -> int:
    """The padded prompt length that one compiled program of :func:`generate` serves:
    the next power of two >= ``length``, at least :data:`MIN_BUCKET`, at most ``limit``
    (but never below ``length``)."""
    bucket = max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())
    if limit is not None:
        bucket = min(bucket, int(limit))
    return max(bucket, int(length))


DEFAULT_PREFILL_CHUNK = 512


def _prefill(model, variables, prompt, prompt_len, cache, chunk: int):
    """Run the prompt through ``model`` into ``cache``; return the last prompt token's
    logits ``[batch, vocab]`` float32 and the cache with ``index = prompt_len``.

    ``chunk = 0`` runs the whole (padded) prompt as one step. Otherwise the prompt runs in
    steps of ``chunk`` tokens (its width is a multiple of ``chunk``), only as many as hold
    real tokens (``ceil(prompt_len / chunk)``, a ``while`` loop): the activations of one
    step are those of ``chunk`` tokens (a chunk's queries attend the cache, as a decoding
    step's do), so a long prompt costs the KV cache plus one chunk's activations, not the
    whole prompt's. Only the last prompt token's logits are computed."""
    batch, width = prompt.shape
    if not chunk or chunk >= width:
        last, cache = model.apply(variables, prompt, cache, prompt_len - 1, method="decode")
        return last, cache.replace(index=prompt_len)
    if width % chunk:
        raise ValueError(f"prompt width {width} is not a multiple of prefill_chunk {chunk}")

    def step(i, carry):
        cache, last = carry
        start = i * chunk
        ids = jax.lax.dynamic_slice_in_dim(prompt, start, chunk, axis=1)
        j = prompt_len - 1 - start  # in [0, chunk) in the last step only
        row, cache = model.apply(variables, ids, cache, jnp.clip(j, 0, chunk - 1), method="decode")
        return cache, jnp.where(j < chunk, row, last)

    last = jnp.zeros((batch, model.config.vocab_size), jnp.float32)
    cache, last = jax.lax.fori_loop(0, (prompt_len + chunk - 1) // chunk, step, (cache, last))
    return last, cache.replace(index=prompt_len)


def prompt_width(length: int, limit: int | None, prefill_chunk: int) -> tuple[int, int]:
    """``(width, chunk)``: the padded prompt width one compiled :func:`generate` serves and
    the prefill chunk it runs with (``0``: one step). The width is :func:`prompt_bucket`,
    rounded up to a multiple of ``prefill_chunk`` when it is wider than one chunk; where
    that would pass ``limit`` (GPT-2's learned positions) the prompt runs in one step."""
    width = prompt_bucket(length, limit)
    if not prefill_chunk or width <= prefill_chunk:
        return width, 0
    rounded = -(-width // prefill_chunk) * prefill_chunk
    if limit is not None and rounded > limit:
        return width, 0
    return rounded, prefill_chunk


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "prefill_chunk", "kv_quant", "stream")
)
def _generate(
    model,
    params,
    prompt,
    prompt_len,
    rng,
    temperature,
    top_k,
    top_p,
    eos_ids,
    pad_id,
    *,
    max_new_tokens: int,
    prefill_chunk: int = 0,
    kv_quant: str | None = None,
    stream: Callable | None = None,
):
    batch, bucket = prompt.shape  # prompt_len (traced) real tokens, then padding
    variables = {"params": params}
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def stops(tok, done):
        """Rows that end with ``tok``: an EOS id, or ``stream``'s answer (host callback,
        in step order)."""
        eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        if stream is None:
            return eos
        answer = jax.ShapeDtypeStruct((batch,), jnp.bool_)
        return eos | io_callback(stream, answer, tok, done, ordered=True)

    # The last token sampled is never fed back, so the cache needs prompt + new - 1 slots;
    # decoding overwrites the padding
    cache = model.init_cache(batch, bucket + max_new_tokens - 1, kv_quant)
    last, cache = _prefill(model, variables, prompt, prompt_len, cache, prefill_chunk)
    rng, sub = jax.random.split(rng)
    tok = sample(last, sub)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = stops(tok, jnp.zeros((batch,), jnp.bool_))

    def cond(state):
        t, _, _, _, _, done = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, cache, rng, out, done = state
        logits, cache = model.apply(variables, tok[:, None], cache, method="decode")
        rng, sub = jax.random.split(rng)
        new = jnp.where(done, pad_id, sample(logits[:, -1], sub))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, t))
        return t + 1, new, cache, rng, out, done | stops(new, done)

    state = (jnp.int32(1), tok, cache, rng, out, done)
    return jax.lax.while_loop(cond, body, state)[4]


def generate(
    model,
    params,
    prompt_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    kv_cache: str | None = None,
    stream: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Generate continuations of ``prompt_ids`` with a KV cache.

    Args:
      model: a jaxfit causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``: any module with
        ``config.vocab_size``, ``init_cache(batch, max_len)`` and a ``decode`` method).
      params: its parameter tree.
      prompt_ids: ``[batch, prompt_len]`` or ``[prompt_len]`` int ids; all prompts of a
        batch have the same length (no padding).
      max_new_tokens: number of tokens to generate (>= 1).
      temperature: softmax temperature; ``0`` means greedy decoding.
      top_k: keep the ``k`` most likely tokens (``None``: all).
      top_p: nucleus sampling mass in ``(0, 1]`` (``None``: off).
      eos_token_id: id(s) that end a sequence; later positions of that sequence are padded.
        ``None`` never stops early.
      pad_token_id: the padding id (default: the first EOS id, else 0; HF's convention).
      rng: a ``jax.random.key`` (needed when sampling; default ``key(0)``).
      prefill_chunk: a padded prompt wider than this runs through the model in steps of
        this many tokens (:func:`_prefill`: the KV cache plus one chunk's activations);
        ``None`` or ``0``: the whole prompt in one step. Greedy tokens do not depend on it
        (tested against transformers); the logits differ by float rounding only.
      kv_cache: ``None``: keys and values in the compute dtype; ``"int8"``: int8 codes with
        a per-(token, head) absmax scale (:class:`jaxfit.models.kv_cache.Int8KV`, 0.52x
        the bytes of bf16 at ``head_dim = 128``; its logit error against the float cache is
        measured in ``tests/test_sampling.py``).
      A model whose config has ``weights_on_host=True`` keeps its layer stack in pinned
      host memory (moved there here) and copies one layer's weights to the device at a
      time: a model larger than the device generates, at the host link's speed.
      stream: called on the host after each step, in order, as ``stream(tokens [batch]
        int32, finished [batch] bool) -> stop [batch] bool`` (a ``jax.experimental.
        io_callback``): it sees every token as it is generated (``finished`` rows get the
        padding id) and may end rows (a stop string seen: later positions are padded, as
        after EOS). Each new function compiles the program once more.

    Returns:
      ``np.ndarray [batch, max_new_tokens]`` int32 of generated ids only (``[max_new_tokens]``
      for a 1-D prompt); each sequence ends with its first EOS and padding after it.

    Raises:
      ValueError: bad arguments, or (GPT-2) ``prompt_len + max_new_tokens - 1`` beyond
        ``n_positions``.

    The prompt is padded to :func:`prompt_bucket` of its length (capped so that the cache
    stays within GPT-2's ``n_positions``): one compiled program per bucket.
    """
    prompt = np.asarray(prompt_ids)
    single = prompt.ndim == 1
    if single:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, len>0] or [len>0], got {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if kv_cache not in kv_cache_lib.KV_QUANT:
        raise ValueError(f"kv_cache={kv_cache!r}; expected one of {list(kv_cache_lib.KV_QUANT)}")
    if prefill_chunk is not None and prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0 or None, got {prefill_chunk}")
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, int | np.integer):
        eos = [int(eos_token_id)]
    else:
        eos = [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    eos_ids = np.asarray(eos or [-1], np.int32)  # -1 never matches a token
    vocab = model.config.vocab_size
    length = prompt.shape[1]
    positions = getattr(model.config, "n_positions", None)  # learned positions end there
    limit = positions - max_new_tokens + 1 if positions else None
    width, chunk = prompt_width(length, limit, prefill_chunk or 0)
    padded = np.full((prompt.shape[0], width), pad_token_id, np.int32)
    padded[:, :length] = prompt
    if getattr(model.config, "weights_on_host", False):  # the stack to pinned host memory
        params = model.host_params(params)
    out = _generate(
        model,
        params,
        jnp.asarray(padded),
        jnp.int32(length),
        rng if rng is not None else jax.random.key(0),
        jnp.float32(temperature),
        jnp.int32(min(top_k or vocab, vocab)),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.asarray(eos_ids),
        jnp.int32(pad_token_id),
        max_new_tokens=int(max_new_tokens),
        prefill_chunk=chunk,
        kv_quant=kv_cache,
        stream=stream,
    )
    out = np.asarray(out)
    return out[0] if single else out

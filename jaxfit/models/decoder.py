"""What the decoder-only language models (GPT-2, Llama, Qwen2) share.

A model class mixes in :class:`CausalLMMixin`, sets ``EMBEDDING`` (the name of its token
embedding submodule, used by a tied LM head) and defines ``_backbone(input_ids,
positions, segment_ids, layer_cache, index) -> (final hidden states, layer_cache)``; its
``setup`` builds submodules with :func:`embed`, :meth:`CausalLMMixin._stack` and
:meth:`CausalLMMixin._setup_head`, its layers project with :func:`dense`. The config
subclasses :class:`jaxfit.models.layers.ExecutionConfig` and has ``vocab_size``,
``initializer_range`` and ``tie_word_embeddings`` (HF names).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfit import placement
from jaxfit.models import kv_cache, layers


def dense(
    cfg: Any,
    features: int,
    name: str | None = None,
    *,
    use_bias: bool = True,
    std: float | None = None,
    output_parallel: bool = False,
) -> layers.Dense:
    """A projection in ``cfg``'s dtypes, kernel drawn from ``N(0, std)`` (default
    ``cfg.initializer_range``), bias zero; ``output_parallel`` as :class:`layers.Dense`."""
    return layers.Dense(
        features,
        use_bias=use_bias,
        output_parallel=output_parallel,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(std or cfg.initializer_range),
        name=name,
    )


def embed(cfg: Any, num_embeddings: int, features: int) -> layers.Embed:
    """A lookup table ``[num_embeddings, features]`` drawn from ``N(0, initializer_range)``."""
    return layers.Embed(
        num_embeddings,
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(cfg.initializer_range),
    )


def causal_attention(cfg: Any, q, k, v, segment_ids, layer_cache, index):
    """:func:`jaxfit.models.kv_cache.causal_attention` with ``cfg.attention_impl``:
    ``(out [batch, len, heads, head_dim], layer_cache)``."""
    return kv_cache.causal_attention(
        q,
        k,
        v,
        layer_cache=layer_cache,
        index=index,
        segment_ids=segment_ids,
        implementation=cfg.attention_impl,
    )


class CausalLMMixin:
    # subclasses set EMBEDDING = name of the token-embedding submodule, and
    # POSITION_EMBEDDING that of learned absolute positions if they have them
    POSITION_EMBEDDING: str | None = None
    STACK: str = "layers"  # the name of the scanned layer stack's parameters

    def host_params(self, params: dict) -> dict:
        """``params`` with the layer stack in pinned host memory (the model's
        ``weights_on_host``; :func:`jaxfit.models.layers.host_stack`)."""
        return layers.host_stack(params, self.STACK)

    def _stack(self, block: type[nn.Module], num_layers: int, in_axes: tuple) -> nn.Module:
        """The scanned (and rematerialised) stack of ``num_layers`` blocks (``setup``);
        ``in_axes``: ``nn.scan`` axes of the block's arguments after the carry."""
        cfg = self.config
        stack = layers.stack_layers(
            block,
            num_layers=num_layers,
            remat=cfg.remat_policy,
            scan=cfg.scan_layers,
            in_axes=in_axes,
            weights_on_host=cfg.weights_on_host,
        )
        return stack(cfg)

    def _setup_head(self) -> None:
        """The untied LM head ``lm_head [hidden, vocab]`` (none when tied; ``setup``)."""
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(
                self.config, self.config.vocab_size, use_bias=False, output_parallel=True
            )

    @staticmethod
    def _positions(input_ids: jax.Array, positions: jax.Array | None) -> jax.Array:
        """``positions``, or ``0..seq-1`` for every row of ``input_ids [batch, seq]``."""
        if positions is not None:
            return positions
        b, s = input_ids.shape
        return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))

    def _empty_cache(
        self,
        batch: int,
        max_len: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        quant: str | None = None,
    ) -> kv_cache.KVCache:
        """An empty :class:`~jaxfit.models.kv_cache.KVCache` in the compute dtype (or
        ``quant="int8"``: :class:`~jaxfit.models.kv_cache.Int8KV`)."""
        return kv_cache.init_cache(
            num_layers=num_layers,
            batch=batch,
            max_len=max_len,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=self.config.dtype,
            quant=quant,
        )

    def lookup_only_params(self) -> tuple[str, ...]:
        """Top-level parameter names that are only looked up (no matmul FLOPs): position
        embeddings, and the token embedding unless it is tied as the LM head."""
        names = (self.POSITION_EMBEDDING,) if self.POSITION_EMBEDDING else ()
        if not self.config.tie_word_embeddings:
            names += (self.EMBEDDING,)
        return names

    def hidden_states(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states ``[batch, seq, hidden]`` (after the last norm, compute dtype).

        Args: as :meth:`__call__`.
        """
        return self._backbone(input_ids, positions, segment_ids, None, None)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head: ``hidden [..., hidden] -> logits [..., vocab]`` float32 (tied: the
        token embedding transposed)."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            # under FSDP a table split over the vocabulary stays split (vocabulary-parallel
            # logits, as the untied head's output_parallel)
            emb = getattr(self, self.EMBEDDING).embedding
            emb = jnp.asarray(placement.gathered(emb, cfg.dtype, unless_split_on=0), cfg.dtype)
            out = jnp.matmul(hidden.astype(cfg.dtype), emb.T)
        else:
            out = self.lm_head(hidden)
        return placement.constrain_vocab(out.astype(jnp.float32))

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: ``[batch, seq]`` int token ids.
          segment_ids: optional ``[batch, seq]`` int; packed documents attend only within
            equal ids.
          positions: optional ``[batch, seq]`` int positions (default ``0..seq-1``); give
            positions restarting at 0 for each packed document (GPT-2: ``< n_positions``).

        Returns:
          ``[batch, seq, vocab_size]`` float32 logits.
        """
        return self.logits(self.hidden_states(input_ids, segment_ids, positions))

    def decode(
        self,
        input_ids: jax.Array,
        cache: kv_cache.KVCache,
        logits_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, kv_cache.KVCache]:
        """Run ``input_ids [batch, n]`` at positions ``cache.index + (0..n-1)``.

        Use ``n = prompt_len`` once (prefill, or a prompt's chunks in turn) and then
        ``n = 1`` per generated token.

        Args:
          input_ids: ``[batch, n]`` int token ids.
          cache: the :class:`~jaxfit.models.kv_cache.KVCache` (``index + n <= max_len``).
          logits_index: ``None``: logits of every position; an int32 scalar ``j`` in
            ``[0, n)``: only row ``j``'s (a prefill needs the last prompt token's alone,
            and ``[batch, n, vocab]`` float32 logits of a long chunk would cost
            ``4 n vocab`` bytes per sequence: 1 GiB at n = 2048 and Llama 3's 128,256).

        Returns:
          ``(logits, cache)`` with ``index`` advanced by ``n``; logits ``[batch, n, vocab]``
          float32, or ``[batch, vocab]`` with ``logits_index``.
        """
        b, s = input_ids.shape
        pos = kv_cache.positions(cache, b, s)
        hidden, (k, v) = self._backbone(input_ids, pos, None, (cache.k, cache.v), cache.index)
        k, v = kv_cache.write(cache.k, k, cache.index), kv_cache.write(cache.v, v, cache.index)
        if logits_index is not None:
            hidden = jax.lax.dynamic_index_in_dim(hidden, logits_index, axis=1, keepdims=False)
        return self.logits(hidden), kv_cache.KVCache(k=k, v=v, index=cache.index + s)

    def head_kernel(self, params) -> jax.Array:
        """The LM head kernel ``[hidden, vocab]`` from a parameter tree (tied: the token
        embedding transposed)."""
        if self.config.tie_word_embeddings:
            return params[self.EMBEDDING]["embedding"].T
        return params["lm_head"]["kernel"]

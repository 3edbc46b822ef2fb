"""Methods shared by the decoder-only language models (GPT-2, Llama).

A model class mixes in :class:`CausalLMMixin`, sets ``EMBEDDING`` (the name of its token
embedding submodule, used by a tied LM head) and defines ``_backbone(input_ids,
positions, segment_ids, layer_cache, index) -> (final hidden states, layer_cache)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfit.models import kv_cache


class CausalLMMixin:
    # subclasses set EMBEDDING = name of the token-embedding submodule, and
    # POSITION_EMBEDDING that of learned absolute positions if they have them
    POSITION_EMBEDDING: str | None = None

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
            emb = jnp.asarray(getattr(self, self.EMBEDDING).embedding, cfg.dtype)
            out = jnp.matmul(hidden.astype(cfg.dtype), emb.T)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

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
        self, input_ids: jax.Array, cache: kv_cache.KVCache
    ) -> tuple[jax.Array, kv_cache.KVCache]:
        """Run ``input_ids [batch, n]`` at positions ``cache.index + (0..n-1)``.

        Use ``n = prompt_len`` once (prefill) and then ``n = 1`` per generated token.

        Returns:
          ``(logits [batch, n, vocab] float32, cache)`` with ``index`` advanced by ``n``.
        """
        b, s = input_ids.shape
        pos = kv_cache.positions(cache, b, s)
        hidden, (k, v) = self._backbone(input_ids, pos, None, (cache.k, cache.v), cache.index)
        return self.logits(hidden), kv_cache.KVCache(k=k, v=v, index=cache.index + s)

    def head_kernel(self, params) -> jax.Array:
        """The LM head kernel ``[hidden, vocab]`` from a parameter tree (tied: the token
        embedding transposed)."""
        if self.config.tie_word_embeddings:
            return params[self.EMBEDDING]["embedding"].T
        return params["lm_head"]["kernel"]

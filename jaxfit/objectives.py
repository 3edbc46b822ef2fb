"""Training objectives as free functions of (model, parameters, batch).

Tasks, benchmarks and tests build their ``loss_and_grad`` from here alike, so the loss a
benchmark times is the loss ``jaxfit.train`` minimises. Every builder returns

    loss_and_grad(params, batch, rng, frozen) -> ((loss, metrics), grads)

the function :func:`jaxfit.step.make_train_step` expects: ``params`` are the TRAINABLE
parameters (all weights, or LoRA adapters), ``frozen`` the rest (``None`` when everything
trains); the model applies :func:`jaxfit.lora.training.full` of the two.

* Causal LM (:func:`lm_sum_loss`, :func:`lm_loss_and_grad`): summed token cross-entropy
  of next-token prediction over the unmasked tokens, accumulated exactly over micro-batches
  (:func:`jaxfit.accumulate.microbatched`: divided once by the whole batch's token count).
* Contrastive (:func:`contrastive_loss_and_grad`): CLIP's symmetric InfoNCE over the FULL
  batch, accumulated over micro-batches by GradCache (:func:`jaxfit.losses.gradcache`,
  Gao et al. 2021), so every example sees all in-batch negatives.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxfit import accumulate, losses
from jaxfit.lora import training as lora_training

PyTree = Any


def lm_sum_loss(
    model, params: PyTree, batch: dict, *, chunk_size: int = 0, per_row: bool = False
) -> tuple[jax.Array, jax.Array, dict]:
    """Summed next-token cross-entropy of a decoder on one (micro-)batch.

    Args:
      model: a decoder (``jaxfit.models.gpt2`` / ``llama``) with ``hidden_states`` and
        ``logits`` methods.
      params: the full parameter tree the model applies (adapters combined, see
        :func:`jaxfit.lora.training.full`).
      batch: ``input_ids``, ``labels`` (already shifted), ``loss_mask`` (float32, 0 on
        padding / prompt tokens), ``segment_ids``, ``positions``; all ``[B, S]``.
      chunk_size: > 0: the LM head and the loss run ``chunk_size`` tokens at a time
        (:func:`jaxfit.losses.chunked_cross_entropy`), so the ``[B, S, vocab]`` logits
        never exist at once; 0: logits then :func:`jaxfit.losses.cross_entropy`.
      per_row: sums per sequence (``[B]`` each; evaluation) instead of scalars.

    Returns:
      ``(loss_sum, count, metrics)``: summed token losses in nats (float32), the number of
      loss tokens (float32) and an empty metrics dict.
    """
    variables = {"params": params}
    inputs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    if chunk_size > 0:
        x = model.apply(variables, batch["input_ids"], method="hidden_states", **inputs)
        ce = functools.partial(
            losses.chunked_cross_entropy,
            head_fn=lambda h: model.apply(variables, h, method="logits"),
            chunk_size=chunk_size,
        )
    else:
        x = model.apply(variables, batch["input_ids"], **inputs)  # logits
        ce = losses.cross_entropy
    if per_row:
        ce = jax.vmap(ce)
    loss_sum, count = ce(x, targets=batch["labels"], mask=batch["loss_mask"])
    return loss_sum, count.astype(jnp.float32), {}


def lm_loss_and_grad(model, *, num_micro_batches: int = 1, chunk_size: int = 0):
    """``loss_and_grad`` of the causal-LM objective (see the module docstring); ``rng``
    gives LoRA dropout keys (the decoders themselves have no dropout)."""

    def sum_loss(params, batch, rng, frozen):
        full = lora_training.full(params, frozen, rng)
        return lm_sum_loss(model, full, batch, chunk_size=chunk_size)

    return accumulate.microbatched(sum_loss, num_micro_batches)


def lm_eval_sums(model, *, chunk_size: int = 0):
    """``sums(params, frozen, batch) -> (loss_sum [B], count [B])`` per sequence, for
    evaluation (deterministic: no dropout); jit it once."""

    def sums(params, frozen, batch):
        full = lora_training.full(params, frozen)
        return lm_sum_loss(model, full, batch, chunk_size=chunk_size, per_row=True)[:2]

    return sums


def clip_embed(model, params: PyTree, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(image_embeds, text_embeds)`` (L2-normalised, float32) of a CLIP batch
    (``pixel_values [B, H, W, 3]``, ``input_ids`` / ``attention_mask [B, L]``)."""
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["pixel_values"],
        batch["attention_mask"],
        method="embed",
    )


def contrastive_loss_and_grad(model, *, num_micro_batches: int = 1, chunk_size: int = 0):
    """``loss_and_grad`` of CLIP's contrastive objective with GradCache over
    ``num_micro_batches`` (see the module docstring); ``chunk_size`` > 0 computes the
    similarity matrix in row chunks (:func:`jaxfit.losses.chunked_contrastive_loss`).

    GradCache re-runs each micro-batch's forward, so the forward must be deterministic:
    the CLIP towers have no dropout and LoRA dropout is not applied (``rng`` is unused).
    """

    def embed(params, micro_batch, frozen):
        return clip_embed(model, lora_training.full(params, frozen), micro_batch)

    def loss(params, embeds, frozen):
        full = lora_training.full(params, frozen)
        image_embeds, text_embeds = embeds
        return losses.chunked_contrastive_loss(
            image_embeds, text_embeds, full["logit_scale"], chunk_size=chunk_size
        )

    def loss_and_grad(params, batch, rng, frozen=None):
        del rng
        return losses.gradcache(
            lambda p, mb: embed(p, mb, frozen),
            lambda p, e: loss(p, e, frozen),
            params,
            batch,
            num_micro_batches,
        )

    return loss_and_grad

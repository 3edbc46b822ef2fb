"""Losses: CLIP's contrastive loss (plain, or chunked over rows so the full ``[B, B]``
logits never exist; with exact GradCache accumulation) and causal-LM loss (plain, or
chunked over tokens so the full ``[tokens, vocab]`` logits never exist).

All reductions run in float32 whatever the compute dtype of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit.accumulate import merge_micro, split_micro
from jaxfit.models.clip import logit_scale_value

PyTree = Any
Metrics = dict[str, jax.Array]


def contrastive_loss(
    image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE loss of CLIP over in-batch negatives.

    ``logits = scale * image_embeds @ text_embeds.T`` (float32, HIGHEST matmul precision so
    that GPUs do not silently use TF32), then the mean of the image->text and text->image
    cross-entropies with the diagonal as targets. Source: Radford et al. 2021, "Learning
    Transferable Visual Models From Natural Language Supervision", Fig. 3; identical to
    ``transformers.models.clip.modeling_clip.clip_loss`` (named
    ``image_text_contrastive_loss`` since transformers 5).

    Args:
      image_embeds: ``[N, D]`` L2-normalised image embeddings (any float dtype).
      text_embeds: ``[N, D]`` L2-normalised text embeddings; row i is the caption of image i.
      logit_scale: scalar LOG-temperature parameter; the applied scale is
        ``exp(min(logit_scale, log 100))`` (``jaxfit.models.clip.logit_scale_value``).

    Returns:
      ``(loss, metrics)``: scalar float32 loss (nats); metrics ``loss``, ``logit_scale``
      (the applied scale), ``accuracy_i2t`` and ``accuracy_t2i`` (in-batch top-1, in [0, 1]).

    Raises:
      ValueError: embeddings are not 2-D or their shapes differ.
    """
    _check_embed_shapes(image_embeds, text_embeds)
    scale = logit_scale_value(logit_scale)
    logits_per_image = scale * jnp.matmul(
        image_embeds.astype(jnp.float32),
        text_embeds.astype(jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
    )
    labels = jnp.arange(logits_per_image.shape[0])
    loss_i2t = _mean_xent(logits_per_image, labels)
    loss_t2i = _mean_xent(logits_per_image.T, labels)
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = {
        "loss": loss,
        "logit_scale": scale,
        "accuracy_i2t": jnp.mean(jnp.argmax(logits_per_image, axis=1) == labels),
        "accuracy_t2i": jnp.mean(jnp.argmax(logits_per_image, axis=0) == labels),
    }
    return loss, metrics


def _check_embed_shapes(image_embeds: jax.Array, text_embeds: jax.Array) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"expected image/text embeddings of equal shape [N, D], got {image_embeds.shape} "
            f"and {text_embeds.shape}"
        )


def chunked_contrastive_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    *,
    chunk_size: int,
) -> tuple[jax.Array, Metrics]:
    """:func:`contrastive_loss` without materialising the ``[N, N]`` logits.

    Same formula (Radford et al. 2021, CLIP, Fig. 3 pseudo-code), computed by rows:

    ``loss_i2t = mean_i [logsumexp_j(s <x_i, y_j>) - s <x_i, y_i>]`` over image rows ``x_i``
    against all texts ``y_j``, ``loss_t2i`` the same with the roles swapped, and
    ``loss = (loss_i2t + loss_t2i) / 2`` with ``s = logit_scale_value(logit_scale)``. The
    embeddings are cast to float32 and the matmuls use HIGHEST precision, as in
    :func:`contrastive_loss`. The positive (diagonal) logits ``s <x_i, y_i>`` are row-wise
    dot products (``O(N D)``). Each direction runs a ``lax.scan`` over row chunks of
    ``chunk_size`` (the last one zero-padded and masked when ``chunk_size`` does not
    divide ``N``) whose body is ``jax.checkpoint``-ed: a chunk's ``[chunk_size, N]``
    logits are recomputed in the backward pass instead of stored, so at most one chunk's
    logits (and their gradient) exist at once instead of several ``[N, N]`` float32
    buffers (16 MiB each at ``N = 2048``, 1 GiB at ``N = 16384``). Cost: each direction's
    ``2 N^2 D`` FLOPs matmul runs once more in the backward pass. The same trick as
    :func:`chunked_cross_entropy`, over the in-batch negatives instead of the vocabulary.

    The result equals :func:`contrastive_loss` (loss, metrics and gradients w.r.t. both
    embeddings and ``logit_scale``) up to float reassociation; it is a drop-in
    replacement, e.g. as the ``loss_fn`` of :func:`gradcache`.

    Args:
      image_embeds: ``[N, D]`` L2-normalised image embeddings (any float dtype; upcast to
        float32).
      text_embeds: ``[N, D]`` L2-normalised text embeddings; row i is the caption of image i.
      logit_scale: scalar LOG-temperature parameter; the applied scale is
        ``exp(min(logit_scale, log 100))`` (``jaxfit.models.clip.logit_scale_value``).
      chunk_size: rows per chunk (keyword-only, static Python int). ``chunk_size <= 0`` or
        ``>= N`` falls back to :func:`contrastive_loss` itself. A chunk's float32 logits
        and their gradient take ``2 * chunk_size * N * 4`` bytes.

    Returns:
      ``(loss, metrics)`` exactly as :func:`contrastive_loss`: scalar float32 loss (nats);
      metrics ``loss``, ``logit_scale`` (the applied scale), ``accuracy_i2t`` and
      ``accuracy_t2i`` (in-batch top-1, in [0, 1]).

    Raises:
      ValueError: embeddings are not 2-D or their shapes differ.
    """
    _check_embed_shapes(image_embeds, text_embeds)
    n = image_embeds.shape[0]
    chunk_size = int(chunk_size)
    if chunk_size <= 0 or chunk_size >= n:
        return contrastive_loss(image_embeds, text_embeds, logit_scale)
    scale = logit_scale_value(logit_scale)
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    positives = scale * jnp.sum(img * txt, axis=-1)  # [N] diagonal logits
    loss_i2t, acc_i2t = _chunked_infonce_rows(img, txt, positives, scale, chunk_size)
    loss_t2i, acc_t2i = _chunked_infonce_rows(txt, img, positives, scale, chunk_size)
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = {
        "loss": loss,
        "logit_scale": scale,
        "accuracy_i2t": acc_i2t,
        "accuracy_t2i": acc_t2i,
    }
    return loss, metrics


def _chunked_infonce_rows(
    rows: jax.Array, cols: jax.Array, positives: jax.Array, scale: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Mean over rows i of ``logsumexp_j(scale <rows_i, cols_j>) - positives_i`` and the
    top-1 accuracy (``argmax_j == i``), ``chunk_size`` rows at a time. float32 in/out."""
    n = rows.shape[0]
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    weights = jnp.ones((n,), jnp.float32)
    if pad:  # zero rows: finite logits (all 0), weight 0, so no loss and zero gradient
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        positives = jnp.pad(positives, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    xs = (
        rows.reshape(num_chunks, chunk_size, rows.shape[-1]),
        positives.reshape(num_chunks, chunk_size),
        weights.reshape(num_chunks, chunk_size),
        jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size),
    )

    # Save nothing inside a chunk: its [chunk, N] logits are recomputed by the backward
    # pass. prevent_cse=False is safe inside scan.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_terms(r_c, pos_c, w_c, idx_c, cols, scale):
        logits = scale * jnp.matmul(r_c, cols.T, precision=jax.lax.Precision.HIGHEST)
        loss_c = jnp.sum((jax.nn.logsumexp(logits, axis=-1) - pos_c) * w_c)
        correct_c = jnp.sum((jnp.argmax(logits, axis=-1) == idx_c) * w_c)
        return loss_c, correct_c

    def body(carry, x):
        loss_c, correct_c = chunk_terms(*x, cols, scale)
        return (carry[0] + loss_c, carry[1] + correct_c), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), xs)
    return loss_sum / n, correct / n


def _mean_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    loss_sum, n = cross_entropy(logits, labels)
    return loss_sum / n


def gradcache(
    embed_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, Metrics]],
    params: PyTree,
    batch: PyTree,
    num_micro_batches: int,
) -> tuple[tuple[jax.Array, Metrics], PyTree]:
    """Exact gradient of a batch-coupled loss, computed ``num_micro_batches`` examples at a time.

    GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
    Limited Setup", arXiv:2101.06983, Sec. 3.2): for ``L(params, E(params, batch))``,

    1. embed every micro-batch forward only (``lax.map``; no activations kept);
    2. take ``value_and_grad`` of ``loss_fn`` w.r.t. (params, full-batch embeddings): the
       loss, its direct parameter gradient (e.g. ``logit_scale``) and the embedding
       gradients ``dL/dE`` (the cached "representation gradients");
    3. for each micro-batch, re-run the forward under ``jax.vjp`` and pull back its slice
       of ``dL/dE`` into parameter gradients, summed over micro-batches in a ``lax.scan``.

    The result equals ``jax.value_and_grad`` on the whole batch up to float reassociation,
    at the activation memory of one micro-batch plus the ``[B, D]`` embeddings, for the cost
    of one extra forward pass. With ``num_micro_batches == 1`` the plain
    ``jax.value_and_grad`` is used directly.

    Args:
      embed_fn: ``embed_fn(params, micro_batch) -> embeddings`` pytree whose leaves have a
        per-example leading axis. MUST be deterministic (no dropout / rng): it is evaluated
        twice per micro-batch and both evaluations must agree. CLIP has no dropout.
      loss_fn: ``loss_fn(params, embeddings) -> (loss, metrics)`` on the FULL batch's
        embeddings (leading axis ``B``); ``loss`` is a scalar.
      params: parameter pytree (float leaves).
      batch: pytree of arrays with a common leading batch axis ``B``.
      num_micro_batches: ``k``; every batch leaf's leading size must be divisible by it.
        Micro-batch i holds examples ``i, i + k, i + 2k, ...`` so that, with the batch
        sharded over D devices, each micro-batch is spread over all of them (keep
        ``B // k`` divisible by D).

    Returns:
      ``((loss, metrics), grads)`` with ``grads`` shaped and typed like ``params``.
      Per-micro-batch gradients are accumulated in float32 and cast to each parameter's
      dtype at the end.

    Raises:
      ValueError: ``num_micro_batches < 1`` or a batch leaf's leading size is not divisible.
    """
    k = int(num_micro_batches)
    if k < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if k == 1:
        return jax.value_and_grad(lambda p: loss_fn(p, embed_fn(p, batch)), has_aux=True)(params)

    micro = split_micro(batch, k, "batch")

    # (1) Forward only: nothing is differentiated through this map, so XLA keeps no
    # activations; stop_gradient makes that explicit if gradcache is itself differentiated.
    embeds = jax.lax.stop_gradient(jax.lax.map(lambda mb: embed_fn(params, mb), micro))

    # (2) Loss on the full batch of embeddings; gradients w.r.t. params and embeddings.
    (loss, metrics), (direct_grads, embed_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(params, merge_micro(embeds))
    embed_grads = split_micro(embed_grads, k, "embedding gradient")

    # (3) Re-run each micro-batch under vjp and accumulate the pulled-back gradients.
    def body(acc, xs):
        mb, cotangent = xs
        _, vjp_fn = jax.vjp(lambda p: embed_fn(p, mb), params)
        (grads,) = vjp_fn(cotangent)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), None

    # The float32 accumulator starts at loss_fn's direct gradient (e.g. logit_scale's).
    acc0 = jax.tree.map(lambda d: d.astype(jnp.float32), direct_grads)
    acc, _ = jax.lax.scan(body, acc0, (micro, embed_grads))
    grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), acc, params)
    return (loss, metrics), grads


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed softmax cross-entropy over the last axis, in float32.

    ``loss_i = logsumexp(logits_i) - logits_i[targets_i]`` (nats).

    Args:
      logits: ``[..., V]`` any float dtype (upcast to float32).
      targets: ``[...]`` integer class ids in ``[0, V)``; negative ids (e.g. HF's ``-100``)
        are ignored like ``torch.nn.functional.cross_entropy(ignore_index=-100)``.
      mask: optional ``[...]`` weights (bool/0-1); zero entries are ignored.

    Returns:
      ``(loss_sum, token_count)``: float32 scalars; the mean is ``loss_sum / token_count``
      (guard ``token_count == 0`` yourself, or use :func:`causal_lm_loss`).
    """
    logits = logits.astype(jnp.float32)
    valid = targets >= 0
    weights = valid.astype(jnp.float32)
    if mask is not None:
        weights = weights * mask.astype(jnp.float32)
    safe_targets = jnp.where(valid, targets, 0)
    target_logits = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(losses * weights), jnp.sum(weights)


def chunked_cross_entropy(
    hidden: jax.Array,
    head_fn: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy` of ``head_fn(hidden)`` without materialising all the logits.

    The sequences (``[R, S, D]``: ``R`` rows, the leading dimensions but the last; one row
    for ``[N, D]``) are cut along ``S`` into chunks of ``c = ceil(chunk_size / R)``
    positions of every row (``S`` padded to a multiple of ``c``; padding is ignored:
    target ``-1``, mask 0), and the LM head plus the loss run one ``[R, c]`` chunk (about
    ``chunk_size`` tokens) at a time in a ``lax.scan`` whose body is
    ``jax.checkpoint``-ed: the ``[R, c, V]`` logits of a chunk are recomputed in the
    backward pass instead of stored, so at most one chunk's logits (and their gradient)
    exist at once instead of ``[N, V]`` float32 (Llama 3's V = 128,256 makes those 2.1 GB
    for 4,096 tokens, twice that with their gradient). Cost: the head's matmul runs once
    more in the backward pass (``2 N D V`` FLOPs). The idea of Liger-Kernel's fused linear
    cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and of Wijmans et al. 2024, "Cut
    Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009), here in plain JAX
    at the granularity of token chunks.

    When the head's weights are trained, the backward pass sums their ``[D, V]`` gradient
    over chunks, and XLA may hold a chunk's contribution in one more ``[D, V]`` float32
    buffer besides the accumulator (the CPU backend does): the logits' ``N V`` floats
    become ``D V + 2 chunk_size V``, a saving while the tokens per call ``N`` exceed the
    width ``D`` by a margin. A frozen head (LoRA / QLoRA) has no such term.

    The per-chunk loss is :func:`cross_entropy` itself (float32 log-softmax, masked sum),
    so the result equals ``cross_entropy(head_fn(hidden), targets, mask)`` up to float
    reassociation of the sum over chunks; so do its gradients w.r.t. ``hidden`` and
    anything ``head_fn`` closes over (e.g. the head kernel, a LoRA or quantised leaf).

    Args:
      hidden: ``[..., D]`` final hidden states, any float dtype (passed to ``head_fn``
        unchanged, one ``[R * c, D]`` chunk at a time).
      head_fn: ``[R * c, D] -> [R * c, V]`` logits (any float dtype; the loss upcasts to
        float32), e.g. ``lambda h: model.apply(variables, h, method="logits")``. Must be
        deterministic and act on each token independently: it is called once per chunk
        in the forward pass and again in the backward pass.
      targets: ``[...]`` integer ids in ``[0, V)`` (same leading shape as ``hidden``);
        negative ids are ignored, as in :func:`cross_entropy`.
      mask: optional ``[...]`` weights (bool/0-1); zero entries are ignored.
      chunk_size: tokens per chunk (keyword-only, static): ``ceil(chunk_size / R)``
        positions of each row, at most ``S``. A chunk's float32 logits and their gradient
        take about ``2 * chunk_size * V * 4`` bytes. Rows stay whole along the chunks, so
        a batch split over devices (``jaxfit.sharding``) stays split.

    Returns:
      ``(loss_sum, token_count)``: float32 scalars, as :func:`cross_entropy`.

    Raises:
      ValueError: ``chunk_size < 1``, or ``targets`` / ``mask`` shapes that do not match
        ``hidden.shape[:-1]``.
    """
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} != hidden shape[:-1] {hidden.shape}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask shape {mask.shape} != targets shape {targets.shape}")
    # Rows stay rows: [R, S, D] (R = the leading dims but the last; 1 for [N, D]) is cut
    # along S into chunks of c positions of every row, c * R ~ chunk_size tokens, so a
    # batch split over devices stays split chunk by chunk (flat token chunks would span
    # devices: data parallelism would gather the hidden states and repeat the head).
    rows = int(np.prod(hidden.shape[:-2], dtype=np.int64)) if hidden.ndim > 2 else 1
    h = hidden.reshape(rows, -1, hidden.shape[-1])
    t = targets.reshape(rows, -1)
    m = None if mask is None else mask.reshape(rows, -1)
    n = h.shape[1]
    per_row = max(1, min(-(-chunk_size // rows), n))
    num_chunks = -(-n // per_row)
    pad = num_chunks * per_row - n
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, pad)), constant_values=-1)  # negative target: ignored
        m = None if m is None else jnp.pad(m, ((0, 0), (0, pad)))

    def chunks(x):  # [R, num_chunks * c, ...] -> [num_chunks, R, c, ...]
        return jnp.swapaxes(x.reshape(rows, num_chunks, per_row, *x.shape[2:]), 0, 1)

    xs = (chunks(h), chunks(t), None if m is None else chunks(m))

    # Save nothing inside a chunk (its inputs are the scan's xs anyway): the [chunk, V]
    # logits are recomputed by the backward pass. prevent_cse=False is safe inside scan.
    # The head sees the chunk flat, [R * c, D] (a bitcast of [R, c, D]): a 2-D matmul,
    # whose layout XLA assigns as before rows were kept (a 3-D one made XLA:CPU keep a
    # transposed float32 copy of a frozen bf16 head, [V, D]: 1.96 GiB for Llama 3).
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(h_c, t_c, m_c):
        logits = head_fn(h_c.reshape(-1, h_c.shape[-1]))
        return cross_entropy(logits, t_c.reshape(-1), None if m_c is None else m_c.reshape(-1))

    def body(carry, x):
        loss_c, count_c = chunk_loss(*x)
        return (carry[0] + loss_c, carry[1] + count_c), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero), xs)
    return loss_sum, count


def causal_lm_loss(
    logits: jax.Array, labels: jax.Array, loss_mask: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy: position t predicts ``labels[:, t + 1]``.

    Args:
      logits: ``[B, T, V]`` model outputs for inputs ``input_ids`` (any float dtype; the
        log-softmax runs in float32).
      labels: ``[B, T]`` int token ids, normally ``input_ids`` itself (HF convention: the
        shift happens here). Negative ids are ignored.
      loss_mask: optional ``[B, T]``, aligned with ``labels``: 1 where ``labels[:, t]`` is a
        target to be predicted, 0 for padding / prompt tokens. Position 0 is never a target.

    Returns:
      ``(mean_loss, metrics)``: mean over counted tokens (0 if none, never NaN); metrics
      ``loss``, ``num_tokens`` (float32 count of targets) and ``accuracy`` (top-1 over
      counted tokens). Matches ``torch.nn.functional.cross_entropy(logits[:, :-1],
      labels[:, 1:], ignore_index=-100)`` with masked labels set to -100.

    Raises:
      ValueError: shapes disagree.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {logits.shape} and {labels.shape}"
        )
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask shape {loss_mask.shape} != labels shape {labels.shape}")
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = None if loss_mask is None else loss_mask[:, 1:]
    loss_sum, n = cross_entropy(logits, targets, mask)
    denom = jnp.maximum(n, 1.0)
    weights = (targets >= 0).astype(jnp.float32)
    if mask is not None:
        weights = weights * mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    loss = loss_sum / denom
    return loss, {"loss": loss, "num_tokens": n, "accuracy": jnp.sum(correct * weights) / denom}

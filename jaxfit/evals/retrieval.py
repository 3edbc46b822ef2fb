"""Image-text retrieval recall@K, the standard CLIP/COCO evaluation.

Protocol (Karpathy & Fei-Fei 2015; used by CLIP, Radford et al. 2021, Table 13, and
open_clip's ``zero_shot``/``retrieval`` evaluation): every image is scored against every
caption of the split by cosine similarity of the normalised embeddings.

* image -> text: an image counts as a hit at K if ANY of its captions is among the K
  highest-scoring captions.
* text -> image: a caption counts as a hit at K if its own image is among the K
  highest-scoring images.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def recall_at_k(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K in both directions, in percent.

    Args:
      image_embeds: ``[num_images, dim]`` L2-normalised embeddings.
      text_embeds: ``[num_texts, dim]`` L2-normalised embeddings.
      text_to_image: ``[num_texts]`` int, the index of each caption's image.
      ks: the K values; K larger than the candidate count counts every query as a hit.
      chunk_size: queries scored at once (bounds the ``[chunk, candidates]`` score block).

    Returns:
      ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` in percent (0-100), plus ``i2t_mean`` /
      ``t2i_mean`` (mean over ``ks``) and ``rsum`` (sum of all recalls).

    Raises:
      ValueError: mismatched sizes, an out-of-range image index, or an image without
        captions (its image->text recall would be undefined).
    """
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    text_to_image = np.asarray(text_to_image, np.int64)
    n_img, n_txt = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (n_txt,):
        raise ValueError(
            f"text_to_image has shape {text_to_image.shape}; expected ({n_txt},) for "
            f"{n_txt} captions"
        )
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image holds indices outside [0, {n_img})")
    if np.bincount(text_to_image, minlength=n_img).min(initial=1) == 0:
        raise ValueError("every image needs at least one caption for image->text recall")
    kmax = max(ks)

    @jax.jit
    def topk(queries, candidates):
        return jax.lax.top_k(queries @ candidates.T, min(kmax, candidates.shape[0]))[1]

    def ranks(queries, candidates):
        return np.concatenate(
            [
                np.asarray(topk(jnp.asarray(queries[i : i + chunk_size]), candidates))
                for i in range(0, queries.shape[0], chunk_size)
            ]
        )

    img_dev, txt_dev = jnp.asarray(image_embeds), jnp.asarray(text_embeds)
    i2t = text_to_image[ranks(image_embeds, txt_dev)]  # [n_img, kmax] image ids of hits
    i2t_hit = i2t == np.arange(n_img)[:, None]
    t2i = ranks(text_embeds, img_dev)  # [n_txt, kmax]
    t2i_hit = t2i == text_to_image[:, None]
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(i2t_hit[:, :k].any(axis=1).mean())
        out[f"t2i_R@{k}"] = 100.0 * float(t2i_hit[:, :k].any(axis=1).mean())
    out["i2t_mean"] = float(np.mean([out[f"i2t_R@{k}"] for k in ks]))
    out["t2i_mean"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks]))
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks))
    return out


def first_hit_ranks(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    kmax: int,
    *,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the position of the first correct candidate among its top ``kmax``, with
    the top-K selection of :func:`recall_at_k` (so ``100 * mean(rank < K)`` is its
    recall@K for every ``K <= kmax``).

    Args:
      image_embeds: ``[num_images, dim]`` L2-normalised embeddings.
      text_embeds: ``[num_texts, dim]`` L2-normalised embeddings.
      text_to_image: ``[num_texts]`` int, the index of each caption's image.
      kmax: how many top candidates are looked at.
      chunk_size: queries scored at once (bounds the ``[chunk, candidates]`` score block).

    Returns:
      ``(i2t_rank, t2i_rank)``: int32 ``[num_images]`` and ``[num_texts]``; ``kmax`` where
      no correct candidate is among the top ``kmax``.
    """
    text_to_image = np.asarray(text_to_image, np.int64)
    top = jax.jit(lambda q, c: jax.lax.top_k(q @ c.T, min(kmax, c.shape[0]))[1])

    def topk(queries, candidates):
        c = jnp.asarray(candidates, jnp.float32)
        parts = [
            np.asarray(top(jnp.asarray(queries[i : i + chunk_size], jnp.float32), c))
            for i in range(0, len(queries), chunk_size)
        ]
        return np.concatenate(parts)

    def first(hit):
        return np.where(hit.any(axis=1), hit.argmax(axis=1), kmax).astype(np.int32)

    i2t = text_to_image[topk(image_embeds, text_embeds)] == np.arange(len(image_embeds))[:, None]
    t2i = topk(text_embeds, image_embeds) == text_to_image[:, None]
    return first(i2t), first(t2i)


def chance_recall(num_images: int, captions_per_image: float, k: int) -> dict[str, float]:
    """Expected recall@K (percent) of random embeddings, for "far above chance" checks.

    t2i: ``K / num_images``. i2t with ``c`` captions per image among ``n*c`` captions:
    ``1 - C(n*c - c, K) / C(n*c, K)`` (hypergeometric, no caption of the image in the top K).
    """
    n = num_images
    total = int(round(n * captions_per_image))
    c = int(round(captions_per_image))
    miss = 1.0
    for j in range(min(k, total)):
        miss *= max(total - c - j, 0) / (total - j)
    return {"t2i": 100.0 * min(k, n) / n, "i2t": 100.0 * (1.0 - miss)}

"""Recall@K against a brute-force reference and closed-form values."""

import numpy as np
import pytest

from jaxfit.evals.retrieval import chance_recall, recall_at_k


def _brute_force(img, txt, t2i_idx, k):
    sims = img @ txt.T
    n_img, n_txt = sims.shape
    i2t = np.mean([any(t2i_idx[j] == i for j in np.argsort(-sims[i])[:k]) for i in range(n_img)])
    t2i = np.mean([t2i_idx[j] in np.argsort(-sims[:, j])[:k] for j in range(n_txt)])
    return 100 * i2t, 100 * t2i


def _normed(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    img = _normed(rng.normal(size=(17, 8)).astype(np.float32))
    t2i_idx = np.repeat(np.arange(17), 3)
    txt = _normed(img[t2i_idx] + 0.9 * rng.normal(size=(51, 8)).astype(np.float32))
    got = recall_at_k(img, txt, t2i_idx, ks=(1, 5), chunk_size=chunk)
    for k in (1, 5):
        i2t, t2i = _brute_force(img, txt, t2i_idx, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["t2i_R@1"] < 100  # the noise level makes the test discriminative


def test_perfect_embeddings_give_full_recall():
    img = np.eye(6, dtype=np.float32)
    t2i_idx = np.repeat(np.arange(6), 2)
    out = recall_at_k(img, img[t2i_idx], t2i_idx, ks=(1,))
    assert out["i2t_R@1"] == 100 and out["t2i_R@1"] == 100 and out["rsum"] == 200


def test_random_embeddings_near_chance():
    rng = np.random.default_rng(1)
    n, c, k = 200, 5, 10
    img = _normed(rng.normal(size=(n, 64)))
    txt = _normed(rng.normal(size=(n * c, 64)))
    out = recall_at_k(img, txt, np.repeat(np.arange(n), c), ks=(k,))
    ch = chance_recall(n, c, k)
    assert ch["t2i"] == pytest.approx(5.0)
    assert ch["i2t"] == pytest.approx(
        100 * (1 - np.prod([(995 - j) / (1000 - j) for j in range(10)]))
    )
    assert abs(out["t2i_R@10"] - ch["t2i"]) < 3
    assert abs(out["i2t_R@10"] - ch["i2t"]) < 12


def test_bad_inputs():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(img, img, np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(img, img, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(img, img[:2], np.array([0, 1]))

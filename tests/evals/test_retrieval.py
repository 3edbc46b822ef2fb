"""Recall@K against a brute-force reference and closed-form values."""

import numpy as np
import pytest

from jaxfit.evals.retrieval import chance_recall, first_hit_ranks, recall_at_k


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


@pytest.mark.parametrize("chunk", [3, 1024])
def test_first_hit_ranks_match_brute_force_and_give_the_recalls(chunk):
    """Each query's rank of its first correct candidate: the brute-force argsort's, and
    ``100 * mean(rank < K)`` is recall_at_k's R@K; a miss within ``kmax`` is ``kmax``."""
    rng = np.random.default_rng(1)
    img = _normed(rng.normal(size=(13, 8)).astype(np.float32))
    t2i_idx = np.repeat(np.arange(13), 2)
    txt = _normed(img[t2i_idx] + 0.9 * rng.normal(size=(26, 8)).astype(np.float32))
    kmax = 5
    i2t, t2i = first_hit_ranks(img, txt, t2i_idx, kmax, chunk_size=chunk)
    sims = img @ txt.T
    for i in range(13):
        hits = [r for r, j in enumerate(np.argsort(-sims[i])[:kmax]) if t2i_idx[j] == i]
        assert i2t[i] == (hits[0] if hits else kmax)
    for j in range(26):
        order = list(np.argsort(-sims[:, j])[:kmax])
        assert t2i[j] == (order.index(t2i_idx[j]) if t2i_idx[j] in order else kmax)
    recalls = recall_at_k(img, txt, t2i_idx, ks=(1, 5))
    for k in (1, 5):
        assert 100 * np.mean(i2t < k) == pytest.approx(recalls[f"i2t_R@{k}"])
        assert 100 * np.mean(t2i < k) == pytest.approx(recalls[f"t2i_R@{k}"])
    assert i2t.dtype == t2i.dtype == np.int32
    assert (t2i == kmax).any()  # some misses: the kmax case is exercised


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

"""Selection diversity metrics against direct (loop / dense-matrix) formulas."""

import numpy as np
import pytest

from datasel.ops.algos.diversity_metrics import METRICS, distsum, knn_distance, measure, vendi_score
from datasel.ops.algos.novelsum import novelsum


def unit(X):
    X = np.asarray(X, np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.where(n > 0, X / np.where(n > 0, n, 1), 0.0)


def direct_cosdist(X):
    U = unit(X)
    return np.array([[1.0 - U[i] @ U[j] for j in range(len(U))] for i in range(len(U))])


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(11)
    return rng.standard_normal((80, 5)).astype(np.float32) * 3


SEL = np.array([3, 7, 8, 15, 22, 40, 41, 60, 79, 5, 66, 12])


def test_distsum_direct(pool):
    D = direct_cosdist(pool[np.sort(SEL)])
    m = len(SEL)
    assert distsum(pool, SEL) == pytest.approx((D.sum() - np.trace(D)) / (m * (m - 1)), rel=1e-12)
    assert distsum(np.array([[1.0, 0.0], [0.0, 2.0]]), [0, 1]) == pytest.approx(1.0)
    assert distsum(np.array([[1.0, 0.0], [-1.0, 0.0]]), [0, 1]) == pytest.approx(2.0)
    assert np.isnan(distsum(pool, [3]))


@pytest.mark.parametrize("k", [1, 3, 20])
def test_knn_direct(pool, k):
    D = direct_cosdist(pool[np.sort(SEL)])
    m = len(SEL)
    kk = min(k, m - 1)
    want = np.mean([np.sort(np.delete(D[i], i))[kk - 1] for i in range(m)])
    assert knn_distance(pool, SEL, k) == pytest.approx(want, rel=1e-12)
    assert knn_distance(pool, SEL, k, block=5) == pytest.approx(want, rel=1e-12)


def test_knn_duplicates_are_neighbours():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # row 0 and 1: nearest other at 0; row 2: nearest at 1
    assert knn_distance(X, [0, 1, 2], 1) == pytest.approx(1.0 / 3.0)


def test_vendi_direct(pool):
    U = unit(pool[np.sort(SEL)])
    K = U @ U.T
    lam = np.linalg.eigvalsh(K / len(SEL))
    lam = lam[lam > 1e-12]
    want = np.exp(-(lam * np.log(lam)).sum())
    assert vendi_score(pool, SEL) == pytest.approx(want, rel=1e-9)  # m > d: via the d x d matrix
    few = SEL[:4]  # m < d: via the m x m matrix
    U = unit(pool[np.sort(few)])
    lam = np.linalg.eigvalsh(U @ U.T / 4)
    lam = lam[lam > 1e-12]
    assert vendi_score(pool, few) == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)


def test_vendi_limits():
    assert vendi_score(np.eye(6), np.arange(6)) == pytest.approx(6.0)
    assert vendi_score(np.ones((5, 3)), np.arange(5)) == pytest.approx(1.0)
    assert vendi_score(np.vstack([np.eye(3), np.zeros((1, 3))]), np.arange(4)) == pytest.approx(4.0)


def test_selection_forms(pool):
    mask = np.zeros(80, bool)
    mask[SEL] = True
    assert distsum(pool, mask) == distsum(pool, SEL) == distsum(pool, np.concatenate([SEL, SEL[:3]]))
    with pytest.raises(IndexError, match=r"selected indices must lie in \[0, 80\)"):
        distsum(pool, [80])
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['entropy'\]"):
        measure(pool, SEL, ["entropy"])


def test_measure_collects_metrics(pool):
    metrics = [m for m in METRICS if m != "facility"]
    out = measure(pool, SEL, metrics, knn_k=3, novelsum_K=5)
    assert list(out) == metrics
    assert out["distsum"] == distsum(pool, SEL)
    assert out["knn"] == knn_distance(pool, SEL, 3)
    assert out["vendi"] == vendi_score(pool, SEL)
    ids = np.sort(SEL)
    assert out["novelsum"] == novelsum(pool[ids], pool, K=5, target_ids=ids)
    own = measure(pool, SEL, ["novelsum"], novelsum_K=5, novelsum_reference="selection")
    assert own["novelsum"] == novelsum(pool[ids], K=5)


def test_measure_facility(pool):
    got = measure(pool, SEL, ["facility"])["facility"]
    S = np.clip(1.0 - direct_cosdist(pool), 0.0, None)  # max(cos, 0)
    want = S[:, np.sort(SEL)].max(axis=1).sum()
    assert got == pytest.approx(want, rel=1e-5)

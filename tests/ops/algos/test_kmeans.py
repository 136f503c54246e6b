"""faiss k-means wrapper and nearest_to_centroids, checked against direct computations and scikit-learn."""

import numpy as np
import pytest

from datasel.ops.algos.kmeans import KMeansResult, kmeans, nearest_to_centroids


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-10, 10, size=(8, 12))
    labels = rng.integers(0, 8, size=1200)
    return (centres[labels] + rng.standard_normal((1200, 12))).astype(np.float32), labels


def direct_inertia(X, labels, centroids, metric="l2"):
    X = np.asarray(X, np.float64)
    C = np.asarray(centroids, np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        return float(sum(1.0 - X[i] @ C[labels[i]] for i in range(len(X))))
    return float(sum(((X[i] - C[labels[i]]) ** 2).sum() for i in range(len(X))))


def test_partition_and_inertia(blobs):
    X, _ = blobs
    res = kmeans(X, 8, seed=0)
    assert isinstance(res, KMeansResult)
    assert res.labels.dtype == np.int64 and res.labels.shape == (1200,)
    assert res.centroids.dtype == np.float32 and res.centroids.shape == (8, 12)
    assert set(np.unique(res.labels)) == set(range(8))  # every cluster used, contiguous ids
    assert res.empty_dropped == 0
    # every row sits with its nearest centroid (a valid final assignment)
    D = ((X[:, None, :].astype(np.float64) - res.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(res.labels, D.argmin(1))
    assert res.inertia == pytest.approx(direct_inertia(X, res.labels, res.centroids), rel=1e-9)


def test_close_to_sklearn_on_separated_blobs(blobs):
    from sklearn.cluster import KMeans

    X, truth = blobs
    ref = KMeans(n_clusters=8, n_init=1, max_iter=20, random_state=0).fit(X)
    for seed in range(3):
        res = kmeans(X, 8, seed=seed)
        assert res.inertia <= ref.inertia_ * 1.03
        # recovers the generating blobs (up to renaming)
        pairs = set(zip(res.labels.tolist(), truth.tolist()))
        assert len(pairs) == 8


def test_deterministic_per_seed(blobs):
    X, _ = blobs
    a, b = kmeans(X, 8, seed=5), kmeans(X, 8, seed=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    c = kmeans(X, 30, seed=1, init="random", n_init=2)
    d = kmeans(X, 30, seed=1, init="random", n_init=2)
    np.testing.assert_array_equal(c.labels, d.labels)


def test_n_init_keeps_the_best(blobs):
    X, _ = blobs
    # restart r uses child r of SeedSequence(seed), so restart 0 is the n_init=1 run
    single = kmeans(X, 20, seed=0, n_local_trials=1)
    multi = kmeans(X, 20, seed=0, n_init=4, n_local_trials=1)
    assert multi.inertia <= single.inertia
    assert multi.inertia == pytest.approx(direct_inertia(X, multi.labels, multi.centroids), rel=1e-9)


def test_spherical(blobs):
    X, _ = blobs
    res = kmeans(X, 8, metric="cosine", seed=0)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, rtol=1e-5)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_array_equal(res.labels, (Xn @ res.centroids.T).argmax(1))
    assert res.inertia == pytest.approx(direct_inertia(X, res.labels, res.centroids, "cosine"), rel=1e-5)


def test_fewer_distinct_rows_than_k_drops_empty_clusters():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 3)).astype(np.float32)
    X = np.vstack([base] * 4)  # 20 rows, 5 distinct
    res = kmeans(X, 10, seed=0)
    assert res.empty_dropped == 5
    assert res.centroids.shape == (5, 3)
    assert set(res.labels) == set(range(5))
    # copies of one point share a label, distinct points do not
    assert len({tuple(res.labels[i::5]) for i in range(5)}) == 5
    assert all(len(set(res.labels[i::5])) == 1 for i in range(5))
    assert res.inertia == pytest.approx(0.0, abs=1e-9)


def test_k_equals_n_and_errors(blobs):
    X, _ = blobs
    res = kmeans(X[:15], 15, seed=0)
    assert sorted(res.labels.tolist()) == list(range(15))
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="k=6 clusters need at least k rows, got n=5"):
        kmeans(X[:5], 6)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        kmeans(X, 0)
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'manhattan'"):
        kmeans(X, 3, metric="manhattan")
    with pytest.raises(ValueError, match=r"init must be 'k-means\+\+' or 'random', got 'plusplus'"):
        kmeans(X, 3, init="plusplus")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_to_centroids_brute_force(blobs, metric):
    X, _ = blobs
    res = kmeans(X, 8, seed=0, metric=metric)
    got = nearest_to_centroids(X, res.labels, res.centroids, metric)
    Xd = X.astype(np.float64)
    if metric == "cosine":
        Xd = Xd / np.linalg.norm(Xd, axis=1, keepdims=True)
    C = res.centroids.astype(np.float64)
    for c in range(8):
        members = np.flatnonzero(res.labels == c)
        d = ((Xd[members] - C[c]) ** 2).sum(1)
        assert got[c] == members[np.argmin(d)]


def test_nearest_to_centroids_ties_and_empty():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [5.0, 5.0], [5.0, 5.0]])
    labels = np.array([0, 0, 0, 0, 2, 2])
    C = np.array([[0.0, 0.0], [9.0, 9.0], [5.0, 5.0]])
    # cluster 0: four members at the same distance -> lowest index; cluster 1 empty; cluster 2 duplicates -> 4
    np.testing.assert_array_equal(nearest_to_centroids(X, labels, C), [0, -1, 4])
    with pytest.raises(IndexError, match=r"labels must lie in \[0, 3\)"):
        nearest_to_centroids(X, labels + 2, C)


def test_threaded_seeding_gives_the_same_result(blobs, monkeypatch):
    import datasel.ops.algos.kmeans as km

    X, _ = blobs
    serial = kmeans(X, 12, seed=3)
    monkeypatch.setattr(km, "_PARALLEL_MIN_WORK", 0)
    threaded = kmeans(X, 12, seed=3)
    np.testing.assert_array_equal(serial.labels, threaded.labels)


def test_tolerance_stops_when_the_centroids_settle_as_scikit_learn_does(blobs):
    X, _ = blobs
    full = kmeans(X, 6, seed=0, iters=100)
    early = kmeans(X, 6, seed=0, iters=100, tol=1e-4)
    assert full.iterations == 100
    assert 1 <= early.iterations < 100
    assert early.inertia == pytest.approx(full.inertia, rel=1e-3)
    # The rule itself: the last iteration moved the centroids by at most tol * mean variance, the one before did not.
    threshold = 1e-4 * float(np.asarray(X, dtype=np.float64).var(axis=0).mean())
    before = kmeans(X, 6, seed=0, iters=early.iterations - 1) if early.iterations > 1 else None
    last_shift = float(((early.centroids.astype(np.float64) - before.centroids) ** 2).sum()) if before else 0.0
    assert last_shift <= threshold
    if early.iterations > 2:
        earlier = kmeans(X, 6, seed=0, iters=early.iterations - 2)
        assert float(((before.centroids.astype(np.float64) - earlier.centroids) ** 2).sum()) > threshold

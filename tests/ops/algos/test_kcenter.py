"""k-center greedy against a naive full-matrix reference written here (independent of the module)."""

import numpy as np
import pytest

from datasel.ops.algos.kcenter import KCenterResult, kcenter


def naive_kcenter(X, k, given=(), candidates=None, metric="l2", first=None):
    """Full distance matrix; each step: min over all selected columns, argmax (first max) over unpicked candidates."""
    X = np.asarray(X, dtype=np.float32).astype(np.float64)
    n = X.shape[0]
    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        zero = norms[:, 0] == 0
        X = np.where(norms > 0, X / np.where(norms > 0, norms, 1), 0.0)
        # 1 - cos for unit rows, via differences so that duplicates are at exactly 0
        D = 0.5 * ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        D[zero, :] = 1.0
        D[:, zero] = 1.0
    else:
        D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    cand = list(range(n)) if candidates is None else sorted(set(int(c) for c in candidates))
    selected = [int(g) for g in given]
    order, radius = [], []
    for step in range(k):
        pool = [c for c in cand if c not in selected and c not in order]
        if step == 0 and first is not None:
            pick = first
            r = D[pick, selected].min() if selected else np.inf
        else:
            cols = selected + order
            mins = D[np.ix_(pool, cols)].min(axis=1)
            j = int(np.argmax(mins))  # numpy argmax = first max
            pick, r = pool[j], mins[j]
        order.append(pick)
        radius.append(r)
    return np.array(order), np.array(radius)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return rng.standard_normal((300, 8)) * rng.uniform(0.5, 3.0, size=(300, 1))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_naive_with_first(data, metric):
    res = kcenter(data, 40, metric=metric, first=7)
    ref_order, ref_radius = naive_kcenter(data, 40, metric=metric, first=7)
    assert isinstance(res, KCenterResult)
    assert res.order.dtype == np.int64 and res.radius.dtype == np.float64
    np.testing.assert_array_equal(res.order, ref_order)
    assert np.isinf(res.radius[0])
    np.testing.assert_allclose(res.radius[1:], ref_radius[1:], rtol=1e-5)
    assert np.all(np.diff(res.radius) <= 1e-12)  # covering radius never grows


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_naive_with_given_and_candidates(data, metric):
    rng = np.random.default_rng(0)
    given = rng.choice(300, 12, replace=False)
    candidates = rng.choice(300, 150, replace=False)  # overlaps given on purpose
    res = kcenter(data, 30, given=given, candidates=candidates, metric=metric)
    ref_order, ref_radius = naive_kcenter(data, 30, given=given, candidates=candidates, metric=metric)
    np.testing.assert_array_equal(res.order, ref_order)
    np.testing.assert_allclose(res.radius, ref_radius, rtol=1e-5)
    assert not set(res.order) & set(given)
    assert set(res.order) <= set(candidates)


def test_boolean_masks_equal_index_lists(data):
    given = np.zeros(300, bool)
    given[[1, 5, 9]] = True
    cand = np.ones(300, bool)
    cand[::3] = False
    a = kcenter(data, 20, given=given, candidates=cand)
    b = kcenter(data, 20, given=[1, 5, 9], candidates=np.flatnonzero(cand))
    np.testing.assert_array_equal(a.order, b.order)


def test_ties_from_duplicate_rows_pick_lowest_index():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((20, 5))
    # rows 20..39 duplicate rows 0..19, shuffled: every max is a tie between an original and its copy
    perm = rng.permutation(20)
    X = np.vstack([base, base[perm]])
    for metric in ["l2", "cosine"]:
        res = kcenter(X, 25, metric=metric, first=0)
        ref_order, _ = naive_kcenter(X, 25, metric=metric, first=0)
        np.testing.assert_array_equal(res.order, ref_order)
        assert np.all(res.order[:20] < 20)  # originals (lower index) win every tie
        # after all 20 distinct points are taken, the rest have distance 0: lowest remaining indices in order
        np.testing.assert_array_equal(res.radius[20:], 0.0)
        np.testing.assert_array_equal(res.order[20:], np.arange(20, 25))


def test_all_equal_distances_lowest_index():
    X = np.eye(6)  # all pairwise distances equal
    res = kcenter(X, 6, first=3)
    np.testing.assert_array_equal(res.order, [3, 0, 1, 2, 4, 5])


def test_seeded_first_pick_is_deterministic(data):
    a = kcenter(data, 10, seed=5)
    b = kcenter(data, 10, seed=5)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.order[0] == np.random.default_rng(5).integers(300)
    ref_order, _ = naive_kcenter(data, 10, first=int(a.order[0]))
    np.testing.assert_array_equal(a.order, ref_order)


def test_no_first_with_given_uses_argmax(data):
    res = kcenter(data, 5, given=[0])
    d0 = np.linalg.norm(data.astype(np.float32).astype(np.float64) - data[0].astype(np.float32), axis=1)
    assert res.order[0] == int(np.argmax(d0))
    assert res.radius[0] == pytest.approx(d0.max(), rel=1e-6)


def test_zero_rows_cosine():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    res = kcenter(X, 3, metric="cosine", first=1)
    np.testing.assert_array_equal(res.order, [1, 3, 0])  # -x is at distance 2; the zero row then ties (1) with (0,2)
    np.testing.assert_allclose(res.radius[1:], [2.0, 1.0])


def test_edge_cases_and_errors(data):
    assert kcenter(data, 0).order.size == 0
    full = kcenter(data[:10], 10, first=0)
    assert sorted(full.order) == list(range(10))
    with pytest.raises(ValueError, match="k=11 exceeds the 10 eligible candidates"):
        kcenter(data[:10], 11)
    with pytest.raises(ValueError, match="k=9 exceeds the 8 eligible candidates"):
        kcenter(data[:10], 9, given=[0, 1])
    with pytest.raises(ValueError, match="first=4 is not an eligible candidate"):
        kcenter(data, 3, given=[4], first=4)
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'manhattan'"):
        kcenter(data, 3, metric="manhattan")
    with pytest.raises(IndexError, match=r"given: indices must lie in \[0, \d+\), got range \[1000, 1000\]"):
        kcenter(data, 3, given=[1000])
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        kcenter(np.array([[np.nan, 1.0], [0.0, 1.0]]), 1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_parallel_and_serial_agree(data, metric):
    a = kcenter(data, 50, metric=metric, first=3, parallel=True)
    b = kcenter(data, 50, metric=metric, first=3, parallel=False)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.radius, b.radius)

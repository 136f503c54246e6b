"""Facility location / lazy greedy engine vs independent naive float64 references written here.

Reference: an explicit float64 similarity matrix Sim[v, a] (built column by column so duplicated rows give
bit-identical columns), then a naive greedy that evaluates every remaining candidate's exact marginal gain at every step
and takes the first argmax (lowest index on ties).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from datasel.ops.algos.facility import GreedyResult, build_knn_graph, facility_location, facility_value

KERNELS = ("cosine", "rbf", "euclid_exp")


# ---------------------------------------------------------------------------------------------------------------------
# references


def ref_similarity(X, kernel, gamma=None):
    """Sim[v, a] = s(x_v, x_a) in float64, one column per candidate a."""
    X = np.asarray(X, dtype=np.float32).astype(np.float64)
    n, d = X.shape
    if kernel == "cosine":
        norms = np.linalg.norm(X, axis=1)
        Xn = X / np.where(norms > 0, norms, 1.0)[:, None]
        Sim = np.empty((n, n))
        for a in range(n):
            Sim[:, a] = Xn @ Xn[a]
        return np.maximum(Sim, 0.0)
    D2 = cdist(X, X, "sqeuclidean")  # direct differences, no cancellation
    if kernel == "rbf":
        g = 1.0 / d if gamma is None else gamma
        return np.exp(-g * D2)
    if kernel == "euclid_exp":
        return np.exp(-np.sqrt(D2) / d)
    raise AssertionError(kernel)


def ref_knn_mask(X, Sim, m, facilities=None):
    """Keep, in each row v of Sim, only its m most similar facility columns (most similar by the raw kernel order)."""
    X = np.asarray(X, dtype=np.float64)
    n = Sim.shape[0]
    fac = np.arange(n) if facilities is None else np.asarray(facilities)
    out = np.zeros_like(Sim)
    for v in range(n):
        sims = Sim[v, fac]
        order = np.argsort(-sims, kind="stable")[:m]
        out[v, fac[order]] = sims[order]
    return out


def ref_knn_sim(X, kernel, m, facilities=None, gamma=None):
    """Sparse reference similarity: neighbours ranked by raw cosine / distance (cosine clipping does not reorder)."""
    Sim = ref_similarity(X, kernel, gamma)
    if kernel == "cosine":  # rank by the unclipped cosine, keep clipped values
        Xf = np.asarray(X, dtype=np.float64)
        Xn = Xf / np.linalg.norm(Xf, axis=1)[:, None]
        raw = Xn @ Xn.T
        n = raw.shape[0]
        fac = np.arange(n) if facilities is None else np.asarray(facilities)
        out = np.zeros_like(Sim)
        for v in range(n):
            order = np.argsort(-raw[v, fac], kind="stable")[:m]
            out[v, fac[order]] = Sim[v, fac[order]]
        return out
    return ref_knn_mask(X, Sim, m, facilities)


def ref_greedy(Sim, k, quality=None, alpha=0.0, given=(), candidates=None):
    """Naive greedy on f(S) = (1 - alpha) sum_v max_{a in S} Sim[v, a] + alpha sum_{a in S} q(a)."""
    n = Sim.shape[1]
    cov = np.zeros(Sim.shape[0])
    for g in given:
        cov = np.maximum(cov, Sim[:, g])
    cand = np.arange(n) if candidates is None else np.unique(candidates)
    cand = np.array([a for a in cand if a not in set(given)])
    q = np.zeros(n) if quality is None else np.asarray(quality, dtype=np.float64)
    picks, gains = [], []
    alive = np.ones(cand.shape[0], dtype=bool)
    for _ in range(k):
        fl = np.maximum(Sim[:, cand] - cov[:, None], 0.0).sum(axis=0)
        key = (1 - alpha) * fl + alpha * q[cand]
        key[~alive] = -np.inf
        j = int(np.argmax(key))  # first max = lowest index
        alive[j] = False
        picks.append(int(cand[j]))
        gains.append(float(key[j]))
        cov = np.maximum(cov, Sim[:, cand[j]])
    sel = list(given) + picks
    value = (1 - alpha) * cov.sum() + alpha * q[sel].sum() if sel else 0.0
    return np.array(picks, dtype=np.int64), np.array(gains), float(value)


# Float32 kernels resolve marginal gains to ~1e-7 relative.  Clustered data has *structural* exact ties (e.g. two
# unselected rows a, b whose remaining gain comes only from {a, b}: gain(a) = gain(b) in exact arithmetic, and even the
# float64 reference then decides by rounding), so on such data the picks are checked "identical up to near-ties" by
# replay(); isotropic random data has no such ties and is checked for strictly identical picks.
TIE_TOL = 1e-6


def replay(order, Sim, quality=None, alpha=0.0, given=(), candidates=None, tol=TIE_TOL):
    """Replay a tested pick sequence against exact float64 keys.

    Every pick must be the reference's first argmax, except at a near-tie (best key - pick's key <= tol *
    max(1, |best|)) where the replay accepts it and counts a flip; the replay always follows the tested picks.
    Returns (keys of the picks, objective value, flips).
    """
    n = Sim.shape[1]
    cov = np.zeros(Sim.shape[0])
    for g in given:
        cov = np.maximum(cov, Sim[:, g])
    given_set = set(int(g) for g in given)
    cand = np.arange(n) if candidates is None else np.unique(candidates)
    cand = np.array([a for a in cand if a not in given_set])
    q = np.zeros(n) if quality is None else np.asarray(quality, dtype=np.float64)
    alive = np.ones(cand.shape[0], dtype=bool)
    pos = {int(a): j for j, a in enumerate(cand)}
    keys, flips = [], 0
    for step, a in enumerate(order):
        a = int(a)
        assert a in pos and alive[pos[a]], f"step {step}: row {a} is not a remaining candidate"
        fl = np.maximum(Sim[:, cand] - cov[:, None], 0.0).sum(axis=0)
        key = (1 - alpha) * fl + alpha * q[cand]
        key[~alive] = -np.inf
        j_best = int(np.argmax(key))
        j = pos[a]
        if j != j_best:
            gap = key[j_best] - key[j]
            assert gap <= tol * max(1.0, abs(key[j_best])), (
                f"step {step}: picked {a} (key {key[j]!r}) but {cand[j_best]} has key {key[j_best]!r}"
            )
            flips += 1
        keys.append(float(key[j]))
        alive[j] = False
        cov = np.maximum(cov, Sim[:, a])
    sel = [int(g) for g in given] + [int(a) for a in order]
    value = (1 - alpha) * cov.sum() + alpha * q[sel].sum() if sel else 0.0
    return np.array(keys), float(value), flips


def assert_greedy(res, Sim, k, max_flips=2, **kw):
    """res is the greedy sequence of length k up to near-ties; its gains and value match the float64 objective."""
    assert res.order.shape == (k,)
    keys, value, flips = replay(res.order, Sim, **kw)
    assert flips <= max_flips, f"{flips} near-tie flips"
    np.testing.assert_allclose(res.gains, keys, rtol=1e-5, atol=1e-6)
    assert math.isclose(res.value, value, rel_tol=1e-6)
    return value


def clustered(n, d, n_clusters, seed, noise=0.35, unit=True):
    """Real-ish embeddings: Gaussian clusters, optionally L2-normalised."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    lab = rng.integers(0, n_clusters, size=n)
    X = centers[lab] + noise * rng.standard_normal((n, d))
    if unit:
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_matches_naive_greedy(kernel, seed):
    d = 384 if kernel == "euclid_exp" else 24  # euclid_exp: the 384-d unit-vector regime values ~[0.9948, 1]
    X = clustered(260 + 40 * seed, d, 12, seed)
    k = 30
    res = facility_location(X, k, kernel=kernel)
    assert isinstance(res, GreedyResult)
    value = assert_greedy(res, ref_similarity(X, kernel), k)
    assert math.isclose(facility_value(X, res.order, kernel=kernel), value, rel_tol=1e-6)
    assert res.order.dtype == np.int64 and res.gains.dtype == np.float64
    assert res.evaluations >= X.shape[0]


def test_rbf_custom_gamma_and_unnormalised_data():
    rng = np.random.default_rng(5)
    X = (rng.standard_normal((250, 16)) * 3.0).astype(np.float32)
    res = facility_location(X, 25, kernel="rbf", gamma=0.05)
    order, gains, value = ref_greedy(ref_similarity(X, "rbf", gamma=0.05), 25)
    np.testing.assert_array_equal(res.order, order)
    np.testing.assert_allclose(res.gains, gains, rtol=1e-6)
    assert math.isclose(res.value, value, rel_tol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("knn", [None, 16])
def test_strictly_identical_on_isotropic_data(kernel, seed, knn):
    """No structural ties: the ordered picks must equal the naive float64 greedy exactly (dense and kNN)."""
    d = 384 if kernel == "euclid_exp" else 48
    X = np.random.default_rng(seed).standard_normal((320, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    k = 40
    res = facility_location(X, k, kernel=kernel, knn=knn)
    Sim = ref_similarity(X, kernel) if knn is None else ref_knn_sim(X, kernel, knn)
    order, gains, value = ref_greedy(Sim, k)
    np.testing.assert_array_equal(res.order, order)
    np.testing.assert_allclose(res.gains, gains, rtol=1e-6)
    assert math.isclose(res.value, value, rel_tol=1e-7)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_euclid_exp_precision_384d(seed):
    """exp(-d/384) lies in ~[0.9948, 1]: stored as plain float32 (absolute error ~3e-8 against differences ~1e-3)
    the greedy leaves the float64 picks within ~30 steps on these seeds; the shifted kernel (kernels.py) must not."""
    X = clustered(400, 384, 12, seed)
    res = facility_location(X, 40, kernel="euclid_exp")
    order, gains, value = ref_greedy(ref_similarity(X, "euclid_exp"), 40)
    np.testing.assert_array_equal(res.order, order)
    np.testing.assert_allclose(res.gains, gains, rtol=1e-5, atol=1e-7)  # float32 distances: ~2e-9 per term
    assert math.isclose(res.value, value, rel_tol=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kernel", ["cosine", "euclid_exp"])
def test_quality_alpha(alpha, kernel):
    X = clustered(240, 32, 8, 11)
    q = np.random.default_rng(7).normal(size=240) * (10.0 if kernel == "cosine" else 0.5)
    k = 25
    res = facility_location(X, k, kernel=kernel, quality=q, alpha=alpha)
    assert_greedy(res, ref_similarity(X, kernel), k, quality=q, alpha=alpha, max_flips=0 if alpha == 1 else 2)
    if alpha == 1.0:
        np.testing.assert_array_equal(res.order, np.argsort(-q, kind="stable")[:k])


def test_alpha_one_is_topk_with_ties():
    X = clustered(200, 16, 5, 2)
    q = np.round(np.random.default_rng(1).uniform(size=200), 1)  # many ties
    res = facility_location(X, 30, quality=q, alpha=1.0)
    np.testing.assert_array_equal(res.order, np.argsort(-q, kind="stable")[:30])
    assert math.isclose(res.value, np.sort(q)[::-1][:30].sum())


@pytest.mark.parametrize("kernel", KERNELS)
def test_given_and_candidates(kernel):
    X = clustered(300, 24, 10, 4)
    rng = np.random.default_rng(9)
    given = rng.choice(300, size=7, replace=False)
    candidates = rng.choice(300, size=150, replace=False)
    candidates = np.concatenate([candidates, given[:3]])  # overlap: given rows are never picked
    Sim = ref_similarity(X, kernel)
    res = facility_location(X, 20, kernel=kernel, given=given, candidates=candidates)
    value = assert_greedy(res, Sim, 20, given=list(given), candidates=candidates)
    assert not set(res.order) & set(given)
    assert set(res.order) <= set(candidates)
    sel = np.concatenate([given, res.order])
    assert math.isclose(facility_value(X, sel, kernel=kernel), value, rel_tol=1e-6)
    # given only
    res_g = facility_location(X, 20, kernel=kernel, given=given)
    assert_greedy(res_g, Sim, 20, given=list(given))


def test_quality_with_given_candidates():
    X = clustered(220, 20, 6, 8)
    q = np.random.default_rng(2).uniform(size=220) * 5
    given = np.array([3, 50, 100])
    cand = np.arange(0, 220, 2)
    res = facility_location(X, 15, quality=q, alpha=0.3, given=given, candidates=cand)
    assert_greedy(res, ref_similarity(X, "cosine"), 15, quality=q, alpha=0.3, given=list(given), candidates=cand)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_matches_naive_sparse(kernel, seed):
    d = 384 if kernel == "euclid_exp" else 24
    X = clustered(300, d, 10, 20 + seed)
    m = 12
    res = facility_location(X, 30, kernel=kernel, knn=m)
    value = assert_greedy(res, ref_knn_sim(X, kernel, m), 30)
    assert math.isclose(facility_value(X, res.order, kernel=kernel, knn=m), value, rel_tol=1e-6)
    assert res.info["knn_index"] == "flat"


def test_knn_with_given_candidates_quality():
    X = clustered(280, 20, 8, 31)
    rng = np.random.default_rng(4)
    given = rng.choice(280, size=5, replace=False)
    cand = np.setdiff1d(rng.choice(280, size=160, replace=False), given)
    fac = np.union1d(cand, given)
    q = rng.uniform(size=280) * 3
    m = 10
    res = facility_location(X, 25, knn=m, given=given, candidates=cand, quality=q, alpha=0.3)
    Simk = ref_knn_sim(X, "cosine", m, facilities=fac)
    assert_greedy(res, Simk, 25, quality=q, alpha=0.3, given=list(given), candidates=cand)
    fl = facility_value(X, np.concatenate([given, res.order]), knn=m, facilities=fac)
    _, _, fl_ref = ref_greedy(Simk, 0, given=list(np.concatenate([given, res.order])))
    assert math.isclose(fl, fl_ref, rel_tol=1e-6)


def test_prebuilt_knn_graph():
    X = clustered(250, 16, 8, 12)
    cand = np.arange(0, 250, 3)
    given = np.array([1, 2])
    g = build_knn_graph(X, 9, kernel="euclid_exp", candidates=cand, given=given)
    a = facility_location(X, 20, kernel="euclid_exp", knn=9, candidates=cand, given=given)
    b = facility_location(X, 20, kernel="euclid_exp", knn=g, candidates=cand, given=given)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.value == b.value
    with pytest.raises(ValueError, match="other facility rows"):
        facility_location(X, 20, kernel="euclid_exp", knn=g)
    with pytest.raises(ValueError, match="built with kernel"):
        facility_location(X, 20, kernel="cosine", knn=g, candidates=cand, given=given)
    with pytest.raises(ValueError, match="rows"):
        facility_location(X[:100], 20, kernel="euclid_exp", knn=g)


def test_knn_distance_kernel_uncovered_rows_count_from_zero():
    # rbf with large gamma: s is tiny except for close pairs; uncovered rows must gain the full s (offset handling)
    X = clustered(200, 8, 6, 3, unit=False)
    res = facility_location(X, 20, kernel="rbf", gamma=0.5, knn=5)
    assert_greedy(res, ref_knn_sim(X, "rbf", 5, gamma=0.5), 20)


@pytest.mark.parametrize("kernel", ["cosine", "euclid_exp"])
def test_ivf_index_runs_and_is_exact_for_its_graph(kernel):
    X = clustered(600, 16, 10, 5)
    res = facility_location(X, 20, kernel=kernel, knn=8, knn_index="ivf", nprobe=4)
    assert res.info["knn_index"] == "ivf" and res.info["nlist"] > 0 and res.info["nprobe"] == 4
    value = facility_value(X, res.order, kernel=kernel, knn=8, knn_index="ivf", nprobe=4)
    assert math.isclose(value, res.value, rel_tol=1e-9)
    # with every list probed the inverted file is exhaustive: the exact graph, the same picks
    cand, given = np.arange(0, 600, 2), np.array([1, 3])
    for kw in ({}, {"candidates": cand, "given": given}):
        full = facility_location(X, 20, kernel=kernel, knn=8, knn_index="ivf", nprobe=10_000, **kw)
        flat = facility_location(X, 20, kernel=kernel, knn=8, knn_index="flat", **kw)
        np.testing.assert_array_equal(full.order, flat.order)
        assert math.isclose(full.value, flat.value, rel_tol=1e-12)
    g_ivf = build_knn_graph(X, 8, kernel=kernel, knn_index="ivf", nprobe=10_000)
    g_flat = build_knn_graph(X, 8, kernel=kernel, knn_index="flat")
    np.testing.assert_array_equal(g_ivf.nbr, g_flat.nbr)


# ---------------------------------------------------------------------------------------------------------------------
# ties


@pytest.mark.parametrize("kernel", KERNELS)
def test_tie_breaking_duplicated_rows(kernel):
    # 7 distinct rows with distinct multiplicities (so only copies of the same row tie), shuffled: copies of a row have
    # exactly equal gains at every step, and once all 7 are picked every gain is exactly 0 -- lowest index first.
    base = np.random.default_rng(1).standard_normal((7, 12)).astype(np.float32)
    rows = np.repeat(np.arange(7), [3, 5, 7, 9, 11, 13, 15])
    X = base[np.random.default_rng(0).permutation(rows)]
    k = 15
    Sim = ref_similarity(X, kernel)
    order, gains, value = ref_greedy(Sim, k)
    for engine in (None, X.shape[0]):  # dense, and kNN with every row a neighbour (same objective)
        res = facility_location(X, k, kernel=kernel, knn=engine)
        np.testing.assert_array_equal(res.order, order)
        np.testing.assert_allclose(res.gains, gains, rtol=1e-5, atol=1e-6)
        assert math.isclose(res.value, value, rel_tol=1e-6)
    # every copy of a picked row covers exactly what the row covers: the first 7 picks are the first copies
    assert len({X[i].tobytes() for i in order[:7]}) == 7


# ---------------------------------------------------------------------------------------------------------------------
# stochastic greedy


@pytest.mark.parametrize("knn", [None, 16])
def test_stochastic_deterministic_and_close_to_lazy(knn):
    X = clustered(400, 24, 15, 6, noise=0.2)
    k = 40
    a = facility_location(X, k, optimizer="stochastic", seed=3, knn=knn)
    b = facility_location(X, k, optimizer="stochastic", seed=3, knn=knn)
    c = facility_location(X, k, optimizer="stochastic", seed=4, knn=knn)
    lazy = facility_location(X, k, knn=knn)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.value == b.value
    assert len(set(a.order)) == k and len(set(c.order)) == k
    assert not np.array_equal(a.order, c.order)
    assert a.value >= 0.97 * lazy.value and c.value >= 0.97 * lazy.value
    assert a.info["sample_size"] == math.ceil(400 / k * math.log(100))
    # the reported value is the objective of the picks
    assert math.isclose(facility_value(X, a.order, knn=knn), a.value, rel_tol=1e-6)


def test_stochastic_picks_best_of_its_sample():
    # epsilon tiny => the sample is every remaining row => stochastic greedy == exact greedy
    X = clustered(150, 16, 5, 2)
    res = facility_location(X, 15, optimizer="stochastic", epsilon=1e-12, quality=np.arange(150.0) / 150, alpha=0.3)
    order, _, _ = ref_greedy(ref_similarity(X, "cosine"), 15, quality=np.arange(150.0) / 150, alpha=0.3)
    np.testing.assert_array_equal(res.order, order)


# ---------------------------------------------------------------------------------------------------------------------
# edge cases and errors


def test_k_zero_and_full():
    X = clustered(50, 8, 3, 0)
    r0 = facility_location(X, 0, given=[1, 2])
    assert r0.order.size == 0 and math.isclose(r0.value, facility_value(X, [1, 2]), rel_tol=1e-9)
    r = facility_location(X, 50)
    assert sorted(r.order) == list(range(50))
    assert math.isclose(r.value, facility_value(X, np.arange(50)), rel_tol=1e-9)
    assert facility_value(X, []) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=61), "larger than the number of selectable"),
        (dict(k=5, candidates=[1, 2, 3]), "larger than the number of selectable"),
        (dict(k=3, candidates=[1, 2, 3], given=[2]), "larger than the number of selectable"),
        (dict(k=-1), "non-negative integer"),
        (dict(k=2.5), "non-negative integer"),
        (dict(k=3, kernel="cos2"), "unknown kernel"),
        (dict(k=3, alpha=1.5, quality=np.ones(60)), "alpha must lie"),
        (dict(k=3, alpha=-0.1, quality=np.ones(60)), "alpha must lie"),
        (dict(k=3, alpha=0.5), "needs a quality"),
        (dict(k=3, alpha=0.5, quality=np.r_[np.ones(59), np.nan]), "NaN"),
        (dict(k=3, alpha=0.5, quality=np.ones(10)), "one value per row"),
        (dict(k=3, optimizer="greedy"), "unknown optimizer"),
        (dict(k=3, optimizer="stochastic", epsilon=0.0), "epsilon"),
        (dict(k=3, knn=0), "knn must be"),
        (dict(k=3, gamma=0.1), "only used by kernel='rbf'"),
        (dict(k=3, kernel="rbf", gamma=-1.0), "gamma must be"),
        (dict(k=3, candidates=[0, 60]), "outside"),
        (dict(k=3, given=[0.5]), "integer row indices"),
        (dict(k=3, knn=4, knn_index="hnsw"), "unknown knn index"),
    ],
)
def test_errors(kwargs, match):
    X = clustered(60, 8, 3, 0)
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=match):
        facility_location(X, k, **kwargs)


def test_bad_X():
    with pytest.raises(ValueError, match="2-D"):
        facility_location(np.ones(5), 1)
    X = np.ones((5, 3))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        facility_location(X, 1)
    with pytest.raises(ValueError, match="within facilities"):
        facility_value(np.eye(4), [0, 3], knn=2, facilities=[0, 1])

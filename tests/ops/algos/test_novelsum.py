"""NovelSum density / metric / NovelSelect against brute-force references written here."""

import numpy as np
import pytest

from datasel.ops.algos.novelsum import NovelResult, density, novelselect, novelselect_reference, novelsum

# ----------------------------------------------------------------------------------------------------------------------
# independent references


def brute_sqdist(A, B):
    A = np.asarray(A, np.float32).astype(np.float64)
    B = np.asarray(B, np.float32).astype(np.float64)
    return ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)


def brute_density(Q, R=None, K=10, beta=0.5, self_ids=None):
    """sigma = 1/(mean of K smallest squared L2 + 1e-9)^beta; self_ids[i] = reference column to drop for row i."""
    D = brute_sqdist(Q, Q if R is None else R)
    if R is None:
        self_ids = np.arange(len(Q))
    out = []
    for i, row in enumerate(D):
        if self_ids is not None:
            row = np.delete(row, self_ids[i])
        out.append(1.0 / (np.sort(row)[:K].mean() + 1e-9) ** beta)
    return np.array(out)


def unit(X):
    X = np.asarray(X, np.float32).astype(np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def naive_novelselect(X, k, sigma, first, alpha=1.0, combine="sum", quality=None):
    """Per candidate, per step: list of scaled distances to the selected rows, sorted, 1/rank^alpha, / t."""
    Xn = unit(X)
    n = len(Xn)
    q = np.ones(n) if quality is None else np.asarray(quality, float)
    sel = [first]
    for _ in range(1, k):
        best, best_v = -1, -np.inf
        for i in range(n):
            if i in sel:
                continue
            c = []
            for j in sel:
                g = {"sum": sigma[i] + sigma[j], "row": sigma[i], "product": sigma[i] * sigma[j]}[combine]
                c.append((1.0 - Xn[i] @ Xn[j]) * g)
            c = np.sort(c)
            v = sum(cv / (r + 1) ** alpha for r, cv in enumerate(c)) / len(sel) * q[i]
            if v > best_v:  # strict: first max
                best, best_v = i, v
        sel.append(best)
    return np.array(sel)


def direct_novelsum(X, sigma, alpha=1.0, exclude_self=False):
    Xn = unit(X)
    n = len(Xn)
    vals = []
    for i in range(n):
        d = [0.0 if j == i else 1.0 - Xn[i] @ Xn[j] for j in range(n) if not (exclude_self and j == i)]
        m = np.sort(sigma[i] * np.array(d))
        w = 1.0 / np.arange(1, len(m) + 1) ** alpha
        vals.append((m * w).sum() / w.sum())
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(7)
    return (rng.standard_normal((120, 6)) * rng.uniform(0.5, 2.0, (120, 1))).astype(np.float32)


def authors_density(Q, R=None, K=10, beta=0.5):
    """The authors' density (UmeanNever/NovelSum, utils.py FaissIndex.local_density), by brute force: the index holds
    the distinct reference vectors; each query row (in the reference) takes its K+1 nearest indexed vectors by
    squared L2 and drops the first, its own vector at distance 0.  Written with Python sets of row tuples: for row i
    the neighbours are the distinct vectors other than x_i itself."""
    Q = np.asarray(Q, np.float32)
    R = Q if R is None else np.asarray(R, np.float32)
    distinct = sorted({tuple(r.tolist()) for r in R})
    out = []
    for q in Q:
        others = np.array([v for v in distinct if v != tuple(q.tolist())], dtype=np.float64)
        assert len(others) == len(distinct) - 1  # the query is in the reference: its own vector is the dropped hit
        d = np.sort(((others - q.astype(np.float64)) ** 2).sum(1))
        out.append(1.0 / (d[:K].mean() + 1e-9) ** beta)
    return np.array(out)


DUPLICATED = [3, 3, 8, 21, 21, 21, 30]  # base rows copied: row 3 and row 21 three and four times in all


@pytest.fixture(scope="module")
def dup_pool():
    """40 distinct raw vectors plus 7 exact copies of 4 of them, shuffled: 47 rows, 40 distinct."""
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((40, 5)) * rng.uniform(0.5, 2.0, (40, 1))).astype(np.float32)
    X = np.concatenate([base, base[DUPLICATED]])[rng.permutation(47)]
    assert len({tuple(r.tolist()) for r in X}) == 40
    return X


def twin_rows(X):
    """Indices of the rows that have an exact copy elsewhere in X."""
    keys = [tuple(r.tolist()) for r in X]
    return np.array([i for i, key in enumerate(keys) if keys.count(key) > 1])


# ----------------------------------------------------------------------------------------------------------------------
# density


@pytest.mark.parametrize("K,beta", [(1, 0.5), (5, 0.25), (10, 0.5), (3, 0.0)])
def test_density_matches_brute_force(pool, K, beta):
    np.testing.assert_allclose(density(pool, K=K, beta=beta), brute_density(pool, K=K, beta=beta), rtol=1e-9)


def test_density_without_self_exclusion(pool):
    ref = brute_density(pool, pool, K=4, beta=0.5, self_ids=None)  # self (distance 0) counted
    np.testing.assert_allclose(density(pool, K=4, exclude_self=False), ref, rtol=1e-9)


def test_density_all_index_counts_a_duplicate_as_a_neighbour():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4)).astype(np.float32)
    X[10] = X[3]  # density_index="all": a genuine duplicate is a neighbour at distance 0, not "self"
    sig = density(X, K=2, beta=1.0, density_index="all")
    np.testing.assert_allclose(sig, brute_density(X, K=2, beta=1.0), rtol=1e-9)
    # row 3's two nearest others: row 10 (0) and its true nearest distinct row
    d3 = np.sort(np.delete(brute_sqdist(X[3:4], X)[0], [3, 10]))
    assert sig[3] == pytest.approx(1.0 / (d3[0] / 2 + 1e-9))
    # the default (the authors' np.unique index): the twin goes with "self", the two nearest distinct rows count
    uniq = density(X, K=2, beta=1.0)
    assert uniq[3] == uniq[10] == pytest.approx(1.0 / (d3[:2].mean() + 1e-9))
    assert uniq[3] < sig[3]


def test_density_separate_reference(pool):
    Q = pool[:20] + 0.01  # queries not in the reference: nothing to drop
    R = pool[20:]
    sig = density(Q, R, K=5)
    np.testing.assert_allclose(sig, brute_density(Q, R, K=5, self_ids=None), rtol=1e-9)
    # the reference quirk drops the true nearest neighbour instead
    first = density(Q, R, K=5, self_drop="first")
    D = np.sort(brute_sqdist(Q, R), axis=1)
    np.testing.assert_allclose(first, 1.0 / (D[:, 1:6].mean(1) + 1e-9) ** 0.5, rtol=1e-5)
    assert np.all(first < sig)


def test_density_query_ids_and_zero_distance(pool):
    ids = np.array([5, 17, 60, 99])
    want = brute_density(pool[ids], pool, K=6, self_ids=ids)
    np.testing.assert_allclose(density(pool[ids], pool, K=6, query_ids=ids), want, rtol=1e-9)
    # without ids, the exact-zero hit is recognised as the query itself
    np.testing.assert_allclose(density(pool[ids], pool, K=6), want, rtol=1e-9)


def test_density_errors(pool):
    with pytest.raises(ValueError, match="reference has 5 rows; need at least 6 for K=5"):
        density(pool[:5], K=5)  # needs K+1 rows
    twins = np.concatenate([pool[:5], pool[:1]])
    with pytest.raises(ValueError, match=r"reference has 5 distinct rows \(of 6\); need at least 6 for K=5"):
        density(twins, K=5)  # K+1 distinct rows with the default index
    assert density(twins, K=5, density_index="all").shape == (6,)
    with pytest.raises(ValueError, match="density_index must be 'unique' or 'all', got 'distinct'"):
        density(pool, density_index="distinct")
    with pytest.raises(ValueError, match="density_index must be 'unique' or 'all', got 'rows'"):
        novelselect(pool, 3, density_index="rows")
    with pytest.raises(ValueError, match="self_drop must be 'id' or 'first', got 'last'"):
        density(pool, self_drop="last")
    with pytest.raises(ValueError, match="reference has dimension 3, X_raw has 6"):
        density(pool, pool[:, :3])


# ----------------------------------------------------------------------------------------------------------------------
# exact duplicates: the density index over distinct vectors (the authors' FaissIndex) vs every row


@pytest.mark.parametrize("K,beta", [(3, 0.5), (1, 1.0), (10, 0.25)])
def test_density_default_matches_the_authors_distinct_index(dup_pool, K, beta):
    want = authors_density(dup_pool, K=K, beta=beta)
    np.testing.assert_allclose(density(dup_pool, K=K, beta=beta), want, rtol=1e-9)
    # self_drop="first" is the authors' code path itself (drop faiss's first hit, faiss's float32 distances)
    np.testing.assert_allclose(density(dup_pool, K=K, beta=beta, self_drop="first"), want, rtol=1e-4)
    # the old behaviour: every row indexed, only the query's own row dropped, twins count at distance 0
    old = density(dup_pool, K=K, beta=beta, density_index="all")
    np.testing.assert_allclose(old, brute_density(dup_pool, K=K, beta=beta), rtol=1e-9)
    twins = twin_rows(dup_pool)
    assert len(twins) == 11
    assert np.all(old[twins] > want[twins])  # a zero-distance twin inflates the density weight


def test_density_twins_share_sigma_and_equal_a_single_copy(dup_pool):
    sig = density(dup_pool, K=3)
    keys = [tuple(r.tolist()) for r in dup_pool]
    for i in twin_rows(dup_pool):
        for j in range(len(keys)):
            if keys[j] == keys[i]:
                assert sig[j] == sig[i]
    # collapsing the copies by hand changes nothing: each row's sigma is that of its single copy
    single = np.unique(dup_pool, axis=0)
    where = {tuple(r.tolist()): i for i, r in enumerate(single)}
    np.testing.assert_allclose(sig, density(single, K=3)[[where[key] for key in keys]], rtol=1e-12)


def test_density_distinct_index_with_query_ids_and_outside_queries(dup_pool):
    ids = np.array([0, 5, 11, 17, 29, 46])
    want = authors_density(dup_pool[ids], dup_pool, K=4)
    np.testing.assert_allclose(density(dup_pool[ids], dup_pool, K=4, query_ids=ids), want, rtol=1e-9)
    np.testing.assert_allclose(density(dup_pool[ids], dup_pool, K=4), want, rtol=1e-9)  # zero-distance hit = self
    # queries outside the reference: nothing dropped, the K nearest distinct reference vectors count
    Q = dup_pool[:5] + 0.01
    distinct = np.unique(dup_pool, axis=0)
    D = np.sort(brute_sqdist(Q, distinct), axis=1)
    np.testing.assert_allclose(density(Q, dup_pool, K=4), 1.0 / (D[:, :4].mean(1) + 1e-9) ** 0.5, rtol=1e-9)
    D_all = np.sort(brute_sqdist(Q, dup_pool), axis=1)
    np.testing.assert_allclose(density(Q, dup_pool, K=4, density_index="all"),
                               1.0 / (D_all[:, :4].mean(1) + 1e-9) ** 0.5, rtol=1e-9)


@pytest.mark.parametrize("combine", ["sum", "row"])
def test_novelselect_default_picks_match_the_authors_density(dup_pool, combine):
    k, K = 15, 3
    got = novelselect(dup_pool, k, K=K, density_combine=combine, first=0)  # sigma computed inside
    want = naive_novelselect(dup_pool, k, authors_density(dup_pool, K=K), 0, combine=combine)
    np.testing.assert_array_equal(got.order, want)
    ref = novelselect_reference(dup_pool, k, K=K, density_combine=combine, first=0)
    np.testing.assert_array_equal(ref.order, want)
    # density_index="all" is the old behaviour (twins inflate sigma), and here it really picks differently
    old = novelselect(dup_pool, k, K=K, density_combine=combine, first=0, density_index="all")
    old_want = naive_novelselect(dup_pool, k, brute_density(dup_pool, K=K), 0, combine=combine)
    np.testing.assert_array_equal(old.order, old_want)
    assert not np.array_equal(old.order, got.order)


def test_novelsum_metric_default_uses_the_distinct_index(dup_pool):
    target = np.array([1, 4, 9, 12, 20, 26, 33, 40, 44])
    X = dup_pool[target]
    want = direct_novelsum(X, authors_density(X, dup_pool, K=3))
    assert novelsum(X, dup_pool, K=3, target_ids=target) == pytest.approx(want, rel=1e-10)
    old = direct_novelsum(X, brute_density(X, dup_pool, K=3, self_ids=target))
    assert novelsum(X, dup_pool, K=3, target_ids=target, density_index="all") == pytest.approx(old, rel=1e-10)
    assert abs(want - old) > 1e-3 * abs(old)  # the target meets duplicated pool rows: the two really differ
    # the report behind `datasel measure` (density over the pool) follows the same default and option
    from datasel.ops.algos.diversity_metrics import measure

    assert measure(dup_pool, target, ["novelsum"], novelsum_K=3)["novelsum"] == pytest.approx(want, rel=1e-10)
    got_all = measure(dup_pool, target, ["novelsum"], novelsum_K=3, novelsum_density_index="all")["novelsum"]
    assert got_all == pytest.approx(old, rel=1e-10)
    # reference = the target itself (which holds a twin pair here)
    Xt = dup_pool[twin_rows(dup_pool)[:6]]
    assert novelsum(Xt, K=2) == pytest.approx(direct_novelsum(Xt, authors_density(Xt, K=2)), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------------------
# NovelSelect


@pytest.mark.parametrize("combine", ["sum", "row", "product"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_incremental_equals_naive_and_reference(pool, combine, alpha):
    sigma = density(pool, K=5)
    res = novelselect(pool, 25, sigma=sigma, alpha=alpha, density_combine=combine, first=11)
    ref = novelselect_reference(pool, 25, sigma=sigma, alpha=alpha, density_combine=combine, first=11, batch_size=37)
    naive = naive_novelselect(pool, 25, sigma, 11, alpha=alpha, combine=combine)
    assert isinstance(res, NovelResult) and res.order.dtype == np.int64
    np.testing.assert_array_equal(res.order, naive)
    np.testing.assert_array_equal(ref.order, naive)
    assert np.isnan(res.values[0])
    np.testing.assert_allclose(res.values[1:], ref.values[1:], rtol=1e-12)


def test_quality_multiplier(pool):
    rng = np.random.default_rng(1)
    q = rng.uniform(0.2, 1.5, len(pool))
    sigma = density(pool)
    res = novelselect(pool, 20, sigma=sigma, quality=q, first=0)
    np.testing.assert_array_equal(res.order, naive_novelselect(pool, 20, sigma, 0, quality=q))
    ref = novelselect_reference(pool, 20, sigma=sigma, quality=q, first=0)
    np.testing.assert_array_equal(res.order, ref.order)


def test_default_sigma_seed_and_larger_run():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((700, 16)).astype(np.float32)
    a = novelselect(X, 80)  # sigma from X (K 10, beta 0.5), first centre from seed 42
    b = novelselect_reference(X, 80)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.order[0] == np.random.default_rng(42).integers(700)
    np.testing.assert_array_equal(novelselect(X, 80).order, a.order)
    c = novelselect(X, 80, buffer_dtype="float32")
    assert len(set(c.order)) == 80
    assert np.mean(c.order == a.order) > 0.9  # float32 buffer: same picks up to near ties


def test_picks_are_distinct_and_ties_lowest_index():
    X = np.eye(5, dtype=np.float32)  # every non-selected row has the same score
    res = novelselect(X, 5, sigma=np.ones(5), first=2)
    np.testing.assert_array_equal(res.order, [2, 0, 1, 3, 4])
    assert novelselect(X, 0).order.size == 0
    assert novelselect(X, 1, first=4).order.tolist() == [4]
    with pytest.raises(ValueError, match=r"k must be in \[0, 5\], got 6"):
        novelselect(X, 6, sigma=np.ones(5))
    with pytest.raises(ValueError, match=r"sigma must have shape \(5,\), got \(4,\)"):
        novelselect(X, 2, sigma=np.ones(4))
    with pytest.raises(ValueError, match=r"density_combine must be one of .*, got 'max'"):
        novelselect(X, 2, sigma=np.ones(5), density_combine="max")


# ----------------------------------------------------------------------------------------------------------------------
# NovelSum metric


def test_novelsum_hand_checked():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # squared L2: d01 = d12 = 2, d02 = 4 -> every K=1 density mean is 2; cosine distances d01 = d12 = 1, d02 = 2.
    # rows sorted with self: [0,1,2], [0,1,1], [0,1,2]; weights 1, 1/2, 1/3 (sum 11/6)
    # v = 7/11, 5/11, 7/11 -> mean 19/33
    assert novelsum(X, K=1, beta=0.0) == pytest.approx(19 / 33, rel=1e-12)
    assert novelsum(X, K=1, beta=0.5) == pytest.approx(19 / 33 / np.sqrt(2 + 1e-9), rel=1e-12)
    # without self: [1,2] -> (1 + 1)/1.5 = 4/3, [1,1] -> 1, [1,2] -> 4/3 ; mean 11/9
    assert novelsum(X, K=1, beta=0.0, exclude_self=True) == pytest.approx(11 / 9, rel=1e-12)
    # alpha = 0: plain mean of sigma-scaled distances incl. self: (3 + 2 + 3)/3/3
    assert novelsum(X, K=1, beta=0.0, alpha=0.0) == pytest.approx(8 / 9, rel=1e-12)


@pytest.mark.parametrize("alpha,exclude_self", [(1.0, False), (2.0, True), (0.0, False)])
def test_novelsum_matches_direct_formula(pool, alpha, exclude_self):
    X = pool[:40]
    sigma = brute_density(X, pool, K=5, beta=0.5, self_ids=np.arange(40))
    got = novelsum(X, pool, K=5, alpha=alpha, exclude_self=exclude_self, target_ids=np.arange(40), block=7)
    assert got == pytest.approx(direct_novelsum(X, sigma, alpha, exclude_self), rel=1e-10)


def test_novelsum_prefers_spread_sets(pool):
    rng = np.random.default_rng(3)
    tight = pool[0] + 0.01 * rng.standard_normal((30, 6)).astype(np.float32)
    assert novelsum(pool[:30], pool, K=5) > novelsum(tight, pool, K=5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_parallel_and_serial_agree(pool, alpha):
    sigma = density(pool, K=5)
    a = novelselect(pool, 40, sigma=sigma, alpha=alpha, first=1, parallel=True)
    b = novelselect(pool, 40, sigma=sigma, alpha=alpha, first=1, parallel=False)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.values, b.values)

"""G2IS: PCA components and the vectorised walk against a naive walk written from the paper and its code."""
from __future__ import annotations

import math

import numpy as np
import pytest

from datasel.ops.algos import g2is


def naive_walk(G, comps, budget, delta=0.8, knn=None, anchor_pool=1000, graph=None):
    """The released code's loop: Python checks per candidate, a precomputed neighbour list per row
    (``graph``, or the top ``knn`` of ``G``'s own cosines)."""
    G = [np.asarray(g, dtype=np.float64) / max(np.linalg.norm(g), 1e-10) for g in G]
    n = len(G)
    if graph is None:
        graph = []
        for i in range(n):
            sims = [(float(G[i] @ G[j]), j) for j in range(n) if j != i]
            sims.sort(key=lambda t: (-t[0], t[1]))
            graph.append([j for _, j in sims][: knn if knn is not None else n])
    shares = g2is.share_budget(min(budget, n), comps.weights)
    selected, order = set(), []
    for c, b_c in enumerate(shares):
        if b_c == 0:
            continue
        k = comps.vectors[c]
        proj = [float(g @ k) for g in G]
        ranked = sorted(range(n), key=lambda j: (-proj[j], j))
        anchor = next((j for j in ranked[:anchor_pool] if j not in selected), None)
        if anchor is None:
            rest = [j for j in ranked if j not in selected]
            if not rest:
                break
            anchor = rest[0]
        S = [anchor]
        selected.add(anchor)
        s = G[anchor].copy()

        def ok(j):
            if j in selected or any(float(G[j] @ G[u]) < 0 for u in S):
                return False
            old = abs(float(s @ k)) / np.linalg.norm(s)
            t = s + G[j]
            return abs(float(t @ k)) / np.linalg.norm(t) >= delta * old

        while len(S) < b_c:
            j = next((j for j in graph[S[-1]] if ok(j)), None)
            if j is None:
                j = next((j for j in ranked if ok(j)), None)
            if j is None:
                break
            S.append(j)
            selected.add(j)
            s = s + G[j]
        order += S
    return order


def _data(n=300, d=24, n_val=20, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((4, d))
    G = rng.standard_normal((n, d)) + base[rng.integers(0, 4, n)] * 1.5
    V = rng.standard_normal((n_val, d)) * 0.5 + base[0] + base[1] * rng.standard_normal((n_val, 1))
    return G, V


@pytest.mark.parametrize("knn", [None, 10])
@pytest.mark.parametrize("delta", [0.8, 0.95])
@pytest.mark.parametrize("orient", ["mean", "reference"])
def test_vectorised_walk_equals_the_naive_walk(knn, delta, orient):
    G, V = _data()
    comps = g2is.pca_components(V, 0.5, orient=orient)
    got, counts = g2is.graph_walk(G, comps, 30, delta=delta, knn=knn, anchor_pool=50)
    want = naive_walk(G, comps, 30, delta=delta, knn=knn, anchor_pool=50)
    assert got.tolist() == want
    assert sum(counts) == len(got) and len(set(got.tolist())) == len(got)


@pytest.mark.parametrize("k", [3, 12])
def test_a_given_graph_is_walked_as_the_naive_walk_walks_it(k):
    from datasel.ops.algos.knn import knn_graph

    G, V = _data()
    E = np.random.default_rng(9).standard_normal((len(G), 5))  # another space: the graph is not G's own
    neighbours, _ = knn_graph(E, k)
    comps = g2is.pca_components(V, 0.5)
    got, _ = g2is.graph_walk(G, comps, 30, neighbours=neighbours, anchor_pool=50)
    want = naive_walk(G, comps, 30, anchor_pool=50, graph=neighbours.tolist())
    assert got.tolist() == want
    assert got.tolist() != g2is.graph_walk(G, comps, 30, knn=k, anchor_pool=50)[0].tolist()


def test_walk_with_many_components_and_small_budget_shares_exactly():
    G, V = _data(n=200, n_val=30, seed=3)
    comps = g2is.pca_components(V, 0.9)
    assert len(comps.weights) >= 3
    got, counts = g2is.graph_walk(G, comps, 7, delta=0.5)
    assert counts == g2is.share_budget(7, comps.weights).tolist()
    assert got.tolist() == naive_walk(G, comps, 7, delta=0.5)


def test_share_budget_is_exact_by_largest_remainder():
    assert g2is.share_budget(10, np.array([0.55, 0.3, 0.15])).tolist() == [6, 3, 1]
    assert g2is.share_budget(3, np.array([0.5, 0.25, 0.25])).tolist() == [1, 1, 1]  # remainders .5, .75, .75
    assert g2is.share_budget(2, np.array([0.5, 0.25, 0.25])).tolist() == [1, 1, 0]  # a tie: the earlier one
    assert g2is.share_budget(0, np.array([1.0])).tolist() == [0]


def test_pca_matches_a_centred_svd_and_explained_variance():
    _, V = _data(n_val=40, seed=1)
    comps = g2is.pca_components(V, 0.6, orient="reference")
    C = V - V.mean(axis=0)
    w, vecs = np.linalg.eigh(C.T @ C)
    w, vecs = w[::-1], vecs[:, ::-1]
    ratios = w / w.sum()
    count = int(np.argmax(np.cumsum(ratios) >= 0.6)) + 1
    assert len(comps.weights) == count
    np.testing.assert_allclose(comps.explained, ratios[:count], rtol=1e-8)
    np.testing.assert_allclose(comps.weights.sum(), 1.0)
    for c in range(count):
        assert math.isclose(abs(float(comps.vectors[c] @ vecs[:, c])), 1.0, rel_tol=1e-8)
        assert comps.vectors[c][np.argmax(np.abs(comps.vectors[c]))] > 0  # svd_flip's sign


def test_orient_mean_points_every_component_towards_the_mean_target():
    _, V = _data(n_val=40, seed=2)
    comps = g2is.pca_components(V, 0.8, orient="mean")
    assert (comps.vectors @ V.mean(axis=0) >= 0).all()
    ref = g2is.pca_components(V, 0.8, orient="reference")
    np.testing.assert_allclose(np.abs(comps.vectors), np.abs(ref.vectors))


def test_count_mode_uses_the_rank_of_the_target_set():
    _, V = _data(n_val=6, d=24)
    comps = g2is.pca_components(V, 0.5, mode="count")
    assert len(comps.weights) == 2  # int(0.5 × rank 5), the code's int(0.5 × d = 24) would exceed the rank


def test_pca_refuses_what_it_cannot_decompose():
    with pytest.raises(ValueError, match="at least 2"):
        g2is.pca_components(np.ones((1, 3)))
    with pytest.raises(ValueError, match="do not vary"):
        g2is.pca_components(np.ones((4, 3)))

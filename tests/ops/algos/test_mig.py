"""MIG: the label graph, the propagation and the lazy greedy against plain dense computations written here."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.ops.algos import mig as M


def naive_graph(E, threshold, self_weight):
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    W = E @ E.T
    W[W < threshold] = 0
    P = W.copy()
    np.fill_diagonal(P, self_weight)
    return P / P.sum(axis=0, keepdims=True)


def naive_greedy(Vp, k, phi, gain, a=1e-6, b=0.8, alpha=1.0):
    """The plain greedy: every remaining row's gain recomputed at every step, first index on ties."""
    f = (lambda x: (x + a) ** b) if phi == "power" else (lambda x: 1 - np.exp(-alpha * x))
    df = (lambda x: b * (x + a) ** (b - 1)) if phi == "power" else (lambda x: alpha * np.exp(-alpha * x))
    x = np.zeros(Vp.shape[1])
    picks = []
    for _ in range(min(k, len(Vp))):
        best, best_gain = None, -np.inf
        for i in range(len(Vp)):
            if i in picks:
                continue
            g = float(Vp[i] @ df(x)) if gain == "linear" else float((f(x + Vp[i]) - f(x)).sum())
            if g > best_gain:
                best, best_gain = i, g
        picks.append(best)
        x += Vp[best]
    return picks


def _data(n=120, L=40, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((L, 6)) + rng.standard_normal((1, 6)) * 2  # correlated: some cosines pass 0.6
    tags = [sorted(set(rng.choice(L, size=rng.integers(0, 5), replace=False).tolist())) for _ in range(n)]
    q = rng.uniform(0.5, 6.0, n)
    return E, tags, q


def test_label_graph_equals_the_dense_thresholded_column_normalised_matrix():
    E, _, _ = _data()
    for threshold, self_weight in [(0.6, 1.0), (0.9, 0.5)]:
        g = M.label_graph([f"t{i}" for i in range(len(E))], E, threshold, self_weight, block=7)
        np.testing.assert_allclose(g.matrix.toarray(), naive_graph(E, threshold, self_weight), atol=1e-12)
    assert M.label_graph(["a", "b"], E[:2], 0.6).matrix.nnz >= 2


def test_code_prop_weight_equals_self_weight_one_over_it():
    E, _, _ = _data()
    W = E / np.linalg.norm(E, axis=1, keepdims=True)
    W = W @ W.T
    W[W < 0.6] = 0
    prop = 2.0
    code = np.diag(np.diag(W)) + prop * (W - np.diag(np.diag(W)))  # the reference's P before normalising
    code = code / code.sum(axis=0, keepdims=True)
    ours = M.label_graph([str(i) for i in range(len(E))], E, 0.6, 1 / prop).matrix.toarray()
    np.testing.assert_allclose(ours, code, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_propagate_is_v_times_p(normalize):
    E, tags, q = _data()
    g = M.label_graph([str(i) for i in range(len(E))], E, 0.6)
    V = np.zeros((len(tags), len(E)))
    for i, t in enumerate(tags):
        V[i, t] = q[i] / len(t) if normalize and t else q[i]
    np.testing.assert_allclose(M.propagate(tags, q, g, normalize).toarray(), V @ g.matrix.toarray(), atol=1e-12)


@pytest.mark.parametrize("phi", ["power", "exp"])
@pytest.mark.parametrize("gain", ["exact", "linear"])
def test_lazy_greedy_picks_what_the_plain_greedy_picks(phi, gain):
    E, tags, q = _data()
    g = M.label_graph([str(i) for i in range(len(E))], E, 0.6)
    Vp = M.propagate(tags, q, g)
    got = M.mig_greedy(Vp, 25, phi=phi, gain=gain, alpha=0.3)
    assert got.tolist() == naive_greedy(Vp.toarray(), 25, phi, gain, alpha=0.3)


def test_exact_and_linear_gains_differ_and_exact_gains_more_information():
    E, tags, q = _data(seed=4)
    Vp = M.propagate(tags, q, M.label_graph([str(i) for i in range(len(E))], E, 0.6))
    exact, linear = M.mig_greedy(Vp, 30), M.mig_greedy(Vp, 30, gain="linear")
    assert exact.tolist() != linear.tolist()
    assert M.information(Vp, exact) >= M.information(Vp, linear) - 1e-9


def test_ties_go_to_the_earlier_record_and_untagged_rows_come_last():
    import scipy.sparse as sp

    Vp = sp.csr_matrix(np.array([[0, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float))
    assert M.mig_greedy(Vp, 5).tolist() == [1, 3, 2, 4, 0]

"""knn_graph (faiss, blockwise) against a plain numpy neighbour search."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.ops.algos.knn import knn_graph


def naive(X, k):
    """Each row's k most similar other rows (float64 cosines), ties to the lower index."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    order = np.array([np.lexsort((np.arange(len(X)), -S[i]))[:k] for i in range(len(X))])
    return order, S


@pytest.mark.parametrize("block", [7, 4096])
def test_neighbours_and_cosines_equal_a_plain_search(block):
    X = np.random.default_rng(0).standard_normal((300, 16))
    got, sims = knn_graph(X, 7, block=block)
    want, S = naive(X, 7)
    # float32 search vs float64: neighbours whose cosines differ by < 1e-5 may swap places
    np.testing.assert_allclose(sims, np.take_along_axis(S, want, axis=1), atol=1e-5)
    np.testing.assert_allclose(sims, np.take_along_axis(S, got, axis=1), atol=1e-5)  # each is its own cosine
    swapped = (got != want).any(axis=1)
    assert swapped.sum() <= 3, swapped.sum()
    assert (np.diff(sims, axis=1) <= 1e-7).all()
    assert all(i not in row for i, row in enumerate(got.tolist()))


def test_a_row_is_never_its_own_neighbour_even_with_duplicates():
    X = np.random.default_rng(1).standard_normal((40, 8))
    X[10] = X[3]
    X[20] = X[3] * 2  # the same direction: cosine 1
    got, sims = knn_graph(X, 3)
    assert all(i not in row for i, row in enumerate(got.tolist()))
    assert got[3][:2].tolist() == [10, 20] and got[10][:2].tolist() == [3, 20] and got[20][:2].tolist() == [3, 10]
    np.testing.assert_allclose(sims[3][:2], 1, atol=1e-6)


def test_k_is_capped_at_the_other_rows():
    got, sims = knn_graph(np.eye(4) + 0.1, 10)
    assert got.shape == sims.shape == (4, 3)
    assert sorted(got[0].tolist()) == [1, 2, 3]

"""Exact k-nearest-neighbour graphs by cosine similarity, blockwise (no n × n matrix).

Each row's ``k`` most similar other rows, most similar first (ties: the lower row index first),
with their cosines.  faiss's flat inner-product index on unit-normalised float32 vectors does the
search; queries go in blocks of ``block`` rows, so memory is O(n · k + block · n) at most
(faiss itself tiles the products).  A row's own entry is removed by index, not by position: with
exact duplicate vectors the row itself need not come first.  Ties are ordered by index among the
k + 9 candidates faiss returns per row (a tie wider than that is cut where faiss cuts it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_graph"]


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12), dtype=np.float32)


def knn_graph(X: np.ndarray, k: int, *, block: int = 4096, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """``(neighbours (n, k) int64, cosines (n, k) float32)``; ``k`` is capped at n − 1."""
    import faiss

    n = len(X)
    k = int(min(k, max(n - 1, 0)))
    neighbours = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    if n == 0 or k == 0:
        return neighbours, sims
    U = _unit(X)
    index = faiss.IndexFlatIP(U.shape[1])
    index.add(U)
    # One more than asked for, to drop the row itself; a few more so ties at the k-th place are
    # ordered by index whatever order faiss returns them in.
    extra = min(n, k + 1 + 8)
    for start in range(0, n, block):
        stop = min(n, start + block)
        D, I = index.search(U[start:stop], extra)
        for r in range(stop - start):
            row = start + r
            ids, ds = I[r], D[r]
            keep = (ids != row) & (ids >= 0)
            ids, ds = ids[keep], ds[keep]
            order = np.lexsort((ids, -ds))[:k]
            neighbours[row], sims[row] = ids[order], ds[order]
        if progress is not None:
            progress(stop - start)
    return neighbours, sims

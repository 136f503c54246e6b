"""Diversity metrics of a selection, for reports and comparisons between selectors.

All functions take the pool's feature matrix ``X`` (n, d) and ``selected`` (row indices or a boolean mask; repeated
indices count once, order is irrelevant) and return a float.  Cosine geometry throughout (rows L2-normalised; a zero
row has cosine 0 with everything), except NovelSum's density term, which uses raw squared L2 as in the paper.

The metric families are those compared by NovelSum (Yang et al., "Measuring Data Diversity for Instruction Tuning",
ACL 2025; code UmeanNever/NovelSum): pairwise distance sum, kNN distance, Vendi score (Friedman & Dieng 2023, also
DiverseEvol's evaluation: Wu et al., arXiv 2311.08182, code OFA-Sys/DiverseEvol), facility location and NovelSum
itself (``datasel.ops.algos.novelsum.novelsum``; its density index holds the distinct pool vectors, as in the authors'
``utils.py`` ``FaissIndex``, unless ``novelsum_density_index="all"``).
"""

from __future__ import annotations

import numpy as np

from datasel.ops.algos.arrays import unit_rows
from datasel.ops.algos.novelsum import novelsum as _novelsum

__all__ = ["METRICS", "distsum", "knn_distance", "measure", "vendi_score"]

METRICS = ("distsum", "knn", "vendi", "novelsum", "facility")


def _rows(X, selected) -> tuple[np.ndarray, np.ndarray]:
    """(selected row ids sorted unique, their rows as float64)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, d), got shape {X.shape}")
    n = X.shape[0]
    sel = np.asarray(selected)
    if sel.dtype == np.bool_:
        if sel.shape != (n,):
            raise ValueError(f"a boolean selection must have shape ({n},), got {sel.shape}")
        ids = np.flatnonzero(sel)
    else:
        sel = sel.reshape(-1)
        if sel.size and not np.issubdtype(sel.dtype, np.integer):
            raise TypeError(f"selected must be integer indices or a boolean mask, got dtype {sel.dtype}")
        ids = np.unique(sel.astype(np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= n):
            raise IndexError(f"selected indices must lie in [0, {n})")
    R = np.asarray(X[ids], dtype=np.float64)
    if not np.isfinite(R).all():
        raise ValueError("selected rows contain NaN or infinite values")
    return ids.astype(np.int64), R


def distsum(X, selected) -> float:
    """Mean pairwise cosine distance, (1 / (m(m-1))) * sum_{i != j} (1 - cos(x_i, x_j)); NaN for m < 2.

    Uses sum_{i != j} cos_ij = |sum_i u_i|^2 - sum_i |u_i|^2 on unit rows u: O(m*d), no m x m matrix.
    """
    _, R = _rows(X, selected)
    m = R.shape[0]
    if m < 2:
        return float("nan")
    U = unit_rows(R)
    s = U.sum(axis=0)
    off_diag_cos = float(s @ s - np.einsum("ij,ij->", U, U))
    return 1.0 - off_diag_cos / (m * (m - 1))


def knn_distance(X, selected, k: int = 10, *, block: int = 1024) -> float:
    """Mean over selected rows of the cosine distance to their k-th nearest other selected row.

    ``k`` is clipped to m - 1; NaN for m < 2.  Self is excluded by index (duplicates count as neighbours at 0).
    Complexity O(m^2 * d) in float64 blocks of ``block`` rows, O(block * m) memory.
    """
    _, R = _rows(X, selected)
    m = R.shape[0]
    if m < 2:
        return float("nan")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(int(k), m - 1)
    U = unit_rows(R)
    total = 0.0
    for lo in range(0, m, block):
        hi = min(lo + block, m)
        D = 1.0 - U[lo:hi] @ U.T
        rows = np.arange(hi - lo)
        D[rows, lo + rows] = np.inf  # self is never its own neighbour
        total += float(np.partition(D, kk - 1, axis=1)[:, kk - 1].sum())
    return total / m


def vendi_score(X, selected) -> float:
    """Vendi score exp(-sum_i lambda_i log lambda_i), lambda = eigenvalues of K/m, K = cosine kernel (K_ii = 1).

    The effective number of distinct items: 1 for m copies of one vector, m for m orthogonal ones.  Computed from the
    d x d matrix U^T U / m when m > d (same non-zero spectrum), so O(m * min(m, d)^2).  A zero row is taken as
    orthogonal to everything (its own eigenvalue 1/m); NaN for an empty selection.
    """
    _, R = _rows(X, selected)
    m = R.shape[0]
    if m == 0:
        return float("nan")
    U = unit_rows(R)
    nonzero = U.any(axis=1)
    Un = U[nonzero]
    G = Un @ Un.T if Un.shape[0] <= Un.shape[1] else Un.T @ Un
    lam = np.linalg.eigvalsh(G) if G.size else np.empty(0)
    lam = np.concatenate([lam, np.ones(m - Un.shape[0])]) / m
    lam = lam[lam > 1e-15]  # 0 log 0 = 0; rounding can leave tiny negatives
    return float(np.exp(-(lam * np.log(lam)).sum()))


def measure(
    X,
    selected,
    metrics=METRICS,
    *,
    knn_k: int = 10,
    novelsum_K: int = 10,
    novelsum_alpha: float = 1.0,
    novelsum_beta: float = 0.5,
    novelsum_reference: str = "pool",
    novelsum_density_index: str = "unique",
    facility_kernel: str = "cosine",
) -> dict:
    """Diversity report of a selection: ``{metric name: float}`` for each name in ``metrics``.

    - ``"distsum"``:  :func:`distsum`, mean pairwise cosine distance.
    - ``"knn"``:      :func:`knn_distance` with ``k = knn_k``.
    - ``"vendi"``:    :func:`vendi_score`, cosine kernel.
    - ``"novelsum"``: NovelSum of the selected rows (``novelsum.novelsum``; K, alpha, beta as given, README defaults);
      density reference = the whole pool ``X`` (``novelsum_reference="pool"``, the paper's setting, self excluded by
      row id) or the selection itself (``"selection"``); ``novelsum_density_index`` = ``"unique"`` (default, the
      authors' code: exact duplicate vectors are never each other's density neighbours) or ``"all"``.
    - ``"facility"``: facility-location value sum_{v in X} max_{a in selected} s(v, a), s = max(cos, 0) by default
      (``datasel.ops.algos.facility.facility_value``, imported on demand).
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    if novelsum_reference not in ("pool", "selection"):
        raise ValueError(f"novelsum_reference must be 'pool' or 'selection', got {novelsum_reference!r}")
    if novelsum_density_index not in ("unique", "all"):
        raise ValueError(f"novelsum_density_index must be 'unique' or 'all', got {novelsum_density_index!r}")
    ids, _ = _rows(X, selected)
    out: dict = {}
    for name in metrics:
        if name == "distsum":
            out[name] = distsum(X, ids)
        elif name == "knn":
            out[name] = knn_distance(X, ids, knn_k)
        elif name == "vendi":
            out[name] = vendi_score(X, ids)
        elif name == "novelsum":
            Xa = np.asarray(X)
            if novelsum_reference == "pool":
                out[name] = _novelsum(
                    Xa[ids], Xa, K=novelsum_K, alpha=novelsum_alpha, beta=novelsum_beta, target_ids=ids,
                    density_index=novelsum_density_index,
                )
            else:
                out[name] = _novelsum(Xa[ids], None, K=novelsum_K, alpha=novelsum_alpha, beta=novelsum_beta,
                                      density_index=novelsum_density_index)
        elif name == "facility":
            from datasel.ops.algos.facility import facility_value  # another module; imported only when asked for

            out[name] = float(facility_value(X, ids, kernel=facility_kernel))
    return out

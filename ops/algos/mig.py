"""MIG — Chen et al., "MIG: Automatic Data Selection for Instruction Tuning by Maximizing Information
Gain in Semantic Space" (Findings of ACL 2025); code: yichengchen24/MIG @ 969eb53.

1. **Label graph** over the tag vocabulary: unit embeddings E of the tag strings, W = E Eᵀ with
   entries below ``threshold`` set to 0; P = ``self_weight`` · I + offdiag(W), column-normalised
   (P_ij ← P_ij / Σ_i P_ij).  The code writes diag(W) + prop_weight · offdiag(W); after the
   column normalisation that is this P with ``self_weight = 1 / prop_weight`` (both 1 by default).
2. **Propagated label scores**: V[i, ℓ] = s_i for each tag ℓ of record i (``normalize``: s_i / #tags),
   V' = V P, sparse (a record has a few tags, P is thresholded).
3. **Information** E(S) = Σ_ℓ φ(x_ℓ), x = Σ_{i∈S} V'_i, with the concave φ(x) = (x + a)^b
   (``phi="power"``, a = 1e-6, b = 0.8) or 1 − e^{−αx} (``"exp"``): monotone submodular.
4. **Greedy**: ``gain="exact"`` adds the record with the largest E(S + i) − E(S); ``gain="linear"``
   is the code's pick, the largest V'_i · φ'(x).  Both gains only fall as x grows (φ concave,
   V' ≥ 0), so lazy evaluation (CELF: a max-heap of stale gains, re-evaluated at the top) picks
   exactly what the plain greedy picks; ties go to the earlier record, as the code's argmax does.

The code re-scores every remaining row with a dense (N × L) mat-vec per pick; here each pick
re-evaluates only the heap's top rows, each in O(its non-zeros).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = ["LabelGraph", "label_graph", "propagate", "mig_greedy", "information"]


@dataclass
class LabelGraph:
    """Column-normalised propagation matrix over a tag vocabulary (``vocabulary[j]`` is column j)."""

    vocabulary: list[str]
    matrix: "object"  # scipy.sparse.csr_matrix (L, L)

    def describe(self) -> str:
        L = len(self.vocabulary)
        return f"{L:,} labels, {self.matrix.nnz - L:,} edges"


def label_graph(vocabulary: list[str], embeddings: np.ndarray, threshold: float = 0.9,
                self_weight: float = 1.0, block: int = 2048) -> LabelGraph:
    """The thresholded, column-normalised similarity graph of the labels (blockwise: no dense L × L)."""
    import scipy.sparse as sp

    E = np.asarray(embeddings, dtype=np.float64)
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    L = len(vocabulary)
    rows, cols, vals = [np.arange(L)], [np.arange(L)], [np.full(L, float(self_weight))]
    for start in range(0, L, block):
        S = E[start:start + block] @ E.T
        r, c = np.nonzero(S >= threshold)
        r = r + start
        off = r != c
        rows.append(r[off])
        cols.append(c[off])
        vals.append(S[r[off] - start, c[off]])
    P = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(L, L))
    col = np.asarray(P.sum(axis=0)).ravel()
    P = P @ sp.diags(1.0 / np.where(col > 0, col, 1.0))
    return LabelGraph(list(vocabulary), P.tocsr())


def propagate(tags: list[list[int]], quality: np.ndarray, graph: LabelGraph, normalize: bool = False):
    """V' = V P as CSR (n, L): V[i, ℓ] = s_i (or s_i / #tags with ``normalize``) for each tag ℓ of record i."""
    import scipy.sparse as sp

    n, L = len(tags), len(graph.vocabulary)
    counts = np.fromiter((len(t) for t in tags), dtype=np.int64, count=n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.fromiter((j for t in tags for j in t), dtype=np.int64, count=int(indptr[-1]))
    q = np.asarray(quality, dtype=np.float64)
    per = q / np.maximum(counts, 1) if normalize else q
    data = np.repeat(per, counts)
    V = sp.csr_matrix((data, indices, indptr), shape=(n, L))
    V.sum_duplicates()
    return (V @ graph.matrix).tocsr()


def _phi(kind: str, a: float, b: float, alpha: float):
    if kind == "power":
        return (lambda x: np.power(x + a, b)), (lambda x: b * np.power(x + a, b - 1))
    if kind == "exp":
        return (lambda x: 1.0 - np.exp(-alpha * x)), (lambda x: alpha * np.exp(-alpha * x))
    raise ValueError(f"unknown phi {kind!r}; use power or exp")


def information(Vp, picked, *, phi: str = "power", a: float = 1e-6, b: float = 0.8, alpha: float = 1.0) -> float:
    """E(S) = Σ_ℓ φ(x_ℓ) for the picked rows of V' (x = their column sums)."""
    f, _ = _phi(phi, a, b, alpha)
    x = np.asarray(Vp[np.asarray(picked, dtype=np.int64)].sum(axis=0)).ravel()
    return float(f(x).sum())


def mig_greedy(Vp, k: int, *, phi: str = "power", a: float = 1e-6, b: float = 0.8, alpha: float = 1.0,
               gain: str = "exact") -> np.ndarray:
    """The ``k`` rows of V' (CSR, non-negative) picked greedily by MIG's gain, in pick order (lazy, exact)."""
    if gain not in ("exact", "linear"):
        raise ValueError(f"unknown gain {gain!r}; use exact or linear")
    f, df = _phi(phi, a, b, alpha)
    n, L = Vp.shape
    k = int(min(k, n))
    x = np.zeros(L, dtype=np.float64)
    indptr, indices, data = Vp.indptr, Vp.indices, Vp.data
    fx = f(x)
    dfx = df(x)

    def score(i: int) -> float:
        lo, hi = indptr[i], indptr[i + 1]
        if lo == hi:
            return 0.0
        cols = indices[lo:hi]
        if gain == "linear":
            return float(data[lo:hi] @ dfx[cols])
        return float((f(x[cols] + data[lo:hi]) - fx[cols]).sum())

    heap = [(-score(i), i) for i in range(n)]
    heapq.heapify(heap)
    fresh = np.zeros(n, dtype=np.int64)  # the pick count at which each heap entry was scored
    picks: list[int] = []
    while len(picks) < k and heap:
        neg, i = heapq.heappop(heap)
        if fresh[i] != len(picks):
            heapq.heappush(heap, (-score(i), i))
            fresh[i] = len(picks)
            continue
        # Up to date, and no other entry can beat it: stale entries are upper bounds, and an equal
        # bound sorts after it only when its row comes later (the earlier record wins ties).
        picks.append(i)
        lo, hi = indptr[i], indptr[i + 1]
        cols = indices[lo:hi]
        x[cols] += data[lo:hi]
        fx[cols] = f(x[cols])
        dfx[cols] = df(x[cols])
    return np.asarray(picks, dtype=np.int64)

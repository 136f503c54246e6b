"""Greedy k-center (farthest-first traversal) on a feature matrix.

Serves DiverseEvol (Wu et al., "Self-Evolved Diverse Data Sampling for Efficient Instruction Tuning", arXiv
2311.08182; OFA-Sys/DiverseEvol @ a22e952, its ``KCenter`` strategy: K-center over the unlabelled pool, starting from
the labelled set, raw Euclidean) and the k-center selector of Bhatt et al. ("An Experimental Design Framework for
Label-Efficient Supervised Finetuning of Large Language Models", Findings of ACL 2024, arXiv 2401.06692; no public
code).

The published DiverseEvol loop materialises the full N x N distance matrix and, at every pick, takes the minimum over
all labelled columns for every unlabelled row (rebuilding the U x L sub-matrix).  The same picks follow from one vector
``mind`` (distance from each candidate to its nearest centre) updated by a single O(N*d) pass per pick, because the
nearest-centre distance can only shrink when a centre is added.  Memory is O(N) besides the inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from datasel.ops.algos.arrays import prepared_rows

__all__ = ["KCenterResult", "kcenter", "PARALLEL_MIN_WORK"]

# Rows x dims of one pass above which ``parallel=None`` uses threads (~5 ms of single-thread work).
PARALLEL_MIN_WORK = 1 << 25

# Reassociation lets LLVM vectorise the d-long reductions; every row runs the same instruction sequence, so identical
# rows still get bit-identical distances (ties stay ties, broken by the lowest index).
_FASTMATH = {"reassoc", "contract", "nsz"}


class KCenterResult(NamedTuple):
    """Result of :func:`kcenter`.

    order:  int64 (k,) row indices of X in pick order (``given`` rows are not repeated here).
    radius: float64 (k,) for each pick, its distance to the nearest centre chosen before it (given rows included),
            i.e. the covering radius max_i min_j dist(x_i, c_j) over the remaining candidates just before the pick.
            Euclidean (not squared) for ``metric="l2"``, 1 - cos for ``"cosine"``; ``inf`` for a first pick made
            with no centre yet.  Non-increasing by construction.
    """

    order: np.ndarray
    radius: np.ndarray


@njit(fastmath=_FASTMATH, cache=True)
def _update_chunk(Xc, centre, centre_zero, zero, mind, active, lo, hi, cosine):
    """Shrink mind[lo:hi] with the distance to ``centre``; return (max, argmax) over active rows (first max)."""
    d = Xc.shape[1]
    best = -1.0
    best_i = -1
    for i in range(lo, hi):
        if not active[i]:
            continue
        # Direct differences rather than |x|^2 + |c|^2 - 2 x.c: no cancellation for near neighbours or raw
        # large-norm vectors, and duplicate rows get exactly 0.  float32 inputs, float64 accumulation.
        s = 0.0
        for j in range(d):
            t = np.float64(Xc[i, j]) - np.float64(centre[j])
            s += t * t
        if cosine:
            # 1 - cos(x, c) = |x^ - c^|^2 / 2 on unit rows; a zero row is at distance 1 (cos := 0) from everything.
            s = 1.0 if (centre_zero or zero[i]) else 0.5 * s
        if s < mind[i]:
            mind[i] = s
        if mind[i] > best:
            best = mind[i]
            best_i = i
    return best, best_i


@njit(parallel=True, cache=True)
def _pass(Xc, centre, centre_zero, zero, mind, active, cosine, bv, bi):
    """One parallel update of ``mind`` with a new centre; chunk maxima land in (bv, bi)."""
    m = Xc.shape[0]
    nchunk = bv.shape[0]
    for ch in prange(nchunk):
        bv[ch], bi[ch] = _update_chunk(
            Xc, centre, centre_zero, zero, mind, active, ch * m // nchunk, (ch + 1) * m // nchunk, cosine
        )


@njit(cache=True)
def _pass_serial(Xc, centre, centre_zero, zero, mind, active, cosine, bv, bi):
    """Same as :func:`_pass` on one thread (same chunking, hence the same first-max combination)."""
    m = Xc.shape[0]
    nchunk = bv.shape[0]
    for ch in range(nchunk):
        bv[ch], bi[ch] = _update_chunk(
            Xc, centre, centre_zero, zero, mind, active, ch * m // nchunk, (ch + 1) * m // nchunk, cosine
        )


@njit(cache=True)
def _first_max(bv, bi):
    # Chunks cover increasing row ranges, so a strict ">" in chunk order yields the first (lowest-index) maximum
    # whatever the number of threads.
    best = -1.0
    pick = -1
    for ch in range(bv.shape[0]):
        if bv[ch] > best:
            best = bv[ch]
            pick = bi[ch]
    return best, pick


@njit(cache=True)
def _kcenter_loop(Xc, zero, G, G_zero, k, first, cosine, nchunk, parallel):
    """Farthest-first on candidate rows Xc after seeding ``mind`` with the centres in G.

    Returns (order into Xc, squared-L2 or cosine distance of each pick to its nearest earlier centre).
    """
    m = Xc.shape[0]
    mind = np.full(m, np.inf)
    active = np.ones(m, dtype=np.bool_)
    bv = np.empty(nchunk)
    bi = np.empty(nchunk, dtype=np.int64)
    order = np.empty(k, dtype=np.int64)
    value = np.empty(k)
    for g in range(G.shape[0]):
        if parallel:
            _pass(Xc, G[g], G_zero[g], zero, mind, active, cosine, bv, bi)
        else:
            _pass_serial(Xc, G[g], G_zero[g], zero, mind, active, cosine, bv, bi)
    if first >= 0:
        pick = first
        best = mind[first]  # inf when there are no given rows
    else:
        best, pick = _first_max(bv, bi)  # argmax after the last given centre
    for q in range(k):
        order[q] = pick
        value[q] = best
        active[pick] = False
        if q == k - 1:
            break
        if parallel:
            _pass(Xc, Xc[pick], zero[pick], zero, mind, active, cosine, bv, bi)
        else:
            _pass_serial(Xc, Xc[pick], zero[pick], zero, mind, active, cosine, bv, bi)
        best, pick = _first_max(bv, bi)
    return order, value


def _as_index_array(idx, n: int, name: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise ValueError(f"{name}: boolean mask must have shape ({n},), got {arr.shape}")
        return np.flatnonzero(arr).astype(np.int64)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer indices or a boolean mask, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise IndexError(f"{name}: indices must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]")
    return np.unique(arr)


def kcenter(
    X,
    k: int,
    *,
    given=None,
    candidates=None,
    metric: str = "l2",
    seed: int = 0,
    first: int | None = None,
    parallel: bool | None = None,
) -> KCenterResult:
    """Greedy k-center: pick ``k`` rows of ``X``, each the candidate farthest from all centres chosen so far.

    The 2-approximation of Gonzalez (1985), as used by DiverseEvol's ``KCenter`` strategy (OFA-Sys/DiverseEvol):
    centres = ``given`` rows (DiverseEvol's labelled set) plus the picks; each step picks the unselected candidate
    whose distance to its nearest centre is largest, **first maximum (lowest row index) on ties**.

    Args:
        X: (n, d) features; converted to float32 (distances are accumulated in float64, so float32 storage is the
            only rounding; identical rows give bit-identical distances).
        k: number of rows to pick (0 <= k <= number of eligible candidates).
        given: indices (or a boolean mask) of rows already selected: they act as centres and are never picked.
        candidates: indices (or a boolean mask) of the rows that may be picked (default: all rows).  Only candidate
            rows are covered and scanned; given rows need not be candidates.
        metric: ``"l2"`` = Euclidean on the raw vectors (DiverseEvol; internally squared, as the argmax of the min is
            invariant to the square root, which also avoids the reference's NaN from sqrt of tiny negatives);
            ``"cosine"`` = 1 - cos on L2-normalised rows, computed as |x^ - c^|^2 / 2 (exactly 0 for duplicate rows,
            no cancellation for near neighbours); a zero row is at distance 1 from everything.
        seed: with no ``given`` and no ``first``, the first pick is a uniformly random eligible candidate drawn with
            ``numpy.random.default_rng(seed)`` (DiverseEvol itself starts from an unseeded random labelled set, so
            there is no reference stream to match; pass ``given``/``first`` to control the start).
        first: force the first pick (a candidate not in ``given``); the rest is greedy.
        parallel: split each pass over numba threads.  ``None`` (auto) does so only when a pass has at least
            ``PARALLEL_MIN_WORK`` row-elements: a pick needs a global argmax, so every pass is a fork/join, which costs
            more than it saves on small passes and stalls badly on an oversubscribed machine (measured on 2 shared
            cores, 20K x 384: 2.9 s on one thread vs 11-18 s on two).  Results are identical either way.

    Returns:
        :class:`KCenterResult` ``(order, radius)``.

    Complexity: O((|given| + k) * n_c * d) time with n_c = number of candidates, one fused distance/min/argmax pass
    per centre (numba; over row chunks in parallel for large passes); O(n_c) extra memory besides a float32 copy of
    the candidate rows.

    Example (DiverseEvol round): ``kcenter(emb, 100, given=labelled, metric="l2").order``.
    """
    Xf = prepared_rows(X, metric)
    n, d = Xf.shape
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # Zero rows have no direction: under cosine they stay zero (distance 1 to everything).
    zero = ~Xf.any(axis=1) if metric == "cosine" else np.zeros(n, dtype=np.bool_)

    given_idx = _as_index_array([] if given is None else given, n, "given")
    cand_idx = np.arange(n, dtype=np.int64) if candidates is None else _as_index_array(candidates, n, "candidates")
    eligible = np.setdiff1d(cand_idx, given_idx, assume_unique=True)
    if k > eligible.size:
        raise ValueError(f"k={k} exceeds the {eligible.size} eligible candidates (candidates not in given)")
    if k == 0:
        return KCenterResult(np.empty(0, np.int64), np.empty(0, np.float64))

    if first is not None:
        first = int(first)
        pos = np.searchsorted(eligible, first)
        if pos >= eligible.size or eligible[pos] != first:
            raise ValueError(f"first={first} is not an eligible candidate (a candidate row not in given)")
    elif given_idx.size == 0:
        first = int(eligible[np.random.default_rng(seed).integers(eligible.size)])

    # Scan only eligible rows (sorted ascending, so "first max in scan order" = "lowest row index").
    Xc = np.ascontiguousarray(Xf[eligible])
    G = np.ascontiguousarray(Xf[given_idx]) if given_idx.size else np.empty((0, d), np.float32)
    first_local = -1 if first is None else int(np.searchsorted(eligible, first))
    if parallel is None:
        parallel = Xc.shape[0] * d >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1
    # Several chunks per thread: a descheduled thread on a busy machine then holds up less of the pass (measured:
    # 2 chunks on 2 busy cores ran 8x slower than 8 chunks).  The chunking is fixed for a given thread count, and
    # chunk maxima are combined in order, so the picks never depend on it.
    nchunk = max(1, min(Xc.shape[0] // 256, 8 * numba.get_num_threads()))
    order_local, value = _kcenter_loop(
        Xc, zero[eligible], G, zero[given_idx], k, first_local, metric == "cosine", nchunk, bool(parallel)
    )
    radius = np.sqrt(value) if metric == "l2" else value.copy()
    return KCenterResult(eligible[order_local], radius.astype(np.float64))

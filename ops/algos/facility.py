"""Facility location (+ QDIT modular term) by exact lazy greedy or stochastic greedy, as plain array functions.

Serves Superfiltering-D (Li et al., ACL 2024; tianyi-lab/Superfiltering @ f0764af, ``code_diversity_fla/do_fla.py``;
kernel ``"euclid_exp"``), QDIT (Bukharin et al., "Data Diversity Matters for Robust Instruction Tuning", Findings of
EMNLP 2024, arXiv 2311.14736, no official code; FL + alpha * quality), Bhatt et al. (Findings of ACL 2024, arXiv
2401.06692; FL on prompt embeddings) and the "facility" diversity metric (:func:`facility_value`).  Kernels follow
submodlib (decile-team/submodlib), see kernels.py.

Objective.  V = all n rows of X (the records whose coverage is measured), F = the rows that may be selected.

    FL(S)  = sum_{v in V} max_{a in S} s(v, a)                   (coverage starts at 0, or at max over ``given``)
    f(S)   = (1 - alpha) * FL(S) + alpha * sum_{a in S} q(a)      (QDIT; alpha = 0 is plain FL, alpha = 1 is top-k by q)

FL is monotone submodular and the modular term keeps f submodular, so every marginal gain can only shrink as S grows;
a stale gain is an upper bound and lazy greedy (CELF, Minoux 1978 / Leskovec et al. 2007) returns exactly the greedy
picks.  Ties are broken by the lowest row index, i.e. the picks equal those of a naive greedy that takes the first
argmax of the exact gains at every step.

Engines (hot loops in numba):

- dense:  the (|F| x n) shifted kernel ``t = s - c`` in float32 (kernels.py), one row per candidate, so a gain is one
  contiguous vectorised pass ``sum_v max(t[a, v] - cov[v], 0)``.  Coverage in t-units starts at 0; because every
  s >= c, the first pick covers all of V and FL = sum(cov) + n*c from then on, so the constant n*c is added to the
  step-0 gains only.  ~|F| * n * 4 bytes (6.4 GB at 40k), no other O(n^2) memory.
  Each term (a float32 difference) is truncated to a multiple of 2^-e (e ~ 47) and summed as an int64, so a gain
  does not depend on summation order: identical rows give identical gains, exact ties stay exact.
  Row compaction: coverage only grows, so an entry with t[a, v] <= cov[v] adds 0 to every later gain of a.  Once at
  most 1/8 of a row's entries can still contribute, the row is rewritten in place as (value, int32 index) pairs of its
  live entries (and again whenever those halve); later evaluations cost O(live entries).  On the 20k random
  benchmark this cuts the streamed elements from 1.07e10 to ~3.3e9.
- sparse (``knn=m``): row v keeps only its m most similar facility rows N(v) (kernels.knn_graph); the objective is
  FL_m(S) = sum_v max_{a in S cap N(v)} s(v, a) (0 when no neighbour of v is selected).  For the gains the graph is
  inverted to candidate-major lists {(v, t(v, a)) : a in N(v)} (CSR over candidates), so a gain costs ~m on average.
  Here uncovered rows matter, so coverage is float64 and starts at -c (an uncovered v gains t + c = s).

Priority queue: an array-based binary max-heap of (key, position) where a larger key wins and, on equal keys, the
lower position (= lower row index, positions follow sorted row indices).  A stale root is re-evaluated in place and
sifted down (its key can only decrease); a root whose key was computed at the current step is the exact argmax.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import kernels as _kern
from .kernels import KERNELS, KnnGraph, PreparedKernel, kernel_block, knn_graph, prepare_kernel, similarity_matrix

__all__ = [
    "GreedyResult",
    "facility_location",
    "facility_value",
    "build_knn_graph",
    "KERNELS",
    "similarity_matrix",
    "knn_graph",
    "DENSE_MAX_BYTES",
]

# Refuse dense kernels larger than this (|F| x n float32); use knn= beyond.
DENSE_MAX_BYTES = 8 * 1024**3

# Reassociation lets LLVM vectorise the gain reductions.  Every candidate row runs the same instruction sequence, so
# identical rows still get bit-identical gains (ties stay ties, broken by the lowest index).
_FASTMATH = {"reassoc", "nsz", "contract"}


@dataclass
class GreedyResult:
    """Result of :func:`facility_location`.

    order:       int64 (k,) row indices of X in greedy pick order (``given`` rows are not repeated).
    gains:       float64 (k,) marginal gain of each pick in the full objective (1 - alpha) FL + alpha q.
    value:       f(given + picks) = (1 - alpha) FL(given + picks) + alpha * sum of q over given + picks.
    evaluations: number of marginal-gain evaluations (initial ones included).
    info:        extras for reporting: kernel, offset (c), optimizer, kernel_s / graph_s (kernel or kNN graph build,
                 seconds), select_s (greedy), sample_size (stochastic), knn / knn_index / nlist / nprobe (sparse).
    """

    order: np.ndarray
    gains: np.ndarray
    value: float
    evaluations: int
    info: dict | None = None


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels: heap


@njit(cache=True, inline="always")
def _better(k1, i1, k2, i2):
    return k1 > k2 or (k1 == k2 and i1 < i2)


@njit(cache=True)
def _sift_down(keys, ids, size, pos):
    k = keys[pos]
    i = ids[pos]
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and _better(keys[c + 1], ids[c + 1], keys[c], ids[c]):
            c += 1
        if _better(keys[c], ids[c], k, i):
            keys[pos] = keys[c]
            ids[pos] = ids[c]
            pos = c
        else:
            break
    keys[pos] = k
    ids[pos] = i


@njit(cache=True)
def _heapify(keys, ids, size):
    for pos in range(size // 2 - 1, -1, -1):
        _sift_down(keys, ids, size, pos)


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels: dense gains


@njit(cache=True, fastmath=_FASTMATH)
def _terms_full(row, cov, scale):
    """Fixed-point sum of max(row[v] - cov[v], 0) over a dense row, and the number of positive terms.

    Each term is the float32 difference (exact whenever the two values are within a factor 2, else rounded once)
    converted exactly to float64 and truncated to a multiple of 1 / scale; the sum is an int64, hence independent of
    summation order (vectorised lanes, compaction, serial vs parallel): bit-identical rows always get bit-identical
    gains, so exact ties stay exact.
    """
    acc = 0
    cnt = np.int32(0)
    zero = np.float32(0.0)
    for v in range(row.shape[0]):
        d = max(row[v] - cov[v], zero)
        acc += np.int64(np.float64(d) * scale)
        cnt += np.int32(d > zero)
    return acc, cnt


@njit(cache=True, fastmath=_FASTMATH)
def _terms_compact(vals, idx, cov, scale):
    """As _terms_full over the live entries (vals[j] at row index idx[j]) of a compacted row (same term integers)."""
    acc = 0
    cnt = np.int32(0)
    zero = np.float32(0.0)
    for j in range(vals.shape[0]):
        d = max(vals[j] - cov[idx[j]], zero)
        acc += np.int64(np.float64(d) * scale)
        cnt += np.int32(d > zero)
    return acc, cnt


@njit(cache=True)
def _compact_row(S, Si, live, p, cov, buf_v, buf_i):
    """Keep only the entries of candidate row p that can still contribute (t > cov[v]); cov never decreases, so a
    dropped entry would add exactly 0 to every later gain.  In place: values in S[p, :L], their row indices (int32,
    through the int32 view Si of the same buffer) in Si[p, L:2L]; needs 2L <= current length."""
    L = live[p]
    cnt = 0
    if L < 0:
        row = S[p]
        for v in range(row.shape[0]):
            if row[v] > cov[v]:
                buf_v[cnt] = row[v]
                buf_i[cnt] = v
                cnt += 1
    else:
        for j in range(L):
            v = Si[p, L + j]
            if S[p, j] > cov[v]:
                buf_v[cnt] = S[p, j]
                buf_i[cnt] = v
                cnt += 1
    for j in range(cnt):
        S[p, j] = buf_v[j]
        Si[p, cnt + j] = buf_i[j]
    live[p] = cnt


# A dense row is compacted once at most this fraction of its entries is live.  A compacted entry costs ~4x a streamed
# one (8 bytes + a gather from cov instead of 4 contiguous bytes), so compacting earlier loses (measured on the
# 20k x 20k random benchmark: 1/8 - 1/5 best, 1/2 ~1.7x slower, never compacting ~1.8x slower).
_COMPACT_FRAC = 0.125


@njit(cache=True)
def _eval_dense(S, Si, live, p, cov, scale, buf_v, buf_i):
    """Exact FL gain of candidate row p.  A dense row is compacted once at most 1/8 of its entries are live; a compacted
    row again whenever its live entries halve."""
    L = live[p]
    if L < 0:
        acc, cnt = _terms_full(S[p], cov, scale)
        if cnt <= _COMPACT_FRAC * S.shape[1]:
            _compact_row(S, Si, live, p, cov, buf_v, buf_i)
    else:
        acc, cnt = _terms_compact(S[p, :L], Si[p, L : 2 * L], cov, scale)
        if 2 * cnt <= L:
            _compact_row(S, Si, live, p, cov, buf_v, buf_i)
    return acc / scale


@njit(cache=True, parallel=True)
def _all_gains_dense(S, cov, scale, out):
    """Exact gains of every (dense) row, in parallel (the one O(|F| n) pass every lazy run makes)."""
    for p in prange(S.shape[0]):
        acc, _ = _terms_full(S[p], cov, scale)
        out[p] = acc / scale


@njit(cache=True)
def _cover_dense(S, Si, live, p, cov):
    """cov = max(cov, row p); a compacted row only holds the entries above cov, the others cannot raise it."""
    L = live[p]
    if L < 0:
        row = S[p]
        for v in range(row.shape[0]):
            if row[v] > cov[v]:
                cov[v] = row[v]
    else:
        for j in range(L):
            v = Si[p, L + j]
            if S[p, j] > cov[v]:
                cov[v] = S[p, j]


@njit(cache=True)
def _cover_rows_dense(B, cov):
    """cov = max(cov, max over rows of block B) (coverage from ``given``)."""
    for r in range(B.shape[0]):
        for v in range(B.shape[1]):
            if B[r, v] > cov[v]:
                cov[v] = B[r, v]


@njit(cache=True)
def _lazy_dense(S, Si, live, cov, scale, k, w, qterm, keys, ids, size, stamps, order, picked):
    """CELF on the dense kernel.  keys/ids: a heapified max-heap of exact step-0 keys; stamps[p] = step of keys[p]."""
    n = S.shape[1]
    buf_v = np.empty(n, dtype=np.float32)
    buf_i = np.empty(n, dtype=np.int32)
    evals = 0
    step = 0
    while step < k:
        p = ids[0]
        if stamps[p] == step:
            order[step] = p
            picked[step] = keys[0]
            _cover_dense(S, Si, live, p, cov)
            size -= 1
            if size > 0:
                keys[0] = keys[size]
                ids[0] = ids[size]
                _sift_down(keys, ids, size, 0)
            step += 1
        else:
            if w != 0.0:
                g = _eval_dense(S, Si, live, p, cov, scale, buf_v, buf_i)
                evals += 1
                keys[0] = w * g + qterm[p]
            else:  # alpha == 1: the FL part has weight 0, the key is the quality alone
                keys[0] = qterm[p]
            stamps[p] = step
            _sift_down(keys, ids, size, 0)
    return evals


@njit(cache=True)
def _stoch_pick_dense(S, Si, live, cov, scale, sample, bounds, stamps, step, w, qterm, bonus, buf_v, buf_i):
    """Best of ``sample`` by exact key (ties: lowest position), visiting by decreasing upper bound and stopping once
    no remaining bound can win.  Returns (position, key, evaluations)."""
    order = np.argsort(-bounds[sample], kind="mergesort")
    best_key = -np.inf
    best = -1
    evals = 0
    for j in order:
        p = sample[j]
        b = bounds[p]
        if b < best_key:
            break
        if b == best_key and p > best:
            continue
        if stamps[p] != step:
            if w != 0.0:
                b = w * (_eval_dense(S, Si, live, p, cov, scale, buf_v, buf_i) + bonus) + qterm[p]
                evals += 1
            else:
                b = qterm[p]
            bounds[p] = b
            stamps[p] = step
        if best < 0 or _better(b, p, best_key, best):
            best_key = b
            best = p
    return best, best_key, evals


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels: sparse (candidate-major CSR of the kNN graph)


@njit(cache=True)
def _invert_knn(nbr, t, n_fac):
    """Row-v neighbour lists (n, m) -> candidate-major CSR: for facility f, the rows v with f in N(v) (ascending v)."""
    n, m = nbr.shape
    counts = np.zeros(n_fac + 1, dtype=np.int64)
    for v in range(n):
        for j in range(m):
            f = nbr[v, j]
            if f >= 0:
                counts[f + 1] += 1
    for f in range(n_fac):
        counts[f + 1] += counts[f]
    indptr = counts.copy()
    fill = counts[:-1].copy()
    rows = np.empty(indptr[n_fac], dtype=np.int32)
    vals = np.empty(indptr[n_fac], dtype=np.float32)
    for v in range(n):
        for j in range(m):
            f = nbr[v, j]
            if f >= 0:
                q = fill[f]
                rows[q] = v
                vals[q] = t[v, j]
                fill[f] = q + 1
    return indptr, rows, vals


@njit(cache=True)
def _gain_sparse(indptr, rows, vals, p, cov):
    acc = 0.0
    for q in range(indptr[p], indptr[p + 1]):
        dlt = np.float64(vals[q]) - cov[rows[q]]
        if dlt > 0:
            acc += dlt
    return acc


@njit(cache=True)
def _all_gains_sparse(indptr, rows, vals, cand, cov, out):
    for j in range(cand.shape[0]):
        out[j] = _gain_sparse(indptr, rows, vals, cand[j], cov)


@njit(cache=True)
def _cover_sparse(indptr, rows, vals, p, cov):
    for q in range(indptr[p], indptr[p + 1]):
        x = np.float64(vals[q])
        if x > cov[rows[q]]:
            cov[rows[q]] = x


@njit(cache=True)
def _lazy_sparse(indptr, rows, vals, cand, cov, k, w, qterm, keys, ids, size, stamps, order, picked):
    """CELF on the candidate-major CSR; heap ids are positions j into ``cand`` (facility positions, ascending)."""
    evals = 0
    step = 0
    while step < k:
        j = ids[0]
        if stamps[j] == step:
            order[step] = j
            picked[step] = keys[0]
            _cover_sparse(indptr, rows, vals, cand[j], cov)
            size -= 1
            if size > 0:
                keys[0] = keys[size]
                ids[0] = ids[size]
                _sift_down(keys, ids, size, 0)
            step += 1
        else:
            if w != 0.0:
                g = _gain_sparse(indptr, rows, vals, cand[j], cov)
                evals += 1
                keys[0] = w * g + qterm[j]
            else:
                keys[0] = qterm[j]
            stamps[j] = step
            _sift_down(keys, ids, size, 0)
    return evals


@njit(cache=True)
def _stoch_pick_sparse(indptr, rows, vals, cand, cov, sample, bounds, stamps, step, w, qterm):
    order = np.argsort(-bounds[sample], kind="mergesort")
    best_key = -np.inf
    best = -1
    evals = 0
    for i in order:
        j = sample[i]
        b = bounds[j]
        if b < best_key:
            break
        if b == best_key and j > best:
            continue
        if stamps[j] != step:
            if w != 0.0:
                b = w * _gain_sparse(indptr, rows, vals, cand[j], cov) + qterm[j]
                evals += 1
            else:
                b = qterm[j]
            bounds[j] = b
            stamps[j] = step
        if best < 0 or _better(b, j, best_key, best):
            best_key = b
            best = j
    return best, best_key, evals


# ---------------------------------------------------------------------------------------------------------------------
# argument handling


def _index_array(x, n: int, what: str) -> np.ndarray:
    """Sorted unique int64 row indices in [0, n)."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of row indices, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, dtype=np.int64)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integer row indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= n:
        raise ValueError(f"{what} has indices outside [0, {n}) (min {a.min()}, max {a.max()})")
    return np.unique(a)


def _check_common(optimizer, epsilon, alpha, quality, knn, n):
    if optimizer not in ("lazy", "stochastic"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'lazy' or 'stochastic'")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if optimizer == "stochastic" and not (0.0 < float(epsilon) < 1.0):
        raise ValueError(f"epsilon must lie in (0, 1) for stochastic greedy, got {epsilon}")
    q = None
    if quality is not None:
        q = np.asarray(quality, dtype=np.float64)
        if q.shape != (n,):
            raise ValueError(f"quality must be a 1-D array with one value per row ({n}), got shape {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("quality contains NaN or infinite values")
    elif alpha > 0:
        raise ValueError("alpha > 0 needs a quality array")
    if knn is not None and not isinstance(knn, KnnGraph):
        if isinstance(knn, bool) or not isinstance(knn, (int, np.integer)) or knn < 1:
            raise ValueError(f"knn must be a positive integer (neighbours per row), a KnnGraph or None, got {knn!r}")
    return alpha, q


def _graph_for(pk: PreparedKernel, knn, fac, knn_index, nprobe, seed) -> KnnGraph:
    """Build the kNN graph, or check that a prebuilt one (kernels.knn_graph) fits this problem."""
    if not isinstance(knn, KnnGraph):
        return knn_graph(pk, int(knn), fac, index=knn_index, nprobe=nprobe, seed=seed)
    g = knn
    if g.nbr.shape[0] != pk.Z.shape[0]:
        raise ValueError(f"the KnnGraph has {g.nbr.shape[0]} rows, X has {pk.Z.shape[0]}")
    if g.kernel != pk.name or (pk.name == "rbf" and g.gamma != pk.gamma) or g.offset != pk.offset:
        raise ValueError(
            f"the KnnGraph was built with kernel {g.kernel!r} (gamma {g.gamma}), not {pk.name!r} ({pk.gamma})"
        )
    if g.facilities is None or not np.array_equal(g.facilities, fac):
        raise ValueError("the KnnGraph was searched among other facility rows than union(candidates, given)")
    return g


def _dense_kernel(pk: PreparedKernel, cand: np.ndarray) -> np.ndarray:
    """Shifted kernel rows t[p, v] = s(v, cand[p]) - c as float32 (|cand|, n), built in row blocks."""
    S = _kern.shifted_rows(pk, cand)
    _copy_duplicate_rows(pk.Z, cand, S)
    return S


def _copy_duplicate_rows(Z, cand, S):
    """Give bit-identical candidate rows bit-identical kernel rows.

    A GEMM may round the same dot product differently depending on where a row falls in its tiling; copying the first
    occurrence's row keeps exact ties between duplicated records (broken by the lowest index, like the naive greedy).
    """
    Zc = Z[cand] if cand.shape[0] != Z.shape[0] else Z
    keys = np.ascontiguousarray(Zc).view(np.dtype((np.void, Zc.dtype.itemsize * Zc.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    src = first[inverse.ravel()]
    dup = np.nonzero(src != np.arange(cand.shape[0]))[0]
    for p in dup:
        S[p] = S[src[p]]


def _given_coverage_dense(pk: PreparedKernel, given: np.ndarray) -> np.ndarray:
    n = pk.Z.shape[0]
    cov = np.zeros(n, dtype=np.float32)
    step = _kern.block_rows(n)
    for i0 in range(0, given.shape[0], step):
        B = kernel_block(pk, given[i0 : i0 + step], None)
        _cover_rows_dense(B, cov)
    return cov


# ---------------------------------------------------------------------------------------------------------------------
# public API


def facility_location(
    X,
    k: int,
    *,
    kernel: str = "cosine",
    gamma: float | None = None,
    quality=None,
    alpha: float = 0.0,
    knn: int | None = None,
    optimizer: str = "lazy",
    epsilon: float = 0.01,
    seed: int = 0,
    given=None,
    candidates=None,
    knn_index: str = "auto",
    nprobe: int | None = None,
) -> GreedyResult:
    """Greedy maximisation of facility location (+ alpha * quality): Superfiltering-D's FL and QDIT's f(S).

    X:          (n, d) features (converted to contiguous float32).  V = all rows.
    k:          number of rows to pick (besides ``given``).
    kernel:     ``"cosine"`` (max(cos, 0)), ``"rbf"`` (exp(-gamma ||.||^2), gamma default 1/d) or ``"euclid_exp"``
                (exp(-||.|| / d), submodlib's "euclidean", the Superfiltering-D kernel).  See kernels.py.
    quality, alpha: QDIT f(S) = (1 - alpha) FL(S) + alpha sum_{a in S} q(a); alpha in [0, 1], quality one value per row
                (used as given: normalise it beforehand if the scales of FL and q differ).
    knn:        None = dense kernel; m = sparse objective where row v only counts its m most similar facility rows
                (neighbours of v searched among candidates + given); or a prebuilt kernels.knn_graph(...) over those
                facility rows (lets a caller time or cache the graph separately).  ``knn_index`` = "auto" | "flat" |
                "ivf" and ``nprobe`` choose the search (exact flat up to kernels.EXACT_KNN_MAX facility rows, IVF beyond;
                see kernels.knn_graph).  Lazy greedy is exact for the sparse objective.
    optimizer:  ``"lazy"`` = exact lazy greedy (CELF); ``"stochastic"`` = stochastic greedy (Mirzasoleiman et al.
                2015): every step draws ceil(|F| / k * ln(1 / epsilon)) of the remaining candidates with
                ``numpy.random.default_rng(seed)`` and takes the best of them (exact gains, reusing lazy bounds to skip
                evaluations; ties to the lowest index).  Deterministic for a given seed.
    given:      rows already selected: coverage starts from them; they are never picked.
    candidates: rows that may be picked (default all; ``given`` rows are removed from them).

    Picks: identical to a naive greedy taking the first argmax of the exact marginal gains at every step (lazy).
    Raises ValueError for invalid arguments (k larger than the candidates, unknown kernel, alpha outside [0, 1], NaN in
    quality, ...).
    """
    pk = prepare_kernel(X, kernel, gamma)
    n = pk.Z.shape[0]
    alpha, q = _check_common(optimizer, epsilon, alpha, quality, knn, n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    k = int(k)
    given_idx = _index_array(given, n, "given") if given is not None else np.empty(0, dtype=np.int64)
    cand_all = _index_array(candidates, n, "candidates") if candidates is not None else np.arange(n, dtype=np.int64)
    pick = np.setdiff1d(cand_all, given_idx, assume_unique=True)  # sorted: positions follow row indices
    if k > pick.shape[0]:
        raise ValueError(f"k={k} is larger than the number of selectable candidates ({pick.shape[0]})")
    w = 1.0 - alpha
    qfull = np.zeros(n) if q is None else q
    qterm = alpha * qfull[pick] if alpha > 0 else np.zeros(pick.shape[0])
    c = pk.offset
    info = {"kernel": pk.name, "offset": c, "optimizer": optimizer}
    if optimizer == "stochastic" and k > 0:
        info["sample_size"] = _stochastic_size(pick.shape[0], k, epsilon)

    if knn is None:
        need = pick.shape[0] * n * 4
        if need > DENSE_MAX_BYTES:
            raise ValueError(
                f"dense kernel would need {need / 2**30:.1f} GiB (> {DENSE_MAX_BYTES / 2**30:.0f} GiB); pass knn=m"
            )
        if k == 0:
            cov = _given_coverage_dense(pk, given_idx) if given_idx.size else np.zeros(n, dtype=np.float32)
            order_pos, picked, evals = np.empty(0, np.int64), np.empty(0), 0
        else:
            t0 = time.perf_counter()
            S = _dense_kernel(pk, pick)
            if given_idx.size:
                cov = _given_coverage_dense(pk, given_idx)
                bonus = 0.0
            else:
                cov = np.zeros(n, dtype=np.float32)
                bonus = n * c  # the first pick lifts every row from 0 to >= c (see module docstring)
            t1 = time.perf_counter()
            order_pos, picked, evals = _run_dense(S, cov, k, w, qterm, bonus, optimizer, epsilon, seed)
            info.update(kernel_s=t1 - t0, select_s=time.perf_counter() - t1)
            del S
        any_sel = given_idx.size + k > 0
        fl = float(cov.sum(dtype=np.float64)) + (n * c if any_sel else 0.0)
    else:
        t0 = time.perf_counter()
        fac = np.union1d(cand_all, given_idx)
        graph = _graph_for(pk, knn, fac, knn_index, nprobe, seed)
        info.update(knn=int(graph.nbr.shape[1]), knn_index=graph.index, nlist=graph.nlist, nprobe=graph.nprobe)
        indptr, rows, vals = _invert_knn(graph.nbr, graph.t, fac.shape[0])
        del graph
        cov = np.full(n, -c, dtype=np.float64)  # uncovered rows: a neighbour then adds t + c = s
        for g in np.searchsorted(fac, given_idx):
            _cover_sparse(indptr, rows, vals, g, cov)
        cand_pos = np.searchsorted(fac, pick).astype(np.int64)
        t1 = time.perf_counter()
        order_pos, picked, evals = _run_sparse(indptr, rows, vals, cand_pos, cov, k, w, qterm, optimizer, epsilon, seed)
        info.update(graph_s=t1 - t0, select_s=time.perf_counter() - t1)
        fl = float(cov.sum()) + n * c
    order = pick[order_pos]
    qsum = float(qfull[given_idx].sum() + qfull[order].sum()) if q is not None else 0.0
    value = w * fl + alpha * qsum
    return GreedyResult(order.astype(np.int64), picked.astype(np.float64), float(value), int(evals), info)


def _stochastic_size(n_pick: int, k: int, epsilon: float) -> int:
    return int(min(n_pick, max(1, math.ceil(n_pick / k * math.log(1.0 / epsilon)))))


def _fixed_point_scale(n_rows: int) -> float:
    """2^e with n_rows * 2^e < 2^62: every term is <= 1 (all kernels lie in [0, 1]), so the int64 sums cannot overflow;
    e = 47 at n = 20,000 (terms resolved to 7e-15)."""
    return float(2.0 ** min(52, 62 - math.ceil(math.log2(n_rows + 1))))


def _run_dense(S, cov, k, w, qterm, bonus, optimizer, epsilon, seed):
    """Greedy on the dense shifted kernel S (rows = candidate positions).  S is consumed (rows get compacted)."""
    m, n = S.shape
    order = np.empty(k, dtype=np.int64)
    picked = np.empty(k, dtype=np.float64)
    Si = S.view(np.int32)  # same buffer: compacted rows keep their int32 row indices behind their values
    live = np.full(m, -1, dtype=np.int64)  # -1: dense row; L >= 0: compacted to L live entries
    scale = _fixed_point_scale(n)
    if optimizer == "lazy":
        g0 = np.zeros(m, dtype=np.float64)
        evals = 0
        if w != 0.0:
            _all_gains_dense(S, cov, scale, g0)
            evals = m
        keys = w * (g0 + bonus) + qterm
        ids = np.arange(m, dtype=np.int64)
        _heapify(keys, ids, m)
        stamps = np.zeros(m, dtype=np.int64)
        evals += _lazy_dense(S, Si, live, cov, scale, k, w, qterm, keys, ids, m, stamps, order, picked)
        return order, picked, evals
    # stochastic: bounds start at +inf (never evaluated), so rows never sampled cost nothing
    rng = np.random.default_rng(seed)
    s = _stochastic_size(m, k, epsilon)
    bounds = np.full(m, np.inf)
    stamps = np.full(m, -1, dtype=np.int64)
    remaining = np.arange(m, dtype=np.int64)
    slot = np.arange(m, dtype=np.int64)
    r = m
    evals = 0
    buf_v = np.empty(n, dtype=np.float32)
    buf_i = np.empty(n, dtype=np.int32)
    for step in range(k):
        sample = remaining[:r].copy() if s >= r else remaining[rng.choice(r, size=s, replace=False)]
        p, key, e = _stoch_pick_dense(
            S, Si, live, cov, scale, sample, bounds, stamps, step, w, qterm, bonus if step == 0 else 0.0, buf_v, buf_i
        )
        evals += e
        order[step] = p
        picked[step] = key
        _cover_dense(S, Si, live, p, cov)
        r -= 1
        last = remaining[r]
        remaining[slot[p]] = last
        slot[last] = slot[p]
        remaining[r] = p
    return order, picked, evals


def _run_sparse(indptr, rows, vals, cand, cov, k, w, qterm, optimizer, epsilon, seed):
    m = cand.shape[0]
    order = np.empty(k, dtype=np.int64)
    picked = np.empty(k, dtype=np.float64)
    if k == 0:
        return order, picked, 0
    if optimizer == "lazy":
        g0 = np.zeros(m, dtype=np.float64)
        evals = 0
        if w != 0.0:
            _all_gains_sparse(indptr, rows, vals, cand, cov, g0)
            evals = m
        keys = w * g0 + qterm
        ids = np.arange(m, dtype=np.int64)
        _heapify(keys, ids, m)
        stamps = np.zeros(m, dtype=np.int64)
        evals += _lazy_sparse(indptr, rows, vals, cand, cov, k, w, qterm, keys, ids, m, stamps, order, picked)
        return order, picked, evals
    rng = np.random.default_rng(seed)
    s = _stochastic_size(m, k, epsilon)
    bounds = np.full(m, np.inf)
    stamps = np.full(m, -1, dtype=np.int64)
    remaining = np.arange(m, dtype=np.int64)
    slot = np.arange(m, dtype=np.int64)
    r = m
    evals = 0
    for step in range(k):
        sample = remaining[:r].copy() if s >= r else remaining[rng.choice(r, size=s, replace=False)]
        j, key, e = _stoch_pick_sparse(indptr, rows, vals, cand, cov, sample, bounds, stamps, step, w, qterm)
        evals += e
        order[step] = j
        picked[step] = key
        _cover_sparse(indptr, rows, vals, cand[j], cov)
        r -= 1
        last = remaining[r]
        remaining[slot[j]] = last
        slot[last] = slot[j]
        remaining[r] = j
    return order, picked, evals


def build_knn_graph(
    X,
    m: int,
    *,
    kernel: str = "cosine",
    gamma: float | None = None,
    candidates=None,
    given=None,
    knn_index: str = "auto",
    nprobe: int | None = None,
    seed: int = 0,
) -> KnnGraph:
    """The kNN graph ``facility_location(X, ..., knn=m, candidates=..., given=...)`` would build, to pass as ``knn=``
    (so that it can be timed, cached or reused across budgets / alphas).  Neighbours of every row are searched among
    union(candidates, given) (all rows by default); see kernels.knn_graph for the index."""
    pk = prepare_kernel(X, kernel, gamma)
    n = pk.Z.shape[0]
    _check_common("lazy", 0.5, 0.0, None, m, n)
    given_idx = _index_array(given, n, "given") if given is not None else np.empty(0, dtype=np.int64)
    cand_all = _index_array(candidates, n, "candidates") if candidates is not None else np.arange(n, dtype=np.int64)
    return knn_graph(pk, int(m), np.union1d(cand_all, given_idx), index=knn_index, nprobe=nprobe, seed=seed)


def facility_value(
    X,
    selected,
    *,
    kernel: str = "cosine",
    gamma: float | None = None,
    knn: int | None = None,
    facilities=None,
    knn_index: str = "auto",
    nprobe: int | None = None,
    seed: int = 0,
) -> float:
    """FL(selected) = sum_{v in V} max_{a in selected} s(v, a) over all rows v of X (0 for an empty selection).

    The "facility" diversity metric.  With ``knn=m`` it is the sparse objective of :func:`facility_location`: row v only
    counts its m most similar rows among ``facilities`` (default all rows; pass ``union(candidates, given)`` to match a
    ``facility_location(..., candidates=..., given=..., knn=m)`` run); ``selected`` must then lie within ``facilities``.
    """
    pk = prepare_kernel(X, kernel, gamma)
    n = pk.Z.shape[0]
    sel = _index_array(selected, n, "selected")
    if knn is not None:
        _check_common("lazy", 0.5, 0.0, None, knn, n)
    if sel.size == 0:
        return 0.0
    c = pk.offset
    if knn is None:
        cov = _given_coverage_dense(pk, sel)
        return float(cov.sum(dtype=np.float64)) + n * c
    fac = _index_array(facilities, n, "facilities") if facilities is not None else np.arange(n, dtype=np.int64)
    if not np.isin(sel, fac).all():
        raise ValueError("selected rows must lie within facilities when knn is set")
    graph = _graph_for(pk, knn, fac, knn_index, nprobe, seed)
    is_sel = np.zeros(fac.shape[0] + 1, dtype=bool)  # last slot absorbs the -1 (missing) neighbours
    is_sel[np.searchsorted(fac, sel)] = True
    hit = is_sel[graph.nbr]
    best = np.where(hit, graph.t.astype(np.float64) + c, 0.0).max(axis=1)
    return float(best.sum())

"""NovelSum diversity metric and NovelSelect greedy selection.

Yang et al., "Measuring Data Diversity for Instruction Tuning: A Systematic Analysis and A Reliable Metric" (ACL 2025);
the authors' code is UmeanNever/NovelSum (MIT; files ``utils.py`` — ``FaissIndex`` and its ``local_density`` —,
``novelsum.py`` — the metric — and ``novelselect.py`` — the selection loop).

Three plain array functions plus a slow reference loop:

- :func:`density`  — kNN density weight sigma(x) = 1 / (mean K nearest squared L2 distances + 1e-9)^beta on **raw**
  vectors (faiss flat L2), over the **distinct** reference vectors as in the authors' ``FaissIndex`` (``np.unique``),
  with a correct self-exclusion.
- :func:`novelsum` — the NovelSum metric of a target set (proximity-weighted, density-scaled mean cosine distance).
- :func:`novelselect` — NovelSelect, an exact incremental engine: identical picks to the published loop (which, at every
  step, recomputes the N x t distance matrix and re-sorts every row) at O(N*d + N*t) per pick instead of
  O(N*t*d + N*t*log t).
- :func:`novelselect_reference` — that published loop pattern, written plainly, for tests and benchmarks.

Conventions kept from the reference code (and the corrected defaults) are listed in each docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from numba import njit, prange

from datasel.ops.algos.arrays import float32_rows, unit_rows
from datasel.ops.algos.threads import faiss_threads

__all__ = ["NovelResult", "density", "novelselect", "novelselect_reference", "novelsum"]

_EPS = 1e-9  # the reference's additive constant inside the density power
_COMBINE = {"row": 0, "sum": 1, "product": 2}
_FASTMATH = {"reassoc", "contract", "nsz"}
# Work per pick (rows x (dims + buffered distances)) above which ``parallel=None`` uses threads.
PARALLEL_MIN_WORK = 1 << 25


class NovelResult(NamedTuple):
    """Result of :func:`novelselect` / :func:`novelselect_reference`.

    order:  int64 (k,) row indices in pick order.
    values: float64 (k,) the NovelSelect score v (quality-multiplied) of each pick when it was picked; NaN for the first
            (random) centre, which is not scored.
    """

    order: np.ndarray
    values: np.ndarray


# --------------------------------------------------------------------------------------------------------------------
# density

DENSITY_INDEX = ("unique", "all")


def _check_density_index(density_index: str) -> None:
    if density_index not in DENSITY_INDEX:
        raise ValueError(f"density_index must be 'unique' or 'all', got {density_index!r}")


def _exact_sqdist(Q: np.ndarray, R: np.ndarray, I: np.ndarray, block: int = 1024) -> np.ndarray:
    """float64 squared L2 between each query row and its hit rows (faiss's BLAS path loses digits near 0)."""
    out = np.empty(I.shape, dtype=np.float64)
    for lo in range(0, Q.shape[0], block):
        hi = min(lo + block, Q.shape[0])
        diff = R[I[lo:hi]].astype(np.float64) - Q[lo:hi, None, :].astype(np.float64)
        out[lo:hi] = np.einsum("ijk,ijk->ij", diff, diff)
    return out


def density(
    X_raw,
    reference=None,
    K: int = 10,
    beta: float = 0.5,
    exclude_self: bool = True,
    *,
    self_drop: str = "id",
    query_ids=None,
    density_index: str = "unique",
) -> np.ndarray:
    """kNN density weight of each row: sigma(x) = 1 / (mean of the K nearest squared L2 distances + 1e-9) ** beta.

    NovelSum/NovelSelect's density term (Yang et al., ACL 2025; UmeanNever/NovelSum, ``utils.py``,
    ``FaissIndex.local_density``): exact faiss ``IndexFlatL2`` on the **raw** (unnormalised) vectors, squared
    distances, neighbours taken from ``reference`` (default: the rows of ``X_raw`` themselves).  Dense regions get
    small sigma, so their distances count less.

    Exact duplicates (``density_index="unique"``, the default, as in the authors' code): the authors' ``FaissIndex``
    adds ``np.unique(reference, axis=0)`` (float32 rows) to the index, searches K+1 neighbours for every query row (all
    rows, duplicates included) and drops the first hit as "self".  Once duplicates are collapsed, the query's own
    distinct vector is at distance 0 and is that dropped hit, so the query *and all its exact twins* go away together
    and the K neighbours averaged are the K nearest **other distinct** vectors.  Twins therefore get the same sigma as
    a single copy would (a twin at distance 0 would otherwise shrink the mean and inflate sigma, up to 1e-9**-beta
    with K twins, which makes NovelSelect favour duplicated records).  Exact duplicate = equal float32 values
    (``np.unique`` semantics, so -0.0 equals 0.0).  ``density_index="all"`` indexes every reference row (datasel's
    behaviour before this option): a twin is a neighbour at distance 0, only the query's own row is dropped.
    When the query is not in the reference (no hit at distance 0 and no ``query_ids``), ``self_drop="id"`` keeps the
    K nearest hits as they are, with either index.  Vectors equal only up to float noise are distinct for
    ``np.unique``, in the authors' code as here: e.g. MiniLM vectors of two instructions differing only in spaces
    (squared L2 ~2e-13) stay two neighbours; deduplicate the pool first if that matters.

    Checked against a transcription of the authors' index (faiss ``IndexFlatL2`` over ``np.unique`` rows, K+1 hits,
    first dropped; K 10, beta 0.5) on ``embed(minilm)`` vectors.  First 400 records of a sorted databricks-dolly-15k
    pool (394 distinct: one prompt six times, one twice): faiss's first hit is the query's own vector for 400/400
    rows; sigma agrees to 1.6e-7 relative (``"all"``: up to 43% larger).  ``examples/pool.jsonl`` (586 rows, 576
    distinct): for 2 rows faiss ranks such a whitespace near-twin first (float32 distance 0 for both), so the
    authors' code drops the twin and keeps self; sigma still agrees to 6e-7 relative.  ``"all"`` never gives a
    smaller sigma (its neighbour multiset contains the distinct one).

    Args:
        X_raw: (n, d) query vectors, unnormalised.
        reference: (m, d) reference pool; ``None`` = ``X_raw`` (each query is then reference row ``i``).
        K: neighbours averaged.  beta: density power (0 gives sigma = 1).
        exclude_self: do not count the query itself as its own neighbour (the reference code always searches K+1 and
            drops one hit).
        self_drop: how the self hit is found when ``exclude_self``:
            ``"id"`` (default, corrected) — drop the hit that *is* the query: the hit whose reference row id (with
            ``"unique"``: the id of the query's distinct vector) equals the query's id (``reference=None`` or
            ``query_ids`` given), otherwise the nearest hit at exactly zero distance (the query duplicated in the
            reference); when no hit qualifies, the K nearest are kept as they are.  Distances of the hits are
            recomputed exactly in float64 and re-ranked (ties by row id).
            ``"first"`` (reference compatibility) — drop faiss's first hit blindly and average faiss's own float32
            distances of the remaining K, which is exactly what the authors' code does.  Wrong when the query is not
            in the reference (the true nearest neighbour is dropped) or when float32 rounding ranks another vector
            before the query's own (faiss's BLAS path computes |x|^2 + |y|^2 - 2 x.y, so the self distance need not be
            exactly 0); with ``"all"``, also when a twin outranks the query (harmless: both are at distance 0).
        query_ids: (n,) reference row id of each query row, when the queries are rows of ``reference``
            (e.g. a selection inside its pool); lets ``"id"`` drop exactly the right hit.
        density_index: ``"unique"`` (default; the authors' code) — index the distinct reference vectors;
            ``"all"`` — index every reference row, duplicates included.

    Returns: float64 (n,) sigma.

    Raises ValueError when the index (distinct vectors with ``"unique"``) has fewer than K+1 rows (K with
    ``exclude_self=False``).

    Complexity: one exact kNN search, O(n*m*d) (faiss, multithreaded); O(n*K*d) for the exact re-ranking;
    ``"unique"`` adds a row sort of the reference, O(m*log(m)*d) worst case.
    """
    import faiss

    Q = float32_rows(X_raw, "X_raw")
    R = Q if reference is None else float32_rows(reference, "reference")
    if R.shape[1] != Q.shape[1]:
        raise ValueError(f"reference has dimension {R.shape[1]}, X_raw has {Q.shape[1]}")
    if self_drop not in ("id", "first"):
        raise ValueError(f"self_drop must be 'id' or 'first', got {self_drop!r}")
    _check_density_index(density_index)
    K = int(K)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    n, m = Q.shape[0], R.shape[0]
    if reference is None:
        ids = np.arange(n, dtype=np.int64)
    elif query_ids is not None:
        ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        if ids.shape != (n,):
            raise ValueError(f"query_ids must have shape ({n},), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= m):
            raise IndexError("query_ids out of range of the reference rows")
    else:
        ids = None
    what = "rows"
    if density_index == "unique" and m:
        # The authors' FaissIndex: np.unique over the float32 rows.  Reference row j becomes distinct row inverse[j].
        R, inverse = np.unique(R, axis=0, return_inverse=True)
        R = np.ascontiguousarray(R)
        if ids is not None:
            ids = inverse.reshape(-1).astype(np.int64)[ids]
        if R.shape[0] < m:
            what = f"distinct rows (of {m})"
        m = R.shape[0]
    n_search = K + 1 if exclude_self else K
    if n_search > m:
        raise ValueError(f"reference has {m} {what}; need at least {n_search} for K={K} (exclude_self={exclude_self})")
    if n == 0:
        return np.empty(0, dtype=np.float64)

    index = faiss.IndexFlatL2(R.shape[1])
    index.add(R)
    with faiss_threads(n * m * Q.shape[1]):
        Dv, I = index.search(Q, n_search)
    I = I.astype(np.int64)

    if exclude_self and self_drop == "first":
        mean_sq = Dv[:, 1:].astype(np.float64).mean(axis=1)
    else:
        D = _exact_sqdist(Q, R, I)
        # Re-rank by exact distance, ties by reference row id: independent of faiss's float32 order.
        perm = np.lexsort((I, D), axis=1)
        D = np.take_along_axis(D, perm, axis=1)
        I = np.take_along_axis(I, perm, axis=1)
        if exclude_self:
            if ids is not None:
                is_self = I == ids[:, None]
            else:
                is_self = D == 0.0
            has = is_self.any(axis=1)
            drop = np.where(has, np.argmax(is_self, axis=1), n_search - 1)  # nearest qualifying hit, else the K+1-th
            keep = np.ones(D.shape, dtype=bool)
            keep[np.arange(n), drop] = False
            D = D[keep].reshape(n, K)
        mean_sq = D.mean(axis=1)
    return 1.0 / (mean_sq + _EPS) ** float(beta)


# --------------------------------------------------------------------------------------------------------------------
# shared helpers


def _rank_weights(n: int, alpha: float) -> np.ndarray:
    """w_r = 1 / r**alpha for ranks r = 1..n (alpha = 0: plain mean)."""
    return 1.0 / np.arange(1, n + 1, dtype=np.float64) ** float(alpha)


def _check_vector(v, n: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def _prepare_select(X, k, sigma, density_combine, quality, seed, first, K, beta, density_index):
    Xr = float32_rows(X, "X")
    n = Xr.shape[0]
    k = int(k)
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if density_combine not in _COMBINE:
        raise ValueError(f"density_combine must be one of {sorted(_COMBINE)}, got {density_combine!r}")
    _check_density_index(density_index)
    if sigma is None:
        # k <= 1 never scores a row: skip the kNN search (which also needs more than K rows)
        sig = density(Xr, K=K, beta=beta, density_index=density_index) if k > 1 else np.ones(n)
    else:
        sig = _check_vector(sigma, n, "sigma")
    q = np.ones(n) if quality is None else _check_vector(quality, n, "quality")
    if first is None:
        first = int(np.random.default_rng(seed).integers(n)) if n else 0
    else:
        first = int(first)
        if not 0 <= first < n:
            raise IndexError(f"first={first} out of range [0, {n})")
    return unit_rows(Xr), k, sig, q, first


# --------------------------------------------------------------------------------------------------------------------
# NovelSelect, exact incremental engine


@njit(fastmath=_FASTMATH, cache=True)
def _insert_chunk(Xn, centre, sig_c, sigma, combine, quality, active, buf, S, t, w, dw, plain_mean, lo, hi):
    """Add the new centre to rows lo..hi: distance, density scaling, sorted insertion, rank-weighted sum update.

    Row i's buffer holds its t scaled distances to the earlier centres in ascending order and S[i] = sum_r buf[r]*w[r].
    Inserting c at position p shifts ranks p..t-1 up by one, so S += c*w[p] + sum_{r>=p} buf[r]*(w[r+1]-w[r]); the
    shift loop computes that correction while moving the elements, so a pick costs O(d + t - p) per row.
    """
    d = Xn.shape[1]
    best = -np.inf
    best_i = -1
    for i in range(lo, hi):
        if not active[i]:
            continue
        dot = 0.0
        for j in range(d):  # float32 products are exact in float64; only the sum rounds
            dot += np.float64(Xn[i, j]) * np.float64(centre[j])
        if combine == 0:
            f = sigma[i]
        elif combine == 1:
            f = sigma[i] + sig_c
        else:
            f = sigma[i] * sig_c
        c = (1.0 - dot) * f
        if plain_mean:
            # alpha = 0: every rank weighs 1, order is irrelevant, no buffer needed.
            S[i] += c
        else:
            row = buf[i]
            lo_ = 0
            hi_ = t
            while lo_ < hi_:  # upper bound: equal values keep their order (irrelevant to the sum)
                mid = (lo_ + hi_) >> 1
                if row[mid] <= c:
                    lo_ = mid + 1
                else:
                    hi_ = mid
            p = lo_
            adj = 0.0
            for r in range(t - 1, p - 1, -1):
                v = row[r]
                adj += v * dw[r]
                row[r + 1] = v
            row[p] = c
            c = row[p]  # a float32 buffer stores a rounded value; keep S consistent with what is stored
            S[i] += c * w[p] + adj
        val = S[i] / (t + 1) * quality[i]
        if val > best:
            best = val
            best_i = i
    return best, best_i


@njit(parallel=True, cache=True)
def _insert_pass(Xn, centre, sig_c, sigma, combine, quality, active, buf, S, t, w, dw, plain_mean, bv, bi):
    n = Xn.shape[0]
    nchunk = bv.shape[0]
    for ch in prange(nchunk):
        bv[ch], bi[ch] = _insert_chunk(
            Xn, centre, sig_c, sigma, combine, quality, active, buf, S, t, w, dw, plain_mean,
            ch * n // nchunk, (ch + 1) * n // nchunk,
        )


@njit(cache=True)
def _insert_serial(Xn, centre, sig_c, sigma, combine, quality, active, buf, S, t, w, dw, plain_mean, bv, bi):
    n = Xn.shape[0]
    nchunk = bv.shape[0]
    for ch in range(nchunk):
        bv[ch], bi[ch] = _insert_chunk(
            Xn, centre, sig_c, sigma, combine, quality, active, buf, S, t, w, dw, plain_mean,
            ch * n // nchunk, (ch + 1) * n // nchunk,
        )


@njit(cache=True)
def _novelselect_loop(Xn, sigma, combine, quality, first, k, w, dw, plain_mean, buf, nchunk, par_mode, min_work):
    n = Xn.shape[0]
    active = np.ones(n, dtype=np.bool_)
    S = np.zeros(n)
    bv = np.empty(nchunk)
    bi = np.empty(nchunk, dtype=np.int64)
    order = np.empty(k, dtype=np.int64)
    values = np.empty(k)
    pick = first
    val = np.nan
    for t in range(k):
        order[t] = pick
        values[t] = val
        active[pick] = False
        if t == k - 1:
            break
        # par_mode 0: serial, 1: threads, 2: threads once a pick's work N*(d + t) is worth a fork/join
        work = n * (Xn.shape[1] + (0 if plain_mean else t))
        if par_mode == 1 or (par_mode == 2 and work >= min_work):
            _insert_pass(
                Xn, Xn[pick], sigma[pick], sigma, combine, quality, active, buf, S, t, w, dw, plain_mean, bv, bi
            )
        else:
            _insert_serial(
                Xn, Xn[pick], sigma[pick], sigma, combine, quality, active, buf, S, t, w, dw, plain_mean, bv, bi
            )
        # chunks cover increasing row ranges: strict ">" in chunk order = first maximum overall
        val = -np.inf
        pick = -1
        for ch in range(nchunk):
            if bv[ch] > val:
                val = bv[ch]
                pick = bi[ch]
    return order, values


def novelselect(
    X,
    k: int,
    *,
    sigma=None,
    alpha: float = 1.0,
    density_combine: str = "sum",
    quality=None,
    seed: int = 42,
    first: int | None = None,
    K: int = 10,
    beta: float = 0.5,
    density_index: str = "unique",
    buffer_dtype="float64",
    parallel: bool | None = None,
) -> NovelResult:
    """NovelSelect: greedily add the row with the largest density-scaled, proximity-weighted novelty.

    Yang et al., ACL 2025; the authors' loop is UmeanNever/NovelSum, ``novelselect.py`` (``novelselect`` with
    ``bi_density_weighted_distance`` and ``distance_weighted``).

    With X L2-normalised (rows of the raw ``X`` are normalised here), S_t the t rows picked so far and for candidate i:
    c_ij = (1 - cos(x_i, s_j)) * g(sigma_i, sigma_j), sorted ascending over j, weighted by 1/rank**alpha,
    v_i = (sum_r c_(r)/r**alpha) / t   (the same divisor t for every candidate, as in the reference loop),
    multiplied by ``quality[i]`` when given (the README's quality integration); picked rows are excluded; the next pick
    is the first maximum (lowest row index on ties).  The first centre is uniformly random.

    Args:
        X: (N, d) embeddings (raw; normalised internally in float32).
        k: number of rows to pick.
        sigma: (N,) density weights; default ``density(X, K=K, beta=beta, density_index=density_index)`` on the raw
            rows (reference: K 10, beta 0.5).
        density_index: ``"unique"`` (default, the authors' ``FaissIndex``) — the density index holds the distinct
            vectors, so a row's exact duplicates are never its neighbours (see :func:`density`); ``"all"`` — every
            row is indexed and a twin counts at distance 0 (larger sigma for duplicated rows).  Ignored when
            ``sigma`` is given.
        alpha: rank exponent p (reference ``distance_power``, default 1.0); 0 = plain mean (no sort, no buffer).
        density_combine: g = ``"sum"`` sigma_i + sigma_j (the reference selection code), ``"row"`` sigma_i (the metric's
            convention), ``"product"`` sigma_i * sigma_j.
        quality: optional (N,) per-row multiplier.
        seed, first: the first centre is ``first`` or ``numpy.random.default_rng(seed).integers(N)`` (seed 42 as in the
            reference; its RNG stream is not reproduced, pass ``first`` to pin the start).
        buffer_dtype: dtype of the N x (k-1) sorted-distance buffer; ``"float32"`` halves memory (ranks and sums stay
            float64, but stored distances round to float32, so near-tied picks may differ from a float64 run).
        parallel: spread each pick over numba threads; ``None`` (auto) does so once a pick's work N*(d + t) reaches
            ``PARALLEL_MIN_WORK`` (every pick is a fork/join for the global argmax, which stalls on an oversubscribed
            machine).  Picks are identical either way.

    Returns: :class:`NovelResult` ``(order, values)``.

    Engine: exact and incremental.  The reference recomputes 1 - X S_t^T and re-sorts all N rows at every step
    (O(N*t*d + N*t*log t) per pick).  Here each row keeps its scaled distances sorted in an N x (k-1) buffer; a pick
    costs one float64-accumulated GEMV (O(N*d)) plus a sorted insertion that also updates the rank-weighted sum
    (O(N*t) worst case), parallel over row chunks with numba.  Memory: N*(k-1) buffer entries (160 MB for 20K x 1K
    float64; 396K x 10K needs float32 or chunking).  Picks equal the reference loop's in float64 up to rounding of
    sums (~1e-15 relative), i.e. except for exact numerical ties.
    """
    Xn, k, sig, q, first = _prepare_select(X, k, sigma, density_combine, quality, seed, first, K, beta, density_index)
    n = Xn.shape[0]
    if k == 0:
        return NovelResult(np.empty(0, np.int64), np.empty(0, np.float64))
    alpha = float(alpha)
    plain_mean = alpha == 0.0
    w = _rank_weights(max(k, 2), alpha)
    dw = np.diff(w)
    dtype = np.dtype(buffer_dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"buffer_dtype must be float64 or float32, got {dtype}")
    buf = np.empty((n, 1) if plain_mean else (n, max(k - 1, 1)), dtype=dtype)
    nchunk = max(1, min(n // 64, 8 * numba.get_num_threads()))
    par_mode = 2 if parallel is None else int(bool(parallel))
    if numba.get_num_threads() == 1:
        par_mode = 0
    order, values = _novelselect_loop(
        Xn, sig, _COMBINE[density_combine], q, first, k, w, dw, plain_mean, buf, nchunk, par_mode, PARALLEL_MIN_WORK
    )
    return NovelResult(order, values)


# --------------------------------------------------------------------------------------------------------------------
# NovelSelect, the published loop pattern (slow; for tests and benchmarks)


def _combine_matrix(sig_rows: np.ndarray, sig_sel: np.ndarray, combine: str) -> np.ndarray:
    if combine == "row":
        return sig_rows[:, None]
    if combine == "sum":
        return sig_rows[:, None] + sig_sel[None, :]
    return sig_rows[:, None] * sig_sel[None, :]


def _reference_scores(Xn, selected, sigma, quality, w, combine, batch_size):
    """One step of the published loop: scores of all rows given the selected list (selected rows -> -inf)."""
    n = Xn.shape[0]
    sel = np.asarray(selected, dtype=np.int64)
    S = Xn[sel]
    t = sel.size
    vals = np.empty(n, dtype=np.float64)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        C = 1.0 - Xn[lo:hi] @ S.T
        C = C * _combine_matrix(sigma[lo:hi], sigma[sel], combine).astype(C.dtype)
        C.sort(axis=1)
        v = (C * w[:t].astype(C.dtype)).mean(axis=1, dtype=np.float64)
        vals[lo:hi] = v * quality[lo:hi]
    vals[sel] = -np.inf
    return vals


def novelselect_reference(
    X,
    k: int,
    *,
    sigma=None,
    alpha: float = 1.0,
    density_combine: str = "sum",
    quality=None,
    seed: int = 42,
    first: int | None = None,
    K: int = 10,
    beta: float = 0.5,
    density_index: str = "unique",
    batch_size: int = 10_000,
    dtype="float64",
) -> NovelResult:
    """NovelSelect written the way the published loop computes it: every step, for all N rows in batches, recompute
    C = 1 - X_b S_t^T, scale by the density combination, sort each row, weight by 1/rank**alpha, take the row mean,
    multiply by quality, mask the selected rows with -inf and take the argmax (first max).

    Same arguments and result as :func:`novelselect` (plus ``batch_size``, the reference's 10,000, and ``dtype`` of
    the matrix work: ``"float64"`` for an exact oracle, ``"float32"`` for the reference's speed class on CPU; the
    reference itself runs fp16 on GPU).  Complexity O(N*t*(d + log t)) per pick, O(N*k^2*(d + log k)) in all.
    """
    Xn, k, sig, q, first = _prepare_select(X, k, sigma, density_combine, quality, seed, first, K, beta, density_index)
    if k == 0:
        return NovelResult(np.empty(0, np.int64), np.empty(0, np.float64))
    Xn = Xn.astype(np.dtype(dtype))
    w = _rank_weights(k, alpha)
    order = [first]
    values = [np.nan]
    for _ in range(1, k):
        vals = _reference_scores(Xn, order, sig, q, w, density_combine, int(batch_size))
        pick = int(np.argmax(vals))
        order.append(pick)
        values.append(float(vals[pick]))
    return NovelResult(np.asarray(order, dtype=np.int64), np.asarray(values, dtype=np.float64))


# --------------------------------------------------------------------------------------------------------------------
# NovelSum metric


def novelsum(
    X_target,
    reference=None,
    K: int = 10,
    alpha: float = 1.0,
    beta: float = 0.5,
    exclude_self: bool = False,
    *,
    target_ids=None,
    self_drop: str = "id",
    density_index: str = "unique",
    block: int = 500,
) -> float:
    """NovelSum diversity of a target set (Yang et al., ACL 2025; UmeanNever/NovelSum, ``novelsum.py``: ``novelsum``,
    ``weighted_average`` and ``compute_cos_distance``, with the density of ``utils.py``'s ``FaissIndex``).

    D_ij = 1 - cos(x_i, x_j) on L2-normalised target rows; M_ij = sigma_i * D_ij (row scaled by its own density, the
    metric's convention); each row sorted ascending, **including** itself (D_ii = 0 at rank 1, so the nearest distinct
    point gets weight 1/2**alpha) unless ``exclude_self``; v_i = sum_r M_(r)/r**alpha / sum_r 1/r**alpha (a weighted
    mean); NovelSum = mean_i v_i.

    Args:
        X_target: (n, d) raw target embeddings.
        reference: (m, d) raw reference pool for the density (default: the target itself).
        K, beta: density neighbours and power (:func:`density`, self excluded there as in the reference).
        alpha: rank exponent.
        exclude_self: drop the diagonal (by index, not "the first sorted element") before ranking.
        target_ids: reference row ids of the target rows when the target is a subset of ``reference`` (exact
            self-exclusion in the density); ``self_drop`` is passed to :func:`density` (``"first"`` = reference quirk).
        density_index: ``"unique"`` (default, the authors' code: the density index holds the distinct reference
            vectors, so exact duplicates are never neighbours) or ``"all"`` (every reference row); see :func:`density`.
            Only sigma changes: duplicates inside the target still meet each other at cosine distance 0 in D.
        block: rows per block of the n x n matrix (the reference's 500).

    Complexity: O(m*n*d) density search + O(n^2*d + n^2*log n) for the blocked distance matrix and row sorts; memory
    O(block * n).
    """
    Xr = float32_rows(X_target, "X_target")
    n = Xr.shape[0]
    if n == 0:
        raise ValueError("NovelSum of an empty target set is undefined")
    if exclude_self and n < 2:
        raise ValueError("exclude_self needs at least 2 target rows")
    sigma = density(Xr, reference, K=K, beta=beta, exclude_self=True, self_drop=self_drop, query_ids=target_ids,
                    density_index=density_index)
    Xn = unit_rows(Xr.astype(np.float64))
    ncol = n - 1 if exclude_self else n
    w = _rank_weights(ncol, alpha)
    wsum = w.sum()
    total = 0.0
    for lo in range(0, n, int(block)):
        hi = min(lo + int(block), n)
        D = 1.0 - Xn[lo:hi] @ Xn.T
        rows = np.arange(hi - lo)
        D[rows, lo + rows] = 0.0  # self distance exactly 0 (1 - x.x rounds to +-1e-16)
        if exclude_self:
            keep = np.ones(D.shape, dtype=bool)
            keep[rows, lo + rows] = False
            D = D[keep].reshape(hi - lo, n - 1)
        M = sigma[lo:hi, None] * D
        M.sort(axis=1)
        total += float((M @ w).sum() / wsum)
    return total / n

"""Similarity kernels and kNN similarity graphs for facility location.

The kernel names follow submodlib (decile-team/submodlib, ``metric="cosine"`` / ``"euclidean"``), whose euclidean
kernel is the one Superfiltering-D uses (Li et al., ACL 2024; tianyi-lab/Superfiltering @ f0764af,
``code_diversity_fla/do_fla.py``).

Plain array functions, float32 throughout (a float64 n x n matrix is never built).

Kernels, s(v, a) for rows x_v, x_a of X:

- ``"cosine"``     s = max(cos(x_v, x_a), 0)            -- submodlib-style clip at 0 (rows normalised internally;
                                                            an all-zero row has cosine 0 with everything)
- ``"rbf"``        s = exp(-gamma * ||x_v - x_a||^2)      -- gamma defaults to 1 / d
- ``"euclid_exp"`` s = exp(-||x_v - x_a|| / d)            -- submodlib ``metric="euclidean"``: the distance is NOT
                                                            squared and is divided by the dimension d (Superfiltering-D)

Precision (why the matrices hold ``t = s - c`` rather than ``s``).  Both distance kernels are bounded below by a
constant ``c = exp(-A) > 0``, where A bounds the exponent via the triangle inequality (||x_v - x_a|| <= 2 max ||x||).
For unit 384-d vectors ``euclid_exp`` lives in [e^{-2/384}, 1] ~ [0.9948, 1]: stored as plain float32 near 1 every
value carries an absolute rounding error of ~3e-8 while the differences that drive the greedy are ~1e-3, i.e. only
four to five significant digits survive.  The blocks therefore store ``t = s - c`` computed without cancellation as
``t = -exp(-a) * expm1(a - A)`` (a = the exponent of s), which keeps full float32 *relative* precision in t.  Facility
location only needs differences ``s - cov`` and, once every row is covered, is shifted by the constant ``n * c``; the
greedy engine adds that constant back explicitly (see facility.py).  For ``"cosine"`` c = 0 and t = s.

Distances use ``||x||^2 + ||y||^2 - 2 x.y`` (a float32 GEMM).  That form cancels catastrophically for nearby points
(the diagonal, near-duplicates), so entries whose squared distance is below ``_REPAIR_REL`` times the norms are
recomputed directly as sum((x - y)^2) in float64; results are clamped at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

__all__ = [
    "KERNELS",
    "PreparedKernel",
    "prepare_kernel",
    "kernel_block",
    "shifted_rows",
    "similarity_matrix",
    "KnnGraph",
    "knn_graph",
    "EXACT_KNN_MAX",
]

KERNELS = ("cosine", "rbf", "euclid_exp")

# Squared distances below this fraction of (||x||^2 + max ||y||^2) are recomputed directly (see module docstring).
_REPAIR_REL = 1e-2
# Target size of one float32 kernel block (rows x all columns), in elements (~64 MB).
_BLOCK_ELEMS = 16 * 1024 * 1024
# Exact (flat) faiss kNN search up to this many facility rows; an IVF index above (see knn_graph).
EXACT_KNN_MAX = 50_000


@dataclass(frozen=True)
class PreparedKernel:
    """A kernel bound to a data matrix, ready for block evaluation.

    Z:      float32 (n, d) C-contiguous; rows L2-normalised for ``"cosine"``, raw otherwise.
    sq:     float32 (n,) squared row norms of Z (computed in float64), distance kernels only.
    gamma:  the rbf gamma actually used (None for other kernels).
    A:      upper bound of the exponent a (s = exp(-a)); ``offset = exp(-A)``.
    offset: c, a lower bound of every similarity; blocks hold ``t = s - c``.
    """

    name: str
    Z: np.ndarray
    sq: np.ndarray | None
    gamma: float | None
    A: float
    offset: float
    dim: int = field(default=0)


def prepare_kernel(X, kernel: str = "cosine", gamma: float | None = None) -> PreparedKernel:
    """Validate ``X`` and the kernel arguments and precompute what block evaluation needs."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    Z = np.ascontiguousarray(X, dtype=np.float32)
    if Z.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d), got shape {Z.shape}")
    n, d = Z.shape
    if n == 0 or d == 0:
        raise ValueError(f"X must have at least one row and one column, got shape {Z.shape}")
    if not np.isfinite(Z).all():
        raise ValueError("X contains NaN or infinite values")
    if gamma is not None and kernel != "rbf":
        raise ValueError(f"gamma is only used by kernel='rbf', not {kernel!r}")
    # Norms in float64: they enter every distance, an error here would be systematic.
    sq64 = np.einsum("ij,ij->i", Z, Z, dtype=np.float64)
    if kernel == "cosine":
        norms = np.sqrt(sq64)
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        Zn = (Z * scale[:, None].astype(np.float32)).astype(np.float32, copy=False)
        return PreparedKernel("cosine", np.ascontiguousarray(Zn), None, None, math.inf, 0.0, d)
    dmax = 2.0 * math.sqrt(float(sq64.max()))  # triangle inequality bound on any pairwise distance
    if kernel == "rbf":
        g = 1.0 / d if gamma is None else float(gamma)
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
        A = g * dmax * dmax
    else:
        g = None
        A = dmax / d
    return PreparedKernel(kernel, Z, sq64.astype(np.float32), g, A, math.exp(-A), d)


@njit(cache=True)
def _direct_sqdist(A, B, ii, jj, out):
    """out[t] = ||A[ii[t]] - B[jj[t]]||^2 in float64 (no cancellation)."""
    for t in range(ii.shape[0]):
        a = A[ii[t]]
        b = B[jj[t]]
        s = 0.0
        for l in range(a.shape[0]):
            diff = np.float64(a[l]) - np.float64(b[l])
            s += diff * diff
        out[t] = s


@njit(cache=True, parallel=True, fastmath={"reassoc", "nsz", "contract"})
def _pair_values(Z, ZF, nbr, dot, out):
    """out[v, j] = <Z[v], ZF[nbr[v, j]]> (dot=True) or ||Z[v] - ZF[nbr[v, j]]||^2 (float64 sums); 0 if nbr < 0."""
    n, m = nbr.shape
    d = Z.shape[1]
    for v in prange(n):
        x = Z[v]
        for j in range(m):
            f = nbr[v, j]
            if f < 0:
                out[v, j] = 0.0
                continue
            y = ZF[f]
            s = 0.0
            if dot:
                for l in range(d):
                    s += np.float64(x[l]) * np.float64(y[l])
            else:
                for l in range(d):
                    diff = np.float64(x[l]) - np.float64(y[l])
                    s += diff * diff
            out[v, j] = s


def _transform_sqdist(pk: PreparedKernel, D, tmp=None):
    """In place: squared distances D (float32, already >= 0) -> t = s - c for a distance kernel."""
    if pk.name == "euclid_exp":
        np.sqrt(D, out=D)
        D *= np.float32(1.0 / pk.dim)  # a = ||x - y|| / d
    else:
        D *= np.float32(pk.gamma)  # a = gamma ||x - y||^2
    if tmp is None or tmp.shape != D.shape:
        tmp = np.empty_like(D)
    # t = exp(-a) - exp(-A) = -exp(-a) * expm1(a - A): no cancellation when a ~ A or s ~ 1.
    np.subtract(D, np.float32(pk.A), out=tmp)
    np.expm1(tmp, out=tmp)
    np.negative(D, out=D)
    np.exp(D, out=D)
    D *= tmp
    np.negative(D, out=D)
    np.maximum(D, 0.0, out=D)  # a float32 distance may exceed the bound by an ulp
    return D


def _repair_sqdist(D, Za, Zb, sa, sb_max):
    """Recompute entries of the GEMM-based squared distances that may have cancelled (see module docstring)."""
    thr = (np.float32(_REPAIR_REL) * (sa + np.float32(sb_max))).astype(np.float32)
    ii, jj = np.nonzero(D < thr[:, None])
    if ii.size:
        vals = np.empty(ii.size, dtype=np.float64)
        _direct_sqdist(Za, Zb, ii.astype(np.int64), jj.astype(np.int64), vals)
        D[ii, jj] = vals.astype(np.float32)
    np.maximum(D, 0.0, out=D)


def kernel_block(pk: PreparedKernel, rows=None, cols=None, out=None, tmp=None) -> np.ndarray:
    """``t = s(rows, cols) - offset`` as a float32 (len(rows), len(cols)) block.

    rows / cols: integer index arrays into X, or None for all rows.  ``out`` / ``tmp`` may supply float32 buffers of
    the block's shape (``out`` may be a view into a larger C-contiguous matrix, one row block of it).
    """
    Za = pk.Z if rows is None else pk.Z[rows]
    Zb = pk.Z if cols is None else pk.Z[cols]
    shape = (Za.shape[0], Zb.shape[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    np.matmul(Za, Zb.T, out=out)
    if pk.name == "cosine":
        np.maximum(out, 0.0, out=out)
        return out
    sa = pk.sq if rows is None else pk.sq[rows]
    sb = pk.sq if cols is None else pk.sq[cols]
    out *= np.float32(-2.0)
    out += sa[:, None]
    out += sb[None, :]
    _repair_sqdist(out, Za, Zb, sa, float(sb.max()) if sb.size else 0.0)
    return _transform_sqdist(pk, out, tmp)


def block_rows(n_cols: int) -> int:
    """Rows per kernel block so that one block holds about ``_BLOCK_ELEMS`` float32 values."""
    return max(1, min(4096, _BLOCK_ELEMS // max(1, n_cols)))


def shifted_rows(pk: PreparedKernel, rows: np.ndarray, cols=None) -> np.ndarray:
    """Shifted kernel rows t[p, v] = s(rows[p], cols[v]) - offset as float32 (len(rows), len(cols)), in row blocks."""
    n = pk.Z.shape[0]
    nc = n if cols is None else len(cols)
    S = np.empty((len(rows), nc), dtype=np.float32)
    step = block_rows(nc)
    tmp = None
    for i0 in range(0, len(rows), step):
        i1 = min(len(rows), i0 + step)
        if pk.name != "cosine" and (tmp is None or tmp.shape[0] != i1 - i0):
            tmp = np.empty((i1 - i0, nc), dtype=np.float32)
        kernel_block(pk, rows[i0:i1], cols, out=S[i0:i1], tmp=tmp)
    return S


def similarity_matrix(X, kernel: str = "cosine", gamma: float | None = None, rows=None, cols=None) -> np.ndarray:
    """The plain similarity s (not shifted) as a float32 (len(rows), len(cols)) matrix, built in row blocks.

    Convenience for baselines, tests and small problems; the greedy engine uses shifted blocks directly.
    """
    pk = prepare_kernel(X, kernel, gamma)
    r = np.arange(pk.Z.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    S = shifted_rows(pk, r, cols)
    if pk.offset:
        S += np.float32(pk.offset)
    return S


# ---------------------------------------------------------------------------------------------------------------------
# kNN similarity graph


@dataclass
class KnnGraph:
    """Row v's m most similar facility rows (the "row v's neighbours" direction).

    nbr:    int64 (n, m) positions into ``facilities`` (row v's neighbours, most similar first); -1 = missing (an IVF
            search can return fewer than m).
    t:      float32 (n, m) shifted similarities s - offset of those pairs (0 where nbr == -1).
    offset: the kernel's lower bound c (0 for cosine).
    index:  ``"flat"`` (exact) or ``"ivf"`` (approximate), with ``nlist`` / ``nprobe`` for IVF.
    facilities: int64 sorted row indices the neighbours were searched among.
    kernel / gamma: the kernel the similarities come from.
    """

    nbr: np.ndarray
    t: np.ndarray
    offset: float
    index: str
    nlist: int = 0
    nprobe: int = 0
    facilities: np.ndarray | None = None
    kernel: str = ""
    gamma: float | None = None


def _faiss():
    import faiss  # local import: faiss is only needed for the sparse variant

    return faiss


@njit(cache=True, inline="always")
def _worse(s1, i1, s2, i2):
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(cache=True)
def _merge_topm(best_s, best_i, rows, scores, fids):
    """For each r: fold (scores[r, j], fids[j]) into row rows[r] of the per-row top-m min-heaps (best_s, best_i).

    Order: larger score first, lower facility id on equal scores (the exact ranking's stable tie rule).  Serial on
    purpose: one short parallel region per list stalls on its barrier whenever the cores are shared (measured 10x
    slower under load), and a root comparison per candidate is cheap.
    """
    m = best_s.shape[1]
    for r in range(rows.shape[0]):
        q = rows[r]
        hs = best_s[q]
        hi = best_i[q]
        srow = scores[r]
        root_s = hs[0]  # the current m-th best, kept in registers: most candidates fail this first test
        root_i = hi[0]
        for j in range(fids.shape[0]):
            s = srow[j]
            if s < root_s:
                continue
            f = fids[j]
            if s == root_s and f > root_i:
                continue
            pos = 0  # better than the m-th best: replace the root and sift down
            while True:
                c = 2 * pos + 1
                if c >= m:
                    break
                if c + 1 < m and _worse(hs[c + 1], hi[c + 1], hs[c], hi[c]):
                    c += 1
                if _worse(hs[c], hi[c], s, f):
                    hs[pos] = hs[c]
                    hi[pos] = hi[c]
                    pos = c
                else:
                    break
            hs[pos] = s
            hi[pos] = f
            root_s = hs[0]
            root_i = hi[0]


@njit(cache=True)
def _sort_topm(best_s, best_i, sentinel):
    """Sort every row best first (score desc, id asc); unfilled slots (id == sentinel) become -1."""
    n, m = best_s.shape
    for q in range(n):
        hs = best_s[q]
        hi = best_i[q]
        for a in range(1, m):  # insertion sort: m is small
            s = hs[a]
            f = hi[a]
            b = a - 1
            while b >= 0 and _worse(hs[b], hi[b], s, f):
                hs[b + 1] = hs[b]
                hi[b + 1] = hi[b]
                b -= 1
            hs[b + 1] = s
            hi[b + 1] = f
        for a in range(m):
            if hi[a] == sentinel:
                hi[a] = -1


def _ivf_knn(Z, ZF, fac, m, cosine, nlist, nprobe, seed, block=4096):
    """Approximate kNN by an inverted file, batched so that the distance work runs as GEMMs.

    faiss's IndexIVFFlat scans each query's lists one query at a time (~4 GFLOP/s here); grouping, for every list, all
    the queries that probe it turns the same exact scan into one (queries x list) GEMM per list.  The result is what an
    IVF-Flat search with the same lists and nprobe returns (exact top m inside the probed lists), ties by lower id.
    """
    faiss = _faiss()
    n, d = Z.shape
    nF = ZF.shape[0]
    rng = np.random.default_rng(seed)
    ntrain = min(nF, 40 * nlist)
    train = ZF if ntrain == nF else ZF[np.sort(rng.choice(nF, size=ntrain, replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=int(seed), spherical=cosine, verbose=False, max_points_per_centroid=40)
    km.train(np.ascontiguousarray(train))
    quant = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
    quant.add(km.centroids)
    probe = np.empty((n, nprobe), dtype=np.int64)
    for q0 in range(0, n, 16384):
        _, probe[q0 : q0 + 16384] = quant.search(Z[q0 : q0 + 16384], nprobe)
    # facility rows are rows of Z: their list is their nearest centroid, the first probe of that row
    lab = probe[fac, 0] if fac is not None else probe[:, 0].copy()
    f_order = np.argsort(lab, kind="stable")
    f_ptr = np.searchsorted(lab[f_order], np.arange(nlist + 1))
    pq = probe.ravel()
    q_order = np.argsort(pq, kind="stable")
    q_rows = (q_order // nprobe).astype(np.int64)
    q_ptr = np.searchsorted(pq[q_order], np.arange(nlist + 1))
    sq_f = None if cosine else np.einsum("ij,ij->i", ZF, ZF, dtype=np.float64).astype(np.float32)
    sentinel = np.int64(nF + 1)
    best_s = np.full((n, m), -np.inf, dtype=np.float32)
    best_i = np.full((n, m), sentinel, dtype=np.int64)
    for ell in range(nlist):
        fids = f_order[f_ptr[ell] : f_ptr[ell + 1]].astype(np.int64)
        rows_all = q_rows[q_ptr[ell] : q_ptr[ell + 1]]
        if fids.size == 0 or rows_all.size == 0:
            continue
        Fl_T = np.ascontiguousarray(ZF[fids].T)
        for r0 in range(0, rows_all.size, block):
            rows = rows_all[r0 : r0 + block]
            scores = Z[rows] @ Fl_T  # cosine: inner product of unit rows
            if not cosine:  # rank by -||q - f||^2 = 2 q.f - ||f||^2 - ||q||^2; the last term is constant per query
                scores *= np.float32(2.0)
                scores -= sq_f[fids][None, :]
            _merge_topm(best_s, best_i, rows, scores, fids)
    _sort_topm(best_s, best_i, sentinel)
    return best_i


def knn_graph(
    pk: PreparedKernel,
    m: int,
    facilities: np.ndarray | None = None,
    *,
    index: str = "auto",
    nprobe: int | None = None,
    seed: int = 0,
    query_batch: int = 16384,
) -> KnnGraph:
    """For every row v of X, its ``m`` most similar rows among ``facilities`` (default all rows), with similarities.

    Every kernel here is a monotone function of either the inner product of normalised rows (``"cosine"``) or the
    Euclidean distance (``"rbf"``, ``"euclid_exp"``), so the neighbours come from a faiss inner-product or L2 search;
    the kernel values of the returned pairs are then recomputed pair by pair with float64 accumulation (deterministic,
    no cancellation) and shifted like the dense blocks.  No n x n matrix is built.

    index: ``"flat"`` = exact brute force (faiss IndexFlatIP / IndexFlatL2); ``"ivf"`` = an inverted-file search
    (see _ivf_knn): ``nlist = round(2 sqrt(n_F))`` k-means lists (faiss k-means, seeded, 10 iterations on at most 40
    rows per list; spherical for cosine), every row probes its ``nprobe`` nearest lists (default 16) and takes its exact
    top m among the facility rows in them.  IVF is approximate: a true neighbour is missed when it lies in an unprobed
    list.  Recall (mean fraction of the exact top 32 found, cosine, n = 200k, d = 384, nlist 894, nprobe 16):
    0.106 on isotropic random unit vectors (the worst case: no cluster structure, benchmarks/bench_facility.py) and
    0.994 on 2,000 overlapping Gaussian clusters; raise ``nprobe`` to trade time for recall (nprobe = nlist is exact).
    The graph then defines the objective, and lazy greedy is exact for it.  ``"auto"`` = flat up to ``EXACT_KNN_MAX``
    facility rows, IVF above.
    """
    faiss = _faiss()
    Z = pk.Z
    n, d = Z.shape
    fac = np.arange(n, dtype=np.int64) if facilities is None else np.asarray(facilities, dtype=np.int64)
    nF = fac.shape[0]
    if nF == 0:
        raise ValueError("knn graph needs at least one facility row")
    m = int(min(m, nF))
    if index == "auto":
        index = "flat" if nF <= EXACT_KNN_MAX else "ivf"
    if index not in ("flat", "ivf"):
        raise ValueError(f"unknown knn index {index!r}; expected 'auto', 'flat' or 'ivf'")
    ZF = Z if facilities is None else np.ascontiguousarray(Z[fac])
    nlist = nprobe_used = 0
    if index == "flat":
        idx = faiss.IndexFlatIP(d) if pk.name == "cosine" else faiss.IndexFlatL2(d)
        idx.add(ZF)
        nbr = np.empty((n, m), dtype=np.int64)
        for q0 in range(0, n, query_batch):  # batches bound faiss's (batch x m) result buffers
            q1 = min(n, q0 + query_batch)
            _, ids = idx.search(Z[q0:q1], m)
            nbr[q0:q1] = ids
        del idx
    else:
        # ~2 sqrt(n_F) lists, and at least 39 training rows per list (faiss's k-means minimum)
        nlist = int(max(1, min(round(2 * math.sqrt(nF)), 4096, nF // 39)))
        nprobe_used = int(min(nlist, max(1, 16 if nprobe is None else int(nprobe))))
        nbr = _ivf_knn(Z, ZF, None if facilities is None else fac, m, pk.name == "cosine", nlist, nprobe_used, seed)
    missing = nbr < 0
    # Kernel values of the returned pairs, recomputed pair by pair (float64 accumulation) instead of taking faiss's
    # GEMM-based scores: deterministic per pair (duplicated rows get bit-identical values, so their ties stay exact) and
    # free of the ||x||^2 + ||y||^2 - 2 x.y cancellation.
    raw = np.empty(nbr.shape, dtype=np.float32)
    _pair_values(Z, ZF, nbr, pk.name == "cosine", raw)
    if pk.name == "cosine":
        t = np.maximum(raw, 0.0, out=raw)
    else:
        t = _transform_sqdist(pk, raw)
    t[missing] = 0.0
    return KnnGraph(
        nbr, np.ascontiguousarray(t, dtype=np.float32), pk.offset, index, nlist, nprobe_used, fac, pk.name, pk.gamma
    )

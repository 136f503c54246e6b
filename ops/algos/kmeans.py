"""k-means on faiss, plus the per-cluster medoid-like pick that Nuggets' anchor set needs.

Serves CherryLLM (clusters of instruction embeddings; tianyi-lab/Cherry_LLM @ 01fac8d), Small2Large
(dheeraj7596/Small2Large @ 9f4867e), Nuggets anchors (pldlgb/nuggets @ c7e429f), ClusterUCB (spherical; Wang et al.,
Findings of EMNLP 2025, ZigeW/ClusterUCB @ 8cbd9f0) and the NovelSum entropy baseline (faiss k-means; Yang et al.,
ACL 2025, UmeanNever/NovelSum @ b594962).  On this project's benchmark (``python benchmarks/run.py kmeans``: 1,000
clusters of 20,000 x 384, 20 iterations, 2 CPU cores; README, "Performance") it takes 4.37 s, k-means++ seeding
included, against scikit-learn ``KMeans(n_init=1)``'s 19.8 s (inertia 18184.9 vs 18185.6).  Seeding is k-means++ by default (faiss's own random init is available), with numpy's generator, so labels are deterministic
per seed but not equal to scikit-learn's.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from datasel.ops.algos.arrays import prepared_rows, unit_rows
from datasel.ops.algos.threads import faiss_threads

__all__ = ["KMeansResult", "kmeans", "nearest_to_centroids"]


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    labels:         int64 (n,) cluster of each row, contiguous 0..k'-1 (k' = k unless a cluster ended up empty).
    centroids:      float32 (k', d) (unit rows for ``metric="cosine"``).
    inertia:        float, sum over rows of the squared L2 distance to their centroid (``"l2"``), or of
                    1 - cos(x, centroid) (``"cosine"``), computed in float64 after the final assignment.
    empty_reseeded: int, how many times faiss re-seeded an empty cluster during training (it splits a large cluster
                    in two; faiss's ``nsplit`` summed over iterations and ``n_init`` restarts).
    empty_dropped:  int, clusters still empty after the final assignment (dropped; k' = k - empty_dropped).
    iterations:     int, Lloyd iterations run (of the kept restart): fewer than ``iters`` when ``tol`` stopped early.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    empty_reseeded: int
    empty_dropped: int = 0
    iterations: int = 0




def _row_distances(X64: np.ndarray, C64: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """float64 distance of each row to its own centroid, by direct differences (identical rows -> identical values)."""
    diff = X64 - C64[labels]
    sq = (diff * diff).sum(axis=1)
    if metric == "cosine":
        # Rows and centroids are unit (or zero) vectors: 1 - cos = |x - c|^2 / 2, without 1 - x.c cancellation;
        # a zero row or centroid has cos := 0, i.e. distance 1.
        zero = ~X64.any(axis=1) | ~C64.any(axis=1)[labels]
        return np.where(zero, 1.0, 0.5 * sq)
    return sq


# rows x dims x trials of one k-means++ pass above which threads are used.  Every centre is a fork/join; on 2 shared,
# busy cores 20K x 384 x 8 trials took 12.2 s threaded vs 5.6 s serial for k = 1,000.
_PARALLEL_MIN_WORK = 1 << 27
_NCHUNK = 64  # fixed (not per-thread): partial sums, hence the k-means++ draws, do not depend on the thread count


@njit(fastmath={"reassoc", "contract", "nsz"}, cache=True)
def _trial_chunk(Xf, sq, C, csq, mind, dist, pot, ch, lo, hi):
    """Squared distances |x|^2 + |c|^2 - 2 x.c of rows lo..hi to each trial centre in C (float32 dot products:
    seeding needs no more, and a dot costs half a difference loop) and the chunk's share of each trial's potential
    sum_i min(mind_i, d_il)."""
    d = Xf.shape[1]
    L = C.shape[0]
    for l in range(L):
        pot[ch, l] = 0.0
    for i in range(lo, hi):
        for l in range(L):
            s = np.float32(0.0)
            for j in range(d):
                s += Xf[i, j] * C[l, j]
            dd = max(sq[i] + csq[l] - 2.0 * np.float64(s), 0.0)
            dist[i, l] = dd
            pot[ch, l] += min(mind[i], dd)


@njit(parallel=True, cache=True)
def _trials(Xf, sq, C, csq, mind, dist, pot):
    n = Xf.shape[0]
    for ch in prange(_NCHUNK):
        _trial_chunk(Xf, sq, C, csq, mind, dist, pot, ch, ch * n // _NCHUNK, (ch + 1) * n // _NCHUNK)


@njit(cache=True)
def _trials_serial(Xf, sq, C, csq, mind, dist, pot):
    n = Xf.shape[0]
    for ch in range(_NCHUNK):
        _trial_chunk(Xf, sq, C, csq, mind, dist, pot, ch, ch * n // _NCHUNK, (ch + 1) * n // _NCHUNK)


@njit(cache=True)
def _draw(mind, sums, taken, u):
    """Row drawn with probability proportional to mind (D^2 sampling) using the uniform u; -1 when no mass is left."""
    n = mind.shape[0]
    total = 0.0
    for ch in range(_NCHUNK):
        total += sums[ch]
    if not total > 0.0:
        return -1
    r = u * total
    acc = 0.0
    pick = -1
    for ch in range(_NCHUNK):
        if acc + sums[ch] > r or ch == _NCHUNK - 1:
            for i in range(ch * n // _NCHUNK, (ch + 1) * n // _NCHUNK):
                if mind[i] > 0.0 and not taken[i]:
                    pick = i  # float rounding may run past r: the last positive-mass row is then the draw
                    acc += mind[i]
                    if acc > r:
                        break
            if pick >= 0:
                break
        acc += sums[ch]
    return pick


@njit(cache=True)
def _kmeanspp_loop(Xf, k, first, uniforms, n_trials, parallel):
    """Greedy k-means++: per centre, ``n_trials`` D^2-sampled candidates, keep the one minimising the potential.

    ``uniforms`` is (k, n_trials + 1) in [0, 1); the last column drives the fallback when no mass is left (fewer
    distinct rows than k).  Returns the chosen row ids.
    """
    n = Xf.shape[0]
    sq = np.empty(n)
    for i in range(n):
        acc = 0.0
        for j in range(Xf.shape[1]):
            acc += np.float64(Xf[i, j]) * np.float64(Xf[i, j])
        sq[i] = acc
    mind = np.full(n, np.inf)
    sums = np.empty(_NCHUNK)
    taken = np.zeros(n, dtype=np.bool_)
    chosen = np.empty(k, dtype=np.int64)
    dist = np.empty((n, n_trials))
    pot = np.empty((_NCHUNK, n_trials))
    cand = np.empty(n_trials, dtype=np.int64)
    for j in range(k):
        m = 0
        if j == 0:
            cand[0] = first
            m = 1
        else:
            for l in range(n_trials):
                c = _draw(mind, sums, taken, uniforms[j, l])
                if c >= 0:
                    cand[m] = c
                    m += 1
        if m == 0:
            free = n - j
            target = min(int(uniforms[j, n_trials] * free), free - 1)
            for i in range(n):
                if not taken[i]:
                    if target == 0:
                        cand[0] = i
                        break
                    target -= 1
            m = 1
        C = np.empty((m, Xf.shape[1]), dtype=Xf.dtype)
        csq = np.empty(m)
        for l in range(m):
            C[l] = Xf[cand[l]]
            csq[l] = sq[cand[l]]
        if parallel:
            _trials(Xf, sq, C, csq, mind, dist[:, :m], pot[:, :m])
        else:
            _trials_serial(Xf, sq, C, csq, mind, dist[:, :m], pot[:, :m])
        best = 0
        best_pot = np.inf
        for l in range(m):
            p = 0.0
            for ch in range(_NCHUNK):
                p += pot[ch, l]
            if p < best_pot:
                best_pot = p
                best = l
        chosen[j] = cand[best]
        taken[cand[best]] = True
        for ch in range(_NCHUNK):
            acc = 0.0
            for i in range(ch * n // _NCHUNK, (ch + 1) * n // _NCHUNK):
                if dist[i, best] < mind[i]:
                    mind[i] = dist[i, best]
                if taken[i]:
                    mind[i] = 0.0
                acc += mind[i]
            sums[ch] = acc
    return chosen


def _kmeanspp_init(Xf: np.ndarray, k: int, rng: np.random.Generator, n_trials: int) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) in scikit-learn's greedy form: each centre is the best (lowest
    potential) of ``n_trials`` candidates drawn with probability proportional to the squared distance to the nearest
    centre so far.  One fused O(n * d * n_trials) pass per centre (float32 dot products, float64 potentials)."""
    first = int(rng.integers(Xf.shape[0]))
    uniforms = rng.random((k, n_trials + 1))
    # Threads only for large passes: each centre is a fork/join, which stalls on an oversubscribed machine.
    parallel = Xf.shape[0] * Xf.shape[1] * n_trials >= _PARALLEL_MIN_WORK and numba.get_num_threads() > 1
    return np.ascontiguousarray(Xf[_kmeanspp_loop(Xf, k, first, uniforms, n_trials, parallel)])


def kmeans(
    X,
    k: int,
    *,
    seed: int = 0,
    iters: int = 20,
    tol: float | None = None,
    metric: str = "l2",
    n_init: int = 1,
    init: str = "k-means++",
    n_local_trials: int | None = None,
    max_points_per_centroid: int | None = None,
) -> KMeansResult:
    """Lloyd k-means with ``faiss.Kmeans`` (Euclidean or spherical).

    Args:
        X: (n, d) features (converted to float32).
        k: number of clusters, 1 <= k <= n.
        seed: seeds the initialisation (numpy ``default_rng``) and faiss; same seed + same data + same faiss build and
            thread count -> same result.
        iters: at most this many Lloyd iterations.
        tol: stop once an iteration moves the centroids by less than ``tol`` times the data's mean per-feature
            variance (squared Frobenius norm of the shift), scikit-learn's criterion (its default 1e-4); None runs
            all ``iters`` (faiss ``niter``).
        metric: ``"l2"`` (Euclidean k-means) or ``"cosine"`` (spherical k-means: rows L2-normalised, assignment by
            inner product, centroids re-normalised each iteration — ClusterUCB's setting).
        n_init: independent restarts (seeds derived from ``seed``); the lowest final inertia is kept (first on ties).
        init: ``"k-means++"`` (default; faiss's random init often merges well-separated clusters) or ``"random"``
            (faiss's own: k distinct random rows, as in the NovelSum entropy baseline).
        n_local_trials: k-means++ candidates per centre; ``None`` = scikit-learn's 2 + floor(ln k) (greedy
            k-means++), 1 = classic k-means++ (fastest).
        max_points_per_centroid: faiss subsamples the training set to k * 256 rows by default; ``None`` (datasel's
            default) trains on all rows, as scikit-learn does.  Pass 256 for faiss's (and NovelSum's) behaviour.

    Returns: :class:`KMeansResult`.  Labels come from a final assignment to the final centroids (faiss flat index); a
    cluster left empty by it is dropped and labels are renumbered contiguously in the order of surviving centroids.

    Complexity: O(n_init * (n_local_trials + iters) * k * n * d) — one fused numba pass per k-means++ centre, one BLAS
    GEMM per Lloyd iteration (both multithreaded).
    """
    import faiss

    Xf = prepared_rows(X, metric)
    n, d = Xf.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} clusters need at least k rows, got n={n}")
    if int(iters) < 1 or int(n_init) < 1:
        raise ValueError("iters and n_init must be >= 1")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    n_trials = 2 + int(np.log(k)) if n_local_trials is None else int(n_local_trials)
    if n_trials < 1:
        raise ValueError(f"n_local_trials must be >= 1, got {n_trials}")
    X64 = Xf.astype(np.float64)
    best = None
    reseeded = 0
    streams = np.random.SeedSequence(int(seed)).spawn(int(n_init))
    threshold = None if tol is None else float(tol) * float(Xf.astype(np.float64).var(axis=0).mean())
    for r, stream in enumerate(streams):
        rng = np.random.default_rng(stream)
        run_seed = int(seed) + r if init == "random" else int(rng.integers(2**31 - 1))
        centroids = _kmeanspp_init(Xf, k, rng, n_trials) if init == "k-means++" else None
        done = 0
        with faiss_threads(n * k * d):
            # One faiss call for a fixed number of iterations; one per iteration to test the tolerance.
            step = int(iters) if threshold is None else 1
            while done < int(iters):
                km = faiss.Kmeans(
                    d, k, niter=step, nredo=1, seed=run_seed + done, spherical=(metric == "cosine"), verbose=False,
                    max_points_per_centroid=n if max_points_per_centroid is None else int(max_points_per_centroid),
                    min_points_per_centroid=1,  # only silences faiss's "please provide at least 39*k points" warning
                )
                km.train(Xf, init_centroids=centroids)
                reseeded += int(sum(st["nsplit"] for st in km.iteration_stats))
                moved = np.ascontiguousarray(km.centroids, dtype=np.float32)
                done += step
                shift = None if centroids is None else float(((moved.astype(np.float64) - centroids) ** 2).sum())
                centroids = moved
                if threshold is not None and shift is not None and shift <= threshold:
                    break
            index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
            index.add(centroids)
            _, I = index.search(Xf, 1)
        labels = I[:, 0].astype(np.int64)
        inertia = float(_row_distances(X64, centroids.astype(np.float64), labels, metric).sum())
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia, done)

    labels, centroids, inertia, iterations = best
    nonempty = np.bincount(labels, minlength=k) > 0
    dropped = int(k - nonempty.sum())
    if dropped:
        labels = (np.cumsum(nonempty) - 1)[labels]
        centroids = np.ascontiguousarray(centroids[nonempty])
    return KMeansResult(labels, centroids, inertia, reseeded, dropped, iterations)


def nearest_to_centroids(X, labels, centroids, metric: str = "l2") -> np.ndarray:
    """For each cluster, the member row closest to its centroid (ties -> lowest row index).

    Nuggets' anchor set = one such representative per k-means cluster.  Distances are computed in float64 by direct
    differences: squared L2 for ``"l2"``; 1 - cos on L2-normalised rows and centroid for ``"cosine"``.

    Args:
        X: (n, d) features (the same rows that were clustered; raw — normalised here for ``"cosine"``).
        labels: (n,) int cluster ids in [0, len(centroids)).
        centroids: (k, d).

    Returns: int64 (k,) row index per cluster, -1 for a cluster without members.  Complexity O(n*d + n log n).
    """
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if X.ndim != 2 or C.ndim != 2 or C.shape[1] != X.shape[1]:
        raise ValueError(f"X (n, d) and centroids (k, d) must agree, got {X.shape} and {C.shape}")
    if labels.shape != (X.shape[0],):
        raise ValueError(f"labels must have shape ({X.shape[0]},), got {labels.shape}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    k = C.shape[0]
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise IndexError(f"labels must lie in [0, {k})")
    if metric == "cosine":
        X, C = unit_rows(X), unit_rows(C)
    dist = _row_distances(X, C, labels, metric)
    idx = np.arange(X.shape[0], dtype=np.int64)
    order = np.lexsort((idx, dist, labels))  # by cluster, then distance, then row index
    sorted_labels = labels[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    out = np.full(k, -1, dtype=np.int64)
    out[sorted_labels[first]] = order[first]
    return out

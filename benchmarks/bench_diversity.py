"""Diversity selectors vs their reference-style implementations.

- ``kcenter``:  datasel k-center (one fused O(N*d) pass per pick) vs the DiverseEvol pattern (OFA-Sys/DiverseEvol @
  a22e952, ``KCenter``: full N x N distance matrix from the Gram matrix, then per step the min over all labelled
  columns of the rebuilt U x L sub-matrix).
- ``kmeans``:   datasel k-means (faiss Lloyd, k-means++ seeding) vs scikit-learn ``KMeans(n_init=1, max_iter=20)``.
- ``novelsum``: datasel NovelSelect (exact incremental engine) vs the published loop pattern (UmeanNever/NovelSum @
  b594962: recompute 1 - X S^T and re-sort all N rows every step).

Data: N random 384-d unit vectors (numpy seed 0; isotropic data, the hard case for greedy selectors: near-tied gains).  Each function returns one JSON-able dict
(see benchmarks/run.py).  Timings exclude numba compilation (warmed up on tiny inputs first, reported separately).
"""

from __future__ import annotations

import platform
import time

import numpy as np

from datasel.ops.algos.kcenter import kcenter
from datasel.ops.algos.kmeans import kmeans
from datasel.ops.algos.arrays import unit_rows
from datasel.ops.algos.novelsum import _rank_weights, _reference_scores, density, novelselect

D = 384
# Run the NovelSelect reference to the end only when its estimated time is below this; otherwise a verified prefix.
FULL_REFERENCE_BUDGET_S = 360.0
REFERENCE_PREFIX = 200


def unit_vectors(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _env() -> dict:
    import numba

    return {"numpy": np.__version__, "numba": numba.__version__, "threads": numba.get_num_threads(),
            "machine": platform.machine()}


# ----------------------------------------------------------------------------------------------------------------------
# k-center


def diverseevol_kcenter(X: np.ndarray, given: np.ndarray, ours: np.ndarray) -> tuple[list, float, float]:
    """The DiverseEvol pattern: D = sqrt(diag(G) + diag(G)^T - 2G) for all N x N pairs (float32, no clamp), then per
    step the min over all labelled columns for every unlabelled row (sub-matrix rebuilt each step) and the argmax.

    The sub-matrix is gathered as labelled rows x unlabelled columns (D is exactly symmetric: numpy computes X X^T
    with syrk), which reads whole rows instead of one cache line per element.  The loop runs in lock-step with our
    picks (``ours``): at every step it records where its own argmax differs, then continues from our pick, so every
    decision is checked on the same history.  Returns (mismatches [(step, baseline pick, our pick)], matrix s, loop s).
    """
    t0 = time.perf_counter()
    G = X @ X.T  # float32, N x N
    sq = np.diag(G).copy()
    G *= -2.0
    G += sq[:, None]
    G += sq[None, :]
    with np.errstate(invalid="ignore"):
        np.sqrt(G, out=G)  # NaN where rounding went negative (diagonal): never read, labelled columns are excluded
    t1 = time.perf_counter()
    n = X.shape[0]
    labelled = np.empty(given.size + ours.size, dtype=np.int64)
    labelled[: given.size] = given
    n_lab = given.size
    is_labelled = np.zeros(n, dtype=bool)
    is_labelled[given] = True
    mismatches = []
    for step, ours_pick in enumerate(ours.tolist()):
        unl = np.flatnonzero(~is_labelled)
        mins = G[labelled[:n_lab]][:, unl].min(axis=0)
        p = int(unl[int(np.argmax(mins))])
        if p != ours_pick:
            mismatches.append((step, p, ours_pick))
        labelled[n_lab] = ours_pick
        n_lab += 1
        is_labelled[ours_pick] = True
    t2 = time.perf_counter()
    del G
    return mismatches, t1 - t0, t2 - t1


def _exact_gap(X, given, ours, step, a, b) -> float:
    """(d_b - d_a) / d_b with float64 exact nearest-centre distances of rows a and b at ``step``."""
    X64 = X.astype(np.float64)
    centres = X64[np.concatenate([given, ours[:step]])]
    da = np.sqrt(((centres - X64[a]) ** 2).sum(1).min())
    db = np.sqrt(((centres - X64[b]) ** 2).sum(1).min())
    return float((db - da) / db)


# A baseline argmax that differs from ours is accepted as a float32 tie when the exact (float64) distances of the two
# rows differ by less than this relative amount (the float32 Gram formula is accurate to a few 1e-7 here).
FLOAT32_TIE_REL = 1e-6


def bench_kcenter(quick: bool) -> dict:
    n, k, n_given = (5_000, 200, 100) if quick else (20_000, 1_000, 100)
    X = unit_vectors(n)
    given = np.random.default_rng(1).choice(n, n_given, replace=False)
    _, jit_s = _timed(kcenter, X[:300], 5, given=given[given < 300][:3], metric="l2")
    ours, ours_s = _timed(kcenter, X, k, given=given, metric="l2")
    mismatches, matrix_s, loop_s = diverseevol_kcenter(X, given, ours.order)
    gaps = [_exact_gap(X, given, ours.order, s, a, b) for s, a, b in mismatches]
    base_s = matrix_s + loop_s
    return {
        "name": "kcenter", "n": n, "d": D, "k": k, "given": n_given,
        "ours": "datasel kcenter (fused float64-accumulated distance/min/argmax pass per pick, numba)",
        "ours_s": round(ours_s, 3), "ours_jit_warmup_s": round(jit_s, 3),
        "baseline": "DiverseEvol pattern: full N x N float32 distance matrix + per-step min over the rebuilt "
                    "labelled x unlabelled sub-matrix",
        "baseline_s": round(base_s, 3), "baseline_matrix_s": round(matrix_s, 3), "baseline_loop_s": round(loop_s, 3),
        "speedup": round(base_s / ours_s, 1),
        "same_result": all(-1e-12 <= g < FLOAT32_TIE_REL for g in gaps),
        "same_result_rule": "every baseline argmax equals ours, or is a float32 tie (exact relative gap "
                            f"< {FLOAT32_TIE_REL:g} in ours' favour), checked in lock-step on the same history",
        "baseline_argmax_differs_at": [
            {"step": s, "baseline": a, "ours": b, "exact_rel_gap": g} for (s, a, b), g in zip(mismatches, gaps)
        ],
        "final_radius": float(ours.radius[-1]), **_env(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# k-means


def bench_kmeans(quick: bool) -> dict:
    import sklearn
    from sklearn.cluster import KMeans

    n, k = (5_000, 200) if quick else (20_000, 1_000)
    X = unit_vectors(n)
    _, jit_s = _timed(kmeans, X[:200], 4, seed=0, iters=2)
    ours, ours_s = _timed(kmeans, X, k, seed=0, iters=20)
    ours_rand, ours_rand_s = _timed(kmeans, X, k, seed=0, iters=20, init="random")
    sk, sk_s = _timed(KMeans(n_clusters=k, n_init=1, max_iter=20, random_state=0).fit, X)
    rel = (ours.inertia - sk.inertia_) / sk.inertia_
    # Both stopping at scikit-learn's tolerance (its defaults: tol 1e-4, at most 300 iterations), and our
    # time against the GEMM limit of the iterations we ran (one assignment = one n x d x k product).
    ours_tol, ours_tol_s = _timed(kmeans, X, k, seed=0, iters=300, tol=1e-4)
    sk_tol, sk_tol_s = _timed(KMeans(n_clusters=k, n_init=1, random_state=0).fit, X)
    import faiss

    index = faiss.IndexFlatL2(X.shape[1])
    index.add(np.ascontiguousarray(ours_tol.centroids))
    _, assign_s = _timed(index.search, np.ascontiguousarray(X, dtype=np.float32), 1)
    return {
        "name": "kmeans", "n": n, "d": D, "k": k, "iters": 20,
        "ours": "datasel kmeans (greedy k-means++ seeding + faiss Lloyd, 20 iterations)",
        "ours_s": round(ours_s, 3), "ours_inertia": round(ours.inertia, 3), "ours_jit_warmup_s": round(jit_s, 3),
        "ours_random_init_s": round(ours_rand_s, 3), "ours_random_init_inertia": round(ours_rand.inertia, 3),
        "empty_reseeded": ours.empty_reseeded, "empty_dropped": ours.empty_dropped,
        "baseline": f"scikit-learn {sklearn.__version__} KMeans(n_init=1, max_iter=20, random_state=0)",
        "baseline_s": round(sk_s, 3), "baseline_inertia": round(float(sk.inertia_), 3),
        "baseline_n_iter": int(sk.n_iter_),
        "speedup": round(sk_s / ours_s, 1), "inertia_rel_diff": round(float(rel), 5),
        "tol": {"ours_s": round(ours_tol_s, 3), "ours_iterations": ours_tol.iterations,
                "ours_inertia": round(ours_tol.inertia, 3), "baseline_s": round(sk_tol_s, 3),
                "baseline_iterations": int(sk_tol.n_iter_), "baseline_inertia": round(float(sk_tol.inertia_), 3),
                "speedup": round(sk_tol_s / ours_tol_s, 2), "one_assignment_s": round(assign_s, 3),
                "gemm_limit_s": round(assign_s * ours_tol.iterations, 3),
                "ratio_to_gemm_limit": round(ours_tol_s / max(assign_s * ours_tol.iterations, 1e-9), 2)},
        "same_result": bool(abs(rel) <= 0.02), **_env(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# NovelSelect


def reference_lockstep(Xn, sigma, ours, steps) -> tuple[list, list]:
    """Steps 1..steps-1 of the published loop (float32, batches of 10,000, full re-sort), in lock-step with our picks:
    step t scores all rows given ours[:t], records its argmax if it differs from ours[t], then continues from ours.
    Returns (seconds per step, mismatches [(t, reference pick, our pick)])."""
    k = ours.size
    w = _rank_weights(k, 1.0)
    q = np.ones(Xn.shape[0])
    times, mismatches = [], []
    for t in range(1, steps):
        t0 = time.perf_counter()
        vals = _reference_scores(Xn, ours[:t], sigma, q, w, "sum", 10_000)
        p = int(np.argmax(vals))
        times.append(time.perf_counter() - t0)
        if p != int(ours[t]):
            mismatches.append((t, p, int(ours[t])))
    return times, mismatches


def _exact_value_gap(Xn, sigma, ours, t, a, b) -> float:
    """(v_b - v_a) / |v_b| with float64 NovelSelect values of rows a, b given ours[:t]."""
    X64 = Xn.astype(np.float64)
    sel = ours[:t]
    w = _rank_weights(t, 1.0)
    v = []
    for r in (a, b):
        c = np.sort((1.0 - X64[sel] @ X64[r]) * (sigma[r] + sigma[sel]))
        v.append(float((c * w).sum() / t))
    return (v[1] - v[0]) / abs(v[1])


def bench_novelsum(quick: bool) -> dict:
    n, k = (5_000, 200) if quick else (20_000, 1_000)
    X = unit_vectors(n)
    sigma, density_s = _timed(density, X, K=10, beta=0.5)
    _, jit_s = _timed(novelselect, X[:300], 6, sigma=sigma[:300])
    ours, ours_s = _timed(novelselect, X, k, sigma=sigma)
    order = ours.order
    Xn = unit_rows(X)
    result = {
        "name": "novelsum", "n": n, "d": D, "k": k, "alpha": 1.0, "density_combine": "sum", "K": 10, "beta": 0.5,
        "ours": "datasel novelselect (exact incremental: GEMV per pick + sorted insertion, float64)",
        "ours_s": round(ours_s, 3), "ours_density_s": round(density_s, 3), "ours_jit_warmup_s": round(jit_s, 3),
        "baseline": "NovelSelect published loop pattern (numpy float32 GEMM, batches of 10,000, every row re-sorted "
                    "every step), run in lock-step with our picks",
    }
    # Per-step cost of the reference at several t -> piecewise-linear estimate of the whole run.
    probe_ts = [t for t in (50, 100, 200, 400, 600, 800, k - 1) if t < k]
    probes = {}
    for t in probe_ts:
        _, s = _timed(_reference_scores, Xn, order[:t], sigma, np.ones(n), _rank_weights(k, 1.0), "sum", 10_000)
        probes[t] = s
    per_step = np.interp(np.arange(1, k), probe_ts, [probes[t] for t in probe_ts])
    estimate = float(per_step.sum())
    result["baseline_step_s_at_t"] = {str(t): round(s, 4) for t, s in probes.items()}
    full = quick or estimate <= FULL_REFERENCE_BUDGET_S
    steps = k if full else REFERENCE_PREFIX
    times, mismatches = reference_lockstep(Xn, sigma, order, steps)
    gaps = [_exact_value_gap(Xn, sigma, order, t, a, b) for t, a, b in mismatches]
    ref_s = float(sum(times))
    result["same_result"] = all(-1e-12 <= g < FLOAT32_TIE_REL for g in gaps)
    result["same_result_rule"] = (
        "every reference argmax equals ours, or is a float32 tie (exact float64 relative value gap "
        f"< {FLOAT32_TIE_REL:g} in ours' favour), checked in lock-step on the same history"
    )
    result["baseline_argmax_differs_at"] = [
        {"step": t, "baseline": a, "ours": b, "exact_rel_gap": g} for (t, a, b), g in zip(mismatches, gaps)
    ]
    if full:
        result.update({
            "baseline_mode": "full run measured", "baseline_s": round(ref_s, 3),
            "baseline_estimate_s": round(estimate, 1),
            "speedup": round(ref_s / ours_s, 1), "speedup_basis": "measured reference / measured ours",
        })
    else:
        kp = REFERENCE_PREFIX
        ours_p, ours_p_s = _timed(novelselect, X, kp, sigma=sigma)
        assert np.array_equal(ours_p.order, order[:kp])
        extrap = ref_s + float(per_step[kp - 1:].sum())  # measured steps 1..kp-1 + interpolated kp..k-1
        result.update({
            "baseline_mode": f"first {kp} picks measured, steps {kp}..{k - 1} extrapolated from per-step probes",
            "baseline_prefix_k": kp, "baseline_prefix_s": round(ref_s, 3), "ours_prefix_s": round(ours_p_s, 3),
            "speedup_prefix_measured": round(ref_s / ours_p_s, 1),
            "baseline_s": None, "baseline_extrapolated_s": round(extrap, 1),
            "speedup": round(extrap / ours_s, 1), "speedup_basis": "extrapolated reference / measured ours",
            "same_result_scope": f"first {kp} picks",
        })
    result.update(_env())
    return result


BENCHMARKS = {"kcenter": bench_kcenter, "kmeans": bench_kmeans, "novelsum": bench_novelsum}

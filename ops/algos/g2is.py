"""G2IS's gradient-graph walk — Zhao et al., "Beyond Similarity: A Gradient-based Graph Method for
Instruction Tuning Data Selection" (ACL 2025); code: zy125413/G2IS @ 990409b (the selection walk;
the gradient extraction follows LESS, see :mod:`datasel.ops.algos.gradients`).

1. **Core knowledge**: PCA of the target set's gradient features (centred, as scikit-learn's PCA):
   the fewest components whose explained-variance ratios reach ``ratio`` (``mode="variance"``) or
   ``max(1, int(ratio · rank))`` of them (``mode="count"``; the code multiplies by the feature
   dimension, which exceeds the rank of a small target set and makes scikit-learn fail).  Each
   component c gets the weight w_c (its ratio, renormalised over the kept ones).
2. The budget T is shared out as T·w_c by largest remainder (an exact total).
3. Per component, in order: the anchor is the first of the ``anchor_pool`` rows with the largest
   signed ⟨g, k_c⟩ that is not selected yet (else the best unselected row); then the walk adds
   rows while the component has budget: from the last pick, its graph neighbours in order of
   decreasing cosine, the first row that is (i) unselected, (ii) free of conflict with the
   component's picks (⟨g_j, g_u⟩ ≥ 0 for every pick u), (iii) consistent with the core knowledge
   (|cos(s + g_j, k_c)| ≥ δ·|cos(s, k_c)|, s the sum of the picks); if no neighbour qualifies, the
   unselected row with the largest signed ⟨g_j, k_c⟩ that passes (ii) and (iii); if none, the
   component stays under-filled (the code does not redistribute).

The reference checks each candidate in Python (O(|S_c|·d) per check, a full argsort per
fallback).  Here every row keeps ``min_dot`` (its smallest dot product with the component's
picks), ``s_dot`` (with s) and ``k_dot`` (with k_c), so conditions (ii) and (iii) hold for all rows
at once, and each acceptance costs one matrix-vector product over the rows — the same product
gives the new pick's similarities, i.e. its graph neighbours (``knn``: its K most similar rows
other than itself, which is what a precomputed top-K graph holds; None: every row).

Sign of a component: PCA's sign is arbitrary, and the walk uses the signed projection for anchors
and fallbacks, so a flipped component starts from the rows most opposed to it.  ``orient="mean"``
(default) points each component towards the mean target feature (⟨k_c, mean V⟩ ≥ 0);
``orient="reference"`` keeps the sign scikit-learn's ``svd_flip`` gives (the largest-magnitude
coordinate of each component positive), which is what the released code sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Components", "pca_components", "share_budget", "graph_walk"]


@dataclass(frozen=True)
class Components:
    """Principal directions of a target set's features, each with its weight (explained variance share)."""

    vectors: np.ndarray  # (c, d) unit rows
    weights: np.ndarray  # (c,) summing to 1
    explained: np.ndarray  # (c,) explained-variance ratios before renormalising

    def describe(self) -> str:
        return f"{len(self.weights)} components ({float(self.explained.sum()):.0%} of the variance)"


def pca_components(V: np.ndarray, ratio: float = 0.5, mode: str = "variance", orient: str = "mean") -> Components:
    """The core-knowledge components of target features ``V`` (n, d); see the module docstring."""
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2 or len(V) < 2:
        raise ValueError(f"pca needs at least 2 target vectors, got {len(V) if V.ndim == 2 else 0}")
    if not np.isfinite(V).all():
        raise ValueError("pca: the target features contain NaN or infinite values")
    centred = V - V.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    total = var.sum()
    if total <= 0:
        raise ValueError("pca: the target features do not vary (all vectors are equal)")
    explained = var / total
    rank = int((s > s[0] * 1e-10).sum())
    if mode == "variance":
        count = int(np.searchsorted(np.cumsum(explained), ratio - 1e-12) + 1)
    elif mode == "count":
        count = max(1, int(rank * ratio))
    else:
        raise ValueError(f"pca mode must be variance or count, got {mode!r}")
    count = min(count, rank)
    vectors = vt[:count].copy()
    if orient == "reference":
        big = np.argmax(np.abs(vectors), axis=1)
        vectors *= np.sign(vectors[np.arange(count), big])[:, None]
    elif orient == "mean":
        sign = np.sign(vectors @ V.mean(axis=0))
        vectors *= np.where(sign == 0, 1.0, sign)[:, None]
    else:
        raise ValueError(f"pca orient must be mean or reference, got {orient!r}")
    kept = explained[:count]
    return Components(vectors, kept / kept.sum(), kept)


def share_budget(total: int, weights: np.ndarray) -> np.ndarray:
    """``total`` split as total·w by largest remainder (ties: the earlier component): an exact total."""
    raw = total * np.asarray(weights, dtype=np.float64)
    out = np.floor(raw).astype(np.int64)
    left = int(total - out.sum())
    if left > 0:
        order = sorted(range(len(raw)), key=lambda c: (-(raw[c] - out[c]), c))
        for c in order[:left]:
            out[c] += 1
    return out


def _unit(G: np.ndarray) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    return G / np.maximum(norms, 1e-10)


def graph_walk(G: np.ndarray, components: Components, budget: int, *, delta: float = 0.8, knn: int | None = None,
               anchor_pool: int = 1000, neighbours: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """G2IS's walk over rows of ``G`` (n, d): ``(picked rows in order, picks per component)``.

    ``neighbours`` (n, K): a given graph's lists (rows of ``G``, most similar first, −1 padding)
    used in place of the similarities of ``G``.
    """
    G = _unit(G)
    n = len(G)
    if G.shape[1] != components.vectors.shape[1]:
        raise ValueError(f"graphwalk: the records' features have {G.shape[1]} dimensions, the components "
                         f"{components.vectors.shape[1]}; compute both with the same gradient features")
    shares = share_budget(min(int(budget), n), components.weights)
    selected = np.zeros(n, dtype=bool)
    order: list[int] = []
    counts: list[int] = []
    for c, b_c in enumerate(shares):
        if b_c == 0:
            counts.append(0)
            continue
        k_vec = components.vectors[c]
        k_dot = G @ k_vec
        ranked = np.argsort(-k_dot, kind="stable")
        anchor = next((int(j) for j in ranked[:anchor_pool] if not selected[j]), None)
        if anchor is None:
            rest = np.flatnonzero(~selected)
            if rest.size == 0:
                break
            anchor = int(rest[np.argmax(k_dot[rest])])
        picks = [anchor]
        selected[anchor] = True
        last_dot = G @ G[anchor]
        min_dot = last_dot.copy()
        s_dot = last_dot.copy()
        s_k = float(k_dot[anchor])
        s_s = 1.0
        while len(picks) < b_c:
            old = abs(s_k) / np.sqrt(s_s)
            new = np.abs(s_k + k_dot) / np.sqrt(np.maximum(s_s + 2 * s_dot + 1, 1e-300))
            valid = ~selected & (min_dot >= 0) & (new >= delta * old)
            if not valid.any():
                break
            # the last pick's graph neighbours, most similar first (itself excluded)
            if neighbours is not None:
                near = np.asarray(neighbours[picks[-1]])
                near = near[near >= 0]
            elif knn is not None and knn < n - 1:
                sims = last_dot.copy()
                sims[picks[-1]] = -np.inf
                near = np.argpartition(-sims, knn)[:knn]
                near = near[np.lexsort((near, -sims[near]))]
            else:
                sims = last_dot.copy()
                sims[picks[-1]] = -np.inf
                near = np.lexsort((np.arange(n), -sims))
            ok = near[valid[near]]
            if ok.size:
                j = int(ok[0])
            else:
                cand = np.flatnonzero(valid)
                j = int(cand[np.argmax(k_dot[cand])])
            picks.append(j)
            selected[j] = True
            last_dot = G @ G[j]
            np.minimum(min_dot, last_dot, out=min_dot)
            s_s += 2 * s_dot[j] + 1
            s_dot += last_dot
            s_k += float(k_dot[j])
        order.extend(picks)
        counts.append(len(picks))
    return np.asarray(order, dtype=np.int64), counts

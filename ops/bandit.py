"""Bandit selection over clusters: ClusterUCB (Wang et al., Findings of EMNLP 2025, arXiv 2506.10288).

``ucb(partition, reward=…)`` draws records cluster by cluster, choosing the cluster by an upper
confidence bound on the rewards it has given so far, and evaluates ``reward`` only on the records
it draws: through the engine's per-record laziness, a reward built on gradient features
(``influence(grad_adam, val_grad, run=warmup)``) computes gradients for the drawn records alone.
The algorithm is in :mod:`datasel.ops.algos.bandit`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from datasel.ops.registry import Budget, Kind, Param, op


@op("ucb", [Param("partition", Kind.PARTITION, doc="the arms, e.g. kmeans(grad_adam, 100)"),
            Param("reward", Kind.SCORES, doc="what a draw earns; computed only for the records drawn"),
            Param("budget", Kind.BUDGET, Budget(fraction=Fraction(1, 5)),
                  doc="how many records to draw, cold start included (ClusterUCB: 20%)"),
            Param("beta", Kind.NUMBER, 1.0, low=0, doc="UCB = mean + beta × std of an arm's rewards"),
            Param("cold_start", Kind.NUMBER, 0.0, low=0, high=1,
                  doc="each arm first draws max(int(size × cold_start), 1) records (0: none)"),
            Param("draw_batch", Kind.NUMBER, 1, integer=True, low=1,
                  doc="records drawn per pull (1 as in the paper; more is an approximation that batches rewards)"),
            Param("seed", Kind.NUMBER, 42, integer=True, low=0, high=2**32 - 1),
            Param("exhausted", Kind.STRING, "mask",
                  doc="mask: an arm with nothing left is never drawn; reference: scored 0, as the code does",
                  choices=("mask", "reference"))],
    Kind.SELECTOR, role="selector", version="1", family="selection", costly=True)
def ucb(ctx, subset, partition, reward, budget=None, beta=1.0, cold_start=0.0, draw_batch=1, seed=42,
        exhausted="mask"):
    """ClusterUCB's bandit: the records it draws, in draw order (keep the best with ``| topk(reward, 5% of pool)``).

    Arms are the partition's groups (restricted to the records that reach ``ucb``; empty ones
    are never drawn).  After an optional cold start, each pull goes to the arm with the largest
    mean + beta × std of its rewards (arms without a reward first) and draws ``draw_batch``
    unseen records uniformly from it; an exhausted arm is never drawn.
    """
    from datasel.ops.algos.bandit import cluster_ucb

    subset = np.asarray(subset, dtype=np.int64)
    total = (budget or Budget(fraction=Fraction(1, 5))).resolve(len(subset), ctx.n_pool)
    arms = [np.intersect1d(members, subset) for _, members in partition.groups()]
    arms = [a for a in arms if len(a)]
    if total <= 0 or not arms:
        return subset[:0]
    cold = sum(max(int(len(a) * float(cold_start)), 1) for a in arms) if cold_start > 0 else 0
    calls = [0]

    def rewards(rows: np.ndarray) -> np.ndarray:
        calls[0] += 1
        order = np.argsort(rows, kind="stable")
        out = np.empty(len(rows))
        out[order] = np.asarray(reward.values(rows[order]), dtype=np.float64)
        ctx.advance(len(rows))
        return out

    with ctx.progress(total, f"{ctx.node_label} draws"):
        drawn, _ = cluster_ucb(arms, rewards, max(0, total - cold), beta=float(beta), cold_start=float(cold_start),
                               draw_batch=int(draw_batch), seed=int(seed), exhausted=exhausted)
    left = np.setdiff1d(subset, drawn)
    if len(left):
        ctx.exclude("not drawn", left, detail=f"not drawn by the bandit ({len(drawn)} of {len(subset)} records "
                                               f"drawn from {len(arms)} clusters; its reward was never computed)")
    return drawn

"""ClusterUCB's bandit over clusters — Wang et al., Findings of EMNLP 2025 (arXiv 2506.10288);
code: ZigeW/ClusterUCB @ 8cbd9f0 (``ucb_beta``, the default of its driver).

Arms are the clusters of a partition; pulling an arm draws records from it uniformly (without
replacement) and computes their rewards, which is the expensive part (a gradient per record);
the point of the method is the rewards it never computes.

1. Cold start (``cold_start`` = csp > 0): every arm draws max(int(n_c · csp), 1) records.
2. Then int(N · (budget − csp)) more draws, ``draw_batch`` at a time: the arm with the largest
   UCB_c = mean(r_c) + β · std(r_c) (population std of the rewards drawn from it so far) draws;
   arms with no reward yet come first (the first such arm).  An arm is exhausted once all its
   records are drawn.
3. The result is every drawn record, in draw order; the method then keeps the best of them by
   reward (``| topk(reward, 5% of pool)`` in the recipe).

The code scores an exhausted arm 0.0 instead of removing it, so when every live arm's UCB is
negative (cosine rewards can be) it picks the exhausted arm and fails an assertion; here exhausted
arms are never drawn (``exhausted="reference"`` keeps the 0.0 score, and then stops, as a draw
from an exhausted arm cannot happen).  A record whose reward is NaN (no answer token) counts as
drawn and adds nothing to its arm's statistics (the code turns a failed gradient into reward 0).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["cluster_ucb"]


def cluster_ucb(arms: list[np.ndarray], reward: Callable[[np.ndarray], np.ndarray], draws: int, *,
                beta: float = 1.0, cold_start: float = 0.0, draw_batch: int = 1, seed: int = 0,
                exhausted: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Run the bandit; returns ``(drawn records in draw order, their rewards)``.

    ``arms``: the records of each arm; ``reward(records) -> rewards`` is called once per draw
    (batch); ``draws``: how many records to draw after the cold start.
    """
    if exhausted not in ("mask", "reference"):
        raise ValueError(f"exhausted must be mask or reference, got {exhausted!r}")
    rng = np.random.default_rng(seed)
    # each arm's records in a seeded random order: drawing "uniformly among the unseen" is taking the next ones
    queues = [np.asarray(a, dtype=np.int64)[rng.permutation(len(a))] for a in arms]
    taken = np.zeros(len(arms), dtype=np.int64)
    sums = np.zeros(len(arms))
    squares = np.zeros(len(arms))
    counts = np.zeros(len(arms), dtype=np.int64)
    drawn: list[np.ndarray] = []
    rewards: list[np.ndarray] = []

    def pull(arm: int, m: int) -> None:
        rows = queues[arm][taken[arm]:taken[arm] + m]
        taken[arm] += len(rows)
        r = np.asarray(reward(rows), dtype=np.float64)
        ok = np.isfinite(r)
        sums[arm] += r[ok].sum()
        squares[arm] += (r[ok] ** 2).sum()
        counts[arm] += int(ok.sum())
        drawn.append(rows)
        rewards.append(r)

    if cold_start > 0:
        for arm, queue in enumerate(queues):
            if len(queue):
                pull(arm, max(int(len(queue) * cold_start), 1))
    left = int(draws)
    sizes = np.array([len(q) for q in queues])
    while left > 0:
        live = taken < sizes
        if not live.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / np.maximum(counts, 1)
            std = np.sqrt(np.maximum(squares / np.maximum(counts, 1) - mean ** 2, 0.0))
        ucb = np.where(counts > 0, mean + beta * std, np.inf)
        if exhausted == "mask":
            ucb = np.where(live, ucb, -np.inf)
        else:
            ucb = np.where(live, ucb, 0.0)
        arm = int(np.argmax(ucb))
        if not live[arm]:  # the reference would draw from an exhausted arm here (and fail)
            break
        m = min(int(draw_batch), left, int(sizes[arm] - taken[arm]))
        pull(arm, m)
        left -= m
    if not drawn:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(drawn), np.concatenate(rewards)

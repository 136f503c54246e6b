"""ClusterUCB's bandit against a naive loop written from the paper, and its bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from datasel.ops.algos.bandit import cluster_ucb


def naive_ucb(arms, table, draws, beta=1.0, cold_start=0.0, draw_batch=1, seed=0):
    """Lists and np.std: each arm's unseen records in the same seeded order, UCB by hand."""
    rng = np.random.default_rng(seed)
    queues = [list(np.asarray(a)[rng.permutation(len(a))]) for a in arms]
    got = {i: [] for i in range(len(arms))}
    order = []

    def pull(i, m):
        rows = [queues[i].pop(0) for _ in range(min(m, len(queues[i])))]
        order.extend(rows)
        got[i].extend(table[r] for r in rows if not math.isnan(table[r]))

    if cold_start > 0:
        for i, a in enumerate(arms):
            pull(i, max(int(len(a) * cold_start), 1))
    left = draws
    while left > 0:
        live = [i for i in range(len(arms)) if queues[i]]
        if not live:
            break
        fresh = [i for i in live if not got[i]]
        if fresh:
            arm = fresh[0]
        else:
            arm = max(live, key=lambda i: (np.mean(got[i]) + beta * np.std(got[i]), -i))
        m = min(draw_batch, left, len(queues[arm]))
        pull(arm, m)
        left -= m
    return order


def _arms(sizes, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(sum(sizes))
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(ids[start:start + s]))
        start += s
    return out


@pytest.mark.parametrize("beta, cold, batch", [(1.0, 0.0, 1), (0.0, 0.0, 1), (2.0, 0.1, 1), (1.0, 0.0, 3),
                                               (0.5, 0.2, 2)])
def test_bandit_equals_the_naive_loop(beta, cold, batch):
    arms = _arms([30, 5, 50, 12, 1])
    rng = np.random.default_rng(1)
    table = {int(r): float(rng.normal(loc=i * 0.1, scale=0.3)) for i, a in enumerate(arms) for r in a}
    seen = []

    def reward(rows):
        seen.extend(int(r) for r in rows)
        return np.array([table[int(r)] for r in rows])

    drawn, rewards = cluster_ucb(arms, reward, 40, beta=beta, cold_start=cold, draw_batch=batch, seed=7)
    assert drawn.tolist() == naive_ucb(arms, table, 40, beta, cold, batch, seed=7)
    assert sorted(seen) == sorted(drawn.tolist()) and len(set(seen)) == len(seen)  # each reward computed once
    np.testing.assert_array_equal(rewards, [table[int(r)] for r in drawn])


def test_exhausted_arms_are_never_drawn_and_nan_rewards_count_as_drawn():
    arms = _arms([2, 20, 20])
    table = {int(r): (5.0 if i == 0 else -1.0) for i, a in enumerate(arms) for r in a}
    table[int(arms[1][0])] = float("nan")
    drawn, _ = cluster_ucb(arms, lambda rows: np.array([table[int(r)] for r in rows]), 30, seed=0)
    assert len(drawn) == 30 and len(set(drawn.tolist())) == 30
    assert set(arms[0].tolist()) <= set(drawn.tolist())  # the best arm is used up, then left alone
    assert drawn.tolist() == naive_ucb(arms, table, 30, seed=0)


def test_reference_mode_stops_where_the_code_would_draw_from_an_exhausted_arm():
    arms = _arms([2, 20, 20])
    table = {int(r): (0.5 if i == 0 else -0.5) for i, a in enumerate(arms) for r in a}
    masked, _ = cluster_ucb(arms, lambda rows: np.array([table[int(r)] for r in rows]), 30, seed=0)
    reference, _ = cluster_ucb(arms, lambda rows: np.array([table[int(r)] for r in rows]), 30, seed=0,
                               exhausted="reference")
    assert len(masked) == 30
    # every live arm's UCB is negative once arm 0 (2 records, reward 0.5) is used up: the code's 0.0 wins
    assert len(reference) < 30


def test_draws_never_exceed_the_records():
    arms = _arms([3, 4])
    drawn, _ = cluster_ucb(arms, lambda rows: np.ones(len(rows)), 100, seed=0)
    assert sorted(drawn.tolist()) == sorted(np.concatenate(arms).tolist())

"""ucb through the engine: rewards are computed for the drawn records only (per-record laziness)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")


def _pool(n=60):
    return [{"instruction": f"question {i}", "input": "", "output": "x" * (5 + (i * 37) % 50),
             "category": ["a", "b", "c", "d"][i % 4]} for i in range(n)]


def test_ucb_computes_rewards_only_for_what_it_draws(run_recipe):
    pool = _pool()
    out = run_recipe('select ucb(groups("category"), reward=length, budget=25%) | topk(length, 5)', pool)
    length = out.node("length")
    drawn = 15  # 25% of 60
    assert length["rows_computed"] == drawn  # the other 45 records' lengths were never computed
    assert len(out.selected) == 5
    fates = out.manifest["exclusions"]
    assert fates['stage 1 (ucb(groups("category"), reward=length, budget=25%)): not drawn'] == 45, fates


def test_ucb_matches_the_algorithm_on_the_partition(run_recipe):
    from datasel.ops.algos.bandit import cluster_ucb

    pool = _pool()
    out = run_recipe('select ucb(groups("category"), reward=length, budget=20, beta=0.5, seed=3)', pool)
    lengths = {i: len(r["output"]) for i, r in enumerate(pool)}
    arms = [np.array([i for i in range(60) if i % 4 == g]) for g in range(4)]  # groups by first appearance
    want, _ = cluster_ucb(arms, lambda rows: np.array([lengths[int(r)] for r in rows], dtype=float), 20,
                          beta=0.5, seed=3)
    assert out.selected == want.tolist()


def test_ucb_is_cached_whole(run_recipe):
    pool = _pool()
    text = 'select ucb(groups("category"), reward=length, budget=10)'
    first = run_recipe(text, pool)
    second = run_recipe(text, pool)
    assert second.selected == first.selected and second.node("ucb")["status"] == "cached"

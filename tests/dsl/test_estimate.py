"""`datasel compile --pool`: cache states that agree with what a run does, and the work left, before running."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.dsl.cache import Cache
from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.estimate import estimate
from datasel.dsl.runner import fingerprints, load_inputs, run
from datasel.ops import registry
from datasel.ops.context import Work

pytestmark = pytest.mark.usefixtures("cache_dir")


def records(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1)), "score": i % 5}
            for i in range(start, start + n)]


def states(recipe: str, pool, cache_dir) -> dict[str, dict]:
    datasets = load_inputs(pool)
    compiled = compile_recipe(recipe_source(recipe, name="r.sel"), None, fingerprints(datasets))
    result = estimate(compiled.plan, datasets, Cache(cache_dir))
    return {compiled.plan.nodes[k].op: v.as_state() for k, v in result.nodes.items()}


RECIPE = 'select length > 20 | topk(field("score"), 3)'


def test_after_a_complete_run_nothing_is_left_to_compute(write_pool, cache_dir):
    pool = write_pool(records(20))
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text=RECIPE)
    after = states(RECIPE, pool, cache_dir)
    assert {op: s["state"] for op, s in after.items()} == {"length": "hit", "field": "hit", "compare": "hit",
                                                           "topk": "hit"}
    assert after["field"]["rows"] == 0 and after["length"]["rows"] == 0


def test_grown_pool_counts_only_new_records_that_reach_the_node(write_pool, cache_dir):
    run("r.sel", write_pool(records(20)), cache_dir=cache_dir, quiet=True, recipe_text=RECIPE)
    # two new records: one too short for the filter, one long enough
    grown = records(20) + [{"instruction": "short", "input": "", "output": "ab", "score": 1},
                           {"instruction": "long", "input": "", "output": "y" * 40, "score": 2}]
    got = states(RECIPE, write_pool(grown, "grown.jsonl"), cache_dir)
    assert got["length"]["rows"] == 2 and got["length"]["exact"]
    assert got["length"]["state"] == "partial" and got["length"]["fraction"] == pytest.approx(20 / 22)
    # The filter is exact for the 20 cached records (14 pass, all with field cached) and unknown for the
    # two new ones: field has at most 2 records left to compute (1 in fact).
    assert got["field"]["rows"] == 2 and got["field"]["exact"] is False
    assert got["field"]["fraction"] == pytest.approx(14 / 16)


def test_unknown_filter_gives_an_upper_bound(write_pool, cache_dir):
    got = states(RECIPE, write_pool(records(20)), cache_dir)
    assert got["length"] == {"state": "miss", "fraction": 0.0, "rows": 20, "exact": True}
    # length is not computed yet, so which records pass the filter is unknown: at most all 20
    assert got["field"]["rows"] == 20 and got["field"]["exact"] is False


def test_estimate_writes_nothing_and_runs_no_op(write_pool, cache_dir, monkeypatch):
    pool = write_pool(records(20))
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text='select length > 20')
    before = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*"))
    monkeypatch.setattr(registry.get("field"), "fn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    got = states(RECIPE, pool, cache_dir)
    assert got["field"]["rows"] == 14
    assert sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*")) == before


def test_work_comes_from_the_op_cost_hook_for_the_rows_left(write_pool, cache_dir, monkeypatch):
    asked = []

    def cost(ctx, idx, name):
        asked.append(np.asarray(idx).tolist())
        return Work(records=len(idx), tokens=10 * len(idx), seconds=0.5 * len(idx))

    monkeypatch.setattr(registry.get("field"), "cost", cost)
    pool = write_pool(records(20))
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text='select length > 20')
    got = states(RECIPE, pool, cache_dir)
    assert asked == [list(range(6, 20))]  # exactly the survivors, none cached yet
    assert got["field"]["work"] == {"records": 14, "tokens": 140, "seconds": 7.0}

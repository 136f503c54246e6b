"""Selectors, comparisons, set algebra, budgets and iterate, on tiny pools with hand-computed answers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from datasel.dsl.diagnostics import RecipeError
from datasel.dsl.runner import run

pytestmark = pytest.mark.usefixtures("cache_dir")


def pool_s(scores) -> list[dict]:
    """Record i: Alpaca record with ``s`` = scores[i] (no ``s`` key for None)."""
    out = []
    for i, s in enumerate(scores):
        rec = {"instruction": f"task {i}", "input": "", "output": f"answer {i}"}
        if s is not None:
            rec["s"] = s
        out.append(rec)
    return out


def pool_len(n: int) -> list[dict]:
    """Record i has an output of 3*(i+1) characters (length strictly increasing with i)."""
    return [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1))} for i in range(n)]


S = 'field("s")'
TIES = pool_s([3, 1, 3, None, 5, 1, 2])  # row 3 has no score


# ------------------------------------------------------------ topk / bottomk
@pytest.mark.parametrize("recipe, expected", [
    (f"select topk({S}, 3)", [4, 0, 2]),  # 5, then the two 3s in pool order
    (f"select bottomk({S}, 3)", [1, 5, 6]),  # the two 1s in pool order, then 2
    (f"select topk({S}, 10)", [4, 0, 2, 6, 1, 5]),  # more than there are: every scored row
    (f"select bottomk({S}, 10)", [1, 5, 6, 0, 2, 4]),
    (f"select topk({S}, 1)", [4]),
    (f"select topk(-{S}, 2)", [1, 5]),
    (f"select topk({S}, 50%)", [4, 0, 2]),  # int(7 * 0.5) = 3 (the unscored row counts in n)
    (f"select {S} < 5 | topk({S}, 2)", [0, 2]),  # only what the filter kept
    (f"select {S} > 1 | bottomk({S}, 2)", [6, 0]),
])
def test_topk_bottomk(run_recipe, recipe, expected):
    assert run_recipe(recipe, TIES).selected == expected


def test_topk_all_ties_keeps_pool_order(run_recipe):
    pool = pool_s([7, 7, 7, 7, 7])
    assert run_recipe(f"select topk({S}, 3)", pool).selected == [0, 1, 2]
    assert run_recipe(f"select bottomk({S}, 3)", pool).selected == [0, 1, 2]


@pytest.mark.parametrize("op", ["topk", "bottomk"])
def test_nan_scores_excluded_and_counted(run_recipe, op):
    pool = pool_s([1, None, "n/a", 4, float("nan"), 2])
    out = run_recipe(f"select {op}({S}, 10)", pool)
    assert sorted(out.selected) == [0, 3, 5]
    assert out.selected == ([3, 5, 0] if op == "topk" else [0, 5, 3])
    assert out.dropped() == {"no score": 3}
    reasons = out.manifest["records"]["reason"]
    assert reasons[1] == """no field(name="s") score: the record has no field 's'"""
    assert reasons[2] == """no field(name="s") score: field 's' is not a number ('n/a')"""


# ------------------------------------------------------------------ random
def test_random_reproducible_and_documented_draw(run_recipe, tmp_path):
    pool = pool_s(list(range(10)))
    a = run_recipe("select random(3, seed=7)", pool, cache=tmp_path / "c1").selected
    b = run_recipe("select random(3, seed=7)", pool, cache=tmp_path / "c2").selected
    assert a == b
    assert len(set(a)) == 3 and set(a) <= set(range(10))
    # numpy PCG64 with the seed, a permutation of the input rows, first k in draw order
    assert a == np.random.default_rng(7).permutation(10)[:3].tolist()
    other = run_recipe("select random(3, seed=8)", pool, cache=tmp_path / "c1").selected
    assert other == np.random.default_rng(8).permutation(10)[:3].tolist()
    assert other != a


def test_random_k_larger_than_input_keeps_everything(run_recipe):
    pool = pool_s(list(range(6)))
    out = run_recipe("select random(50, seed=3)", pool).selected
    assert sorted(out) == [0, 1, 2, 3, 4, 5]


def test_random_inside_a_pipe_draws_from_survivors(run_recipe):
    pool = pool_s(list(range(10)))
    out = run_recipe(f"select {S} >= 5 | random(2, seed=1)", pool).selected
    survivors = np.arange(5, 10)
    assert out == survivors[np.random.default_rng(1).permutation(5)[:2]].tolist()
    assert run_recipe("select random(30%, seed=2)", pool).selected == \
        np.random.default_rng(2).permutation(10)[:3].tolist()


# ------------------------------------------------------------------ sample
@pytest.mark.parametrize("recipe, expected", [
    ("select sample(3)", [0, 3, 6]),  # floor(10/3) = 3: every 3rd, truncated to 3
    ("select sample(4)", [0, 2, 4, 6]),  # floor(10/4) = 2
    ("select sample(5)", [0, 2, 4, 6, 8]),
    ("select sample(10)", list(range(10))),
    ("select sample(20)", list(range(10))),  # smaller input kept whole, in pool order
    ("select sample(1)", [0]),
    ("select sample(30%)", [0, 3, 6]),
    (f"select {S} >= 3 | sample(2)", [3, 6]),  # 7 survivors: floor(7/2) = 3
    (f"select topk({S}, 6) | sample(3)", [4, 6, 8]),  # pool order of the survivors 4..9
])
def test_sample_even_stride(run_recipe, recipe, expected):
    assert run_recipe(recipe, pool_s(list(range(10)))).selected == expected


def test_sample_random_is_random(run_recipe):
    pool = pool_s(list(range(10)))
    a = run_recipe('select sample(3, how="random", seed=4)', pool).selected
    assert a == run_recipe("select random(3, seed=4)", pool).selected


# -------------------------------------------------------------------- band
@pytest.mark.parametrize("recipe, expected", [
    # scores 0..10: 25th percentile 2.5, 75th 7.5 (linear interpolation) -> 3..7, pool order
    (f"select band({S})", [3, 4, 5, 6, 7]),
    (f"select band({S}, 0, 100)", list(range(11))),
    (f"select band({S}, 50, 50)", [5]),
    # 10th percentile 1.0 exactly: inclusive bounds keep the record scored 1
    (f"select band({S}, 10, 20)", [1, 2]),
    (f"select {S} >= 4 | band({S}, 25, 75)", [6, 7, 8]),  # over the survivors 4..10: 5.5 .. 8.5
])
def test_band(run_recipe, recipe, expected):
    assert run_recipe(recipe, pool_s(list(range(11)))).selected == expected


def test_band_per_group_and_min_size(run_recipe):
    # group a: scores 0..7 (8 records); group b: 10, 20, 30 (3 records).
    pool = pool_s(list(range(8)) + [10, 20, 30])
    for i, r in enumerate(pool):
        r["cat"] = "a" if i < 8 else "b"
    # a: 25th 1.75, 75th 5.25 -> 2..5; b: 15 .. 25 -> only 20 (row 9)
    assert run_recipe(f'select groups("cat") | band({S})', pool).selected == [2, 3, 4, 5, 9]
    # min_size 4: b (3 records) is kept whole, a (8) is banded as before
    assert run_recipe(f'select groups("cat") | band({S}, min_size=4)', pool).selected == [2, 3, 4, 5, 8, 9, 10]
    # min_size 9: both groups are smaller, everything is kept
    assert run_recipe(f'select groups("cat") | band({S}, min_size=9)', pool).selected == list(range(11))


def test_band_drops_unscored_and_rejects_bad_bounds(run_recipe):
    out = run_recipe(f"select band({S}, 0, 100)", TIES)
    assert out.selected == [0, 1, 2, 4, 5, 6]
    assert out.dropped() == {"no score": 1}
    with pytest.raises(Exception, match="lo <= hi"):
        run_recipe(f"select band({S}, 80, 20)", TIES)


# ------------------------------------------------------------- comparisons
CMP = pool_s([1, 2, 3, None, 2])


@pytest.mark.parametrize("recipe, expected", [
    (f"select {S} < 2", [0]),
    (f"select {S} <= 2", [0, 1, 4]),
    (f"select {S} > 2", [2]),
    (f"select {S} >= 2", [1, 2, 4]),
    (f"select {S} == 2", [1, 4]),
    (f"select {S} != 2", [0, 2]),  # NaN is not "different from 2": it has no score
    (f"select 2 > {S}", [0]),  # turned around: s < 2
    (f"select 2 <= {S}", [1, 2, 4]),
    (f"select {S} > 1 + 0.5", [1, 2, 4]),
    (f"select {S} * 2 - 1 > 2", [1, 2, 4]),
    (f"select -{S} >= -2", [0, 1, 4]),
])
def test_comparisons(run_recipe, recipe, expected):
    out = run_recipe(recipe, CMP)
    assert out.selected == expected
    dropped = out.dropped()
    assert dropped.pop("no score") == 1  # row 3 has no "s"
    (reason, count), = dropped.items()
    assert count == len(CMP) - 1 - len(expected) and reason.endswith("is false")


def test_comparison_of_two_scores(run_recipe):
    pool = pool_s([1, 2, 3, None, 2])
    for rec, t in zip(pool, [0, 5, 3, 1, None]):
        if t is not None:
            rec["t"] = t
    out = run_recipe(f'select {S} > field("t")', pool)
    assert out.selected == [0]
    out = run_recipe(f'select {S} >= field("t")', pool)
    assert out.selected == [0, 2]
    assert out.dropped()["no score"] == 2  # rows 3 and 4 lack one side


def test_chained_comparison_is_an_error(run_recipe):
    with pytest.raises(RecipeError):
        run_recipe(f"select 1 < {S} < 3", CMP)


# ------------------------------------------------------------- set algebra
LIN = pool_s([0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("recipe, expected", [
    # union: a's picks in a's order, then b's new ones in b's order
    (f"select ({S} <= 1) + topk({S}, 4)", [0, 1, 5, 4, 3, 2]),
    (f"select topk({S}, 4) + ({S} <= 1)", [5, 4, 3, 2, 0, 1]),
    (f"select topk({S}, 4) + topk({S}, 5)", [5, 4, 3, 2, 1]),
    (f"select bottomk({S}, 2) + topk({S}, 2)", [0, 1, 5, 4]),
    # intersection: in a's order
    (f"select topk({S}, 5) & bottomk({S}, 5)", [4, 3, 2, 1]),
    (f"select bottomk({S}, 5) & topk({S}, 5)", [1, 2, 3, 4]),
    (f"select topk({S}, 4) & {S} < 4", [3, 2]),  # & binds looser than <
    (f"select topk({S}, 2) & bottomk({S}, 2)", []),
    # difference
    (f"select topk({S}, 4) - bottomk({S}, 3)", [5, 4, 3]),
    (f"select bottomk({S}, 3) - topk({S}, 4)", [0, 1]),
    (f"select topk({S}, 6) - bottomk({S}, 2) - topk({S}, 1)", [4, 3, 2]),  # left-associative
    # pipe is loosest: (a + b) | c
    (f"select topk({S}, 1) + bottomk({S}, 2) | topk({S}, 1)", [5]),
    (f"select {S} >= 2 | bottomk({S}, 2)", [2, 3]),
    (f"select topk({S}, 2) + topk({S}, 3) & {S} > 3", [5, 4]),
])
def test_set_algebra(run_recipe, recipe, expected):
    assert run_recipe(recipe, LIN).selected == expected


def test_set_algebra_rejects_mixed_kinds(run_recipe):
    with pytest.raises(RecipeError) as err:
        run_recipe(f"select topk({S}, 2) + {S}", LIN)
    assert "Selector" in str(err.value) and "Scores" in str(err.value)


# ------------------------------------------------------------------ budgets
def test_percent_budgets_round_down(run_recipe):
    pool = pool_s(list(range(19)))
    assert run_recipe(f"select topk({S}, 10%)", pool).selected == [18]  # int(1.9)
    assert run_recipe(f"select topk({S}, 20%)", pool).selected == [18, 17, 16]  # int(3.8)
    assert run_recipe(f"select topk({S}, 5%)", pool).selected == []  # int(0.95)
    assert run_recipe(f"select topk({S}, 100%)", pool).selected == list(range(18, -1, -1))


def test_percent_budgets_are_exact_not_float(run_recipe):
    pool = pool_s(list(range(100)))
    # 0.29 * 100 == 28.999999999999996 and 0.57 * 100 == 56.99999999999999 in floating point
    assert len(run_recipe(f"select topk({S}, 29%)", pool).selected) == 29
    assert len(run_recipe(f"select bottomk({S}, 57%)", pool).selected) == 57
    assert len(run_recipe(f"select topk({S}, 12.5%)", pool).selected) == 12


def test_percent_of_input_vs_percent_of_pool(run_recipe):
    pool = pool_s(list(range(20)))
    # 10 survivors: 20% of them is 2, 20% of the pool is 4
    assert run_recipe(f"select {S} >= 10 | topk({S}, 20%)", pool).selected == [19, 18]
    assert run_recipe(f"select {S} >= 10 | topk({S}, 20% of pool)", pool).selected == [19, 18, 17, 16]
    # never more than reach the selector
    assert run_recipe(f"select {S} >= 17 | topk({S}, 50% of pool)", pool).selected == [19, 18, 17]


def test_budgets_per_group(run_recipe):
    pool = pool_s(list(range(10)))
    for i, rec in enumerate(pool):
        rec["g"] = "a" if i < 6 else "b"  # group a: 0..5 (6 rows), group b: 6..9 (4 rows)
    assert run_recipe(f'select groups("g") | topk({S}, 50%)', pool).selected == [5, 4, 3, 9, 8]
    assert run_recipe(f'select groups("g") | topk({S}, 2)', pool).selected == [5, 4, 9, 8]
    # "of pool" under a partition: every group gets int(10 * 0.3) = 3
    assert run_recipe(f'select groups("g") | topk({S}, 30% of pool)', pool).selected == [5, 4, 3, 9, 8, 7]


def test_percent_under_partition_shares_out_largest_remainders(run_recipe):
    pool = pool_s(list(range(10)))
    for i, rec in enumerate(pool):
        rec["g"] = "x" if i < 5 else ("y" if i < 8 else "z")  # sizes 5, 3, 2
    # 25% of 10 = 2 in all: floors 1 (1.25), 0 (.75), 0 (.5); the leftover goes to y (.75)
    assert run_recipe(f'select groups("g") | topk({S}, 25%)', pool).selected == [4, 7]
    # a selector seeing a filtered group floors its own input: 1, 0, 0
    assert run_recipe(f'select groups("g") | ({S} >= 0 | topk({S}, 25%))', pool).selected == [4]
    # Small2Large's rule: ceil(n_g / round(1 / 25%)) = 2, 1, 1
    assert run_recipe(f'select groups("g") | bottomk({S}, 25%, chunks="array_split")', pool).selected == \
        [0, 1, 5, 8]
    assert run_recipe(f'select topk({S}, 25%, chunks="array_split")', pool).selected == [9, 8, 7]


def test_count_budget_larger_than_input(run_recipe):
    assert run_recipe(f"select topk({S}, 100)", pool_s([2, 1, 3])).selected == [2, 0, 1]


def test_non_literal_budget(run_recipe):
    pool = pool_s(list(range(10)))
    assert run_recipe(f"select topk({S}, count(bottomk({S}, 3)))", pool).selected == [9, 8, 7]


@pytest.mark.parametrize("budget, message", [
    ("0.5", "topk: a budget is a whole count or a percentage; got 0.5 (for a share write 50%)"),
    ("150%", "a percentage must be between 0% and 100%, got 150%"),
    ("-3", "topk: a budget cannot be negative"),
])
def test_invalid_budgets_are_compile_errors(run_recipe, budget, message):
    with pytest.raises(RecipeError) as err:
        run_recipe(f"select topk({S}, {budget})", pool_s([1, 2, 3]))
    assert [(d.message, d.span.location()) for d in err.value.diagnostics] == [(message, "recipe.sel:1:25")]


# ------------------------------------------------------------------ iterate
def test_iterate_issue_example_union_with_topk_of_current_size(run_recipe):
    """`cur + topk(length, count(cur))` on a pool whose lengths grow with the index.

    random(2, seed=1) of 20 rows is [1, 10] (numpy PCG64: permutation(20)[:2]).  Round r adds the
    top-count(cur) rows by length that are not in cur yet: {19, 18}, then {17, 16}, then {15, 14}.
    """
    assert np.random.default_rng(1).permutation(20)[:2].tolist() == [1, 10]
    out = run_recipe("select iterate(random(2, seed=1), 3, cur -> cur + topk(length, count(cur)))",
                     pool_len(20))
    assert out.selected == [1, 10, 19, 18, 17, 16, 15, 14]


def test_iterate_doubles_with_count(run_recipe):
    """Each round adds count(cur) new rows (the longest not selected yet): 2 -> 4 -> 8 -> 16."""
    recipe = "select iterate(random(2, seed=1), 3, cur -> cur + ((length >= 0) - cur | topk(length, count(cur))))"
    out = run_recipe(recipe, pool_len(20))
    assert out.selected == [1, 10, 19, 18, 17, 16, 15, 14, 13, 12, 11, 9, 8, 7, 6, 5]
    two_rounds = run_recipe(recipe.replace(", 3,", ", 2,"), pool_len(20)).selected
    assert two_rounds == [1, 10, 19, 18, 17, 16, 15, 14]


STEP2 = "select iterate(random(2, seed=1), 3, cur -> cur + ((length >= 0) - cur | topk(length, 2)))"
STEP2_RESULT = [1, 10, 19, 18, 17, 16, 15, 14]  # 2 -> 4 -> 6 -> 8


def test_iterate_fixed_step(run_recipe):
    out = run_recipe(STEP2, pool_len(20))
    assert out.selected == STEP2_RESULT
    one = run_recipe(STEP2.replace(", 3,", ", 1,"), pool_len(20))
    assert one.selected == STEP2_RESULT[:4]
    zero = run_recipe(STEP2.replace(", 3,", ", 0,"), pool_len(20))
    assert zero.selected == [1, 10]


def test_iterate_rounds_are_cached(write_pool, cache_dir):
    pool = write_pool(pool_len(20))
    logs: list[str] = []

    def go():
        logs.clear()
        return run("it.sel", pool, cache_dir=cache_dir, quiet=False, log=logs.append, recipe_text=STEP2)

    first = go()
    assert [int(i) for i in first.selected] == STEP2_RESULT
    assert sum("round" in m and "/3:" in m for m in logs) == 3
    # A plain rerun: everything cached, nothing computed.
    second = go()
    assert [int(i) for i in second.selected] == STEP2_RESULT
    assert all(n["status"] == "cached" and n["rows_computed"] == 0 for n in second.manifest["nodes"])
    # Lose the final result and the last round (an interrupted run): rounds 1-2 come from the cache.
    engine = first.engine
    key = engine.key(engine.plan.output, {})
    rounds = [e for e in engine.cache.entries() if e["op"] == "iterate" and e["key"] != key]
    assert len(rounds) == 3
    final = engine.cache.get(key).arrays["indices"].tolist()
    last = [e for e in rounds if engine.cache.get(e["key"]).arrays["indices"].tolist() == final]
    assert len(last) == 1
    for k in (key, last[0]["key"]):
        shutil.rmtree(engine.cache.object_dir(k))
    third = go()
    assert [int(i) for i in third.selected] == STEP2_RESULT
    cached = [m for m in logs if "from the cache" in m]
    assert len(cached) == 2 and "round 1 from" in cached[0] and "round 2 from" in cached[1]
    topk = next(n for n in third.manifest["nodes"] if n["op"] == "topk")
    assert topk["applications"] == 1

"""Per-record scores (length, field) and score transforms (rank, quantile, zscore, minmax),
with hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")

nan = math.nan


def pool_s(scores, key: str = "s") -> list[dict]:
    out = []
    for i, s in enumerate(scores):
        rec = {"instruction": f"task {i}", "input": "", "output": f"answer {i}"}
        if s is not None:
            rec[key] = s
        out.append(rec)
    return out


def assert_values(got, expected):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=0, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------ length
TEXTS = [
    {"instruction": "Say hi", "input": "to Bob", "output": "Hello there Bob!"},
    {"instruction": "Count", "output": "one two  three"},
    {"instruction": "Grüß", "input": "", "output": "héllo wörld"},
]


@pytest.mark.parametrize("expr, expected", [
    ("length", [16, 14, 11]),  # default: response characters (code points, not bytes)
    ('length(field="output")', [16, 14, 11]),
    ('length(unit="words")', [3, 3, 2]),
    ('length(field="instruction")', [6, 5, 4]),
    ('length(field="instruction", unit="words")', [2, 1, 1]),
    ('length(field="input")', [6, 0, 0]),
    ('length(field="input", unit="words")', [2, 0, 0]),
    ('length(field="prompt")', [13, 5, 4]),  # "Say hi\nto Bob"
    ('length(field="prompt", unit="words")', [4, 1, 1]),
    ('length(field="all")', [30, 20, 16]),  # "Say hi\nto Bob\nHello there Bob!"
    ('length(field="all", unit="words")', [7, 4, 3]),
    ("response_words", [3, 3, 2]),  # prelude names
    ("instruction_words", [2, 1, 1]),
])
def test_length(eval_expr, expr, expected):
    assert_values(eval_expr(expr, TEXTS), expected)


def test_length_of_multi_turn_records(eval_expr):
    chat = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4"}]},
        {"messages": [{"role": "user", "content": "Name one"}, {"role": "assistant", "content": "Oak"}]},
    ]
    assert_values(eval_expr("length", chat), [7, 3])  # the last assistant turn
    assert_values(eval_expr('length(field="instruction")', chat), [4, 8])  # the user turn before it
    # "all": every turn, joined by newlines: "Hi\nHello.\n2+2?\nIt is 4"
    assert_values(eval_expr('length(field="all")', chat), [22, 12])
    assert_values(eval_expr('length(field="all", unit="words")', chat), [6, 3])


def test_length_filter_in_a_recipe(run_recipe):
    out = run_recipe('select length(field="input") > 0', TEXTS)
    assert out.selected == [0]
    out = run_recipe('select length(unit="words") >= 3', TEXTS)
    assert out.selected == [0, 1]


# ------------------------------------------------------------------- field
NESTED = [
    {"instruction": "i0", "output": "o", "a": {"b": 2}},
    {"instruction": "i1", "output": "o", "a": {"b": "3.5"}},  # numeric string
    {"instruction": "i2", "output": "o", "a": {"b": True}},  # bool -> 1
    {"instruction": "i3", "output": "o", "a": {"c": 1}},  # missing
    {"instruction": "i4", "output": "o", "a": 7},  # not an object
    {"instruction": "i5", "output": "o", "a": {"b": [1]}},  # not a number
    {"instruction": "i6", "output": "o", "a": {"b": "high"}},  # not a number
    {"instruction": "i7", "output": "o", "a": {"b": None}},
    {"instruction": "i8", "output": "o", "a": {"b": -0.25}, "xs": [10, 20]},
]


def test_field_nested_and_missing(eval_expr):
    assert_values(eval_expr('field("a.b")', NESTED), [2, 3.5, 1, nan, nan, nan, nan, nan, -0.25])
    assert_values(eval_expr('field("a")', NESTED), [nan, nan, nan, nan, 7, nan, nan, nan, nan])
    assert_values(eval_expr('field("xs.1")', NESTED), [nan] * 8 + [20])
    assert_values(eval_expr('field("xs.2")', NESTED), [nan] * 9)
    assert_values(eval_expr('field("nope")', NESTED), [nan] * 9)


def test_field_missing_rows_are_left_out_of_selections(run_recipe):
    out = run_recipe('select topk(field("a.b"), 9)', NESTED)
    assert out.selected == [1, 0, 2, 8]
    assert sum(out.manifest["exclusions"].values()) == 5


# ------------------------------------------------------------ transforms
def test_rank_ties_averaged_and_normalised(eval_expr):
    pool = pool_s([10, 20, None, 20, 40])
    # ranks among the finite values 10, 20, 20, 40: 1, 2.5, 2.5, 4 -> (r - 1) / (n - 1)
    assert_values(eval_expr('rank(field("s"))', pool), [0, 0.5, nan, 0.5, 1])
    assert_values(eval_expr('rank(field("s"), normalize=false)', pool), [1, 2.5, nan, 2.5, 4])
    assert_values(eval_expr('rank(field("s"))', pool_s([5])), [0])


def test_quantile(eval_expr):
    pool = pool_s([10, 20, None, 20, 40])
    # share of finite values <= x: 10 -> 1/4, 20 -> 3/4, 40 -> 4/4
    assert_values(eval_expr('quantile(field("s"))', pool), [0.25, 0.75, nan, 0.75, 1.0])


def test_zscore(eval_expr):
    pool = pool_s([2, 4, 4, 4, 5, 5, 7, 9])  # mean 5, population std 2
    assert_values(eval_expr('zscore(field("s"))', pool), [-1.5, -0.5, -0.5, -0.5, 0, 0, 1, 2])
    assert_values(eval_expr('zscore(field("s"))', pool_s([3, 3, None])), [0, 0, nan])


def test_minmax(eval_expr):
    assert_values(eval_expr('minmax(field("s"))', pool_s([2, 4, None, 10])), [0, 0.25, nan, 1])
    assert_values(eval_expr('minmax(field("s"))', pool_s([7, 7])), [0, 0])


def test_abs_and_arithmetic(eval_expr, run_recipe):
    pool = pool_s([1, 5, 2, None])
    assert_values(eval_expr('abs(field("s") - 3)', pool), [2, 2, 1, nan])
    out = run_recipe('select bottomk(abs(field("s") - 3), 2)', pool)
    assert out.selected == [2, 0]


def test_transforms_are_relative_to_the_rows_that_reach_them(run_recipe):
    pool = pool_s([10, 20, None, 20, 40])
    # Over the whole pool, the 20s have rank 0.5 and pass; among the survivors of s > 10
    # (20, 20, 40) their rank is (1.5 - 1) / 2 = 0.25 and only the 40 passes.
    assert run_recipe('select rank(field("s")) >= 0.5', pool).selected == [1, 3, 4]
    assert run_recipe('select field("s") > 10 | rank(field("s")) >= 0.5', pool).selected == [4]
    assert run_recipe('select field("s") > 10 | minmax(field("s")) < 0.5', pool).selected == [1, 3]


def test_weighted_rank_combination(run_recipe):
    pool = pool_s([1, 2, 3, 4])
    for rec, b in zip(pool, [3, 1, 4, 2]):
        rec["b"] = b
    # rank(s) = [0, 1/3, 2/3, 1], rank(b) = [2/3, 0, 1, 1/3]; half each: [1/3, 1/6, 5/6, 2/3]
    out = run_recipe('select topk(0.5*rank(field("s")) + 0.5*rank(field("b")), 3)', pool)
    assert out.selected == [2, 3, 0]


def test_ratio_is_nan_where_the_denominator_is_zero(eval_expr, run_recipe):
    pool = [{"instruction": f"t{i}", "input": "", "output": "o", "a": a, "b": b}
            for i, (a, b) in enumerate([(1, 2), (3, 0), (0, 5), (-4, 2), (2, None)])]
    for r in pool:
        if r["b"] is None:
            del r["b"]
    assert_values(eval_expr('ratio(field("a"), field("b"))', pool), [0.5, nan, 0, -2, nan])
    # plain division gives inf there, which would rank first; ratio leaves the row out, counted
    out = run_recipe('select topk(ratio(field("a"), field("b")), 5)', pool)
    assert out.selected == [0, 2, 3]
    assert sum(out.manifest["exclusions"].values()) == 2


def test_exp_and_log(eval_expr):
    pool = pool_s([0, 1, 2.5, None])
    assert_values(eval_expr('exp(field("s"))', pool), [1, math.e, math.exp(2.5), nan])
    assert_values(eval_expr('log(exp(field("s")))', pool), [0, 1, 2.5, nan])

"""dedup_exact and groups (partitions and pipes into them), with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")


def rec(instruction: str, output: str, inp: str = "", **extra) -> dict:
    r = {"instruction": instruction, "input": inp, "output": output}
    r.update(extra)
    return r


# ------------------------------------------------------------------ dedup
DUPS = [
    rec("Q", "A"),  # 0
    rec("q", "a"),  # 1: same as 0 up to case
    rec("Q", "A", id=2),  # 2: same text as 0 (other fields differ)
    rec("Q", "B"),  # 3
    rec("Q ", "A"),  # 4: same as 0 up to whitespace
    rec("Q", "B", "x"),  # 5: differs from 3 by its input
    rec("Z", "B"),  # 6: same response as 3
]


@pytest.mark.parametrize("recipe, kept", [
    ("select dedup_exact", [0, 1, 3, 4, 5, 6]),
    ('select dedup_exact(field="all")', [0, 1, 3, 4, 5, 6]),
    ("select dedup_exact(normalize=true)", [0, 3, 5, 6]),
    ('select dedup_exact(field="output")', [0, 1, 3]),
    ('select dedup_exact(field="output", normalize=true)', [0, 3]),
    ('select dedup_exact(field="instruction")', [0, 1, 4, 6]),
    ('select dedup_exact(field="record")', [0, 1, 2, 3, 4, 5, 6]),
])
def test_dedup_exact_keeps_first(run_recipe, recipe, kept):
    out = run_recipe(recipe, DUPS)
    assert out.selected == kept
    dropped = len(DUPS) - len(kept)
    if dropped:
        (reason, count), = out.manifest["exclusions"].items()
        assert count == dropped and "duplicate" in reason
    else:
        assert out.manifest["exclusions"] == {}


def test_dedup_identical_raw_records(run_recipe):
    pool = [rec("a", "1"), rec("b", "2"), rec("a", "1"), rec("a", "1")]
    out = run_recipe('select dedup_exact(field="record")', pool)
    assert out.selected == [0, 1]


def test_dedup_first_is_in_pool_order_not_input_order(run_recipe):
    # topk hands over [3, 0, ...] but the earliest record of the pool survives.
    pool = [rec("Q", "A", s=1), rec("x", "y", s=0), rec("Q", "A", s=0), rec("Q", "A", s=9)]
    out = run_recipe('select topk(field("s"), 4) | dedup_exact', pool)
    assert out.selected == [0, 1]


def test_dedup_then_select(run_recipe):
    pool = [rec("a", "x" * n) for n in (5, 9, 5, 7)] + [rec("a", "x" * 9)]
    out = run_recipe("select dedup_exact | topk(length, 2)", pool)
    assert out.selected == [1, 3]


# ----------------------------------------------------------------- groups
CATS = [
    rec("i0", "o", cat="b", s=1),
    rec("i1", "o", cat="a", s=5),
    rec("i2", "o", cat="b", s=3),
    rec("i3", "o", s=9),  # no category: a group of its own
    rec("i4", "o", cat="a", s=2),
    rec("i5", "o", cat="b", s=0),
    rec("i6", "o", cat=None, s=4),  # null is "missing" too
]
S = 'field("s")'


def test_groups_labels_in_order_of_first_appearance(eval_expr):
    labels = eval_expr('groups("cat")', CATS)
    assert labels.tolist() == [0, 1, 0, 2, 1, 0, 2]


def test_groups_nested_field_and_types(eval_expr):
    pool = [rec("i0", "o", m={"src": "x"}), rec("i1", "o", m={"src": 1}), rec("i2", "o", m={"src": "1"}),
            rec("i3", "o", m={"src": "x"}), rec("i4", "o", m={}), rec("i5", "o", m={"src": 1.0})]
    labels = eval_expr('groups("m.src")', pool)
    # "x" -> 0, 1 -> 1, "1" -> 2 (a string is not the number), missing -> 3, 1.0 -> a float
    assert labels[0] == labels[3] == 0
    assert labels[1] == 1 and labels[2] == 2 and labels[4] == 3
    assert labels[5] not in (0, 2, 3)


@pytest.mark.parametrize("recipe, expected", [
    # per group, unioned in group-number order: b (0, 2, 5), a (1, 4), missing (3, 6)
    (f'select groups("cat") | topk({S}, 1)', [2, 1, 3]),
    (f'select groups("cat") | bottomk({S}, 1)', [5, 4, 6]),
    (f'select groups("cat") | topk({S}, 50%)', [2, 1, 3]),  # int(3/2) = 1, int(2/2) = 1, int(2/2) = 1
    # in all int(7 * .34) = 2: b gets int(1.02) = 1, a and missing int(.68) = 0; the one left over goes
    # to the largest remainder (.68, a tie: the lower group number, a)
    (f'select groups("cat") | topk({S}, 34%)', [2, 1]),
    (f'select groups("cat") | topk({S}, 2)', [2, 0, 1, 4, 3, 6]),
    (f'select groups("cat") | topk({S}, 30% of pool)', [2, 0, 1, 4, 3, 6]),  # int(7 * 0.3) = 2 per group
    ('select groups("cat") | sample(1)', [0, 1, 3]),
    # grouping only the survivors 1 (a), 2 (b), 3, 4 (a), 6: numbered a, b, missing as they appear
    (f'select {S} >= 2 | groups("cat") | topk({S}, 1)', [1, 2, 3]),
    (f'select {S} < 3 | groups("cat") | topk({S}, 5)', [0, 5, 4]),
    (f'select groups("cat") | topk({S}, 1) + bottomk({S}, 1)', [2, 5, 1, 4, 3, 6]),
])
def test_pipe_through_groups(run_recipe, recipe, expected):
    assert run_recipe(recipe, CATS).selected == expected


def test_groups_then_dedup_per_group(run_recipe):
    pool = [rec("Q", "A", cat="x"), rec("Q", "A", cat="y"), rec("Q", "A", cat="x"), rec("R", "B", cat="y")]
    # Duplicates are only looked for inside each group.
    out = run_recipe('select groups("cat") | dedup_exact', pool)
    assert out.selected == [0, 1, 3]
    out = run_recipe('select dedup_exact | groups("cat") | topk(length, 5)', pool)
    assert out.selected == [0, 3]


def test_groups_rerun_is_cached(run_recipe):
    first = run_recipe(f'select groups("cat") | topk({S}, 1)', CATS)
    assert first.node("groups")["status"] == "computed"
    second = run_recipe(f'select groups("cat") | topk({S}, 1)', CATS)
    assert second.selected == first.selected
    assert all(n["status"] == "cached" for n in second.manifest["nodes"])
    assert np.sum([n["rows_computed"] for n in second.manifest["nodes"]]) == 0


def test_budget_smaller_than_the_number_of_groups_warns(run_recipe):
    # 34% of 7 = 2 picks for 3 groups: the "missing" group gets none, decided by remainders.
    out = run_recipe(f'select groups("cat") | topk({S}, 34%)', CATS)
    assert out.selected == [2, 1]
    [warning] = out.manifest["warnings"]
    assert "fewer than the 3 non-empty groups, so 1 group gets none" in warning
    # 50%: every group gets one, no warning
    assert run_recipe(f'select groups("cat") | topk({S}, 50%)', CATS).manifest["warnings"] == []

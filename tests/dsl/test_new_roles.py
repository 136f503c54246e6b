"""The two roles the op contract adds: set-level scores (a function of a subset, cached whole) and ragged
per-record values (a list per record, stored as values + offsets).  Each is exercised by an op declared
here, exactly as a family module would declare it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datasel.dsl.runner import evaluate
from datasel.ops import registry
from datasel.ops.contract import Column, Kind, Param, Role
from datasel.ops.registry import op

pytestmark = pytest.mark.usefixtures("cache_dir")

CALLS: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def declared():
    """Declare the two test ops once, and take them out of the registry afterwards."""
    @op("test_rank_in_subset", [Param("by", Kind.SCORES, doc="the values ranked")], Kind.SCORES,
        role=Role.SET_SCORES, version="1")
    def rank_in_subset(ctx, subset, by):
        """Rank of each record among the records scored together (a set-level score)."""
        CALLS.append(len(subset))
        values = np.asarray(by.values(subset), dtype=np.float64)
        return values.argsort().argsort().astype(np.float64)

    @op("test_words", [Param("field", Kind.STRING, "output")], Kind.LABELS, role=Role.MAP, version="1",
        columns=(Column("value", ragged=True),))
    def words(state, batch, field="output"):
        """The distinct words of a field, one list per record (a ragged per-record value)."""
        return [sorted(set(r[field].split())) for r in batch.records]

    yield
    for name in ("test_rank_in_subset", "test_words"):
        registry._REGISTRY.pop(name, None)


POOL = [{"instruction": f"q{i}", "input": "", "output": " ".join(["w"] * (i + 1) + [f"x{i}"])} for i in range(6)]


def test_set_level_scores_are_computed_once_for_the_subset_and_cached_whole(run_recipe):
    CALLS.clear()
    first = run_recipe("select topk(test_rank_in_subset(length), 2)", POOL)
    assert first.selected == [5, 4]
    assert CALLS == [6]  # one call for the whole subset, not one per record or per chunk
    second = run_recipe("select topk(test_rank_in_subset(length), 3)", POOL)
    assert second.selected == [5, 4, 3]
    assert CALLS == [6]  # the scores came from the cache: no second call
    node = second.node("test_rank_in_subset")
    assert node["status"] == "cached"


def test_ragged_values_round_trip_through_the_cache(write_pool, cache_dir):
    pool = write_pool(POOL)
    first = evaluate("test_words", pool, cache_dir=cache_dir, quiet=True)
    expected = [sorted(set(r["output"].split())) for r in POOL]
    assert [list(v) for v in first.values] == expected
    shards = list((cache_dir / "maps").glob("*/*/meta.json"))
    files = set(json.loads(shards[0].read_text())["files"])
    assert {"value__values", "value__offsets", "keys"} <= files  # values + offsets, no pickle
    again = evaluate("test_words", pool, cache_dir=cache_dir, quiet=True)
    assert [list(v) for v in again.values] == expected

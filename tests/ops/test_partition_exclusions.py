"""A partition op may leave records out of every group (label -1), saying why: kmeans over features
with undefined rows (a gradient of a record whose answer was cut off), fresh and from the cache."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.ops import registry
from datasel.ops.registry import Kind, Param, op

pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(autouse=True)
def declared():
    @op("test_vec_or_nan", [Param("d", Kind.NUMBER, 3)], Kind.FEATURES, role="map", version="1")
    def vec_or_nan(state, batch, d=3):
        """A vector per record from its output's numbers; NaN where the output says "cut"."""
        out = np.empty((len(batch), int(d)))
        for i, r in enumerate(batch.records):
            out[i] = np.nan if "cut" in r["output"] else float(r["output"].split()[0])
        return out

    yield
    registry._REGISTRY.pop("test_vec_or_nan", None)


POOL = [{"instruction": f"q{i}", "input": "", "output": f"{v} x" if v is not None else "cut off"}
        for i, v in enumerate([0, 0.1, 0.2, None, 10, 10.1, None, 10.2, 20, 20.1])]


def test_kmeans_leaves_records_without_features_out_and_says_why(run_recipe):
    text = "select kmeans(test_vec_or_nan, 3) | topk(length, 1)"
    first = run_recipe(text, POOL)
    assert sorted(first.selected) == [1, 5, 9]  # one per cluster {0,1,2}, {4,5,7}, {8,9}: the longest output (ties: earlier)
    reasons = first.manifest["records"]["reason"]
    assert [i for i, r in enumerate(reasons) if r and "features for kmeans" in r] == [3, 6]
    again = run_recipe(text, POOL)  # from the cache: the same records, the same reasons
    assert again.selected == first.selected
    assert again.manifest["records"]["reason"] == reasons
    assert again.node("kmeans")["status"] == "cached"


def test_with_fewer_defined_records_than_k_each_is_its_own_group(run_recipe):
    first = run_recipe("select kmeans(test_vec_or_nan, 9) | topk(length, 1)", POOL)
    assert sorted(first.selected) == [0, 1, 2, 4, 5, 7, 8, 9]


def test_graphwalk_leaves_records_without_features_out_and_says_why(run_recipe, write_pool):
    val = write_pool([r for r in POOL if "cut" not in r["output"]], name="val.jsonl")
    first = run_recipe("select graphwalk(test_vec_or_nan, anchors=pca(test_vec_or_nan(data=val), 0.5), k=4)",
                       POOL, val=val)
    assert len(first.selected) == 4 and not {3, 6} & set(first.selected)
    reasons = first.manifest["records"]["reason"]
    assert [i for i, r in enumerate(reasons) if r and "features for graphwalk" in r] == [3, 6]

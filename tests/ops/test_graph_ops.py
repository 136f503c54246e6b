"""knn_graph through the engine, and graphwalk following it, against direct computations written here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasel.ops.algos import g2is
from datasel.ops.algos.knn import knn_graph

pytestmark = pytest.mark.usefixtures("cache_dir")

ROOT = Path(__file__).resolve().parents[2]
VAL = ROOT / "examples" / "target_arithmetic.jsonl"
WALK = ('select graphwalk(embed(minilm), anchors=pca(embed(minilm, data=val), 0.5), k=8, '
        'graph=knn_graph(embed(minilm, text="response"), 5))')


def _pool(n: int) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "examples" / "pool.jsonl").read_text().splitlines()[:n]]


def _walk_directly(eval_expr, records):
    G = eval_expr("embed(minilm)", records)
    E = eval_expr('embed(minilm, text="response")', records)
    V = eval_expr("embed(minilm, data=val)", records, val=VAL)
    neighbours, _ = knn_graph(E, 5)
    return g2is.graph_walk(G, g2is.pca_components(V, 0.5), 8, neighbours=neighbours)[0].tolist()


def test_graphwalk_follows_the_knn_graph_and_the_graph_is_cached_per_pool(run_recipe, eval_expr):
    first = run_recipe(WALK, _pool(60), val=VAL)
    assert first.selected == _walk_directly(eval_expr, _pool(60))
    graph = [n for n in first.manifest["nodes"] if n["op"] == "knn_graph"]
    assert len(graph) == 1
    again = run_recipe(WALK, _pool(60), val=VAL)
    assert again.selected == first.selected
    assert all(n["status"] == "cached" for n in again.manifest["nodes"] if n["op"] == "graphwalk")
    # another pool in the same cache: another graph (its key names the pool), another walk
    other = run_recipe(WALK, _pool(45), val=VAL)
    assert other.selected == _walk_directly(eval_expr, _pool(45))


def test_knn_graph_key_includes_the_pool(run_recipe, cache_dir):
    for n in (30, 31):
        run_recipe('select graphwalk(embed(minilm), anchors=pca(embed(minilm, data=val), 0.5), k=2, '
                   'graph=knn_graph(embed(minilm), 3))', _pool(n), val=VAL)
    graphs = sorted(cache_dir.rglob("graph.json"))
    assert len(graphs) == 2, graphs  # one work folder per pool, not one overwritten
    assert sorted(json.loads(p.read_text())["n"] for p in graphs) == [30, 31]


def test_knn_and_graph_together_are_an_error(run_recipe):
    from datasel.dsl.engine import OpError

    with pytest.raises(OpError, match="not both"):
        run_recipe('select graphwalk(embed(minilm), anchors=pca(embed(minilm, data=val), 0.5), knn=3, '
                   'graph=knn_graph(embed(minilm), 3))', _pool(20), val=VAL)

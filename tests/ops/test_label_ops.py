"""tags, deita, label_graph and mig through the engine, against direct computations written here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasel.ops.algos import mig as M

pytestmark = pytest.mark.usefixtures("cache_dir")

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "pools"
TOPICS = ["math", "arithmetic", "coding", "python programming", "poetry", "writing", "history", "geography"]


def _pool(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tags = sorted(set(rng.choice(TOPICS, size=int(rng.integers(0, 4)), replace=False).tolist()))
        q, c = rng.uniform(1, 6, 2).tolist(), rng.uniform(1, 6, 2).tolist()
        rows.append({"instruction": f"task {i}", "input": "", "output": f"answer {i}", "tags": tags,
                     "annotation": {"deita": {"quality_scores": q, "complexity_scores": c}}})
    return rows


def test_tags_and_deita_read_the_records(eval_expr):
    pool = _pool()
    got = eval_expr("tags", pool)
    assert [list(v) for v in got] == [r["tags"] for r in pool]
    scores = eval_expr("deita", pool)
    want = [np.mean(np.multiply(r["annotation"]["deita"]["quality_scores"],
                                r["annotation"]["deita"]["complexity_scores"])) for r in pool]
    np.testing.assert_allclose(scores, want)


def test_a_vocabulary_keeps_only_its_tags(eval_expr, tmp_path):
    vocab = tmp_path / "valid.json"
    vocab.write_text(json.dumps(["math", "coding"]))
    pool = _pool()
    got = eval_expr(f'tags(vocabulary="{vocab}")', pool)
    assert [list(v) for v in got] == [[t for t in r["tags"] if t in ("math", "coding")] for r in pool]


def test_a_field_that_is_not_a_list_of_strings_is_an_error(eval_expr):
    from datasel.dsl.engine import OpError

    pool = _pool(5)
    pool[3]["tags"] = "math"
    with pytest.raises(OpError, match="not a list of strings"):
        eval_expr("tags", pool)


def test_mig_through_the_engine_equals_the_direct_computation(run_recipe, eval_expr):
    pool = _pool()
    text = ('labels = tags\nselect mig(labels, 10, quality=deita, '
            'graph=label_graph(labels, minilm, threshold=0.5))')
    got = run_recipe(text, pool)
    # directly: embed the sorted vocabulary with the same encoder, then the same algorithm
    from datasel.ops.algos.lm_loading import load_encoder

    vocabulary = sorted({t for r in pool for t in r["tags"]})
    E = load_encoder("minilm").encode(vocabulary, normalize_embeddings=True)
    graph = M.label_graph(vocabulary, E, 0.5)
    assert graph.matrix.nnz > len(vocabulary)  # some tags are linked at 0.5 (math/arithmetic, say)
    index = {t: j for j, t in enumerate(vocabulary)}
    tagged = [i for i, r in enumerate(pool) if r["tags"]]
    q = eval_expr("deita", pool)[tagged]
    Vp = M.propagate([[index[t] for t in pool[i]["tags"]] for i in tagged], q, graph)
    want = [tagged[i] for i in M.mig_greedy(Vp, 10)]
    assert got.selected == want
    untagged = sum(1 for r in pool if not r["tags"])
    assert untagged and got.manifest["records"]["reason"].count(None) >= 10
    assert any("no tags" in str(r) for r in got.manifest["records"]["reason"])


@pytest.mark.skipif(not (SHARED / "mig_example_raw.jsonl").exists(), reason="needs ../shared/data")
def test_the_mig_example_file_runs_skipping_its_malformed_line(run_recipe):
    from datasel.dsl.data import DataError

    path = SHARED / "mig_example_raw.jsonl"
    text = ('labels = tags(field="annotation.instag.content")\n'
            'select mig(labels, 3, quality=deita, graph=label_graph(labels, minilm))')
    with pytest.raises(DataError, match=r"mig_example_raw.jsonl:3: malformed JSON"):
        run_recipe(text, path)
    result = run_recipe(text, path, on_bad_record="skip")
    assert len(result.selected) == 3

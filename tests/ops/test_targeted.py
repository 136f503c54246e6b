"""similarity and roundrobin (ops/targeted.py) against naive numpy / plain-Python references, and the
checker's treatment of per-record values of the target set (``target=embed(minilm, data=val)``).

The round-robin reference follows RDS+'s selection script literally: every query's ranking is a
fully sorted list (stable sort, so ties go to the lower index), and in each round every query pops
the head of its list, which is added unless it is already selected; datasel stops at exactly k.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ------------------------------------------------------------------------------------ references
def unit64(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def naive_similarity(X, T, reduce):
    S = unit64(X) @ unit64(T).T
    return S.max(axis=1) if reduce == "max" else S.mean(axis=1)


def naive_round_robin(X, T, k, labels=None):
    """RDS+'s loop: per group a full ranking by max cosine over the group's targets, then turns."""
    S = unit64(T) @ unit64(X).T  # (targets, pool)
    labels = np.arange(len(T)) if labels is None else np.asarray(labels)
    groups = []
    for g in dict.fromkeys(labels.tolist()):  # in order of first appearance
        scores = S[labels == g].max(axis=0)
        groups.append(sorted(range(X.shape[0]), key=lambda i: -scores[i]))  # stable: lower index first on ties
    selected, seen = [], set()
    while len(selected) < k:
        for ranking in groups:
            i = ranking.pop(0)
            if i not in seen:
                seen.add(i)
                selected.append(i)
            if len(selected) == k:
                break
    return selected


def random_vectors(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ----------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_cosine_to_targets_matches_numpy(reduce, monkeypatch):
    from datasel.ops.algos import kernels
    from datasel.ops.targeted import _unit, cosine_to_targets

    X = random_vectors(1000, 12, 0) * np.random.default_rng(1).uniform(0.1, 9, size=(1000, 1)).astype(np.float32)
    X[7] = 0.0  # a zero vector scores 0
    T = random_vectors(37, 12, 2)
    monkeypatch.setattr(kernels, "_BLOCK_ELEMS", 37 * 100)  # blocks of 100 rows: 10 blocks
    assert kernels.block_rows(37) == 100
    got = cosine_to_targets(_unit(X, "x"), _unit(T, "t"), reduce)
    np.testing.assert_allclose(got, naive_similarity(X, T, reduce), atol=2e-6)
    assert got[7] == 0.0


@pytest.mark.parametrize("k", [1, 6, 7, 50, 299, 300])
def test_round_robin_matches_the_reference_loop(k):
    from datasel.ops.targeted import _unit, round_robin

    X, T = random_vectors(300, 16, 3), random_vectors(7, 16, 4)
    got = round_robin(_unit(X, "x"), _unit(T, "t"), np.arange(7), k).tolist()
    assert got == naive_round_robin(X, T, k)
    assert len(set(got)) == len(got) == k


def test_round_robin_by_task():
    from datasel.ops.targeted import _unit, round_robin

    X, T = random_vectors(400, 16, 5), random_vectors(9, 16, 6)
    labels = np.array([0, 0, 1, 2, 1, 0, 2, 2, 2])  # three tasks, numbered by first appearance
    for k in (1, 3, 40, 400):
        got = round_robin(_unit(X, "x"), _unit(T, "t"), labels, k).tolist()
        assert got == naive_round_robin(X, T, k, labels)
    # a task ranks by the max over its targets, not each target on its own
    per_target = round_robin(_unit(X, "x"), _unit(T, "t"), np.arange(9), 40).tolist()
    assert per_target != round_robin(_unit(X, "x"), _unit(T, "t"), labels, 40).tolist()


def test_round_robin_grows_its_rankings_when_targets_agree():
    # 5 copies of one target: every round adds one record, so 200 picks need rankings 200 deep
    # (the first pass keeps 64 per target)
    from datasel.ops.targeted import _unit, round_robin

    X = random_vectors(500, 8, 7)
    T = np.repeat(random_vectors(1, 8, 8), 5, axis=0)
    got = round_robin(_unit(X, "x"), _unit(T, "t"), np.arange(5), 200).tolist()
    assert got == naive_round_robin(X, T, 200)
    order = np.argsort(-(unit64(X) @ unit64(T[:1]).T)[:, 0], kind="stable")
    assert got == order[:200].tolist()


def test_round_robin_ties_go_to_the_earlier_record():
    from datasel.ops.targeted import _unit, round_robin

    X = random_vectors(50, 8, 9)
    X[40] = X[3]  # exact copies: equal scores for every target
    X[45] = X[3] * 2
    T = random_vectors(3, 8, 10)
    got = round_robin(_unit(X, "x"), _unit(T, "t"), np.arange(3), 50).tolist()
    assert got.index(3) < got.index(40) and got.index(3) < got.index(45)
    assert got == naive_round_robin(X, T, 50)


# ------------------------------------------------------------------------------ through the engine
def _dump(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """60 pool records of examples/pool.jsonl and the 30 arithmetic targets, with a task field on the
    targets (plain word problems vs the rest), and their MiniLM embeddings."""
    from datasel.dsl.runner import evaluate

    folder = tmp_path_factory.mktemp("targeted")
    pool_records = [json.loads(x) for x in (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:60]]
    targets = [json.loads(x) for x in (EXAMPLES / "target_arithmetic.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, t in enumerate(targets):
        if i % 3:
            t["task"] = "word" if t["input"] == "" else "framed"
    pool = _dump(folder / "pool.jsonl", pool_records)
    val = _dump(folder / "val.jsonl", targets)
    cache = folder / "cache"
    E = np.asarray(evaluate("emb", pool, cache_dir=cache, quiet=True).values, dtype=np.float64)
    V = np.asarray(evaluate('embed(minilm, text="whole")', val, cache_dir=cache, quiet=True).values,
                   dtype=np.float64)
    W = np.asarray(evaluate('embed(minilm, text="whole")', pool, cache_dir=cache, quiet=True).values,
                   dtype=np.float64)
    return dict(pool=pool, val=val, cache=cache, E=E, V=V, W=W, targets=targets)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_similarity_scores_the_pool_against_val(env, reduce):
    from datasel.dsl.runner import evaluate

    got = np.asarray(evaluate(f'similarity(emb, target=embed(minilm, text="whole", data=val), reduce="{reduce}")',
                              env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True).values)
    assert got.shape == (60,)
    np.testing.assert_allclose(got, naive_similarity(env["E"], env["V"], reduce), atol=1e-5)


def test_topk_of_similarity(env):
    from datasel.dsl.runner import run

    out = run("r.sel", env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True,
              recipe_text='select topk(similarity(emb, target=embed(minilm, text="whole", data=val)), 8)')
    ref = naive_similarity(env["E"], env["V"], "max")
    assert [int(i) for i in out.selected] == np.argsort(-ref, kind="stable")[:8].tolist()


@pytest.mark.parametrize("by", [None, "task"])
def test_roundrobin_through_the_engine(env, by):
    from datasel.dsl.runner import run

    arg = "" if by is None else f', by="{by}"'
    out = run("r.sel", env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True,
              recipe_text=f'select roundrobin(embed(minilm, text="whole"), 25%, '
                          f'target=embed(minilm, text="whole", data=val){arg})')
    labels = None
    if by:
        names = ["\0" if "task" not in t else t["task"] for t in env["targets"]]
        labels = [list(dict.fromkeys(names)).index(x) for x in names]
    assert [int(i) for i in out.selected] == naive_round_robin(env["W"], env["V"], 15, labels)


def test_nothing_reaches_them(env):
    from datasel.dsl.runner import run

    for text in ['select length > 10000 | topk(similarity(emb, target=embed(minilm, data=val)), 5)',
                 'select length > 10000 | roundrobin(emb, 5, target=embed(minilm, data=val))']:
        out = run("r.sel", env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True, recipe_text=text)
        assert list(out.selected) == []


def test_another_val_is_another_result(env, tmp_path):
    # map results are keyed without their dataset; results that read the target must not be
    from datasel.dsl.runner import run

    pool_lines = env["pool"].read_text(encoding="utf-8").splitlines()
    other = _dump(tmp_path / "other.jsonl", [json.loads(x) for x in pool_lines[10:13]])
    for text, expected in [
        ('select roundrobin(embed(minilm, text="whole"), 3, target=embed(minilm, text="whole", data=val))',
         [10, 11, 12]),  # each target's most similar record is its own copy in the pool (cosine 1)
        ('select topk(similarity(embed(minilm, text="whole"), target=embed(minilm, text="whole", data=val)), 3)',
         None),
    ]:
        first = run("r.sel", env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True, recipe_text=text)
        second = run("r.sel", env["pool"], val=other, cache_dir=env["cache"], quiet=True, recipe_text=text)
        assert sorted(int(i) for i in second.selected) == [10, 11, 12]
        if expected is not None:
            assert [int(i) for i in second.selected] == expected
        assert [int(i) for i in first.selected] != [int(i) for i in second.selected]
        again = run("r.sel", env["pool"], val=env["val"], cache_dir=env["cache"], quiet=True, recipe_text=text)
        assert [int(i) for i in again.selected] == [int(i) for i in first.selected]


# ------------------------------------------------------------------------------------ the checker
def _compile(text):
    from datasel.dsl.compiler import compile_recipe, recipe_source

    return compile_recipe(recipe_source(text, name="t.sel"))


def _errors(text):
    from datasel.dsl.diagnostics import RecipeError

    with pytest.raises(RecipeError) as info:
        _compile(text)
    return [d.message for d in info.value.diagnostics]


def test_checker_accepts_features_of_val_as_the_target():
    for text in ["select topk(similarity(emb, target=embed(minilm, data=val)), 5%)",
                 "select topk(similarity(target=embed(minilm, data=val), features=emb), 5)",
                 "select roundrobin(emb, 5%, target=embed(minilm, data=val))",
                 'select roundrobin(emb, 5, target=embed(minilm, data=val), by="task")']:
        compiled = _compile(text)
        [node] = [n for n in compiled.plan.nodes.values() if n.op in ("similarity", "roundrobin")]
        if node.op == "similarity":
            assert node.dataset == "pool"  # Scores of the pool, not of val


def test_checker_still_refuses_val_where_pool_records_are_meant():
    # the records being scored or selected must be the pool's
    [msg] = _errors("select topk(similarity(embed(minilm, data=val), target=emb), 5)")
    assert "topk selects from the pool but argument 1 (scores) covers val" in msg
    msgs = _errors("select roundrobin(embed(minilm, data=val), 5, target=emb)")
    assert any("roundrobin selects from the pool but argument 1 (features) covers val" in m for m in msgs)


def test_nearest_to_val_points_to_similarity():
    [msg] = _errors("select nearest(embed(minilm, data=val), 5)")
    assert msg.startswith("nearest selects from the pool but argument 1 (features) covers val")
    assert "use similarity(<pool features>, target=embed(minilm, data=val))" in msg


def test_mismatched_dimensions_are_a_clear_error(env):
    from datasel.dsl.runner import evaluate

    with pytest.raises(Exception, match="384-dimensional features but the target 128-dimensional") as info:
        evaluate("similarity(emb, target=minhash(data=val))", env["pool"], val=env["val"],
                 cache_dir=env["cache"], quiet=True)
    assert "same encoder" in str(info.value)

"""dedup_near (ops/dedup.py): MinHash and embedding near-duplicate removal against brute-force references.

References written here: exact Jaccard of 5-word shingle sets over all pairs (own tokenizer and
shingling), and float64 cosine over all pairs, each followed by a plain greedy loop in pool order
("drop a record when an earlier *kept* record is its near duplicate").

MinHash tolerance: the op estimates Jaccard from 128 permutations and finds candidates by LSH, so
its kept set equals the exact one only when no pair is near the threshold.  The MinHash pools are
built so that every pair has exact Jaccard >= 0.93 or <= 0.55 (asserted), with the threshold at
0.8: the estimate's standard deviation is at most 0.044 there (>= 5.7 sd away), and LSH (14 bands
of 9 rows) misses a pair at J >= 0.93 with probability (1 - 0.93^9)^14 < 4e-5.  The embedding
reference is exact: thresholds are chosen at least 1e-4 from every pair's cosine (asserted).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def rec(instruction: str, output: str, inp: str = "") -> dict:
    return {"instruction": instruction, "input": inp, "output": output}


# ------------------------------------------------------------------------------------ references
def shingle_set(text: str, k: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    if len(words) <= k:
        return {tuple(words)}
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def whole_text(r: dict) -> str:  # field="all" of a single-turn record
    return "\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p)


def jaccard_matrix(records: list[dict], k: int = 5) -> np.ndarray:
    sets = [shingle_set(whole_text(r), k) for r in records]
    n = len(sets)
    J = np.eye(n)
    for i in range(n):
        for j in range(i):
            J[i, j] = J[j, i] = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
    return J


def greedy(S: np.ndarray, threshold: float) -> tuple[list[int], dict[int, int]]:
    """Kept rows in order, and for every dropped row its most similar earlier kept row (earliest on ties)."""
    kept: list[int] = []
    twin: dict[int, int] = {}
    for i in range(len(S)):
        near = [j for j in kept if S[i, j] >= threshold]
        if near:
            twin[i] = max(near, key=lambda j: (S[i, j], -j))
        else:
            kept.append(i)
    return kept, twin


def dropped_count(manifest: dict) -> int:
    return sum(c for reason, c in manifest["exclusions"].items() if "near duplicate" in reason)


# ----------------------------------------------------------------------------------- MinHash data
def word_pool(n_base: int = 30, seed: int = 0) -> list[dict]:
    """Random 40-word texts over a 400-word vocabulary, with exact copies, one-word edits at the
    very end (J = 35/37), case / punctuation edits (J = 1 after normalisation) and heavy rewrites
    (every fourth word replaced: J well below 0.55), inserted at random later positions."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(400)]
    base = [list(rng.choice(vocab, size=40)) for _ in range(n_base)]
    records = [rec(" ".join(words[:8]), " ".join(words[8:])) for words in base]
    variants = []
    for b, words in enumerate(base):
        kind = b % 4
        w = list(words)
        if kind == 0:
            variants.append(rec(" ".join(w[:8]), " ".join(w[8:])))
        elif kind == 1:
            w[-1] = "changed"
            variants.append(rec(" ".join(w[:8]), " ".join(w[8:])))
        elif kind == 2:
            variants.append(rec(" ".join(w[:8]).upper() + "!!", ", ".join(w[8:]) + "."))
        else:
            for p in range(0, 40, 4):
                w[p] = f"x{rng.integers(10**6)}"
            variants.append(rec(" ".join(w[:8]), " ".join(w[8:])))
    for v in variants:
        records.insert(int(rng.integers(len(records) // 2, len(records) + 1)), v)
    return records


def test_word_pool_is_far_from_the_threshold():
    J = jaccard_matrix(word_pool())
    off = J[~np.eye(len(J), dtype=bool)]
    assert ((off >= 0.93) | (off <= 0.55)).all()
    assert (off >= 0.93).sum() >= 2 * 20  # 22 near-duplicate pairs (both orders)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minhash_matches_exact_jaccard(run_recipe, seed):
    records = word_pool(seed=seed)
    kept_ref, twin_ref = greedy(jaccard_matrix(records), 0.8)
    out = run_recipe("select dedup_near", records)
    assert out.selected == kept_ref
    assert dropped_count(out.manifest) == len(records) - len(kept_ref) == len(twin_ref)
    # the same with the parameters spelled out
    spelled = run_recipe('select dedup_near(threshold=0.8, field="all", shingle=5, num_perm=128, seed=1, '
                         'normalize=true)', records)
    assert spelled.selected == kept_ref


def test_minhash_keeps_first_in_pool_order_not_input_order(run_recipe):
    text = " ".join(f"w{i}" for i in range(30))
    pool = [dict(rec("a " + text, "x"), s=1), rec("completely different words here", "y") | {"s": 5},
            dict(rec("A " + text + ".", "x"), s=9)]
    out = run_recipe('select topk(field("s"), 3) | dedup_near', pool)
    assert out.selected == [0, 1]  # topk hands over 2, 1, 0, but record 0 comes first in the pool and survives


def test_minhash_short_texts(run_recipe):
    # fewer words than the shingle size: the whole (normalised) text is one shingle
    pool = [rec("Hi", "there"), rec("hi,", "THERE!"), rec("Bye", "now"), rec("hi", "there friend")]
    assert run_recipe("select dedup_near", pool).selected == [0, 2, 3]
    # without normalisation "hi," and "Hi" differ
    assert run_recipe("select dedup_near(normalize=false)", pool).selected == [0, 1, 2, 3]
    # one field only: the instructions of 0, 1 and 3 are all "hi"
    assert run_recipe('select dedup_near(field="instruction")', pool).selected == [0, 2]


def test_minhash_shingle_size_matters(run_recipe):
    # one word swapped in the middle of 13: the word sets share 10 of 12 words (J = 0.83), the
    # 5-word shingles 4 of 14 (J = 0.29); at a threshold of 0.6 both are far from it
    a = rec("the quick brown fox jumps over the lazy dog near the river", "ok")
    b = rec("the quick brown fox jumps under the lazy dog near the river", "ok")
    for k, expected in ((1, [0]), (5, [0, 1])):
        J = jaccard_matrix([a, b], k)[0, 1]
        assert abs(J - 0.6) > 0.2
        assert (J >= 0.6) == (expected == [0])
        assert run_recipe(f"select dedup_near(shingle={k}, threshold=0.6)", [a, b]).selected == expected


def test_minhash_signatures_are_cached_per_record(run_recipe):
    records = word_pool()
    distinct = len({json.dumps(r, sort_keys=True) for r in records})  # identical records are hashed once
    assert distinct < len(records)
    first = run_recipe("select dedup_near", records)
    assert first.node("minhash")["rows_computed"] == distinct
    second = run_recipe("select dedup_near", records)
    assert second.selected == first.selected
    assert second.node("minhash")["rows_computed"] == 0
    # a grown pool hashes only its new records
    grown = records + [rec("brand new record number one", "z"), rec("and another new one", "z")]
    third = run_recipe("select dedup_near", grown)
    assert third.node("minhash")["rows_computed"] == 2
    # other shingling parameters are other signatures
    fourth = run_recipe("select dedup_near(shingle=3)", records)
    assert fourth.node("minhash")["rows_computed"] == distinct


def test_minhash_signature_values(eval_expr):
    from datasketch import MinHash

    pool = [rec("Hello there, world", "fine"), rec("hello THERE world!", "fine")]
    sig = eval_expr("minhash(shingle=2, num_perm=64, seed=3)", pool)
    assert sig.shape == (2, 64) and sig.dtype == np.uint32
    assert (sig[0] == sig[1]).all()  # equal after normalisation
    m = MinHash(num_perm=64, seed=3)
    m.update_batch([" ".join(g).encode() for g in shingle_set("hello there world fine", 2)])
    assert (sig[0] == m.hashvalues).all()


# --------------------------------------------------------------------------- op contract: exclude
class FakeCtx:
    def __init__(self, n_pool: int):
        self.n_pool = n_pool
        self.calls: list[tuple] = []

    def exclude(self, reason, indices, *, detail=None, **values):
        self.calls.append((reason, np.asarray(indices), detail, {k: np.asarray(v) for k, v in values.items()}))


class FakeValues:
    def __init__(self, array: np.ndarray):
        self.array = array
        self.label = "x"

    def values(self, idx):
        return self.array[np.asarray(idx)]


def test_minhash_exclude_details():
    from datasel.ops.dedup import dedup_minhash

    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(6, 128), dtype=np.uint64).astype(np.uint32)
    sig[3] = sig[1]  # identical: Jaccard estimate 1
    sig[5] = sig[0]
    sig[5, :16] += 1  # 112 / 128 = 0.875
    ctx = FakeCtx(6)
    kept = dedup_minhash(ctx, np.array([0, 1, 2, 3, 4, 5]), FakeValues(sig), threshold=0.8)
    assert kept.tolist() == [0, 1, 2, 4]
    [(reason, dropped, detail, values)] = ctx.calls
    assert reason == "near duplicate"
    assert dropped.tolist() == [3, 5]
    assert detail == "near duplicate of {record} (Jaccard ≈ {jaccard:.2f})"
    assert values["record"].tolist() == [1, 0]
    np.testing.assert_allclose(values["jaccard"], [1.0, 112 / 128])
    assert detail.format(record="line 2", jaccard=values["jaccard"][1]) == "near duplicate of line 2 (Jaccard ≈ 0.88)"


def test_minhash_chain_only_kept_records_count():
    # a ~ b (112 of 128 values equal), b ~ c (112), a vs c 96 / 128 = 0.75: b goes, c stays
    from datasel.ops.dedup import dedup_minhash, lsh_bands

    assert lsh_bands(0.8, 128) == (14, 9)  # bands 4..13 (columns 36..125) are shared by all three
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**32, size=128, dtype=np.uint64).astype(np.uint32)
    b = a.copy()
    b[:16] += 1
    c = b.copy()
    c[16:32] += 1
    sig = np.stack([a, b, c])
    ctx = FakeCtx(3)
    assert dedup_minhash(ctx, np.array([0, 1, 2]), FakeValues(sig)).tolist() == [0, 2]
    [(_, dropped, _, values)] = ctx.calls
    assert dropped.tolist() == [1] and values["record"].tolist() == [0]


def test_cosine_exclude_details_and_chain():
    from datasel.ops.dedup import dedup_cosine

    angles = np.radians([0.0, 15.0, 30.0, 90.0, 91.0])  # 1 ~ 0 (cos 0.966); 2 ~ 1 but 1 is dropped, 2 ≁ 0
    X = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[3.0], [1.0], [2.0], [1.0], [5.0]])
    ctx = FakeCtx(5)
    subset = np.array([0, 1, 2, 3, 4])
    kept = dedup_cosine(ctx, subset, FakeValues(X.astype(np.float32)), threshold=0.95)
    assert kept.tolist() == [0, 2, 3]
    [(reason, dropped, detail, values)] = ctx.calls
    assert reason == "near duplicate" and dropped.tolist() == [1, 4]
    assert detail == "near duplicate of {record} (cosine {cosine:.3f})"
    assert values["record"].tolist() == [0, 3]
    np.testing.assert_allclose(values["cosine"], np.cos(np.radians([15.0, 1.0])), atol=1e-6)


def test_cosine_op_refuses_signatures():
    from datasel.ops.dedup import dedup_cosine, dedup_minhash

    with pytest.raises(ValueError, match="MinHash signatures"):
        dedup_cosine(FakeCtx(2), np.array([0, 1]), FakeValues(np.ones((2, 8), dtype=np.uint32)))
    with pytest.raises(ValueError, match="needs MinHash signatures"):
        dedup_minhash(FakeCtx(2), np.array([0, 1]), FakeValues(np.ones((2, 8), dtype=np.float32)))


# ------------------------------------------------------------------------------ cosine algorithm
def planted(n: int, d: int, n_dup: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n // 2, size=n_dup, replace=False)
    dst = rng.choice(np.arange(n // 2, n), size=n_dup, replace=False)
    noise = rng.uniform(0.2, 3.0, size=(n_dup, 1)).astype(np.float32)
    X[dst] = X[src] + noise * rng.standard_normal((n_dup, d)).astype(np.float32) / np.sqrt(d)
    X[dst[:5]] = X[src[:5]] * 2.5  # exact direction copies, other norms
    return X


def cos64(X: np.ndarray) -> np.ndarray:
    U = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    return U @ U.T


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("block", [64, 2048])
def test_cosine_algorithm_matches_brute_force(threshold, block):
    from datasel.ops.dedup import near_duplicates_cosine

    X = planted(900, 24, 120, seed=int(threshold * 100))
    S = cos64(X)
    assert np.abs(S[~np.eye(len(S), dtype=bool)] - threshold).min() > 1e-4
    kept_ref, twin_ref = greedy(S, threshold)
    keep, twin, cos = near_duplicates_cosine(X, threshold, index="flat", block=block)
    assert np.flatnonzero(keep).tolist() == kept_ref
    assert {i: int(twin[i]) for i in np.flatnonzero(~keep)} == twin_ref
    np.testing.assert_allclose(cos[~keep], [S[i, j] for i, j in twin_ref.items()], atol=1e-6)


def test_cosine_ivf_probing_every_list_is_exact():
    from datasel.ops.dedup import near_duplicates_cosine

    X = planted(3000, 16, 300, seed=5)
    kept_ref, twin_ref = greedy(cos64(X), 0.95)
    keep, twin, _ = near_duplicates_cosine(X, 0.95, index="ivf", nprobe=10**6, block=512)
    assert np.flatnonzero(keep).tolist() == kept_ref
    assert {i: int(twin[i]) for i in np.flatnonzero(~keep)} == twin_ref


def test_cosine_cluster_of_copies_and_zero_rows():
    from datasel.ops.dedup import near_duplicates_cosine

    X = np.zeros((3000, 8), dtype=np.float32)
    X[:, 0] = 1.0  # 3,000 copies of one direction: one survivor, the first
    X[10] = 0.0  # an all-zero row has cosine 0 with everything: kept
    X[2999] = [0, 1, 0, 0, 0, 0, 0, 0]
    keep, twin, _ = near_duplicates_cosine(X, 0.95, block=256)
    assert np.flatnonzero(keep).tolist() == [0, 10, 2999]
    assert set(twin[~keep].tolist()) == {0}


# ---------------------------------------------------------------------- embedding mode, end to end
@pytest.fixture(scope="module")
def emb_env(tmp_path_factory):
    """The first 100 records of examples/pool.jsonl plus 12 edited copies, with real MiniLM embeddings."""
    from datasel.dsl.runner import evaluate

    folder = tmp_path_factory.mktemp("dedup_near")
    base = [json.loads(line) for line in (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:100]]
    edits = [lambda s: s.lower(), lambda s: s.rstrip(".?!"), lambda s: s + "  ", lambda s: "Please: " + s]
    rng = np.random.default_rng(3)
    keyed = [(float(i), r) for i, r in enumerate(base)]
    for n, i in enumerate(range(3, 100, 8)):  # an edited copy of record i somewhere after it
        copy = dict(base[i], instruction=edits[n % 4](base[i]["instruction"]))
        keyed.append((float(rng.uniform(i + 0.5, 100.0)), copy))
    records = [r for _, r in sorted(keyed, key=lambda kr: kr[0])]
    pool = folder / "pool.jsonl"
    pool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cache = folder / "cache"
    E = np.asarray(evaluate('embed(minilm, text="whole")', pool, cache_dir=cache, quiet=True).values)
    return SimpleNamespace(records=records, pool=pool, cache=cache, S=cos64(E))


def _threshold_away_from_pairs(S: np.ndarray, wanted: float) -> float:
    off = np.sort(S[np.triu_indices(len(S), 1)])
    t = wanted
    while np.abs(off - t).min() <= 1e-4:
        t += 2e-4
    return round(t, 4)


@pytest.mark.parametrize("wanted", [0.9, 0.95, 0.98])
def test_embedding_mode_matches_brute_force(emb_env, wanted):
    from datasel.dsl.runner import run

    t = _threshold_away_from_pairs(emb_env.S, wanted)
    kept_ref, twin_ref = greedy(emb_env.S, t)
    assert len(twin_ref) >= 5  # the edited copies at least
    out = run("r.sel", emb_env.pool, cache_dir=emb_env.cache, quiet=True,
              recipe_text=f'select dedup_near(features=embed(minilm, text="whole"), threshold={t})')
    assert [int(i) for i in out.selected] == kept_ref
    assert dropped_count(out.manifest) == len(twin_ref)


# ------------------------------------------------------------------------------------ bad calls
@pytest.mark.parametrize("text, message", [
    ("select dedup_near(features=emb, shingle=3)", "shingle only applies to MinHash"),
    ('select dedup_near(features=emb, field="output", num_perm=64)', "field, num_perm only apply to MinHash"),
    ('select dedup_near(index="flat")', "index only applies to embeddings"),
    ("select dedup_near(threshold=1.5)", "threshold must be at most 1, got 1.5"),
    ("select dedup_near(features=emb, threshold=0)", "threshold must be in (0, 1]"),
    ("select dedup_near(shingle=0)", "shingle must be at least 1"),
    ("select dedup_near(num_perm=2.5)", "num_perm must be a whole number"),
    ('select dedup_near(field="answer")', 'field= must be one of'),
    ("select dedup_near(features=length)", "expects Features"),
])
def test_bad_parameters_are_compile_errors(text, message):
    from datasel.dsl.compiler import compile_recipe, recipe_source
    from datasel.dsl.diagnostics import RecipeError

    with pytest.raises(RecipeError) as info:
        compile_recipe(recipe_source(text, name="t.sel"))
    assert any(message in d.message for d in info.value.diagnostics), [d.message for d in info.value.diagnostics]


def test_nothing_reaches_it(run_recipe):
    pool = [rec("a b", "c"), rec("a b", "c")]
    assert run_recipe("select length > 100 | dedup_near", pool).selected == []
    assert run_recipe("select length > 100 | dedup_near(features=minhash)", pool).selected == []


def test_signatures_as_embeddings_is_a_clear_run_error(run_recipe):
    with pytest.raises(Exception, match="MinHash signatures"):
        run_recipe("select dedup_near(features=minhash)", [rec("a b", "c"), rec("d e", "f")])

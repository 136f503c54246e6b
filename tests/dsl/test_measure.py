"""``datasel measure SELECTED --pool POOL``: diversity metrics of a selection next to seeded random ones.

The metric values are checked against naive float64 formulas written here (explicit cosine
matrices), on MiniLM vectors read back with ``evaluate("embed(minilm)", pool)``; the random
reference draws are rebuilt here from their documented seeds (numpy SeedSequence(seed).spawn),
and their mean / spread / verdict recomputed from the naive values.
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
N = 60
CHOSEN = [0, 3, 7, 12, 20, 26, 33, 41, 47, 52, 58, 59]
METRICS = ("novelsum", "facility", "distsum", "knn", "vendi")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasel.dsl.runner import evaluate

    folder = tmp_path_factory.mktemp("measure")
    lines = (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:N]
    pool = folder / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n", encoding="utf-8")
    selected = folder / "selected.jsonl"
    # selection order differs from pool order on purpose
    selected.write_text("\n".join(lines[i] for i in reversed(CHOSEN)) + "\n", encoding="utf-8")
    cache = folder / "cache"
    E = np.asarray(evaluate("embed(minilm)", pool, cache_dir=cache, quiet=True).values, dtype=np.float64)
    return pool, selected, cache, E, folder


# ---------------------------------------------------------------- naive references (cosine, float64)
def _cos(E):
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    return U @ U.T


def ref_facility(E, sel):
    return float(np.maximum(_cos(E)[:, sel], 0.0).max(axis=1).sum())


def ref_distsum(E, sel):
    C = _cos(E[sel])
    m = len(sel)
    return float(sum(1.0 - C[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1)))


def ref_knn(E, sel, k=10):
    D = 1.0 - _cos(E[sel])
    m = len(sel)
    kk = min(k, m - 1)
    return float(np.mean([np.sort(np.delete(D[i], i))[kk - 1] for i in range(m)]))


def ref_vendi(E, sel):
    K = _cos(E[sel])
    lam = np.linalg.eigvalsh(K / len(sel))
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def ref_novelsum(E, sel, K=10, alpha=1.0, beta=0.5):
    """NovelSum as the README states it: density over the whole pool (raw squared L2 to the K nearest other
    distinct pool vectors, exact copies of the record never counting, as in the authors' np.unique index;
    sigma = 1 / (mean + 1e-9)^beta); each selected row's cosine distances to the selection, itself
    included, sorted ascending, scaled by its own sigma and averaged with weights 1/rank^alpha."""
    E = np.asarray(E, dtype=np.float64)
    distinct = {tuple(row) for row in E.tolist()}
    sigma = []
    for i in sel:
        others = np.array([v for v in distinct if v != tuple(E[i].tolist())])
        d2 = np.sort(((others - E[i]) ** 2).sum(axis=1))[:K]
        sigma.append(1.0 / (np.mean(d2) + 1e-9) ** beta)
    D = 1.0 - _cos(E[sel])
    w = 1.0 / np.arange(1, len(sel) + 1) ** alpha
    return float(np.mean([sigma[a] * np.sort(D[a]) @ w / w.sum() for a in range(len(sel))]))


REFS = {"facility": ref_facility, "distsum": ref_distsum, "knn": ref_knn, "vendi": ref_vendi,
        "novelsum": ref_novelsum}


def ref_draws(seed=0, draws=10, n=N, size=len(CHOSEN)):
    """The documented random references: draw i = sorted default_rng(SeedSequence(seed).spawn(draws)[i]).choice(...)."""
    out = []
    for child in np.random.SeedSequence(seed).spawn(draws):
        out.append(np.sort(np.random.default_rng(child).choice(n, size=size, replace=False)))
    return out


def ref_summary(E, sel, ref, draws):
    """Naive selection value, per-draw values, mean / sample sd / min / max and the verdict."""
    value = ref(E, sel)
    vals = np.array([ref(E, d) for d in draws])
    verdict = "above" if value > vals.max() else "below" if value < vals.min() else "within"
    return value, vals, vals.mean(), vals.std(ddof=1), vals.min(), vals.max(), verdict


def check_metric(entry, E, sel, ref, draws, rel=1e-5):
    value, vals, mean, sd, lo, hi, verdict = ref_summary(E, sel, ref, draws)
    assert entry["selection"] == pytest.approx(value, rel=rel, abs=1e-6)
    assert entry["random_values"] == pytest.approx(vals.tolist(), rel=rel, abs=1e-6)
    assert entry["random_mean"] == pytest.approx(mean, rel=rel, abs=1e-6)
    assert entry["random_std"] == pytest.approx(sd, rel=1e-3, abs=1e-6)
    assert entry["random_min"] == pytest.approx(lo, rel=rel, abs=1e-6)
    assert entry["random_max"] == pytest.approx(hi, rel=rel, abs=1e-6)
    assert entry["vs_random"] == verdict
    return verdict


def write_selection(folder, pool, rows, name):
    lines = pool.read_text(encoding="utf-8").splitlines()
    path = folder / name
    path.write_text("\n".join(lines[i] for i in rows) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------- tests
def test_measure_table_shows_selection_and_the_draws(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--quiet")
    assert res.code == 0, res.err
    assert f"{len(CHOSEN)} selected of {N}" in res.out
    assert f"random reference: 10 uniform draws of {len(CHOSEN)} records (seed 0)" in res.out
    lines = res.out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert lines[top].split()[:7] == ["metric", "selection", "random", "mean", "sd", "min", "max"]
    table = lines[top + 1 : lines.index("", top)]  # the table ends at a blank line; the legend follows
    assert len(table) == len(METRICS)
    draws = ref_draws()
    rows = {line.split()[0]: line.split() for line in table}
    for m in METRICS:
        assert m in rows, res.out
        value, _, mean, sd, lo, hi, verdict = ref_summary(E, CHOSEN, REFS[m], draws)
        numbers = [float(x) for x in rows[m][1:6]]  # selection, mean, sd, min, max, printed to 4 decimals
        assert numbers == pytest.approx([value, mean, sd, lo, hi], abs=2e-4), m
        words = {"above": "above all draws", "below": "below all draws", "within": "within the draws"}
        assert " ".join(rows[m][6:]) == words[verdict], m
    assert "NovelSum (density- and proximity-weighted" in res.out  # the legend below the table


def test_measure_facility_json(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "facility", "--json", "--quiet")
    assert res.code == 0, res.err
    report = _strict(res.out)
    assert report["selected"] == str(selected)
    assert report["pool"] == str(pool)
    assert report["pool_size"] == N
    assert report["selected_count"] == len(CHOSEN)
    assert report["features"] == "embed(minilm)"
    assert report["random_seed"] == 0
    assert report["draws"] == 10
    assert list(report["metrics"]) == ["facility"]
    fac = report["metrics"]["facility"]
    assert set(fac) == {"selection", "random_mean", "random_std", "random_min", "random_max", "random_values",
                        "vs_random"}
    assert len(fac["random_values"]) == 10
    # the random references: uniform draws of the same size without replacement, seeds spawned from --seed
    check_metric(fac, E, CHOSEN, ref_facility, ref_draws())
    assert len({tuple(d) for d in ref_draws()}) == 10 and len(set(fac["random_values"])) == 10  # distinct draws
    # a facility value covers at most every record once
    assert 0 < fac["selection"] <= N + 1e-6


def test_measure_json_values_match_naive_formulas(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--json", "--quiet")
    assert res.code == 0, res.err
    report = _strict(res.out)
    assert set(report["metrics"]) == set(METRICS)
    draws = ref_draws()
    for name, ref in REFS.items():
        check_metric(report["metrics"][name], E, CHOSEN, ref, draws)


def test_measure_verdicts_above_below_within(cli, setup):
    pool, selected, cache, E, folder = setup
    draws = ref_draws()
    C = _cos(E)
    # within, ends included: the selection is the random draw with the largest facility value, so it equals one
    # of the draws for every metric and the draws' maximum for facility
    best = int(np.argmax([ref_facility(E, d) for d in draws]))
    same = write_selection(folder, pool, draws[best], "best_draw.jsonl")
    report = _strict(cli("measure", same, "--pool", pool, "--cache", cache, "--json", "--quiet").out)
    for name, ref in REFS.items():
        entry = report["metrics"][name]
        assert entry["selection"] == entry["random_values"][best], name
        assert check_metric(entry, E, draws[best], ref, draws) == "within", name
    assert report["metrics"]["facility"]["selection"] == report["metrics"]["facility"]["random_max"]
    worst = int(np.argmin([ref_distsum(E, d) for d in draws]))
    same = write_selection(folder, pool, draws[worst], "worst_draw.jsonl")
    distsum = _strict(cli("measure", same, "--pool", pool, "--cache", cache, "--metric", "distsum", "--json",
                          "--quiet").out)["metrics"]["distsum"]
    assert distsum["selection"] == distsum["random_min"]
    assert check_metric(distsum, E, draws[worst], ref_distsum, draws) == "within"
    # below: the 12 records closest (cosine) to record 0 are far less spread out than any random 12
    tight = np.argsort(-C[0], kind="stable")[: len(CHOSEN)]
    path = write_selection(folder, pool, tight, "tight.jsonl")
    report = _strict(cli("measure", path, "--pool", pool, "--cache", cache, "--metric", "distsum",
                         "--metric", "vendi", "--json", "--quiet").out)
    for name in ("distsum", "vendi"):
        assert check_metric(report["metrics"][name], E, np.sort(tight), REFS[name], draws) == "below", name
    # above: a greedy facility-location selection covers the pool better than any random 12
    S = np.maximum(C, 0.0)
    greedy, cover = [], np.zeros(N)
    for _ in range(len(CHOSEN)):
        gains = [np.maximum(S[:, a] - cover, 0).sum() if a not in greedy else -1 for a in range(N)]
        greedy.append(int(np.argmax(gains)))
        cover = np.maximum(cover, S[:, greedy[-1]])
    path = write_selection(folder, pool, greedy, "greedy.jsonl")
    report = _strict(cli("measure", path, "--pool", pool, "--cache", cache, "--metric", "facility", "--json",
                         "--quiet").out)
    assert check_metric(report["metrics"]["facility"], E, np.sort(greedy), ref_facility, draws) == "above"


def test_measure_seed_and_draws_change_only_the_random_reference(cli, setup):
    pool, selected, cache, E, _ = setup

    def run(*extra):
        res = cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "facility", "--json", "--quiet",
                  *extra)
        assert res.code == 0, res.err
        return _strict(res.out)

    a, b, c = run(), run("--seed", "5"), run("--draws", "3")
    assert b["random_seed"] == 5 and c["draws"] == 3
    fa, fb, fc = (r["metrics"]["facility"] for r in (a, b, c))
    assert fa["selection"] == fb["selection"] == fc["selection"]
    assert not set(fa["random_values"]) & set(fb["random_values"])
    check_metric(fb, E, CHOSEN, ref_facility, ref_draws(seed=5))
    # the first draws do not depend on how many are made
    assert fc["random_values"] == fa["random_values"][:3]
    check_metric(fc, E, CHOSEN, ref_facility, ref_draws(draws=3))


def test_measure_one_draw_and_bad_draws(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "knn", "--draws", "1", "--json",
              "--quiet")
    assert res.code == 0, res.err
    knn = _strict(res.out)["metrics"]["knn"]
    (draw,) = ref_draws(draws=1)
    assert knn["random_std"] is None  # no spread from a single draw
    assert knn["random_mean"] == knn["random_min"] == knn["random_max"] == knn["random_values"][0]
    assert knn["random_mean"] == pytest.approx(ref_knn(E, draw), rel=1e-5)
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--draws", "0", "--quiet")
    assert res.code == 1
    assert "--draws must be at least 1, got 0" in res.err
    assert "Traceback" not in res.err


def test_measure_record_not_in_pool_is_a_clean_error(cli, setup):
    pool, selected, cache, E, folder = setup
    stranger = folder / "stranger.jsonl"
    lines = selected.read_text(encoding="utf-8").splitlines()
    extra = json.dumps({"instruction": "Not in the pool at all.", "input": "", "output": "Indeed it is not."})
    stranger.write_text("\n".join(lines + [extra]) + "\n", encoding="utf-8")
    res = cli("measure", stranger, "--pool", pool, "--cache", cache, "--quiet")
    assert res.code == 1
    assert "not in the pool" in res.err
    assert "Traceback" not in res.err
    assert res.out == ""


def test_measure_unknown_metric_is_an_error(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "bogus", "--quiet")
    assert res.code == 1
    assert "unknown metric(s) bogus; known: distsum, knn, vendi, novelsum, facility" in res.err
    assert "Traceback" not in res.err


def _strict(text: str):
    """json.loads that rejects NaN / Infinity (not JSON, RFC 8259)."""

    def reject(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=reject)


def test_measure_json_is_strict_json_when_a_metric_is_undefined(cli, setup):
    # one selected record: mean pairwise distance and kNN distance are undefined (NaN inside)
    pool, selected, cache, E, folder = setup
    one = folder / "one.jsonl"
    one.write_text(pool.read_text(encoding="utf-8").splitlines()[7] + "\n", encoding="utf-8")
    res = cli("measure", one, "--pool", pool, "--cache", cache, "--json", "--quiet")
    assert res.code == 0, res.err
    report = _strict(res.out)  # `datasel eval` writes null for a missing value; measure must not print NaN
    assert report["selected_count"] == 1
    for name in ("distsum", "knn"):
        entry = report["metrics"][name]
        assert entry["selection"] is None
        assert entry["random_values"] == [None] * 10
        assert entry["random_mean"] is entry["random_std"] is entry["vs_random"] is None
    fac = report["metrics"]["facility"]
    assert fac["selection"] == pytest.approx(ref_facility(E, [7]), rel=1e-5)
    check_metric(fac, E, [7], ref_facility, ref_draws(size=1))
    table = cli("measure", one, "--pool", pool, "--cache", cache, "--quiet")
    assert table.code == 0, table.err
    assert next(line for line in table.out.splitlines() if line.startswith("distsum")).split()[1:] == \
        ["n/a"] * 5 + ["n/a"]

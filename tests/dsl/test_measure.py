"""``datasel measure SELECTED --pool POOL``: diversity metrics of a selection next to a random one.

The metric values are checked against naive float64 formulas written here (explicit cosine
matrices), on MiniLM vectors read back with ``evaluate("embed(minilm)", pool)``.
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
    records, sigma = 1 / (mean + 1e-9)^beta); each selected row's cosine distances to the selection, itself
    included, sorted ascending, scaled by its own sigma and averaged with weights 1/rank^alpha."""
    E = np.asarray(E, dtype=np.float64)
    sigma = []
    for i in sel:
        d2 = np.sort([np.sum((E[i] - E[j]) ** 2) for j in range(len(E)) if j != i])[:K]
        sigma.append(1.0 / (np.mean(d2) + 1e-9) ** beta)
    D = 1.0 - _cos(E[sel])
    w = 1.0 / np.arange(1, len(sel) + 1) ** alpha
    return float(np.mean([sigma[a] * np.sort(D[a]) @ w / w.sum() for a in range(len(sel))]))


REFS = {"facility": ref_facility, "distsum": ref_distsum, "knn": ref_knn, "vendi": ref_vendi,
        "novelsum": ref_novelsum}


# -------------------------------------------------------------------------------------------- tests
def test_measure_prints_every_metric_for_selection_and_random(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--quiet")
    assert res.code == 0, res.err
    assert f"{len(CHOSEN)} selected of {N}" in res.out
    assert "random" in res.out and "selection" in res.out
    rows = {line.split()[0]: line.split() for line in res.out.splitlines() if line.split()}
    for m in METRICS:
        assert m in rows, res.out
        # two numbers: the selection's and the random reference's
        sel_v, rand_v = float(rows[m][1]), float(rows[m][2])
        assert np.isfinite(sel_v) and np.isfinite(rand_v)
    assert float(rows["facility"][1]) == pytest.approx(ref_facility(E, CHOSEN), abs=1e-3)


def test_measure_facility_json(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "facility", "--json", "--quiet")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["selected"] == str(selected)
    assert report["pool"] == str(pool)
    assert report["pool_size"] == N
    assert report["selected_count"] == len(CHOSEN)
    assert report["features"] == "embed(minilm)"
    assert report["random_seed"] == 0
    assert list(report["metrics"]) == ["facility"]
    fac = report["metrics"]["facility"]
    assert set(fac) == {"selection", "random"}
    assert fac["selection"] == pytest.approx(ref_facility(E, CHOSEN), rel=1e-5)
    # the random reference: a uniform draw of the same size without replacement, numpy default_rng(seed)
    rand = np.sort(np.random.default_rng(0).choice(N, size=len(CHOSEN), replace=False))
    assert fac["random"] == pytest.approx(ref_facility(E, rand), rel=1e-5)
    # a facility value covers at most every record once
    assert 0 < fac["selection"] <= N + 1e-6


def test_measure_json_values_match_naive_formulas(cli, setup):
    pool, selected, cache, E, _ = setup
    res = cli("measure", selected, "--pool", pool, "--cache", cache, "--json", "--quiet")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert set(report["metrics"]) == set(METRICS)
    for name, ref in REFS.items():
        assert report["metrics"][name]["selection"] == pytest.approx(ref(E, CHOSEN), rel=1e-5, abs=1e-6), name


def test_measure_seed_changes_only_the_random_reference(cli, setup):
    pool, selected, cache, E, _ = setup
    a = json.loads(cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "facility",
                       "--json", "--quiet").out)
    b = json.loads(cli("measure", selected, "--pool", pool, "--cache", cache, "--metric", "facility",
                       "--json", "--quiet", "--seed", "5").out)
    assert b["random_seed"] == 5
    assert a["metrics"]["facility"]["selection"] == b["metrics"]["facility"]["selection"]
    assert a["metrics"]["facility"]["random"] != b["metrics"]["facility"]["random"]


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
    assert report["metrics"]["distsum"]["selection"] is None
    assert report["metrics"]["knn"]["selection"] is None
    assert report["metrics"]["facility"]["selection"] == pytest.approx(ref_facility(E, [7]), rel=1e-5)

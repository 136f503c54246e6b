"""The benchmark runner keeps working: names, the JSON-line contract, and agreement with the baselines.

Only the cheap array benchmarks run here (quick inputs, a few seconds); the timings are printed by
`python benchmarks/run.py`, never asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
NAMES = {"facility", "facility_sparse", "kcenter", "kmeans", "novelsum", "embed", "ifd", "loss", "hidden",
         "uncertainty", "dedup_minhash", "dedup_cosine", "scale_1m", "scale_minilm", "grad_features", "graphwalk", "mig"}
REQUIRED = {"name", "n", "k", "ours_s", "baseline", "baseline_s", "speedup", "same_result"}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=600)


def test_every_documented_benchmark_is_listed():
    out = bench("--list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == NAMES


def test_unknown_name_is_a_usage_error():
    out = bench("--quick", "no_such_bench")
    assert out.returncode == 2
    assert "unknown benchmark" in out.stderr and "kcenter" in out.stderr


def test_quick_array_benchmarks_agree_with_their_baselines():
    out = bench("--quick", "kcenter", "kmeans", "novelsum")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["kcenter", "kmeans", "novelsum"]
    for r in rows:
        assert REQUIRED <= set(r), r
        assert r["quick"] is True
        assert r["same_result"] is True, r
        assert r["ours_s"] > 0 and r["baseline_s"] > 0
        assert abs(r["speedup"] - r["baseline_s"] / r["ours_s"]) <= 0.06 * r["speedup"] + 0.1

"""Scale: a million records through the engine, and a hundred thousand through MiniLM (not run in CI).

* ``scale_1m``: 1,000,000 records of real length (Alpaca and Dolly texts from ../shared/data, each
  made unique by a numbered suffix, or the examples pool's when that is absent) through a cheap
  per-record op (``length``) and 384-d random unit features (a per-record op declared here, seeded by
  the record's content hash), then k-means into 1,000 clusters and facility location taking 1% of
  each cluster: ``select length > 0 | kmeans(rand384, 1000) | facility(rand384, 1%)``.  Also the
  cheap op alone on both executors (the Ray overhead, as a ratio), and the k-means against the GEMM
  limit of its iterations (the time of one n × d × k matrix product, times the iterations run).
* ``scale_minilm``: 100,000 real-length records through MiniLM, then k-center 1%:
  ``select kcenter(embed(minilm), 1%)``; and 5,000 of them through ``embed`` on both executors.

Each case runs in its own process, so its peak memory (VmHWM) is its own; every case reports
seconds per stage, peak RSS and the cache's size on disk.  No n × n matrix is built anywhere:
per-record results are memory-mapped shards, k-means works on the (n, d) features, facility
location on one cluster at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import REPO, SHARED_DATA, bench_dir, peak_rss_gb, ratio  # noqa: E402

RAND_OP = '''
import numpy as np
from datasel.ops.contract import Kind, Param
from datasel.ops.registry import get, op

if get("rand384") is None:
    @op("rand384", [Param("d", Kind.NUMBER, 384)], Kind.FEATURES, role="map", version="1", chunk_rows=200000)
    def rand384(state, batch, d=384):
        """Random unit vectors, one per record, seeded by the record's text (the same record, the same vector)."""
        import hashlib
        out = np.empty((len(batch), int(d)), dtype=np.float32)
        for i, r in enumerate(batch.records):
            seed = int.from_bytes(hashlib.blake2b(r["output"].encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(int(d)).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out
'''


def _texts() -> list[dict]:
    rows = []
    for name in ("alpaca.jsonl", "dolly.jsonl"):
        path = SHARED_DATA / "pools" / name
        if path.exists():
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if not rows:
        print(f"bench_scale: {SHARED_DATA / 'pools'} has no alpaca/dolly pool: using examples/pool.jsonl's shorter "
              f"texts (set DATASEL_SHARED_DATA)", file=sys.stderr)
        rows = [json.loads(line) for line in (REPO / "examples" / "pool.jsonl").read_text().splitlines()]
    return [r for r in rows if str(r.get("output", "")).strip()]


def _write_pool(path: Path, n: int, seed: int = 0) -> None:
    source = _texts()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(source), size=n)
    with open(path, "w", encoding="utf-8") as f:
        for i, j in enumerate(pick.tolist()):
            r = source[j]
            f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input", ""),
                                "output": f"{r['output']} ({i})"}, ensure_ascii=False) + "\n")


def _du(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9, 3)


def _run(recipe: str, pool: Path, cache: Path, executor=None) -> tuple[float, dict]:
    from datasel.dsl.runner import run

    started = time.perf_counter()
    result = run("scale.sel", pool, cache_dir=cache, quiet=True, recipe_text=recipe, executor=executor)
    return time.perf_counter() - started, result.manifest


def _stage_seconds(manifest: dict) -> dict:
    out: dict[str, float] = {}
    for node in manifest["nodes"]:
        out[node["op"]] = round(out.get(node["op"], 0.0) + node["seconds"], 3)
    return {k: v for k, v in out.items() if v >= 0.01}


def case_1m(n: int, work: Path) -> dict:
    exec(RAND_OP, {"__name__": "bench_scale_ops"})
    import faiss

    from datasel.dsl.executor import RayExecutor

    pool = work / "pool.jsonl"
    t0 = time.perf_counter()
    _write_pool(pool, n)
    write_s = time.perf_counter() - t0
    k = 1000 if n >= 100_000 else 50
    # 20 Lloyd iterations, as in the kmeans benchmark: random isotropic data converges slowly under any tolerance.
    recipe = f"select length > 0 | kmeans(rand384, {k}, iters=20, tol=0) | facility(rand384, 1%)"
    seconds, manifest = _run(recipe, pool, work / "cache")
    out = {"n": n, "pool_file_gb": round(pool.stat().st_size / 1e9, 3), "write_pool_s": round(write_s, 1),
           "recipe": recipe, "run_s": round(seconds, 1), "selected": manifest["selected_count"],
           "stages_s": _stage_seconds(manifest), "cache_gb": _du(work / "cache"), "peak_rss_gb": peak_rss_gb()}
    cached_s, _ = _run(recipe, pool, work / "cache")
    out["cached_rerun_s"] = round(cached_s, 1)
    # k-means against the GEMM limit of its iterations: one assignment of every row to the k centroids
    # (an n x d x k product, faiss flat index) times the 20 iterations.
    from datasel.dsl.cache import Cache
    from datasel.dsl.data import load_dataset

    ds = load_dataset(pool)
    store_key = next(p.name for p in (work / "cache" / "maps").iterdir()
                     if any(json.loads(m.read_text())["info"].get("op") == "rand384"
                            for m in p.glob("*/meta.json")))
    store = Cache(work / "cache").map_store(store_key)
    _, where = store.locate(ds.hashes)
    X = np.ascontiguousarray(store.read("value", where), dtype=np.float32)
    C = np.ascontiguousarray(X[np.random.default_rng(0).choice(len(X), size=k, replace=False)])
    t0 = time.perf_counter()
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(C)
    index.search(X, 1)
    assign_s = time.perf_counter() - t0
    km_s = out["stages_s"].get("kmeans", float("nan"))
    out["kmeans"] = {"k": k, "iterations": 20, "s": km_s, "one_assignment_s": round(assign_s, 2),
                     "gemm_limit_s": round(assign_s * 20, 1), "ratio_to_gemm_limit": ratio(km_s, assign_s * 20)}
    # Ray overhead: the cheap per-record op alone, on a fresh cache each.
    local_s, _ = _run("select length > 0", pool, work / "c_local")
    ray = RayExecutor()
    ray._ray()  # start the cluster outside the timing
    ray_s, _ = _run("select length > 0", pool, work / "c_ray", executor=ray)
    out["length_local_s"], out["length_ray_s"] = round(local_s, 1), round(ray_s, 1)
    out["ray_over_local"] = ratio(ray_s, local_s)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def case_minilm(n: int, work: Path) -> dict:
    from datasel.dsl.executor import RayExecutor

    pool = work / "pool.jsonl"
    _write_pool(pool, n, seed=1)
    recipe = "select kcenter(embed(minilm), 1%)"
    seconds, manifest = _run(recipe, pool, work / "cache")
    out = {"n": n, "recipe": recipe, "run_s": round(seconds, 1), "selected": manifest["selected_count"],
           "stages_s": _stage_seconds(manifest), "rows_per_s": round(n / max(seconds, 1e-9), 1),
           "cache_gb": _du(work / "cache"), "peak_rss_gb": peak_rss_gb()}
    small = work / "small.jsonl"
    _write_pool(small, min(n, 5000), seed=2)
    # The local executor has MiniLM loaded already (from the run above); each Ray actor loads it itself.
    local_s, local = _run("select kcenter(embed(minilm), 1%)", small, work / "c_local")
    ray = RayExecutor()
    ray._ray()
    ray_s, remote = _run("select kcenter(embed(minilm), 1%)", small, work / "c_ray", executor=ray)
    out["embed_5k_local_s"], out["embed_5k_ray_s"] = round(local_s, 1), round(ray_s, 1)
    out["ray_over_local"] = ratio(ray_s, local_s)
    out["same_selection_local_ray"] = local["selected"] == remote["selected"]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


CASES = {"1m": case_1m, "minilm": case_minilm}


def _in_subprocess(case: str, n: int) -> dict:
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        env = dict(os.environ, PYTHONPATH=str(HERE))
        proc = subprocess.run([sys.executable, __file__, case, str(n), tmp], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale_1m(quick: bool) -> dict:
    result = _in_subprocess("1m", 20_000 if quick else 1_000_000)
    return dict(result, name="scale_1m", same_result=None)


def bench_scale_minilm(quick: bool) -> dict:
    result = _in_subprocess("minilm", 2_000 if quick else 100_000)
    return dict(result, name="scale_minilm", same_result=result.get("same_selection_local_ray"))


BENCHMARKS = {"scale_1m": bench_scale_1m, "scale_minilm": bench_scale_minilm}


if __name__ == "__main__":
    case, n, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps(CASES[case](n, work)))

"""Targeted-retrieval probe: do the targeted recipes pick in-domain records for a target set?

A pool mixing three sources from ../shared/data/pools in equal parts (Dolly, GSM8K-train, Code
Alpaca; seeded samples, non-empty responses), and GSM8K test questions as the target set
(``--val``).  Each targeted recipe picks the same share of the pool; the probe reports the share
of GSM8K-train records among its picks, next to their share in the pool and among seeded random
picks of the same size (mean and spread over seeds), and each recipe's wall time.  All recipes
share one cache, so the warmup and the gradient features are computed once (by LESS) and reused, as in normal use;
ClusterUCB's rewards are therefore read from the cache, and its manifest says how many records
the bandit drew (the share of the pool whose gradients a fresh ClusterUCB run computes).  On a
CPU a fresh ClusterUCB run is slow for another reason: each single-record draw projects its
gradient with the dense Rademacher matrix drawn anew (``grad``'s per-call cost).  The overlap
of the LESS and ClusterUCB selections is printed.

    .venv/bin/python benchmarks/quality/targeted.py [--per-source 80] [--targets 30] [--share 10%]

Prints one JSON line per recipe and a markdown table.  Skips (exit 0, one JSON line saying so)
when ../shared/data is absent.  CPU stand-ins: SmolLM2 with the prelude's LoRA warmup (rank 8),
``grad_length=512``, 8 ClusterUCB clusters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import SHARED_DATA, bench_dir, peak_rss_gb  # noqa: E402

SOURCES = {"dolly": "dolly.jsonl", "gsm8k": "gsm8k_train_alpaca.jsonl", "code": "code_alpaca_2k.jsonl"}


def recipes(share: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe text, --set lines): the shipped recipes' selections at one common budget."""
    # ClusterUCB after LESS: its rewards are read from the cache (see the module docstring).
    return {
        "less": (f'select topk(influence(grad_adam, val_grad, run=warmup, groups="task"), {share})', []),
        "g2is": (f"select graphwalk(grad_adam, anchors=pca(val_grad, 0.5), k={share})", []),
        "clusterucb": ((HERE.parent.parent / "recipes" / "clusterucb.sel").read_text(encoding="utf-8")
                       .replace("topk(reward, 5% of pool)", f"topk(reward, {share} of pool)"), ["clusters=8"]),
        "rds": ((HERE.parent.parent / "recipes" / "rds.sel").read_text(encoding="utf-8"),
                [f"budget={share} of pool"]),
    }


def build_pool(folder: Path, per_source: int, seed: int = 0) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(seed)
    rows, source_of = [], []
    for name, file in SOURCES.items():
        lines = (SHARED_DATA / "pools" / file).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        records = [r for r in records if str(r.get("output", "")).strip()]
        for i in rng.choice(len(records), size=per_source, replace=False):
            r = records[int(i)]
            rows.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
            source_of.append(name)
    order = rng.permutation(len(rows))  # mixed, so no recipe can profit from file order
    pool = folder / "pool.jsonl"
    pool.write_text("".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in order), encoding="utf-8")
    return pool, [source_of[i] for i in order]


def build_target(folder: Path, n: int, seed: int = 1) -> Path:
    lines = (SHARED_DATA / "targets" / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()
    pick = np.random.default_rng(seed).choice(len(lines), size=n, replace=False)
    path = folder / "target.jsonl"
    path.write_text("".join(lines[int(i)] + "\n" for i in sorted(pick)), encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=80)
    parser.add_argument("--targets", type=int, default=30)
    parser.add_argument("--share", default="10%")
    parser.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--work", type=Path, help="a work folder to reuse (its cache); default: a new one under .bench")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "pools").is_dir():
        print(json.dumps({"name": "targeted_probe", "skipped": f"{SHARED_DATA} is absent"}))
        return 0
    from datasel.dsl.runner import run

    work = args.work or Path(tempfile.mkdtemp(prefix="probe-", dir=bench_dir()))
    work.mkdir(parents=True, exist_ok=True)
    pool, sources = build_pool(work, args.per_source)
    target = build_target(work, args.targets)
    src = np.asarray(sources)
    n = len(src)
    base_sets = ["grad_length=512"]
    rows, chosen = [], {}
    for name, (text, sets) in recipes(args.share).items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        result = run(f"{name}.sel", pool, val=target, cache_dir=work / "cache", quiet=True, recipe_text=text,
                     sets=base_sets + sets)
        seconds = time.perf_counter() - started
        picked = np.asarray(result.selected, dtype=np.int64)
        grad_rows = [node.get("rows_computed") for node in result.manifest["nodes"] if node["op"] == "grad"]
        reasons = result.manifest["records"]["reason"]
        not_drawn = sum(1 for r in reasons if r and ("not drawn by the bandit" in r or "features for kmeans" in r))
        row = {"name": name, "picked": int(len(picked)), "gsm8k_share": round(float((src[picked] == "gsm8k").mean()), 3)
               if len(picked) else None, "code_share": round(float((src[picked] == "code").mean()), 3) if len(picked) else None,
               "seconds": round(seconds, 1), "grad_rows_computed": grad_rows}
        if name == "clusterucb":
            row["drawn_share"] = round(1 - not_drawn / n, 3)
        rows.append(row)
        chosen[name] = set(picked.tolist())
        print(json.dumps(row), flush=True)
    if "less" in chosen and "clusterucb" in chosen:
        a, b = chosen["less"], chosen["clusterucb"]
        print(json.dumps({"name": "overlap", "less_clusterucb_common": len(a & b),
                          "jaccard": round(len(a & b) / max(1, len(a | b)), 3)}), flush=True)
    k = max((r["picked"] for r in rows), default=int(round(n * 0.1)))
    draws = [float((src[np.random.default_rng(s).choice(n, size=k, replace=False)] == "gsm8k").mean())
             for s in range(100)]
    summary = {"name": "random", "picked": k, "gsm8k_share_mean": round(float(np.mean(draws)), 3),
               "gsm8k_share_std": round(float(np.std(draws)), 3), "pool_gsm8k_share": round(float((src == "gsm8k").mean()), 3),
               "pool": n, "targets": args.targets, "peak_rss_gb": peak_rss_gb()}
    print(json.dumps(summary), flush=True)
    print(f"\n| recipe | picks | GSM8K share of picks | Code Alpaca share | wall time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['picked']} | {r['gsm8k_share']} | {r['code_share']} | {r['seconds']} s |")
    print(f"| random (100 seeds) | {k} | {summary['gsm8k_share_mean']} ± {summary['gsm8k_share_std']} | | |")
    print(f"| pool | {n} | {summary['pool_gsm8k_share']} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

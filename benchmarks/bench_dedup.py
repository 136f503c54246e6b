"""Near-duplicate removal (``dedup_near``) at 100,000 records: MinHash on real texts, cosine on embeddings.

dedup_minhash: 100,000 records (quick: 5,000) sampled with replacement from the shared Alpaca and Dolly pools
       (``../shared/data/pools/{alpaca,dolly}.jsonl``; skipped when absent), so exact duplicates occur naturally,
       plus 5% injected near duplicates: a copy of an earlier record, placed later, with one edit (lower-cased,
       punctuation dropped, one word of the response replaced, a sentence appended, or spacing doubled).
       Ours: ``datasel.dsl.runner.run`` of ``select dedup_near`` (default: 5-word shingles, threshold 0.8, 128
       permutations) on a temporary JSONL with a fresh cache -- reading, hashing, MinHash signatures (``minhash``
       node), LSH and the greedy pass (``dedup_minhash`` node) are all timed; ``cached_s`` is a rerun.
       Baseline: the usual datasketch loop -- per record ``MinHash(num_perm=128)`` + ``update_batch`` of the same
       shingles, ``MinHashLSH(threshold=0.8)``, drop a record when ``query`` returns anything, else ``insert``.
       ``recall``: share of the injected copies that are dropped (also for those whose exact Jaccard with their
       original is >= 0.9).  ``same_result``: on a 2,000-record subset (500 injected pairs + 1,000 other rows,
       in pool order) datasel's kept set equals a brute-force greedy on exact Jaccard (all pairs, a sparse
       shingle-incidence product), except for records whose exact Jaccard to an earlier record lies in the LSH /
       estimate fuzz band [0.7, 0.9) (counted as ``subset_in_band``).
dedup_cosine: 100,000 random 384-d unit vectors (quick: 5,000), 5% of them near-duplicate copies of an earlier row
       (cosine 0.96-0.995 by construction), threshold 0.95.  Ours: ``near_duplicates_cosine`` (the array function
       behind ``dedup_near(features=...)``) with ``index="auto"`` (flat up to 50,000 rows, IVF above) and with
       ``index="flat"``.  Baseline: one faiss flat range search of all rows against all rows, then the same
       keep-the-first greedy over the neighbour lists in Python.  ``recall`` of the planted copies per index;
       ``same_result``: flat == baseline on all rows and == a float64 brute force on a 2,000-row subset.

``DATASEL_BENCH_ROWS`` overrides n.  Temporary files live in the system temp dir.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, peak_rss_gb, ratio, rows_override, skipped

THRESHOLD_J = 0.8
THRESHOLD_COS = 0.95
SUBSET = 2_000
PLANTED_SHARE = 0.05
EDITS = ("lowercase", "no_punctuation", "one_word", "appended", "double_spaces")  # planted edit t::5 is EDITS[t]


# ----------------------------------------------------------------------------------------- helpers
def _greedy_pairs(n: int, qi: np.ndarray, rj: np.ndarray) -> np.ndarray:
    """Keep mask of the greedy in row order given all near-duplicate pairs (qi > rj)."""
    order = np.lexsort((rj, qi))
    qi, rj = qi[order], rj[order]
    keep = np.ones(n, dtype=bool)
    starts = np.searchsorted(qi, np.arange(n + 1))
    for i in np.unique(qi).tolist():
        partners = rj[starts[i] : starts[i + 1]]
        if keep[partners].any():
            keep[i] = False
    return keep


def _edit(record: dict, kind: int, rng) -> dict:
    r = dict(record)
    out = r["output"]
    if kind == 0:
        r = {k: v.lower() if isinstance(v, str) else v for k, v in r.items()}
    elif kind == 1:
        r["output"] = re.sub(r"[^\w\s]", "", out)
        r["instruction"] = re.sub(r"[^\w\s]", "", r["instruction"])
    elif kind == 2:
        words = out.split(" ")
        if len(words) > 1:
            p = int(rng.integers(int(len(words) * 0.8), len(words)))
            words[p] = "indeed"
        r["output"] = " ".join(words)
    elif kind == 3:
        r["output"] = out + " I hope this helps."
    else:
        r["output"] = out.replace(" ", "  ")
    return r


def _real_pool(n: int, seed: int = 0):
    """Records sampled with replacement from Alpaca + Dolly, 5% replaced by edited copies of earlier rows."""
    files = [SHARED_DATA / "pools" / "alpaca.jsonl", SHARED_DATA / "pools" / "dolly.jsonl"]
    if not all(f.exists() for f in files):
        return None
    source = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("output"):
                source.append({"instruction": r.get("instruction", ""), "input": r.get("input", ""),
                               "output": r["output"]})
    rng = np.random.default_rng(seed)
    records = [source[i] for i in rng.integers(len(source), size=n)]
    n_plant = int(n * PLANTED_SHARE)
    copies = np.sort(rng.choice(np.arange(n // 10, n), size=n_plant, replace=False))
    is_copy = np.zeros(n, dtype=bool)
    is_copy[copies] = True
    planted = []
    for c in copies.tolist():
        o = int(rng.integers(c))
        while is_copy[o]:  # originals are never copies themselves: no chains
            o = int(rng.integers(c))
        records[c] = _edit(records[o], len(planted) % 5, rng)
        planted.append((o, c))
    return records, np.array(planted, dtype=np.int64), len(source)


def _write(records, path: Path) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _text(r: dict) -> str:  # field="all"
    return "\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p)


def _exact_jaccard_pairs(shingle_sets: list[set], threshold: float):
    """All pairs (i > j) with exact Jaccard >= threshold, and every row's max Jaccard to an earlier row."""
    import scipy.sparse as sp

    vocab: dict = {}
    rows, cols = [], []
    for i, s in enumerate(shingle_sets):
        for g in s:
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    A = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(shingle_sets), len(vocab)))
    inter = (A @ A.T).tocoo()
    size = np.asarray(A.sum(axis=1)).ravel()
    lower = inter.row > inter.col
    qi, rj, v = inter.row[lower], inter.col[lower], inter.data[lower]
    J = v / (size[qi] + size[rj] - v)
    max_prev = np.zeros(len(shingle_sets))
    np.maximum.at(max_prev, qi, J)
    ok = J >= threshold
    return qi[ok].astype(np.int64), rj[ok].astype(np.int64), max_prev


def _datasketch_loop(shingles: list[list[bytes]]) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD_J, num_perm=128)
    keep = np.zeros(len(shingles), dtype=bool)
    for i, s in enumerate(shingles):
        m = MinHash(num_perm=128)
        m.update_batch(s)
        if not lsh.query(m):
            lsh.insert(i, m)
            keep[i] = True
    return keep


# --------------------------------------------------------------------------------------- MinHash
def bench_dedup_minhash(quick: bool) -> dict:
    name = "dedup_minhash"
    n = rows_override(5_000 if quick else 100_000)
    made = _real_pool(n)
    if made is None:
        return skipped(name, f"{SHARED_DATA / 'pools'} has no alpaca.jsonl and dolly.jsonl", n=n)
    records, planted, n_source = made
    from datasel.dsl.runner import run
    from datasel.ops.dedup import word_shingles

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = _write(records, tmp / "pool.jsonl")
        t0 = time.perf_counter()
        first = run("r.sel", pool, cache_dir=tmp / "cache", quiet=True, recipe_text="select dedup_near")
        ours_s = time.perf_counter() - t0
        nodes = {node["op"]: node for node in first.manifest["nodes"]}
        t0 = time.perf_counter()
        again = run("r.sel", pool, cache_dir=tmp / "cache", quiet=True, recipe_text="select dedup_near")
        cached_s = time.perf_counter() - t0
        kept = np.zeros(n, dtype=bool)
        kept[np.asarray(first.selected, dtype=np.int64)] = True
        assert (np.asarray(again.selected) == np.asarray(first.selected)).all()

        shingles = [word_shingles(_text(r), 5) for r in records]
        t0 = time.perf_counter()
        base_keep = _datasketch_loop(shingles)
        baseline_s = time.perf_counter() - t0

        sets = [set(s) for s in shingles]
        exact_planted = np.array([len(sets[o] & sets[c]) / len(sets[o] | sets[c]) for o, c in planted.tolist()])
        recall = float((~kept[planted[:, 1]]).mean())
        high = exact_planted >= 0.9
        recall_high = float((~kept[planted[high, 1]]).mean()) if high.any() else None

        # brute force on a subset: 500 planted pairs + 1,000 other rows, in pool order
        rng = np.random.default_rng(1)
        pairs = planted[rng.choice(len(planted), size=min(len(planted), SUBSET // 4), replace=False)]
        chosen = set(pairs.ravel().tolist())
        others = [i for i in rng.permutation(n).tolist() if i not in chosen][: SUBSET - len(chosen)]
        sub = np.sort(np.array(sorted(chosen) + others, dtype=np.int64))
        sub_pool = _write([records[i] for i in sub], tmp / "subset.jsonl")
        sub_run = run("r.sel", sub_pool, cache_dir=tmp / "cache", quiet=True, recipe_text="select dedup_near")
        sub_kept = np.zeros(len(sub), dtype=bool)
        sub_kept[np.asarray(sub_run.selected, dtype=np.int64)] = True
        t0 = time.perf_counter()
        qi, rj, max_prev = _exact_jaccard_pairs([sets[i] for i in sub], THRESHOLD_J)
        ref_keep = _greedy_pairs(len(sub), qi, rj)
        brute_s = time.perf_counter() - t0
        band = (max_prev >= THRESHOLD_J - 0.1) & (max_prev < THRESHOLD_J + 0.1)
        differ = sub_kept != ref_keep
    return {
        "name": name, "n": n, "k": int(kept.sum()), "ours_s": round(ours_s, 3),
        "minhash_s": round(nodes["minhash"]["seconds"], 3), "lsh_greedy_s": round(nodes["dedup_minhash"]["seconds"], 3),
        "cached_s": round(cached_s, 3),
        "baseline": "datasketch MinHash per record + MinHashLSH(0.8, 128) query-then-insert loop",
        "baseline_s": round(baseline_s, 3), "speedup": ratio(baseline_s, ours_s),
        "baseline_kept": int(base_keep.sum()), "agree_with_baseline": round(float((base_keep == kept).mean()), 5),
        "planted": int(len(planted)), "recall": round(recall, 4),
        "recall_exact_j_ge_0.9": None if recall_high is None else round(recall_high, 4),
        "recall_by_edit": {e: round(float((~kept[planted[t::5, 1]]).mean()), 4) for t, e in enumerate(EDITS)},
        "planted_exact_j_median": round(float(np.median(exact_planted)), 3),
        "exact_duplicate_share": round(1 - len({json.dumps(r, sort_keys=True) for r in records}) / n, 4),
        "source_records": n_source,
        "subset": int(len(sub)), "subset_mismatch": int(differ.sum()), "subset_in_band": int(band.sum()),
        "subset_mismatch_outside_band": int((differ & ~band).sum()),
        "brute_force_subset_s": round(brute_s, 3),
        "same_result": bool(not (differ & ~band).any()),
        "peak_rss_gb": peak_rss_gb(),
    }


# ---------------------------------------------------------------------------------------- cosine
def _planted_vectors(n: int, d: int = 384, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    n_plant = int(n * PLANTED_SHARE)
    copies = np.sort(rng.choice(np.arange(n // 10, n), size=n_plant, replace=False))
    is_copy = np.zeros(n, dtype=bool)
    is_copy[copies] = True
    origins = np.empty(n_plant, dtype=np.int64)
    for t, c in enumerate(copies.tolist()):
        o = int(rng.integers(c))
        while is_copy[o]:  # originals are never copies themselves: no chains
            o = int(rng.integers(c))
        origins[t] = o
    target_cos = rng.uniform(0.96, 0.995, size=n_plant)
    noise = rng.standard_normal((n_plant, d))
    for t, (o, c) in enumerate(zip(origins.tolist(), copies.tolist())):
        u = X[o].astype(np.float64)
        v = noise[t] - (noise[t] @ u) * u  # orthogonal to u
        v /= np.linalg.norm(v)
        X[c] = (target_cos[t] * u + np.sqrt(1 - target_cos[t] ** 2) * v).astype(np.float32)
    return X, np.stack([origins, copies], axis=1)


def _range_all_pairs(Z: np.ndarray, threshold: float):
    import faiss

    index = faiss.IndexFlatIP(Z.shape[1])
    index.add(Z)
    qs, rs = [], []
    for q0 in range(0, len(Z), 4096):
        lims, _, ids = index.range_search(Z[q0 : q0 + 4096], threshold)
        q = np.repeat(np.arange(q0, q0 + len(lims) - 1), np.diff(lims).astype(np.int64))
        lower = ids < q
        qs.append(q[lower])
        rs.append(ids[lower].astype(np.int64))
    return np.concatenate(qs), np.concatenate(rs)


def bench_dedup_cosine(quick: bool) -> dict:
    from datasel.ops.dedup import near_duplicates_cosine

    name = "dedup_cosine"
    n = rows_override(5_000 if quick else 100_000)
    X, planted = _planted_vectors(n)
    near_duplicates_cosine(X[:100], THRESHOLD_COS)  # warm faiss
    t0 = time.perf_counter()
    keep_auto, _, _ = near_duplicates_cosine(X, THRESHOLD_COS, index="auto")
    auto_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    keep_flat, _, _ = near_duplicates_cosine(X, THRESHOLD_COS, index="flat")
    flat_s = time.perf_counter() - t0
    if n > 50_000:  # auto was the IVF index
        keep_ivf, ivf_s = keep_auto, auto_s
    else:
        t0 = time.perf_counter()
        keep_ivf, _, _ = near_duplicates_cosine(X, THRESHOLD_COS, index="ivf")
        ivf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qi, rj = _range_all_pairs(X, THRESHOLD_COS)
    base_keep = _greedy_pairs(n, qi, rj)
    baseline_s = time.perf_counter() - t0
    # float64 brute force on a 2,000-row subset: 500 planted pairs + other rows
    rng = np.random.default_rng(1)
    pairs = planted[rng.choice(len(planted), size=min(len(planted), SUBSET // 4), replace=False)]
    chosen = set(pairs.ravel().tolist())
    others = [i for i in rng.permutation(n).tolist() if i not in chosen][: SUBSET - len(chosen)]
    sub = np.sort(np.array(sorted(chosen) + others, dtype=np.int64))
    U = X[sub].astype(np.float64)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    S = U @ U.T
    ii, jj = np.nonzero(np.tril(S >= THRESHOLD_COS, k=-1))
    ref_sub = _greedy_pairs(len(sub), ii.astype(np.int64), jj.astype(np.int64))
    sub_flat, _, _ = near_duplicates_cosine(X[sub], THRESHOLD_COS, index="flat")
    sub_ivf, _, _ = near_duplicates_cosine(X[sub], THRESHOLD_COS, index="ivf")
    same = bool((keep_flat == base_keep).all() and (sub_flat == ref_sub).all())
    return {
        "name": name, "n": n, "d": int(X.shape[1]), "k": int(keep_auto.sum()), "ours_s": round(auto_s, 3),
        "index_auto": "flat" if n <= 50_000 else "ivf",
        "flat_s": round(flat_s, 3), "ivf_s": round(ivf_s, 3),
        "baseline": "faiss flat range search of all rows vs all rows, then keep-the-first greedy",
        "baseline_s": round(baseline_s, 3), "speedup": ratio(baseline_s, auto_s),
        "speedup_flat": ratio(baseline_s, flat_s),
        "planted": int(len(planted)),
        "recall_auto": round(float((~keep_auto[planted[:, 1]]).mean()), 4),
        "recall_flat": round(float((~keep_flat[planted[:, 1]]).mean()), 4),
        "recall_ivf": round(float((~keep_ivf[planted[:, 1]]).mean()), 4),
        "ivf_kept_minus_flat": int(keep_ivf.sum() - keep_flat.sum()),
        "subset": int(len(sub)), "subset_flat_same": bool((sub_flat == ref_sub).all()),
        "subset_ivf_mismatch": int((sub_ivf != ref_sub).sum()),
        "same_result": same, "peak_rss_gb": peak_rss_gb(),
    }


BENCHMARKS = {"dedup_minhash": bench_dedup_minhash, "dedup_cosine": bench_dedup_cosine}

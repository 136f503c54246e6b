"""Embedding benchmark: the datasel ``embed`` operator run through the engine vs a plain sentence-transformers call.

embed: all-MiniLM-L6-v2 (``minilm``) embeddings of 2,000 real records (quick: 200), a seeded sample of the pool
       (Dolly when present), text = instruction + ("\\n" + input when input is non-empty).
       Ours: ``datasel.dsl.runner.evaluate("embed(minilm)", <temporary JSONL of those records>, cache_dir=<fresh
       temporary dir>, quiet=True)`` -- so reading and hashing the records, planning, chunking and cache writes
       are all timed.  Baseline: ``SentenceTransformer.encode(texts, normalize_embeddings=True)`` (the library's default batch size, 32)
       on the same texts.  Both models are loaded before the timers (the engine reuses the memoised encoder; the
       baseline has its own instance), and both paths are warmed once on a few rows.  ``cached_s``: a second
       ``evaluate`` on the same cache (every chunk is a cache hit).  ``same_result``: allclose(atol 1e-5).
       ``plain_encode_s_by_batch``: the plain encode again at 16 and 64 rows a batch (why ``embed`` uses 16 on CPU).

The temporary pool file and engine cache live in the system temp dir and are deleted afterwards (no pool data is
written inside the repository).  ``DATASEL_BENCH_ROWS`` / ``DATASEL_BENCH_DEVICE`` override size and device.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from _common import Timer, env_info, load_pool, peak_rss_gb, pool_label, ratio, rows_override, sample_rows, skipped


def _write_pool(ds, idx, path: Path) -> None:
    with open(path, "wb") as fh:
        for i in idx:
            line = ds.raw_lines[i]
            if line is None:
                line = json.dumps(ds.raw[i], ensure_ascii=False).encode("utf-8")
            fh.write(line.rstrip(b"\r\n") + b"\n")


def _text(record: dict) -> str:
    instruction = record.get("instruction") or ""
    inp = record.get("input") or ""
    return instruction + ("\n" + inp if inp != "" else "")


def bench_embed(quick: bool) -> dict:
    name = "embed"
    n = rows_override(200 if quick else 2_000)
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        from _common import torch_device
        from datasel.dsl.runner import evaluate
        from datasel.ops.algos.lm_loading import hub_offline, load_encoder, minilm_path

        device = torch_device()
        # The prelude's `minilm` runs on the default device; a forced other device names it explicitly.
        default = "cuda" if torch.cuda.is_available() else "cpu"
        expr = "embed(minilm)" if device == default else f'embed(encoder("minilm", device="{device}"))'
        load_encoder("minilm", device=device)  # the engine's (memoised) instance, loaded outside the timer
        with hub_offline():
            plain = SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)
        plain.eval()
    except Exception as exc:
        return skipped(name, f"MiniLM unavailable: {type(exc).__name__}: {exc}")

    ds = load_pool()
    idx = sample_rows(n)
    n = len(idx)
    texts = [_text(ds.records[i]) for i in idx]

    with tempfile.TemporaryDirectory(prefix="datasel-bench-embed-") as tmp:
        tmp = Path(tmp)
        pool = tmp / "pool.jsonl"
        _write_pool(ds, idx, pool)
        warm_pool = tmp / "warm.jsonl"
        _write_pool(ds, idx[:8], warm_pool)

        # Warm both paths (imports, first-call kernel setup) on a few rows, in caches not reused below.
        evaluate(expr, warm_pool, cache_dir=tmp / "warm-cache", quiet=True)
        plain.encode(texts[:8], normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=False)

        cache = tmp / "cache"
        with Timer(device) as t_ours:
            result = evaluate(expr, pool, cache_dir=cache, quiet=True)
        ours = np.asarray(result.values, dtype=np.float32)

        with Timer(device) as t_base:
            ref = plain.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
        ref = np.asarray(ref, dtype=np.float32)

        # Why embed picks its batch size per device: the same plain encode at 16 and 64 rows a batch.
        by_batch = {}
        for size in (16, 64):
            with Timer(device) as t_batch:
                plain.encode(texts, batch_size=size, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
            by_batch[str(size)] = round(t_batch.s, 3)

        with Timer(device) as t_cached:
            again = evaluate(expr, pool, cache_dir=cache, quiet=True)
        again = np.asarray(again.values, dtype=np.float32)
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())

    same_shape = ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max()) if same_shape and ours.size else None
    out = {
        "name": name,
        "n": n,
        "k": None,
        "rows": pool_label(),
        "text": "instruction + ('\\n' + input if input)",
        "ours": f"evaluate({expr!r}) on a fresh cache (read + hash records, plan, encode, cache writes)",
        "ours_s": round(t_ours.s, 3),
        "baseline": "SentenceTransformer.encode(texts, normalize_embeddings=True)",
        "baseline_s": round(t_base.s, 3),
        "speedup": ratio(t_base.s, t_ours.s),
        "overhead_s": round(t_ours.s - t_base.s, 3),
        "same_result": bool(same_shape and np.allclose(ours, ref, atol=1e-5)),
        "max_abs_diff": diff,
        "cached_s": round(t_cached.s, 3),
        "cached_same": bool(np.array_equal(again, ours)),
        "cached_speedup_vs_baseline": ratio(t_base.s, t_cached.s),
        "cache_mb": round(cache_bytes / 1e6, 3),
        "dim": int(ours.shape[1]) if ours.ndim == 2 else None,
        "ours_rows_per_s": round(n / t_ours.s, 1),
        "baseline_rows_per_s": round(n / t_base.s, 1),
        "plain_encode_s_by_batch": by_batch,
        "batch16_speedup_vs_64": ratio(by_batch["64"], by_batch["16"]),
    }
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


BENCHMARKS = {"embed": bench_embed}

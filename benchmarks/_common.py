"""Shared helpers for the model benchmarks (bench_lm.py, bench_embed.py).

* :func:`pool_path` / :func:`load_pool` / :func:`sample_rows`: the real pool
  (``../shared/data/pools/dolly.jsonl`` next to the checkout when it exists, else the repository's
  ``examples/pool.jsonl``) read through ``datasel.dsl.data.load_dataset``, and a
  seeded sample of its rows (the pool file is sorted, so its first rows are not
  representative).  The shared data is read in place, never copied into the repo.
* :func:`bench_dir`: ``<repo>/.bench`` (git-ignored) -- the model cache
  (``.bench/cache``: the dequantised SmolLM2) and temporary engine caches.
* :class:`Timer` (synchronises CUDA around the timed block), :func:`peak_rss_gb`.
* :func:`rows_override`: ``DATASEL_BENCH_ROWS=8`` shrinks every row count of these
  benchmarks (for development under CPU contention); ``DATASEL_BENCH_MAX_NEW_TOKENS``
  does the same for the generation benchmark; ``DATASEL_BENCH_DEVICE=cpu`` forces the
  device (default: CUDA when available).
"""

from __future__ import annotations

import functools
import os
import resource
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The real pools sit next to the checkout (../shared/data); DATASEL_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("DATASEL_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_POOL = SHARED_DATA / "pools" / "dolly.jsonl"
FALLBACK_POOL = REPO / "examples" / "pool.jsonl"
SAMPLE_SEED = 0


def bench_dir() -> Path:
    """``<repo>/.bench`` (git-ignored), created on demand."""
    path = REPO / ".bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_dir() -> Path:
    """Where ``load_causal_lm("smollm", cache_dir=...)`` keeps the dequantised model (reused across runs)."""
    path = bench_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pool_path() -> Path:
    return SHARED_POOL if SHARED_POOL.exists() else FALLBACK_POOL


@functools.lru_cache(maxsize=None)
def load_pool():
    """The real pool as a ``datasel.dsl.data.Dataset`` (read once per process)."""
    from datasel.dsl.data import load_dataset

    return load_dataset(pool_path(), on_bad_record="skip")


def sample_rows(n: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """``n`` distinct row indices of the pool, a seeded uniform sample in pool order (all rows if n ≥ len)."""
    ds = load_pool()
    if n >= len(ds):
        return np.arange(len(ds))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(ds), size=n, replace=False))


def pool_label() -> str:
    return f"{pool_path().name} (seeded sample, seed {SAMPLE_SEED})"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        out = int(value)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {value!r}") from None
    if out < 1:
        raise SystemExit(f"{name} must be positive, got {out}")
    return out


def rows_override(default: int) -> int:
    """``DATASEL_BENCH_ROWS`` when set (development under contention), else ``default``."""
    return _env_int("DATASEL_BENCH_ROWS") or default


def new_tokens_override(default: int) -> int:
    return _env_int("DATASEL_BENCH_MAX_NEW_TOKENS") or default


def torch_device() -> str:
    """``DATASEL_BENCH_DEVICE`` when set, else ``"cuda"`` when available, else ``"cpu"``."""
    import torch

    forced = os.environ.get("DATASEL_BENCH_DEVICE", "").strip()
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str | None = None) -> None:
    """Wait for queued CUDA work (no-op on CPU) so that wall-clock timings are honest."""
    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """``with Timer(device) as t: ...`` then ``t.s``; synchronises CUDA at both ends."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.s = float("nan")

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.s = time.perf_counter() - self._t0
        return False


def peak_rss_gb() -> float:
    """Process peak resident set size (VmHWM), GB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def env_info() -> dict:
    """torch threads / device / versions, for every result line."""
    import torch

    info = {"torch_threads": torch.get_num_threads(), "device": torch_device(), "torch": torch.__version__}
    if torch_device().startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ratio(a: float, b: float) -> float | None:
    """``a / b`` rounded, or None when undefined."""
    if not (np.isfinite(a) and np.isfinite(b)) or b <= 0:
        return None
    return round(a / b, 2)


def skipped(name: str, reason: str, **extra) -> dict:
    """A result line for a benchmark that could not run (missing model, package...)."""
    out = {"name": name, "skipped": reason, "same_result": None}
    out.update(extra)
    return out

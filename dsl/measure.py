"""``datasel measure``: diversity metrics of a selection, next to a random selection of the same size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasel.dsl.data import DataError, load_dataset
from datasel.dsl.runner import evaluate
from datasel.ops.algos.diversity_metrics import METRICS, measure

METRIC_WORDS = {
    "novelsum": "NovelSum (density- and proximity-weighted distances; higher = more diverse)",
    "facility": "facility location: how well the selection covers the pool (max(cos, 0); higher = better)",
    "distsum": "mean pairwise cosine distance within the selection",
    "knn": "mean cosine distance to the 10th nearest selected neighbour",
    "vendi": "Vendi score (effective number of distinct records, cosine kernel)",
}


def locate(selected_path: str | Path, pool) -> np.ndarray:
    """Pool indices of the records in ``selected_path``, matched by content."""
    chosen = load_dataset(selected_path, name="selected", schema=pool.schema, on_bad_record="fail")
    where = {h: i for i, h in enumerate(pool.hashes.tolist())}
    idx = [where.get(h) for h in chosen.hashes.tolist()]
    missing = sum(i is None for i in idx)
    if missing:
        raise DataError(f"{selected_path}: {missing} of {len(idx)} selected records are not in the pool {pool.path}")
    return np.unique(np.asarray(idx, dtype=np.int64))


def measure_selection(selected: str | Path, pool: str | Path, *, metrics=None, features: str = "embed(minilm)",
                      seed: int = 0, cache_dir=None, pool_format=None, on_bad_record: str = "fail",
                      quiet: bool = False) -> dict:
    """Each metric for the selection and for a uniform random selection of the same size (``seed``)."""
    metrics = list(metrics or METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    pool_ds = load_dataset(pool, name="pool", schema=pool_format, on_bad_record=on_bad_record)
    chosen = locate(selected, pool_ds)
    values = evaluate(features, pool, cache_dir=cache_dir, pool_format=pool_format, on_bad_record=on_bad_record,
                      quiet=quiet)
    X = np.asarray(values.values, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"--features must be a Features expression (one vector per record); {features!r} is not")
    rng = np.random.default_rng(seed)
    reference = np.sort(rng.choice(len(X), size=len(chosen), replace=False))
    ours = measure(X, chosen, metrics)
    rand = measure(X, reference, metrics)
    return {
        "selected": str(selected),
        "pool": str(pool),
        "pool_size": int(len(X)),
        "selected_count": int(len(chosen)),
        "features": features,
        "random_seed": seed,
        "metrics": {m: {"selection": _finite(ours[m]), "random": _finite(rand[m])} for m in metrics},
    }


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. distances within one record) is null."""
    return None if value is None or not np.isfinite(value) else float(value)


def format_report(report: dict) -> str:
    """A small table: metric, selection, random, and what the metric means."""
    lines = [f"{report['selected_count']} selected of {report['pool_size']} pool records; "
             f"features {report['features']}; random reference seed {report['random_seed']}",
             f"{'metric':<10} {'selection':>12} {'random':>12}"]
    for name, v in report["metrics"].items():
        sel = "n/a" if v["selection"] is None else f"{v['selection']:.4f}"
        ran = "n/a" if v["random"] is None else f"{v['random']:.4f}"
        lines.append(f"{name:<10} {sel:>12} {ran:>12}   {METRIC_WORDS.get(name, '')}")
    return "\n".join(lines)

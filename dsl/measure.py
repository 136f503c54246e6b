"""``datasel measure``: diversity metrics of a selection, next to several seeded random selections of the same size.

For each metric the report gives the selection's value, the mean, sample standard deviation, minimum and maximum over
``draws`` uniform random draws (10 by default) and whether the selection lies above the largest draw, below the
smallest or within their range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasel.dsl.data import DataError, load_dataset
from datasel.dsl.runner import evaluate
from datasel.ops.algos.diversity_metrics import METRICS, measure

METRIC_WORDS = {
    "novelsum": "NovelSum (density- and proximity-weighted distances, densities over the pool's distinct vectors; "
                "higher = more diverse)",
    "facility": "facility location: how well the selection covers the pool (max(cos, 0); higher = better)",
    "distsum": "mean pairwise cosine distance within the selection",
    "knn": "mean cosine distance to the 10th nearest selected neighbour",
    "vendi": "Vendi score (effective number of distinct records, cosine kernel)",
}


def locate(selected_path: str | Path, pool) -> np.ndarray:
    """Pool indices of the records in ``selected_path``, matched by content."""
    chosen = load_dataset(selected_path, name="selected", schema=pool.schema if pool.schema != "mixed" else None,
                          on_bad_record="fail")
    where = {h: i for i, h in enumerate(pool.hashes.tolist())}
    idx = [where.get(h) for h in chosen.hashes.tolist()]
    missing = sum(i is None for i in idx)
    if missing:
        raise DataError(f"{selected_path}: {missing} of {len(idx)} selected records are not in the pool {pool.path}")
    return np.unique(np.asarray(idx, dtype=np.int64))


def random_draws(n: int, size: int, seed: int = 0, draws: int = 10) -> list[np.ndarray]:
    """The random reference selections: ``draws`` uniform draws of ``size`` of ``n`` rows, without replacement.

    Draw i (0-based) is ``np.sort(numpy.random.default_rng(child_i).choice(n, size, replace=False))`` with
    ``child_i = numpy.random.SeedSequence(seed).spawn(draws)[i]``: deterministic in ``seed``, independent streams,
    and the first draws do not depend on how many are made (``draws=3`` gives the first three of ``draws=10``).
    """
    draws = int(draws)
    if draws < 1:
        raise ValueError(f"--draws must be at least 1, got {draws}")
    children = np.random.SeedSequence(int(seed)).spawn(draws)
    return [np.sort(np.random.default_rng(c).choice(n, size=size, replace=False)) for c in children]


def measure_selection(selected: str | Path, pool: str | Path, *, metrics=None, features: str = "embed(minilm)",
                      seed: int = 0, draws: int = 10, cache_dir=None, pool_format=None, on_bad_record: str = "fail",
                      quiet: bool = False, cache_write=None) -> dict:
    """Each metric for the selection and for ``draws`` seeded uniform random selections of the same size.

    Per metric: ``selection``; ``random_mean``, ``random_std`` (sample standard deviation, ddof 1; null with one
    draw), ``random_min``, ``random_max`` over the draws that define the metric, ``random_values`` (one per draw, in
    draw order) and ``vs_random``: ``"above"`` (selection > every draw), ``"below"`` (< every draw), ``"within"``
    (inside [min, max], ends included) or null when the selection's value or every draw's is undefined.  Undefined
    values (e.g. distances within one record) are null, never NaN, so the report is strict JSON.  The draws come
    from :func:`random_draws`; the metrics from ``datasel.ops.algos.diversity_metrics.measure`` (NovelSum with its
    defaults: densities over the whole pool's distinct vectors).  Cost: draws + 1 measurements.
    """
    metrics = list(metrics or METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if int(draws) < 1:
        raise ValueError(f"--draws must be at least 1, got {draws}")
    pool_ds = load_dataset(pool, name="pool", schema=pool_format, on_bad_record=on_bad_record)
    chosen = locate(selected, pool_ds)
    values = evaluate(features, pool, cache_dir=cache_dir, pool_format=pool_format, on_bad_record=on_bad_record,
                      quiet=quiet, cache_write=cache_write)
    X = np.asarray(values.values, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"--features must be a Features expression (one vector per record); {features!r} is not")
    ours = measure(X, chosen, metrics)
    rand = [measure(X, ids, metrics) for ids in random_draws(len(X), len(chosen), seed, draws)]
    return {
        "selected": str(selected),
        "pool": str(pool),
        "pool_size": int(len(X)),
        "selected_count": int(len(chosen)),
        "features": features,
        "random_seed": seed,
        "draws": int(draws),
        "metrics": {m: _compare(ours[m], [r[m] for r in rand]) for m in metrics},
    }


def _compare(selection: float, draws: list[float]) -> dict:
    """Selection value, summary of the draws' values and the verdict (see :func:`measure_selection`)."""
    values = [_finite(v) for v in draws]
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    sel = _finite(selection)
    out = {"selection": sel, "random_mean": None, "random_std": None, "random_min": None, "random_max": None,
           "random_values": values, "vs_random": None}
    if defined.size:
        out.update(random_mean=float(defined.mean()), random_min=float(defined.min()),
                   random_max=float(defined.max()))
        if defined.size > 1:
            out["random_std"] = float(defined.std(ddof=1))
        if sel is not None:
            out["vs_random"] = "above" if sel > defined.max() else "below" if sel < defined.min() else "within"
    return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. distances within one record) is null."""
    return None if value is None or not np.isfinite(value) else float(value)


_VERDICT = {"above": "above all draws", "below": "below all draws", "within": "within the draws", None: "n/a"}


def format_report(report: dict) -> str:
    """A table (metric, selection, random mean, sd, min, max, where the selection lies), then what each metric is."""
    draws = report["draws"]
    lines = [f"{report['selected_count']} selected of {report['pool_size']} pool records; "
             f"features {report['features']}",
             f"random reference: {draws} uniform draw{'s' if draws != 1 else ''} of {report['selected_count']} "
             f"records (seed {report['random_seed']}); sd = sample standard deviation over the draws",
             "",
             f"{'metric':<10} {'selection':>11} {'random mean':>11} {'sd':>9} {'min':>11} {'max':>11}  selection is"]

    def num(value, width=11):
        return f"{'n/a' if value is None else f'{value:.4f}':>{width}}"

    for name, v in report["metrics"].items():
        lines.append(f"{name:<10} {num(v['selection'])} {num(v['random_mean'])} {num(v['random_std'], 9)} "
                     f"{num(v['random_min'])} {num(v['random_max'])}  {_VERDICT[v['vs_random']]}")
    lines.append("")
    lines.extend(f"{name:<10} {METRIC_WORDS.get(name, '')}" for name in report["metrics"])
    return "\n".join(lines)

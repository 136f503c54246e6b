"""General selectors: top/bottom by score, random, even-stride sampling, iteration."""

from __future__ import annotations

import numpy as np

from datasel.ops.registry import Budget, Kind, Param, op


def scored_rows(ctx, subset: np.ndarray, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``subset`` that have a score, and those scores; NaN rows are counted as excluded."""
    values = np.asarray(scores.values(subset), dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{what} needs one number per record, got an array of shape {values.shape}")
    nan = np.isnan(values)
    if nan.any():
        ctx.exclude(f"no score ({scores.label}) in {what}", subset[nan])
    return subset[~nan], values[~nan]


def order_by_score(rows: np.ndarray, values: np.ndarray, descending: bool) -> np.ndarray:
    """``rows`` sorted by score; ties keep pool order (lowest index first)."""
    key = -values if descending else values
    return rows[np.lexsort((rows, key))]


def _take(k: Budget, n_input: int, n_pool: int, chunks: str) -> int:
    if chunks == "exact" or k.fraction is None:
        return k.resolve(n_input, n_pool)
    # Small2Large: sort, np.array_split into m = round(1/p) front-loaded chunks, keep the first.
    m = max(1, round(1 / float(k.fraction))) if k.fraction > 0 else None
    if m is None:
        return 0
    return -(-n_input // m) if n_input else 0


_CHUNKS = Param("chunks", Kind.STRING, "exact",
                doc="exact: ⌊P% × n⌋; array_split: the first of round(100/P) front-loaded chunks, "
                    "⌈n / round(100/P)⌉ (Small2Large's rule, slightly over budget)",
                choices=("exact", "array_split"))


@op("topk", [Param("scores", Kind.SCORES, doc="what to rank by"),
             Param("k", Kind.BUDGET, doc="how many to keep: a count, P% of the input, or P% of pool"),
             _CHUNKS],
    Kind.SELECTOR, role="selector", version="1")
def topk(ctx, subset, scores, k: Budget, chunks="exact"):
    """Keep the k records with the highest scores.

    Records without a score (NaN) are left out and counted in the manifest.
    Ties are broken by pool order (the earlier record wins), and the selection
    is in descending score order.  Under a partition, k applies per group.
    A percentage counts the records that reach the selector, scored or not.
    """
    rows, values = scored_rows(ctx, subset, scores, "topk")
    n = _take(k, len(subset), ctx.n_pool, chunks)
    return order_by_score(rows, values, descending=True)[:n]


@op("bottomk", [Param("scores", Kind.SCORES, doc="what to rank by"),
                Param("k", Kind.BUDGET, doc="how many to keep"),
                _CHUNKS],
    Kind.SELECTOR, role="selector", version="1")
def bottomk(ctx, subset, scores, k: Budget, chunks="exact"):
    """Keep the k records with the lowest scores (ascending order, ties by pool order).

    Records without a score (NaN) are left out and counted in the manifest.
    ``chunks="array_split"`` reproduces Small2Large's per-cluster rule.
    """
    rows, values = scored_rows(ctx, subset, scores, "bottomk")
    n = _take(k, len(subset), ctx.n_pool, chunks)
    return order_by_score(rows, values, descending=False)[:n]


@op("band", [Param("scores", Kind.SCORES, doc="values"),
             Param("lo", Kind.NUMBER, 25, doc="lower percentile (0-100)"),
             Param("hi", Kind.NUMBER, 75, doc="upper percentile (0-100)"),
             Param("min_size", Kind.NUMBER, 0,
                   doc="inputs with fewer scored records than this are kept whole (CherryLLM: 10)")],
    Kind.SELECTOR, role="selector", version="1")
def band(ctx, subset, scores, lo=25, hi=75, min_size=0):
    """Keep the records whose score lies between the lo-th and hi-th percentiles of the input (inclusive).

    Percentiles use linear interpolation (numpy's default) over the scored
    records that reach the selector, so under a partition the band is per
    group (CherryLLM's middle-perplexity band per cluster).  An input with
    fewer than ``min_size`` scored records is kept whole, as CherryLLM does
    for clusters under its 10 per-cluster samples.  Pool order.
    """
    if not 0 <= lo <= hi <= 100:
        raise ValueError(f"need 0 <= lo <= hi <= 100, got lo={lo}, hi={hi}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    rows, values = scored_rows(ctx, subset, scores, "band")
    if len(rows) < min_size or len(rows) == 0:
        return rows
    low, high = np.percentile(values, [lo, hi])
    return rows[(values >= low) & (values <= high)]


@op("random", [Param("k", Kind.BUDGET, doc="how many to keep"),
               Param("seed", Kind.NUMBER, 0, doc="random seed")],
    Kind.SELECTOR, role="selector", version="1")
def random_(ctx, subset, k: Budget, seed=0):
    """Keep k records drawn uniformly without replacement (numpy PCG64 with ``seed``).

    The draw depends only on the input rows and the seed, so it is
    reproducible; the selection is in draw order.
    """
    n = k.resolve(len(subset), ctx.n_pool)
    rng = np.random.default_rng(int(seed))
    return subset[rng.permutation(len(subset))[:n]]


@op("sample", [Param("k", Kind.BUDGET, doc="how many to keep"),
               Param("how", Kind.STRING, "stride", doc="stride: evenly spaced in pool order; random: uniform",
                     choices=("stride", "random")),
               Param("seed", Kind.NUMBER, 0, doc="random seed (how=\"random\")")],
    Kind.SELECTOR, role="selector", version="1")
def sample(ctx, subset, k: Budget, how="stride", seed=0):
    """Keep k records spread evenly over the input (CherryLLM's per-cluster rule).

    ``how="stride"`` takes every ⌊n/k⌋-th record in pool order and truncates
    to k; an input smaller than k is kept whole.  ``how="random"`` is the same
    as ``random(k, seed)``.
    """
    n = k.resolve(len(subset), ctx.n_pool)
    if how == "random":
        return subset[np.random.default_rng(int(seed)).permutation(len(subset))[:n]]
    if n == 0:
        return subset[:0]
    step = max(1, len(subset) // n)
    return subset[::step][:n]


@op("iterate", [Param("init", Kind.SELECTOR, doc="the selection to start from"),
                Param("rounds", Kind.NUMBER, doc="how many times to apply step"),
                Param("step", Kind.FUNCTION, doc="cur -> the next selection, given the current one")],
    Kind.SELECTOR, role="selector", version="1", applied=("init",), lambda_kind=Kind.SELECTOR,
    lambda_result=Kind.SELECTOR)
def iterate(ctx, subset, init, rounds, step):
    """Repeat a step that depends on the current selection: cur = step(cur), ``rounds`` times.

    ``iterate(random(100), 10, cur -> cur + kcenter(hidden(finetune(model, data=cur)), 100, given=cur))``
    is DiverseEvol.  The function's parameter names the current selection.
    Each round's nodes are cached under that round's selection, and every
    finished round is cached, so an interrupted loop resumes where it stopped.
    The engine runs this op itself (it needs to bind ``cur``).
    """
    raise AssertionError("iterate is evaluated by the engine")

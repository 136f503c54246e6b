"""General selectors: top/bottom by score, random, even-stride sampling, iteration."""

from __future__ import annotations

import numpy as np

from datasel.ops.context import Verdict
from datasel.ops.registry import Budget, BudgetBound, Kind, Param, op


def scored_rows(ctx, subset: np.ndarray, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``subset`` that have a score, and those scores (NaN rows are left out)."""
    values = np.asarray(scores.values(subset), dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{what} needs one number per record, got an array of shape {values.shape}")
    nan = np.isnan(values)
    return subset[~nan], values[~nan]


def missing_texts(ctx, scores, subset: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row: why the score is NaN ("" where it is not), for verdicts."""
    out = np.full(len(subset), "", dtype=object)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ctx.why_missing(scores, subset[nan])
    return out


def _ranked_verdict(ctx, subset, kept, scores, k, descending: bool) -> Verdict:
    """Rank, value and cut-off of every input row of topk / bottomk."""
    values = np.asarray(scores.values(subset), dtype=np.float64)
    nan = np.isnan(values)
    ok = np.flatnonzero(~nan)
    order = ok[np.lexsort((subset[ok], -values[ok] if descending else values[ok]))]
    rank = np.zeros(len(subset), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    is_kept = np.isin(subset, kept)
    picked = values[is_kept]
    cutoff = float(picked.min() if descending else picked.max()) if len(picked) else float("nan")
    word = "top" if descending else "bottom"
    name = scores.label
    n_kept = len(kept)
    size = str(k) if str(k) == str(n_kept) else f"{k} ({n_kept} record{'' if n_kept == 1 else 's'})"
    return Verdict(
        [(True, "kept", f"rank {{rank}} of {{n}} by {name}: {{score:.4g}}"),
         (False, f"not in the {word} {k}",
          f"not among the {word} {size} by {name}: {{score:.4g}}, rank {{rank}} of {{n}}, cut-off {{cutoff:.4g}}"),
         (False, "no score", f"no {name} score: {{missing}}")],
        np.where(is_kept, 0, np.where(nan, 2, 1)),
        {"score": values, "rank": rank, "n": int(len(ok)), "k": int(len(kept)), "cutoff": cutoff,
         "missing": missing_texts(ctx, scores, subset, values)})


def _explain_topk(ctx, subset, kept, scores, k, chunks="exact"):
    return _ranked_verdict(ctx, subset, kept, scores, k, descending=True)


def _explain_bottomk(ctx, subset, kept, scores, k, chunks="exact"):
    return _ranked_verdict(ctx, subset, kept, scores, k, descending=False)


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


def _shares_budget(chunks="exact", **_) -> bool:
    """Under a partition, ``exact`` shares the budget out over the groups; ``array_split`` rounds per group."""
    return chunks == "exact"


_CHUNKS = Param("chunks", Kind.STRING, "exact",
                doc="exact: ⌊P% × n⌋; array_split: the first of round(100/P) front-loaded chunks, "
                    "⌈n / round(100/P)⌉ (Small2Large's rule, slightly over budget)",
                choices=("exact", "array_split"))


@op("topk", [Param("scores", Kind.SCORES, doc="what to rank by"),
             Param("k", Kind.BUDGET, doc="how many to keep: a count, P% of the input, or P% of pool"),
             _CHUNKS],
    Kind.SELECTOR, role="selector", version="1", explain=_explain_topk, partition_budget=_shares_budget)
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
    Kind.SELECTOR, role="selector", version="1", explain=_explain_bottomk, partition_budget=_shares_budget)
def bottomk(ctx, subset, scores, k: Budget, chunks="exact"):
    """Keep the k records with the lowest scores (ascending order, ties by pool order).

    Records without a score (NaN) are left out and counted in the manifest.
    ``chunks="array_split"`` reproduces Small2Large's per-cluster rule.
    """
    rows, values = scored_rows(ctx, subset, scores, "bottomk")
    n = _take(k, len(subset), ctx.n_pool, chunks)
    return order_by_score(rows, values, descending=False)[:n]


def _explain_band(ctx, subset, kept, scores, lo=25, hi=75, min_size=0):
    values = np.asarray(scores.values(subset), dtype=np.float64)
    nan = np.isnan(values)
    finite = values[~nan]
    low, high = (np.percentile(finite, [lo, hi]) if len(finite) else (np.nan, np.nan))
    whole = len(finite) < min_size
    name = scores.label
    is_kept = np.isin(subset, kept)
    case = np.where(nan, 3, np.where(is_kept, 2 if whole else 0, 1))
    return Verdict(
        [(True, "kept", f"{name} = {{score:.4g}}, inside the {lo}th–{hi}th percentile band "
                        f"[{{low:.4g}}, {{high:.4g}}]"),
         (False, "outside the band", f"{name} = {{score:.4g}}, outside the {lo}th–{hi}th percentile band "
                                     f"[{{low:.4g}}, {{high:.4g}}]"),
         (True, "kept whole", f"kept whole: only {{n}} scored records, fewer than min_size {min_size}"),
         (False, "no score", f"no {name} score: {{missing}}")],
        case, {"score": values, "low": float(low), "high": float(high), "n": int(len(finite)),
               "missing": missing_texts(ctx, scores, subset, values)})


@op("band", [Param("scores", Kind.SCORES, doc="values"),
             Param("lo", Kind.NUMBER, 25, low=0, high=100, doc="lower percentile (0-100)"),
             Param("hi", Kind.NUMBER, 75, low=0, high=100, doc="upper percentile (0-100)"),
             Param("min_size", Kind.NUMBER, 0, integer=True, low=0,
                   doc="inputs with fewer scored records than this are kept whole (CherryLLM: 10)")],
    Kind.SELECTOR, role="selector", version="1", explain=_explain_band)
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


def _drawn_verdict(subset, kept, how: str) -> Verdict:
    return Verdict([(True, "drawn", f"drawn ({how})"),
                    (False, "not drawn", f"not drawn: {{k}} of {{n}} records, {how}")],
                   np.where(np.isin(subset, kept), 0, 1), {"k": int(len(kept)), "n": int(len(subset))})


def _explain_random(ctx, subset, kept, k, seed=0):
    return _drawn_verdict(subset, kept, f"uniformly at random, seed {seed}")


def _explain_sample(ctx, subset, kept, k, how="stride", seed=0):
    if how == "random":
        return _drawn_verdict(subset, kept, f"uniformly at random, seed {seed}")
    step = max(1, len(subset) // max(1, len(kept))) if len(kept) else 0
    return _drawn_verdict(subset, kept, f"every {step}th record in pool order")


@op("random", [Param("k", Kind.BUDGET, doc="how many to keep"),
               Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1, doc="random seed")],
    Kind.SELECTOR, role="selector", version="1", explain=_explain_random)
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
               Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1, doc="random seed (how=\"random\")")],
    Kind.SELECTOR, role="selector", version="1", explain=_explain_sample)
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


def _budget(value) -> Budget:
    if isinstance(value, (Budget, BudgetBound)):
        return value
    if isinstance(value, bool) or float(value) != int(value) or value < 0:
        raise ValueError(f"a budget is a whole, non-negative count or a percentage; got {value}")
    return Budget(count=int(value))


@op("min", [Param("a", Kind.BUDGET, doc="a count or a percentage"), Param("b", Kind.BUDGET, doc="another"),
            Param("c", Kind.BUDGET, None, doc="optional third")],
    Kind.BUDGET, role="value", version="1", family="selection")
def min_(ctx, a, b, c=None):
    """The smaller of two (or three) budgets, each resolved against the same input.

    ``topk(ifd, min(1000, 5% of pool))`` keeps 5% of the pool but never more than 1,000 records.
    """
    return BudgetBound("min", tuple(_budget(x) for x in (a, b, c) if x is not None))


@op("max", [Param("a", Kind.BUDGET, doc="a count or a percentage"), Param("b", Kind.BUDGET, doc="another"),
            Param("c", Kind.BUDGET, None, doc="optional third")],
    Kind.BUDGET, role="value", version="1", family="selection")
def max_(ctx, a, b, c=None):
    """The larger of two (or three) budgets, each resolved against the same input.

    ``topk(ifd, max(100, 10%))`` keeps 10% of what reaches it, but at least 100 records.
    """
    return BudgetBound("max", tuple(_budget(x) for x in (a, b, c) if x is not None))


@op("iterate", [Param("init", Kind.SELECTOR, doc="the selection to start from", applied=True),
                Param("rounds", Kind.NUMBER, integer=True, low=0, high=10000, doc="how many times to apply step"),
                Param("step", Kind.FUNCTION, doc="cur -> the next selection, given the current one",
                      binds=Kind.SELECTOR, returns=Kind.SELECTOR, scope="round", cache_calls=True)],
    Kind.SELECTOR, role="selector", version="2")
def iterate(ctx, subset, init, rounds, step):
    """Repeat a step that depends on the current selection: cur = step(cur), ``rounds`` times.

    ``iterate(random(100), 10, cur -> cur + kcenter(hidden(finetune(model, data=cur)), 100, given=cur))``
    is DiverseEvol.  The function's parameter names the current selection.
    Each round's nodes are cached under that round's selection, and every
    finished round is cached, so an interrupted loop resumes where it stopped.
    """
    import time

    current = init
    total = int(rounds)
    for r in range(1, total + 1):
        started = time.monotonic()
        current = step(current)
        ctx.log(f"round {r}/{total}: {len(current)} records ({time.monotonic() - started:.1f}s)")
    return current.indices

"""Cheap per-record scores and score transforms."""

from __future__ import annotations

import math
import re

import numpy as np

from datasel.ops.context import NO_TEXT, text_hash
from datasel.ops.registry import Kind, Param, op

TEXT_FIELDS = ("instruction", "input", "output", "prompt", "all")
_WORD = re.compile(r"\S+")


def record_text(record: dict, field: str) -> str:
    """One field of a normalised record; ``prompt`` = instruction + input, ``all`` = everything."""
    if field == "prompt":
        return record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    if field == "all":
        if len(record["messages"]) > 2:
            return "\n".join(m["content"] for m in record["messages"])
        parts = [record["instruction"], record["input"], record["output"]]
        return "\n".join(p for p in parts if p)
    return record[field]


@op("length", [Param("field", Kind.STRING, "output", doc="which text to measure", choices=TEXT_FIELDS),
               Param("unit", Kind.STRING, "chars", doc="chars or words (whitespace-separated)",
                     choices=("chars", "words"))],
    Kind.SCORES, role="map", version="1", chunk_rows=65536)
def length(state, batch, field="output", unit="chars"):
    """Length of a record's text in characters or whitespace-separated words.

    ``field`` is ``output`` (the response; default), ``instruction``,
    ``input``, ``prompt`` (instruction + input) or ``all``.
    """
    texts = (record_text(r, field) for r in batch.records)
    if unit == "words":
        return np.fromiter((len(_WORD.findall(t)) for t in texts), dtype=np.float64, count=len(batch))
    return np.fromiter((len(t) for t in texts), dtype=np.float64, count=len(batch))


def _lookup(raw: dict, path: str):
    value = raw
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _number(value) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _field_missing(ctx, idx, columns, name):
    out = []
    for raw in ctx.raw(idx):
        value = _lookup(raw, name)
        if value is None:
            out.append(f"the record has no field {name!r}")
        else:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
            out.append(f"field {name!r} is not a number ({shown})")
    return out


@op("field", [Param("name", Kind.STRING, doc="field name; dots reach into nested objects (a.b.0)")],
    Kind.SCORES, role="map", version="2", chunk_rows=65536, why_missing=_field_missing,
    columns=("value", "text_hash"))
def field_(state, batch, name):
    """A field of the raw records: as numbers (precomputed scores, ratings, ...) or compared as text.

    Missing or non-numeric values are NaN as numbers: selectors leave such
    records out and count them in the manifest.  Booleans are 0/1; numeric
    strings are parsed.  The field can also be compared with strings:
    ``field("category") == "open_qa"``, ``field("source") != "sharegpt"``,
    ``field("lang") in ["en", "de"]`` (a record without the field matches
    none of these and is reported as having no value).
    """
    values = [_lookup(r, name) for r in batch.raw]
    numbers = np.fromiter((_number(v) for v in values), dtype=np.float64, count=len(batch))
    hashes = np.frombuffer(b"".join(NO_TEXT if v is None else text_hash(v) for v in values), dtype="S16").copy()
    return {"value": numbers, "text_hash": hashes}


def _finite(values: np.ndarray) -> np.ndarray:
    return ~np.isnan(values)


@op("rank", [Param("scores", Kind.SCORES, doc="values to rank"),
             Param("normalize", Kind.BOOL, True, doc="scale ranks to [0, 1]")],
    Kind.SCORES, role="scores", version="1")
def rank(ctx, idx, scores, normalize=True):
    """Ascending rank among the records it is evaluated on (ties get their average rank).

    With ``normalize`` the lowest value gets 0 and the highest 1, which makes
    ranks of differently scaled scores comparable (``0.7*rank(a) + 0.3*rank(b)``).
    NaN stays NaN.
    """
    from scipy.stats import rankdata

    values = np.asarray(scores.values(idx), dtype=np.float64)
    out = np.full(values.shape, np.nan)
    ok = _finite(values)
    n = int(ok.sum())
    if n:
        r = rankdata(values[ok], method="average")
        out[ok] = (r - 1) / (n - 1) if normalize and n > 1 else (np.zeros(n) if normalize else r)
    return out


@op("quantile", [Param("scores", Kind.SCORES, doc="values to transform")],
    Kind.SCORES, role="scores", version="1")
def quantile(ctx, idx, scores):
    """Empirical quantile: the fraction of records (it is evaluated on) scoring at most this record's value.

    Values are in (0, 1]; NaN stays NaN.  ``quantile(ppl) > 0.25 & quantile(ppl) < 0.75``
    keeps the middle half.
    """
    values = np.asarray(scores.values(idx), dtype=np.float64)
    out = np.full(values.shape, np.nan)
    ok = _finite(values)
    finite = np.sort(values[ok])
    if len(finite):
        out[ok] = np.searchsorted(finite, values[ok], side="right") / len(finite)
    return out


@op("zscore", [Param("scores", Kind.SCORES, doc="values to standardise")],
    Kind.SCORES, role="scores", version="1")
def zscore(ctx, idx, scores):
    """(x − mean) / standard deviation over the records it is evaluated on (population std; 0 if constant)."""
    values = np.asarray(scores.values(idx), dtype=np.float64)
    out = np.full(values.shape, np.nan)
    ok = _finite(values)
    if ok.any():
        v = values[ok]
        std = v.std()
        out[ok] = (v - v.mean()) / std if std > 0 else 0.0
    return out


@op("minmax", [Param("scores", Kind.SCORES, doc="values to rescale")],
    Kind.SCORES, role="scores", version="1")
def minmax(ctx, idx, scores):
    """(x − min) / (max − min) over the records it is evaluated on (0 if constant); NaN stays NaN."""
    values = np.asarray(scores.values(idx), dtype=np.float64)
    out = np.full(values.shape, np.nan)
    ok = _finite(values)
    if ok.any():
        v = values[ok]
        span = v.max() - v.min()
        out[ok] = (v - v.min()) / span if span > 0 else 0.0
    return out


@op("abs", [Param("scores", Kind.SCORES, doc="values")], Kind.SCORES, role="scores", version="1")
def abs_(ctx, idx, scores):
    """Absolute value."""
    return np.abs(np.asarray(scores.values(idx), dtype=np.float64))


@op("count", [Param("selection", Kind.SELECTOR, doc="a selection (taken from the whole pool)")],
    Kind.NUMBER, role="value", version="1")
def count(ctx, selection):
    """The number of records in a selection (e.g. the current selection inside ``iterate``)."""
    return len(selection)


def _ratio_missing(ctx, idx, numerator, denominator):
    return [f"the denominator {denominator.label} is 0"] * len(idx)


@op("ratio", [Param("numerator", Kind.SCORES, doc="top"), Param("denominator", Kind.SCORES, doc="bottom")],
    Kind.SCORES, role="scores", version="1", why_missing=_ratio_missing)
def ratio(ctx, idx, numerator, denominator):
    """numerator / denominator, with NaN (excluded and counted by selectors) where the denominator is 0.

    Plain ``a / b`` gives ±inf there; ratios of losses or perplexity drops
    (IFD, learning percentage) use this so a degenerate row never ranks first.
    """
    a = np.asarray(numerator.values(idx), dtype=np.float64)
    b = np.asarray(denominator.values(idx), dtype=np.float64)
    out = np.full(a.shape, np.nan)
    ok = (b != 0) & ~np.isnan(a) & ~np.isnan(b)
    out[ok] = a[ok] / b[ok]
    return out


@op("exp", [Param("scores", Kind.SCORES, doc="values")], Kind.SCORES, role="scores", version="1")
def exp(ctx, idx, scores):
    """e to the power of each value (perplexity from a mean loss)."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(scores.values(idx), dtype=np.float64))


def _log_missing(ctx, idx, scores):
    return [f"log of {scores.label} ≤ 0"] * len(idx)


@op("log", [Param("scores", Kind.SCORES, doc="values")], Kind.SCORES, role="scores", version="1",
    why_missing=_log_missing)
def log(ctx, idx, scores):
    """Natural logarithm (NaN for values ≤ 0)."""
    v = np.asarray(scores.values(idx), dtype=np.float64)
    out = np.full(v.shape, np.nan)
    ok = v > 0
    out[ok] = np.log(v[ok])
    return out


@op("column", [Param("scores", Kind.SCORES, doc="an operator with several outputs per record"),
               Param("name", Kind.STRING, doc="which output", column_of="scores")],
    Kind.SCORES, role="scores", version="1")
def column(ctx, idx, scores, name):
    """One named output of a multi-output operator, e.g. ``column(loss(model), "count")`` (scored tokens)."""
    return np.asarray(scores.column(name, idx), dtype=np.float64)

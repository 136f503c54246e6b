"""The operators the language's own syntax stands for: datasets, literals, variables, set algebra,
comparisons, arithmetic and "a selector in every group of a partition".

They are declared like every other op (so the engine evaluates them by role,
``datasel ops`` lists them, and their versions are part of cache keys); the
planner finds them by the piece of syntax they implement (``syntax=``), never
by name:

======================  =========================================================
``a + b`` (Selectors)   ``union``: ``a``'s records, then ``b``'s new ones
``a & b``               ``intersect``: records kept by both (in ``a``'s order)
``a - b``, ``not b``    ``difference``: records kept by ``a`` (by everything) and not by ``b``
``s < 1`` … ``s in [..]``  ``compare``: records whose score satisfies the comparison
``P | sel``             ``per_group``: ``sel`` in every group of the partition ``P``, unioned
``cur`` inside a pipe   ``restrict``: a bound selection limited to what reaches it
``a + b`` (Scores), ``-a``  ``arith``, ``neg``: arithmetic on Scores and numbers
======================  =========================================================
"""

from __future__ import annotations

import json
import math

import numpy as np

from datasel.ops.contract import NO_TEXT, Kind, Param, Role, Verdict, text_hash
from datasel.ops.registry import op

COMPARISONS = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")
SET_KINDS = (Kind.SELECTOR,)


# ------------------------------------------------------------------ leaves
@op("dataset", [Param("name", Kind.STRING, doc="pool or val")], Kind.DATASET, role=Role.DATASET, version="1",
    family="builtins", label=lambda name: name, syntax=("dataset",))
def dataset(ctx, name):
    """A dataset given on the command line (``--pool``, ``--val``); its identity is its content fingerprint."""
    return ctx.dataset(name)


@op("const", [Param("value", Kind.ANY, doc="the literal")], Kind.ANY, role=Role.CONST, version="1",
    family="builtins", label=lambda value: json.dumps(value), syntax=("literal",))
def const(ctx, value):
    """A literal value written in the recipe that is not a parameter of an op (an operand of arithmetic)."""
    return value


@op("var", [Param("name", Kind.STRING, doc="the variable"), Param("scope", Kind.STRING, doc="group or round")],
    Kind.SELECTOR, role=Role.VARIABLE, version="1", family="builtins",
    label=lambda name, scope: f"{name} (bound per {scope})", syntax=("variable",))
def var(ctx, name, scope):
    """A variable bound while the plan runs: a group of a partition, or an iteration's current selection.

    The engine binds it; its identity is the identity of the selection bound to it.
    """
    raise AssertionError("a variable is bound by the engine, never computed")


# -------------------------------------------------------------- set algebra
def _pair(symbol: str):
    return [Param("left", Kind.SELECTOR, doc=f"the left side of {symbol}"),
            Param("right", Kind.SELECTOR, doc=f"the right side of {symbol}")]


def _sides(ctx, rows):
    lk, lr, lt = ctx.explain_input("left", rows)
    rk, rr, rt = ctx.explain_input("right", rows)
    return (lk, lr, lt, ctx.input_label("left")), (rk, rr, rt, ctx.input_label("right"))


def _record_verdict(rows, decide) -> Verdict:
    """A verdict built record by record: ``decide(i) -> (kept, reason, text)``."""
    notes: list[tuple[bool, str, str]] = []
    case = np.zeros(len(rows), dtype=np.int64)
    text = np.empty(len(rows), dtype=object)
    for i in range(len(rows)):
        kept, reason, text[i] = decide(i)
        entry = (kept, reason, "{text}")
        if entry not in notes:
            notes.append(entry)
        case[i] = notes.index(entry)
    return Verdict(notes, case, {"text": text})


def _explain_union(ctx, subset, kept, left, right):
    (lk, _, lt, ln), (rk, _, rt, rn) = _sides(ctx, subset)

    def decide(i):
        if lk[i]:
            return True, "kept", f"kept by {ln}: {lt[i]}"
        if rk[i]:
            return True, "kept", f"kept by {rn}: {rt[i]}"
        return False, "kept by neither side", f"kept by neither {ln} ({lt[i]}) nor {rn} ({rt[i]})"
    return _record_verdict(subset, decide)


def _explain_intersect(ctx, subset, kept, left, right):
    (lk, lr, lt, ln), (rk, rr, rt, rn) = _sides(ctx, subset)

    def decide(i):
        if not lk[i]:
            return False, lr[i], f"{ln}: {lt[i]}"
        if not rk[i]:
            return False, rr[i], f"{rn}: {rt[i]}"
        return True, "kept", f"kept by both {ln} and {rn}"
    return _record_verdict(subset, decide)


def _explain_difference(ctx, subset, kept, left, right):
    (lk, lr, lt, ln), (rk, _, rt, rn) = _sides(ctx, subset)

    def decide(i):
        if not lk[i]:
            return False, lr[i], f"{ln}: {lt[i]}"
        if rk[i]:
            return False, f"removed by {rn}", f"removed because {rn} keeps it ({rt[i]})"
        return True, "kept", f"kept: {rn} does not keep it ({rt[i]})"
    return _record_verdict(subset, decide)


@op("union", _pair("+"), Kind.SELECTOR, role=Role.SELECTOR, version="2", family="builtins", syntax=("+",),
    explain=_explain_union, label=lambda: "union")
def union(ctx, subset, left, right):
    """Records kept by either side: the left side's, in its order, then the right side's new ones."""
    extra = right.indices[~np.isin(right.indices, left.indices)]
    return np.concatenate([left.indices, extra])


@op("intersect", _pair("&"), Kind.SELECTOR, role=Role.SELECTOR, version="2", family="builtins", syntax=("&",),
    explain=_explain_intersect, label=lambda: "intersect")
def intersect(ctx, subset, left, right):
    """Records kept by both sides, in the left side's order."""
    return left.indices[np.isin(left.indices, right.indices)]


@op("difference", _pair("-"), Kind.SELECTOR, role=Role.SELECTOR, version="2", family="builtins",
    syntax=("-", "not"), explain=_explain_difference, label=lambda: "difference")
def difference(ctx, subset, left, right):
    """Records kept by the left side and not by the right (``not x`` is everything that reaches it minus x)."""
    return left.indices[~np.isin(left.indices, right.indices)]


def _explain_restrict(ctx, subset, kept, selection):
    return Verdict([(True, "in the selection", "in the current selection"),
                    (False, "not in the selection", "not in the current selection")],
                   np.where(np.isin(subset, kept), 0, 1), {})


@op("restrict", [Param("selection", Kind.SELECTOR, doc="a selection bound to a variable")], Kind.SELECTOR,
    role=Role.SELECTOR, version="1", family="builtins", syntax=("bound name",), explain=_explain_restrict,
    label=lambda: "restrict")
def restrict(ctx, subset, selection):
    """A bound selection (``cur`` inside ``iterate``) limited to the records that reach it, in its own order."""
    return selection.indices[np.isin(selection.indices, subset)]


# --------------------------------------------------------------- comparisons
def compares_text(rhs) -> bool:
    """Whether a comparison's literal right side is text (a string, or a list holding one)."""
    return isinstance(rhs, str) or (isinstance(rhs, list) and any(isinstance(v, str) for v in rhs))


def text_matches(scores, subset: np.ndarray, op: str, rhs) -> tuple[np.ndarray, np.ndarray]:
    """For a comparison with strings: (record has a value, the comparison holds) per row of ``subset``."""
    hashes = np.asarray(scores.column("text_hash", subset))
    present = hashes != NO_TEXT
    wanted = np.frombuffer(b"".join(text_hash(v) for v in (rhs if isinstance(rhs, list) else [rhs])), dtype="S16")
    hit = np.isin(hashes, wanted)
    return present, (~hit if op in ("!=", "not in") else hit)


_TESTS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
          "!=": np.not_equal}


def _values(x, rows):
    return np.asarray(x.values(rows), dtype=np.float64) if hasattr(x, "values") else x


def _explain_compare(ctx, subset, kept, scores, op, rhs=None):
    is_kept = np.isin(subset, kept)
    expr = ctx.expression
    if compares_text(rhs):
        present, _ = text_matches(scores, subset, op, rhs)
        missing = np.full(len(subset), "", dtype=object)
        if (~present).any():
            missing[~present] = ctx.why_missing(scores, subset[~present])
        return Verdict([(True, "kept", expr), (False, f"{expr} is false", f"{expr} is false"),
                        (False, "no value", "no value: {missing}")],
                       np.where(is_kept, 0, np.where(present, 1, 2)), {"missing": missing})
    score = _values(scores, subset)
    values = {"score": score}
    rhs_note = ""
    nan = np.isnan(score)
    missing = np.full(len(subset), "", dtype=object)
    if nan.any():
        missing[nan] = ctx.why_missing(scores, subset[nan])
    if hasattr(rhs, "values"):
        values["rhs"] = _values(rhs, subset)
        rhs_note = " vs {rhs:.4g}"
        rhs_nan = np.isnan(values["rhs"]) & ~nan
        if rhs_nan.any():
            missing[rhs_nan] = ctx.why_missing(rhs, subset[rhs_nan])
            nan = nan | rhs_nan
    values["missing"] = missing
    name = scores.label
    return Verdict([(True, "kept", f"{name} = {{score:.4g}}{rhs_note}"),
                    (False, f"{expr} is false", f"{expr} is false: {name} = {{score:.4g}}{rhs_note}"),
                    (False, "no score", f"no {name} score: {{missing}}")],
                   np.where(is_kept, 0, np.where(nan, 2, 1)), values)


def _compare_label(op, rhs=None):
    return f"compare {op} {json.dumps(rhs)}" if rhs is not None else f"compare {op}"


@op("compare", [Param("scores", Kind.SCORES, doc="the score compared"),
                Param("op", Kind.STRING, doc="the comparison", choices=COMPARISONS),
                Param("rhs", (Kind.NUMBER, Kind.SCORES, Kind.STRING, Kind.LIST), None,
                      doc="what it is compared with: a number, another score, a string or a list")],
    Kind.SELECTOR, role=Role.SELECTOR, version="2", family="builtins", syntax=COMPARISONS,
    explain=_explain_compare, label=_compare_label, filters_rows=True)
def compare(ctx, subset, scores, op, rhs=None):
    """Records whose score satisfies the comparison; a record without a value (NaN, no field) never does.

    ``==``, ``!=``, ``in`` and ``not in`` with strings compare the text of an
    op that gives one (``field``); ``in`` with numbers tests membership by value.
    """
    if compares_text(rhs):
        present, match = text_matches(scores, subset, op, rhs)
        return subset[present & match]
    values = _values(scores, subset)
    if op in ("in", "not in"):
        member = np.isin(values, np.asarray(rhs, dtype=np.float64))
        keep = member if op == "in" else ~member
        return subset[keep & ~np.isnan(values)]
    other = _values(rhs, subset) if hasattr(rhs, "values") else float(rhs)
    nan = np.isnan(values) | (np.isnan(other) if isinstance(other, np.ndarray) else math.isnan(other))
    with np.errstate(invalid="ignore"):
        mask = _TESTS[op](values, other) & ~nan
    return subset[mask]


# ---------------------------------------------------------------- partitions
def _explain_per_group(ctx, subset, kept, partition, body):
    notes: list[tuple[bool, str, str]] = []
    case = np.zeros(len(subset), dtype=np.int64)
    text = np.empty(len(subset), dtype=object)
    group = np.zeros(len(subset), dtype=np.int64)
    size = np.zeros(len(subset), dtype=np.int64)
    groups = list(partition.groups())
    sizes = tuple(len(members) for _, members in groups)
    for position, (label, members) in enumerate(groups):
        members = np.sort(members)
        kept_g, reasons, texts = ctx.explain_call("body", members, group=(sizes, position))
        pos = np.searchsorted(subset, members)
        for i, p in enumerate(pos):
            entry = (bool(kept_g[i]), reasons[i], "in group {group} ({size} records): {text}")
            if entry not in notes:
                notes.append(entry)
            case[p], text[p], group[p], size[p] = notes.index(entry), texts[i], label, len(members)
    values = {"group": group, "size": size, "text": text}
    # Records the partition put in no group: its own reason (kmeans: no features), else a plain one.
    grouped = np.isin(subset, np.concatenate([m for _, m in groups])) if groups else np.zeros(len(subset), bool)
    for ex in ctx.input_exclusions("partition"):
        pos = np.searchsorted(subset, ex.indices)
        ok = pos < len(subset)
        ok[ok] &= subset[pos[ok]] == ex.indices[ok]
        ok[ok] &= ~grouped[pos[ok]]
        if not ok.any():
            continue
        notes.append((False, ex.reason, ex.detail or ex.reason))
        case[pos[ok]] = len(notes) - 1
        grouped[pos[ok]] = True
        for name, column in ex.values.items():
            values.setdefault(name, np.full(len(subset), None, dtype=object))
            values[name][pos[ok]] = np.asarray(column, dtype=object)[ok]
    if not grouped.all():
        notes.append((False, "in no group", "in no group of the partition"))
        case[~grouped] = len(notes) - 1
    return Verdict(notes, case, values)


@op("per_group", [Param("partition", Kind.PARTITION, doc="the groups"),
                  Param("body", Kind.FUNCTION, doc="the selector applied inside every group",
                        binds=Kind.SELECTOR, returns=Kind.SELECTOR, scope="group")],
    Kind.SELECTOR, role=Role.SELECTOR, version="2", family="builtins", syntax=("|",), explain=_explain_per_group,
    label=lambda: "per_group")
def per_group(ctx, subset, partition, body):
    """A selector applied inside every group of a partition (``P | sel``); the results are unioned, group by group.

    Percentage budgets of the selector are shared out over the groups so that
    the total is exact (largest remainder; see docs/language.md, "Budgets").
    """
    groups = list(partition.groups())
    sizes = tuple(len(members) for _, members in groups)
    picks = []
    with ctx.progress(len(groups), f"{ctx.node_label} groups") as bar:
        for position, (_, members) in enumerate(groups):
            picks.append(body(ctx.selection(members), group=(sizes, position)).indices)
            bar.update(1)
    return np.concatenate(picks) if picks else subset[:0]


# ---------------------------------------------------------------- arithmetic
_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}


@op("arith", [Param("left", (Kind.SCORES, Kind.NUMBER)), Param("right", (Kind.SCORES, Kind.NUMBER)),
              Param("op", Kind.STRING, choices=tuple(_ARITH))],
    Kind.SCORES, role=Role.SCORES, version="1", family="builtins", syntax=("+", "-", "*", "/"),
    label=lambda op: f"arith {op}")
def arith(ctx, idx, left, right, op):
    """Arithmetic on Scores and numbers, record by record (``0.7*ifd + 0.3*rank(reward)``)."""
    a = _values(left, idx) if hasattr(left, "values") else float(left)
    b = _values(right, idx) if hasattr(right, "values") else float(right)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _ARITH[op](np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


@op("calc", [Param("left", Kind.NUMBER), Param("right", Kind.NUMBER), Param("op", Kind.STRING, choices=tuple(_ARITH))],
    Kind.NUMBER, role=Role.VALUE, version="1", family="builtins", syntax=("+", "-", "*", "/"),
    label=lambda op: f"calc {op}")
def calc(ctx, left, right, op):
    """Arithmetic on numbers known only when the plan runs (``count(cur) + 1``); literals are folded earlier."""
    if op == "/" and right == 0:
        raise ValueError(f"division by zero ({left} / 0)")
    value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right}[op]
    return int(value) if float(value).is_integer() else float(value)


@op("neg", [Param("operand", (Kind.SCORES, Kind.NUMBER))], Kind.SCORES, role=Role.SCORES, version="1",
    family="builtins", syntax=("unary -",), label=lambda: "neg")
def neg(ctx, idx, operand):
    """Negation of Scores: ``topk(-length, 5)`` keeps the shortest."""
    return -_values(operand, idx)

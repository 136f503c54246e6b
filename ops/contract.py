"""The language's types and the operator contract, shared by the compiler (``datasel.dsl``) and the
operator library (``datasel.ops``).

This module knows no operator: it defines what a declaration is made of
(:class:`OpSpec`, :class:`Param`, :class:`Role`, :class:`Column`,
:class:`Resources`), the kinds of values (:class:`Kind`, :class:`Budget`) and
the run-time values that pass between the engine and operators
(:class:`Selection`, :class:`Grouping`, :class:`Verdict`, :class:`Work`).
Operators are declared with :func:`datasel.ops.registry.op`; the checker,
the planner, the engine, the cache keys, ``datasel ops`` and the docs all read
those declarations and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import numpy as np


class Kind(enum.Enum):
    """The shapes of values in the language (docs/language.md, "Kinds of values")."""

    DATASET = "Dataset"
    MODEL = "Model"
    FEATURES = "Features"
    SCORES = "Scores"
    LABELS = "Labels"
    PARTITION = "Partition"
    SELECTOR = "Selector"
    COMPONENTS = "Components"
    GRAPH = "Graph"
    BUDGET = "Budget"
    NUMBER = "Number"
    STRING = "String"
    BOOL = "Bool"
    LIST = "List"
    NONE = "None"
    FUNCTION = "Function"
    ANY = "Any"

    def __str__(self) -> str:
        return self.value


#: Kinds whose values are per-record and therefore tied to one dataset.
PER_RECORD = frozenset({Kind.FEATURES, Kind.SCORES, Kind.LABELS})

#: Kinds that are functions of a subset of the pool.
SET_FUNCTIONS = frozenset({Kind.SELECTOR, Kind.PARTITION})


def accepts(expected: Kind | tuple[Kind, ...], got: Kind) -> bool:
    """Whether a value of kind ``got`` may be passed where ``expected`` is declared."""
    if isinstance(expected, tuple):
        return any(accepts(e, got) for e in expected)
    if expected is Kind.ANY or got is Kind.ANY:
        return True
    if expected is got:
        return True
    # A whole number is a budget (an absolute count).
    if expected is Kind.BUDGET and got is Kind.NUMBER:
        return True
    return False


def kind_name(kinds: Kind | tuple[Kind, ...]) -> str:
    """Human-readable name of a declared kind or union of kinds."""
    if isinstance(kinds, tuple):
        names = [str(k) for k in kinds]
        return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
    return str(kinds)


@dataclass(frozen=True)
class Budget:
    """How many records a selector keeps.

    ``count`` is an absolute number; ``fraction`` is a share of the selector's
    input (of each group under a partition) or, with ``of_pool``, of the whole
    pool.  Fractions round down, as ``int(n * rate)`` does in the reference code.
    """

    count: int | None = None
    fraction: Fraction | None = None
    of_pool: bool = False

    def resolve(self, n_input: int, n_pool: int) -> int:
        """The number of records to keep from an input of ``n_input`` records."""
        if self.count is not None:
            return min(self.count, n_input)
        base = n_pool if self.of_pool else n_input
        return min(int(self.fraction * base), n_input)

    def canonical(self) -> str:
        if self.count is not None:
            return str(self.count)
        pct = self.fraction * 100
        text = str(pct.numerator) if pct.denominator == 1 else format(float(pct), "g")
        return f"{text}%" + (" of pool" if self.of_pool else "")

    def __str__(self) -> str:
        return self.canonical()


@dataclass(frozen=True)
class BudgetBound:
    """``min(a, b, ...)`` or ``max(a, b, ...)`` of budgets, each resolved against the same input."""

    combine: str  # "min" or "max"
    parts: tuple

    count = None  # not a plain count: resolved per input like a fraction
    fraction = None
    of_pool = False

    def resolve(self, n_input: int, n_pool: int) -> int:
        values = [p.resolve(n_input, n_pool) for p in self.parts]
        return min(values) if self.combine == "min" else max(values)

    def canonical(self) -> str:
        return f"{self.combine}({', '.join(p.canonical() for p in self.parts)})"

    def __str__(self) -> str:
        return self.canonical()


_MISSING = object()


@dataclass(frozen=True)
class Ref:
    """A parameter default that names a binding, e.g. ``model``: resolved in the recipe's scope.

    ``--set model=...`` therefore changes every operator whose model defaults to ``model``.
    """

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Param:
    """One declared parameter of an operator.

    Beyond name, kind, default and the allowed ``choices``:

    * ``applied``: a Selector argument applied to the records that reach the op
      itself, not to the whole pool (``iterate``'s ``init``);
    * ``any_dataset``: per-record values of any dataset, read whole
      (``similarity``'s ``target=embed(minilm, data=val)``);
    * for a Function argument (``name -> expression``): ``binds``, the kind of
      the variable it binds; ``returns``, the kind its body must have;
      ``scope``, what the variable stands for (``"group"``, ``"round"``);
      ``cache_calls``, whether each call's result is cached under the key of
      its argument (``iterate``'s rounds, so an interrupted loop resumes);
    * ``column_of``: a string naming an output column of the op given as
      parameter ``column_of`` (``column(loss(m), "count")``), checked at compile time;
    * ``integer``, ``low``, ``high``: a number must be whole / within the
      bounds (inclusive), checked at compile time for literals and when the
      plan runs for computed values.
    """

    name: str
    kind: Kind | tuple[Kind, ...]
    default: Any = _MISSING
    doc: str = ""
    choices: tuple | None = None
    applied: bool = False
    any_dataset: bool = False
    binds: Kind | None = None
    returns: Kind | None = None
    scope: str = ""
    cache_calls: bool = False
    column_of: str = ""
    integer: bool = False
    low: float | None = None
    high: float | None = None

    def problem(self, value) -> str | None:
        """What is wrong with a number given for this parameter (whole number, bounds), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
            return None
        if value != value or value in (float("inf"), float("-inf")):
            return f"{self.name} must be a finite number, got {value}"
        value = float(value) if isinstance(value, Fraction) and value.denominator != 1 else value
        if self.integer and value != int(value):
            return f"{self.name} must be a whole number, got {format_value(float(value))}"
        if self.low is not None and value < self.low:
            return f"{self.name} must be at least {format_value(self.low)}, got {format_value(value)}"
        if self.high is not None and value > self.high:
            return f"{self.name} must be at most {format_value(self.high)}, got {format_value(value)}"
        return None

    def bounds(self) -> str:
        """The whole-number and range rule in words (``"a whole number, at least 1"``), or ""."""
        parts = ["a whole number"] if self.integer else []
        if self.low is not None and self.high is not None:
            parts.append(f"{format_value(self.low)} to {format_value(self.high)}")
        elif self.low is not None:
            parts.append(f"at least {format_value(self.low)}")
        elif self.high is not None:
            parts.append(f"at most {format_value(self.high)}")
        return ", ".join(parts)

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def signature(self) -> str:
        text = f"{self.name}: {kind_name(self.kind)}"
        if not self.required:
            text += f" = {format_value(self.default)}"
        return text


def format_value(value: Any) -> str:
    """Render a default or parameter value as it would be written in a recipe."""
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Budget):
        return value.canonical()
    if isinstance(value, Ref):
        return value.name
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)



@dataclass
class Selection:
    """Chosen pool indices in selection order."""

    indices: np.ndarray
    key: str  # identity of this selection (pool fingerprint + indices)
    content_key: str  # identity of the selected records' contents only

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Grouping:
    """A partition of ``subset`` (sorted pool indices) into groups ``labels``."""

    subset: np.ndarray
    labels: np.ndarray
    key: str

    def groups(self):
        """(label, member indices) for every non-empty group, by label."""
        order = np.argsort(self.labels, kind="stable")
        labels = self.labels[order]
        members = self.subset[order]
        bounds = np.flatnonzero(np.diff(labels)) + 1
        for chunk_labels, chunk in zip(np.split(labels, bounds), np.split(members, bounds)):
            if len(chunk):
                yield int(chunk_labels[0]), chunk


def text_hash(value: Any) -> bytes:
    """The 16-byte identity of a per-record text value, for ``==``, ``!=`` and ``in`` against strings.

    Ops whose values are also text (``field``) store it as a ``text_hash``
    column (zeros where the record has no value); the engine hashes the
    recipe's string the same way.  Strings hash as themselves, other JSON
    values as their compact JSON text.
    """
    import hashlib
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                                                           sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


NO_TEXT = bytes(16)


@dataclass
class Work:
    """What an op will do for some records, before it runs (``datasel compile --pool``).

    ``tokens`` go forward through a model, ``backward_tokens`` also backward
    (training); ``steps`` are optimizer steps; ``seconds`` is a rough time from
    a rate measured once on this machine (None when no rate is known).
    """

    records: int = 0
    tokens: int = 0
    backward_tokens: int = 0
    steps: int = 0
    generated_tokens: int = 0
    seconds: float | None = None
    note: str = ""

    def scaled(self, factor: float) -> "Work":
        """This work for ``factor`` times as many records (an upper bound taken from a superset)."""
        def s(x):
            return int(round(x * factor))
        return Work(s(self.records), s(self.tokens), s(self.backward_tokens), s(self.steps),
                    s(self.generated_tokens), None if self.seconds is None else self.seconds * factor, self.note)


@dataclass
class Verdict:
    """How a selector treated each record of its input: the funnel's and ``datasel why``'s raw material.

    ``case[i]`` indexes ``notes``: one ``(kept, reason, text)`` triple per kind
    of outcome, where ``reason`` is the short category the funnel counts
    ("below the cut-off") and ``text`` a template formatted per record with
    the values of that row (``"{scores} = {score:.4g}, rank {rank} of {n}"``).
    ``values`` holds arrays aligned with the input rows; a value named
    ``record`` holds pool indices, shown as the record's file position.
    Built by an op's ``explain`` hook after the run (from cached values, so
    a cached rerun explains the same way) or from ``ctx.exclude`` calls.
    """

    notes: list[tuple[bool, str, str]]
    case: np.ndarray
    values: dict[str, Any]

    def text(self, row: int, render_record=None) -> str:
        """The note of input row ``row`` with its values filled in."""
        _, _, template = self.notes[int(self.case[row])]
        fields = {}
        for name, column in self.values.items():
            value = column if np.ndim(column) == 0 and not isinstance(column, (list, tuple)) else column[row]
            if name == "record" and render_record is not None and value is not None:
                value = render_record(int(value))
            elif isinstance(value, np.generic):
                value = value.item()
            fields[name] = value
        try:
            return template.format(**fields)
        except (KeyError, ValueError, TypeError, IndexError):
            return template




# --------------------------------------------------------------------- the declaration
class Role(str, enum.Enum):
    """How the engine evaluates an op (see docs/architecture.md, "Operators").

    ``MAP``: one output per record of a dataset, ``setup`` once per worker then a
    pure ``compute(state, batch)``, cached per record.  ``SCORES``: a cheap
    per-record transform, recomputed.  ``SELECTOR`` / ``PARTITION``: a function of
    the records that reach it, cached whole.  ``SET_SCORES``: per-record Scores
    that depend on which records are scored together, cached whole.
    ``VALUE``: anything else (a model, a number), computed once per run.
    ``MACRO``: an expression over other ops.  ``DATASET``, ``CONST``,
    ``VARIABLE``: the leaves of a plan (a dataset from the command line, a
    literal, a variable bound while the plan runs).
    """

    MAP = "map"
    SCORES = "scores"
    SELECTOR = "selector"
    PARTITION = "partition"
    SET_SCORES = "set_scores"
    VALUE = "value"
    MACRO = "macro"
    DATASET = "dataset"
    CONST = "const"
    VARIABLE = "variable"

    def __str__(self) -> str:
        return self.value


#: Roles whose result is a function of a subset of the pool (evaluated on what reaches them).
SET_ROLES = frozenset({Role.SELECTOR, Role.PARTITION, Role.SET_SCORES})


@dataclass(frozen=True)
class Column:
    """One output of a per-record op: a fixed-shape array per record, or ``ragged`` (a list per record)."""

    name: str
    ragged: bool = False
    doc: str = ""

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Resources:
    """What one worker of an op needs: CPUs, GPUs (a fraction shares one) and a memory hint.

    The Ray executor reserves these per actor; the local executor runs in-process.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None


@dataclass
class Batch:
    """What a map op's ``compute`` receives: records of one dataset and their resolved per-record inputs.

    ``rows`` are indices into the mapped dataset (for messages only: compute
    must not depend on them), ``records`` the normalised records, ``raw`` the
    records as read, ``inputs`` the values of the op's per-record parameters
    for these rows (e.g. features computed upstream).
    """

    rows: np.ndarray
    records: list[dict]
    raw: list[dict]
    inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class OpSpec:
    """The declaration of one operator: everything the rest of datasel knows about it."""

    name: str
    params: tuple[Param, ...]
    result: Kind
    role: Role
    version: str
    doc: str
    fn: Callable[..., Any]
    family: str = ""
    costly: bool = False
    chunk_rows: int = 4096
    #: the smallest batch worth a call: for ops with a large fixed cost per call (drawing a
    #: projection matrix), so that sizing batches by time does not shrink them to single rows
    min_batch_rows: int = 1
    columns: tuple[Column, ...] = (Column("value"),)
    setup: Callable[..., Any] | None = None
    resources: Resources = Resources()
    maps_over: str | None = None  # a map op's dataset parameter ("data")
    key_fn: Callable[..., str] | None = None
    expand: Callable[..., Any] | None = None
    explain: Callable[..., Any] | None = None
    why_missing: Callable[..., list] | None = None
    cost: Callable[..., Any] | None = None
    partition_budget: Callable[..., bool] | None = None
    label: Callable[..., str] | None = None
    syntax: tuple[str, ...] = ()
    filters_rows: bool = False  # keeps each record by its own values alone (a dry run decides cached rows)
    fingerprint: str = ""

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def function_param(self) -> Param | None:
        """The parameter that takes a function and binds a variable, if any (``iterate``'s ``step``)."""
        return next((p for p in self.params if p.binds is not None), None)

    @property
    def code_version(self) -> str:
        """The declared version with the fingerprint of the op's code: part of every cache key."""
        return f"{self.version}+{self.fingerprint[:12]}" if self.fingerprint else self.version

    def shares_budget(self, args: dict) -> bool:
        """Whether percentage budgets directly under a partition are shared out over the groups."""
        return True if self.partition_budget is None else bool(self.partition_budget(**args))

    def signature(self) -> str:
        return f"{self.name}({', '.join(p.signature() for p in self.params)}) -> {self.result}"

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    @property
    def all_optional(self) -> bool:
        return all(not p.required for p in self.params)


# ----------------------------------------------------------- macro expressions
@dataclass(frozen=True)
class MacroCall:
    """A call in the expression a macro stands for."""

    func: str
    args: tuple
    kwargs: tuple


@dataclass(frozen=True)
class MacroArg:
    """Stands for the macro call's own argument ``name`` (its expression, or the parameter's default)."""

    name: str


@dataclass(frozen=True)
class MacroOp:
    """A binary operator (``-``, ``+`` ...) in the expression a macro stands for."""

    symbol: str
    left: Any
    right: Any


class E:
    """Builds the expression a macro returns: ``E.call("ratio", E.call("loss", E.arg("model")), ...)``.

    Plain Python values (strings, numbers, booleans, None) are literals.
    """

    @staticmethod
    def call(func: str, *args, **kwargs) -> MacroCall:
        return MacroCall(func, tuple(args), tuple(kwargs.items()))

    @staticmethod
    def arg(name: str) -> MacroArg:
        return MacroArg(name)

    @staticmethod
    def op(symbol: str, left, right) -> MacroOp:
        return MacroOp(symbol, left, right)


class NotLiteral:
    """Passed to a macro for an argument that is not written as a literal."""

    def __repr__(self) -> str:
        return "<expression>"


NOT_LITERAL = NotLiteral()

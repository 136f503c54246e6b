"""The one place every operator is declared.

An operator is declared once, with :func:`op`, next to its implementation.  The
declaration (name, parameters with kinds and defaults, result kind, role,
version, docstring) is read by the checker (argument checking and "did you
mean"), the planner (canonical parameters, node identity), the cache (the
version is part of every cache key), ``datasel ops`` and the generated docs.

Roles say how the engine calls an implementation:

``map``
    One output per record of a dataset, cached per record by content hash and
    evaluated lazily for whatever rows a consumer asks for.
    ``fn(ctx, idx, **args) -> ndarray | dict[str, ndarray]`` (rows aligned with
    ``idx``, indices into the mapped dataset).  Every map op gets an implicit
    ``data=pool`` parameter choosing the dataset it maps over.
``scores``
    A cheap per-row transform of other values (``rank``, ``zscore``, arithmetic),
    recomputed on demand and never cached: ``fn(ctx, idx, **args) -> ndarray``.
    Set-relative transforms (``rank``) are relative to the rows asked for.
``selector``
    A function of a subset of the pool returning the chosen pool indices in
    selection order: ``fn(ctx, subset, **args) -> int64 ndarray``.
``partition``
    A grouping of a subset: ``fn(ctx, subset, **args) -> int64 labels`` aligned
    with ``subset``.
``value``
    Anything else computed once per run (a model, a number, a checkpoint
    series): ``fn(ctx, **args) -> object``.
"""

from __future__ import annotations

import enum
import inspect
import textwrap
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable


class Kind(enum.Enum):
    """The shapes of values in the language (docs/language.md, "Kinds of values")."""

    DATASET = "Dataset"
    MODEL = "Model"
    FEATURES = "Features"
    SCORES = "Scores"
    LABELS = "Labels"
    PARTITION = "Partition"
    SELECTOR = "Selector"
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
    """One declared parameter of an operator."""

    name: str
    kind: Kind | tuple[Kind, ...]
    default: Any = _MISSING
    doc: str = ""
    choices: tuple | None = None

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
class OpSpec:
    """The declaration of one operator; see the module docstring for roles."""

    name: str
    params: tuple[Param, ...]
    result: Kind
    role: str
    version: str
    doc: str
    fn: Callable[..., Any]
    family: str = ""
    costly: bool = False
    chunk_rows: int = 4096
    columns: tuple[str, ...] = ("value",)
    key_fn: Callable[..., str] | None = None
    expand: Callable[..., str] | None = None
    explain: Callable[..., Any] | None = None
    why_missing: Callable[..., list] | None = None
    cost: Callable[..., Any] | None = None
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def signature(self) -> str:
        return f"{self.name}({', '.join(p.signature() for p in self.params)}) -> {self.result}"

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    @property
    def all_optional(self) -> bool:
        return all(not p.required for p in self.params)


ROLES = ("map", "scores", "selector", "partition", "value", "macro")

_REGISTRY: dict[str, OpSpec] = {}


def op(
    name: str,
    params: Iterable[Param],
    result: Kind,
    *,
    role: str,
    version: str,
    family: str = "",
    costly: bool = False,
    chunk_rows: int = 4096,
    columns: tuple[str, ...] = ("value",),
    key_fn: Callable[..., str] | None = None,
    explain: Callable[..., Any] | None = None,
    why_missing: Callable[..., list] | None = None,
    cost: Callable[..., Any] | None = None,
    **extra: Any,
) -> Callable[[Callable], Callable]:
    """Declare the decorated function as the implementation of operator ``name``.

    ``version`` must change whenever the op's results change: it is part of
    every cache key.  ``costly`` ops have their results cached even when they
    run once per group or per iteration round.  Map ops may return several
    named ``columns`` per record.  ``key_fn(**params) -> str``, called with
    the op's literal parameter values, adds a string to the op's run-time
    cache key, for any role: a model's content fingerprint, or the digest of
    the template an op renders (so editing the template's text invalidates
    the results).

    Accounting hooks (both optional, both run after the op from cached values):
    ``explain(ctx, subset, kept, **args) -> Verdict`` says, for a selector,
    why each input record was kept or dropped (default: "not picked");
    ``why_missing`` says why a per-record value is NaN — for a map op
    ``why_missing(ctx, idx, columns, **args)`` with the stored ``columns`` of
    those rows, for a scores transform ``why_missing(ctx, idx, **args)``.

    ``cost(ctx, idx, **args) -> Work`` estimates, before anything runs, the
    model work of computing rows ``idx`` (a map op) or of the op itself (a
    value op such as ``finetune``, called with ``idx=None``): records, tokens,
    steps and a rough time (``datasel compile --pool``).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} for op {name}")
    params = tuple(params)
    if role == "map" and not any(p.name == "data" for p in params):
        params = params + (Param("data", Kind.DATASET, "pool", "the dataset to compute this for"),)

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        doc = textwrap.dedent(inspect.getdoc(fn) or "").strip()
        _REGISTRY[name] = OpSpec(
            name=name,
            params=params,
            result=result,
            role=role,
            version=version,
            doc=doc,
            fn=fn,
            family=family or fn.__module__.rsplit(".", 1)[-1],
            costly=costly,
            chunk_rows=chunk_rows,
            columns=columns,
            key_fn=key_fn,
            explain=explain,
            why_missing=why_missing,
            cost=cost,
            extra=extra,
        )
        return fn

    return register


def registry() -> dict[str, OpSpec]:
    """All declared operators by name (importing the op library on first use)."""
    import datasel.ops  # noqa: F401  (importing the package registers every op)

    return _REGISTRY


def get(name: str) -> OpSpec | None:
    """The declaration of op ``name``, or None."""
    return registry().get(name)


def macro(name: str, params: Iterable[Param], result: Kind, *, version: str, family: str = "") -> Callable:
    """Declare an operator defined by an expression over other operators.

    The decorated function receives the call's literal arguments (defaults
    filled in) and returns recipe text in which ``{param}`` stands for that
    argument's expression.  The planner plans the expansion, so the pieces
    are shared with every other use: ``ifd(model)`` and ``loss(model,
    given="none")`` in one recipe compute the direct pass once.
    """
    params = tuple(params)

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        doc = textwrap.dedent(inspect.getdoc(fn) or "").strip()
        _REGISTRY[name] = OpSpec(name=name, params=params, result=result, role="macro", version=version,
                                 doc=doc, fn=fn, family=family or fn.__module__.rsplit(".", 1)[-1], expand=fn)
        return fn

    return register

"""The one place every operator is declared.

An operator is declared once, with :func:`op` (or :func:`macro`), next to its
implementation.  The declaration (:class:`~datasel.ops.contract.OpSpec`:
parameters, result kind, role, output columns, resources, hooks, version) is
read by the checker, the planner, the engine, the cache keys, ``datasel ops``
and the generated docs; nothing else in datasel knows an operator by name.

Roles (:class:`~datasel.ops.contract.Role`) say how the engine calls an implementation:

``map``
    One output per record of a dataset (the op's ``maps_over`` parameter,
    ``data=pool`` unless given), cached per record by content hash and
    evaluated lazily for whatever rows a consumer asks for.  ``setup(args,
    resources) -> state`` runs once per worker (load a model, a tokenizer); the
    decorated ``compute(state, batch) -> ndarray | dict[str, ndarray]`` is pure:
    rows aligned with ``batch.records``, one array per declared column.
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
``set_scores``
    Per-record Scores of a subset that depend on which records are scored
    together: ``fn(ctx, subset, **args) -> float ndarray`` aligned with
    ``subset``, cached whole.
``value``
    Anything else computed once per run (a model, a number, a checkpoint
    series): ``fn(ctx, **args) -> object``.
``dataset``, ``const``, ``variable``
    The leaves of a plan (see :mod:`datasel.ops.builtins`).
``macro``
    An expression over other operators (``ifd`` is a ratio of two ``loss`` passes).

A function argument (``iterate``'s ``step``, ``per_group``'s body) arrives as a
callable: calling it with a selection evaluates the bound expression with the
variable bound to that selection.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import re
import textwrap
from typing import Any, Callable, Iterable

# The language's types live in the contract; they are re-exported here for op modules.
from datasel.ops.contract import (  # noqa: F401
    NO_TEXT,
    PER_RECORD,
    SET_FUNCTIONS,
    SET_ROLES,
    Batch,
    Budget,
    BudgetBound,
    Column,
    Grouping,
    Kind,
    OpSpec,
    Param,
    Ref,
    Resources,
    Role,
    Selection,
    Verdict,
    Work,
    accepts,
    format_value,
    kind_name,
    text_hash,
)

ROLES = tuple(r.value for r in Role)

_REGISTRY: dict[str, OpSpec] = {}
_PLANNED: dict[str, str] = {}


def _columns(columns) -> tuple[Column, ...]:
    return tuple(c if isinstance(c, Column) else Column(str(c)) for c in columns)


def op(
    name: str,
    params: Iterable[Param],
    result: Kind,
    *,
    role: Role | str,
    version: str,
    family: str = "",
    costly: bool = False,
    chunk_rows: int = 4096,
    min_batch_rows: int = 1,
    columns: Iterable[Column | str] = ("value",),
    setup: Callable[..., Any] | None = None,
    resources: Resources = Resources(),
    key_fn: Callable[..., str] | None = None,
    explain: Callable[..., Any] | None = None,
    why_missing: Callable[..., list] | None = None,
    cost: Callable[..., Any] | None = None,
    partition_budget: Callable[..., bool] | None = None,
    label: Callable[..., str] | None = None,
    syntax: tuple[str, ...] = (),
    filters_rows: bool = False,
) -> Callable[[Callable], Callable]:
    """Declare the decorated function as the implementation of operator ``name``.

    ``version`` must change whenever the op's results change: it is part of
    every cache key, together with a fingerprint of the op's code (the
    decorated function, ``setup``, ``key_fn`` and the algorithm modules they
    name), so an edit to the code cannot silently reuse stale results.
    ``costly`` ops have their results cached even when they run once per group
    or per iteration round.  Map ops may return several ``columns`` per record
    (``Column(name, ragged=True)`` for a list per record); ``resources`` says
    what one worker needs.  ``key_fn(**params) -> str``, called with the op's
    literal parameter values, adds a string to the op's run-time cache key, for
    any role: a model's content fingerprint, or the digest of the template an
    op renders.  ``partition_budget(**args) -> bool`` says whether percentage
    budgets directly under a partition are shared out over the groups (the
    default) or applied by the op itself.

    Hooks that run after (or before) the op, from cached values:
    ``explain(ctx, subset, kept, **args) -> Verdict`` says, for a selector,
    why each input record was kept or dropped (default: "not picked");
    ``why_missing`` says why a per-record value is NaN — for a map op
    ``why_missing(ctx, idx, columns, **args)`` with the stored ``columns`` of
    those rows, for a scores transform ``why_missing(ctx, idx, **args)``;
    ``cost(ctx, idx, **args) -> Work`` estimates, before anything runs, the
    model work of computing rows ``idx`` (a map op) or of the op itself (a
    value op such as ``finetune``, called with ``idx=None``).
    """
    role = Role(role)
    params = tuple(params)
    maps_over = None
    if role is Role.MAP:
        maps_over = "data"
        if not any(p.name == "data" for p in params):
            params = params + (Param("data", Kind.DATASET, "pool", "the dataset to compute this for"),)

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        doc = textwrap.dedent(inspect.getdoc(fn) or "").strip()
        _REGISTRY[name] = OpSpec(
            name=name, params=params, result=result, role=role, version=version, doc=doc, fn=fn,
            family=family or (fn.__module__ or "ops").rsplit(".", 1)[-1], costly=costly, chunk_rows=chunk_rows,
            min_batch_rows=min_batch_rows,
            columns=_columns(columns), setup=setup, resources=resources, maps_over=maps_over, key_fn=key_fn,
            explain=explain, why_missing=why_missing, cost=cost, partition_budget=partition_budget, label=label,
            syntax=tuple(syntax), filters_rows=filters_rows, fingerprint=code_fingerprint(fn, setup, key_fn),
        )
        return fn

    return register


def macro(name: str, params: Iterable[Param], result: Kind, *, version: str, family: str = "") -> Callable:
    """Declare an operator defined by an expression over other operators.

    The decorated function receives the call's literal arguments (defaults
    filled in; a non-literal argument as :data:`NOT_LITERAL`) and returns the
    expression it stands for, built with :mod:`datasel.ops.expr`
    (``E.call("ratio", ...)``), where ``E.arg("model")`` stands for the
    argument's own expression.  The macro pass expands it before checking, so
    the pieces are shared with every other use: ``ifd(model)`` and
    ``loss(model, given="none")`` in one recipe compute the direct pass once.
    """
    params = tuple(params)

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        doc = textwrap.dedent(inspect.getdoc(fn) or "").strip()
        _REGISTRY[name] = OpSpec(name=name, params=params, result=result, role=Role.MACRO, version=version,
                                 doc=doc, fn=fn, family=family or fn.__module__.rsplit(".", 1)[-1], expand=fn,
                                 fingerprint=code_fingerprint(fn))
        return fn

    return register


def planned(name: str, arrives_with: str) -> None:
    """Declare a name that later work will add: using it gives "not available yet: it arrives with ..."."""
    _PLANNED[name] = arrives_with


def registry() -> dict[str, OpSpec]:
    """All declared operators by name (importing the op library on first use)."""
    import datasel.ops  # noqa: F401  (importing the package registers every op)

    return _REGISTRY


def get(name: str) -> OpSpec | None:
    """The declaration of op ``name``, or None."""
    return registry().get(name)


def planned_names() -> dict[str, str]:
    """Names of operators still to come, and what brings them."""
    registry()
    return dict(_PLANNED)


def for_syntax(symbol: str) -> list[OpSpec]:
    """The built-in operators a piece of the language's syntax means (``"&"``, ``"<"``, ``"|group"``)."""
    return [spec for spec in registry().values() if symbol in spec.syntax]


# ------------------------------------------------------------------ code fingerprints
_ALGOS = "datasel.ops.algos"


def code_fingerprint(*functions: Callable | None) -> str:
    """A digest of the code of ``functions`` and of the algorithm modules (``datasel.ops.algos.X``) they name.

    Docstrings and comments do not count, so documenting an op keeps its cache;
    any other edit, there or in an algorithm it calls, gives new cache keys.
    """
    h = hashlib.blake2b(digest_size=16)
    for fn in functions:
        if fn is None:
            continue
        source = _function_source(fn)
        h.update(source.encode("utf-8"))
        for module in sorted(_algorithm_modules(source, fn)):
            h.update(module.encode("utf-8"))
            h.update(_module_source(module).encode("utf-8"))
    return h.hexdigest()


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _normalised(source: str) -> str:
    try:
        return ast.unparse(_strip_docstrings(ast.parse(textwrap.dedent(source))))
    except SyntaxError:  # pragma: no cover - a lambda inside a call, say
        return source


def _function_source(fn: Callable) -> str:
    fn = inspect.unwrap(fn)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # built-in or generated: fall back to its name
        return getattr(fn, "__qualname__", repr(fn))
    if getattr(fn, "__name__", "") == "<lambda>":
        return " ".join(source.split())
    return _normalised(source)


@functools.lru_cache(maxsize=None)
def _algos_names() -> tuple[str, ...]:
    import pkgutil

    package = importlib.import_module(_ALGOS)
    return tuple(m.name for m in pkgutil.iter_modules(package.__path__))


def _algorithm_modules(source: str, fn: Callable) -> set[str]:
    """Algorithm modules a function uses: ``algos import X``, ``algos.X``, or module-level aliases (``T``)."""
    found = set()
    names = _algos_names()
    for name in names:
        if re.search(rf"\balgos(\.| import (\w+, )*){name}\b", source):
            found.add(f"{_ALGOS}.{name}")
    module_globals = getattr(inspect.unwrap(fn), "__globals__", {})
    for alias, value in module_globals.items():
        mod = getattr(value, "__name__", "")
        if inspect.ismodule(value) and mod.startswith(_ALGOS + ".") and re.search(rf"\b{re.escape(alias)}\.", source):
            found.add(mod)
    return found


@functools.lru_cache(maxsize=None)
def _module_source(module: str) -> str:
    try:
        return _normalised(inspect.getsource(importlib.import_module(module)))
    except (OSError, TypeError, ImportError):  # pragma: no cover
        return module

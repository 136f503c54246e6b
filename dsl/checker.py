"""Name resolution and kind checking.

The checker merges the scopes (prelude < recipe < ``--set``), resolves every
name, checks every call against its operator's declaration and every operator
against the kinds of its operands, and reports all errors of a recipe at once.
It records what it learned (the kind of every expression, what every name and
call resolves to) for the planner.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Any

from datasel.dsl import ast
from datasel.dsl.depth import nesting_errors
from datasel.dsl.diagnostics import Diagnostic, RecipeError, Source, Span
from datasel.ops import registry as reg
from datasel.ops.contract import SET_ROLES, Budget, Kind, OpSpec, Param, Role, accepts, kind_name

DATASETS = ("pool", "val")

@dataclass(frozen=True)
class Type:
    """The kind of an expression, and for per-record kinds the dataset it covers."""

    kind: Kind
    dataset: str | None = None

    def describe(self) -> str:
        if self.dataset and self.dataset != "pool" and self.kind in reg.PER_RECORD:
            return f"{self.kind} of {self.dataset}"
        return str(self.kind)


ANY = Type(Kind.ANY)


@dataclass
class CallInfo:
    """A checked call: the operator and its arguments by parameter name."""

    spec: OpSpec
    args: dict[str, ast.Expr]  # only those written in the recipe
    lambda_param: str | None = None


@dataclass
class Checked:
    """The result of checking: everything the planner needs."""

    select: ast.Expr
    bindings: dict[str, ast.Binding]
    types: dict[int, Type] = field(default_factory=dict)
    calls: dict[int, CallInfo] = field(default_factory=dict)
    implicit_calls: dict[int, OpSpec] = field(default_factory=dict)  # bare op names
    implicit_args: dict[int, dict] = field(default_factory=dict)  # their synthesized arguments
    sources: list[Source] = field(default_factory=list)

    def type_of(self, expr: ast.Expr) -> Type:
        return self.types.get(id(expr), ANY)


RESERVED = ("select", "true", "false", "none", "of", "not", "in")


def _declares(declared: Kind | tuple[Kind, ...], kind: Kind) -> bool:
    """Whether ``declared`` names ``kind`` itself (no coercions)."""
    return kind in declared if isinstance(declared, tuple) else declared is kind


def _suggest(name: str, candidates) -> str:
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _snippet(expr: ast.Expr, limit: int = 40) -> str:
    text = " ".join(expr.span.text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Checker:
    """Checks one merged program; use :func:`check`."""

    def __init__(self, bindings: dict[str, ast.Binding], broken: set[str]):
        self.bindings = bindings
        self.broken = broken
        self.errors: list[Diagnostic] = []
        self.ops = reg.registry()
        self.binding_types: dict[str, Type] = {}
        self.in_progress: list[str] = []
        self.result_types: dict[int, Type] = {}
        self.calls: dict[int, CallInfo] = {}
        self.implicit: dict[int, OpSpec] = {}
        self.implicit_args: dict[int, dict] = {}

    # ------------------------------------------------------------ utilities
    def error(self, message: str, span: Span | None, notes=()) -> None:
        self.errors.append(Diagnostic(message, span, notes=list(notes)))

    def record(self, expr: ast.Expr, t: Type) -> Type:
        self.result_types[id(expr)] = t
        return t

    def visible_names(self, scope: dict[str, Type]) -> list[str]:
        names = list(self.bindings) + list(scope) + list(DATASETS)
        names += [n for n, s in self.ops.items() if s.all_optional]
        return names

    # ------------------------------------------------------------ bindings
    def binding_type(self, name: str, use_span: Span | None) -> Type:
        if name in self.binding_types:
            return self.binding_types[name]
        if name in self.in_progress:
            cycle = self.in_progress[self.in_progress.index(name):] + [name]
            b = self.bindings[name]
            self.error(f"cycle in bindings: {' -> '.join(cycle)}", b.span)
            return ANY
        binding = self.bindings[name]
        self.in_progress.append(name)
        try:
            t = self.expr(binding.expr, {})
        finally:
            self.in_progress.pop()
        self.binding_types[name] = t
        return t

    # --------------------------------------------------------- expressions
    def expr(self, e: ast.Expr, scope: dict[str, Type]) -> Type:
        method = getattr(self, "expr_" + type(e).__name__)
        return self.record(e, method(e, scope))

    def expr_Number(self, e: ast.Number, scope) -> Type:
        return Type(Kind.NUMBER)

    def expr_Percent(self, e: ast.Percent, scope) -> Type:
        if e.fraction < 0 or e.fraction > 1:
            self.error(f"a percentage must be between 0% and 100%, got {_snippet(e)}", e.span)
        return Type(Kind.BUDGET)

    def expr_String(self, e, scope) -> Type:
        return Type(Kind.STRING)

    def expr_Bool(self, e, scope) -> Type:
        return Type(Kind.BOOL)

    def expr_NoneLit(self, e, scope) -> Type:
        return Type(Kind.NONE)

    def expr_ListLit(self, e: ast.ListLit, scope) -> Type:
        for item in e.items:
            self.expr(item, scope)
        return Type(Kind.LIST)

    def expr_Lambda(self, e: ast.Lambda, scope) -> Type:
        self.error("a function (name -> expression) is only allowed as an argument of an operator that takes one, such as iterate", e.span)
        return ANY

    def expr_Name(self, e: ast.Name, scope) -> Type:
        name = e.id
        if name in scope:
            return scope[name]
        if name in DATASETS:
            return Type(Kind.DATASET)
        if name in self.bindings:
            return self.binding_type(name, e.span)
        if name in self.broken:
            return ANY  # its statement already has a syntax error
        spec = self.ops.get(name)
        if spec is not None:
            if not spec.all_optional:
                required = ", ".join(p.name for p in spec.params if p.required)
                self.error(f"'{name}' is an operator that needs arguments ({required}); write {name}(...)", e.span)
                return ANY
            self.implicit[id(e)] = spec
            args = self.default_refs(spec, {}, e.span)
            self.implicit_args[id(e)] = args
            return self.call_result(spec, args, e, scope)
        planned = reg.planned_names()
        if name in planned:
            self.error(f"'{name}' is not available yet: it arrives with {planned[name]}", e.span)
            return ANY
        self.error(f"unknown name '{name}'{_suggest(name, self.visible_names(scope))}", e.span)
        return ANY

    def expr_Neg(self, e: ast.Neg, scope) -> Type:
        t = self.expr(e.operand, scope)
        if t.kind not in (Kind.NUMBER, Kind.SCORES, Kind.ANY):
            hint = ""
            if t.kind is Kind.SELECTOR:
                hint = f"; for the records a selector leaves out write not {_snippet(e.operand)}"
            self.error(f"'-' negates Scores or numbers, got {t.describe()} ({_snippet(e.operand)}){hint}", e.span)
            return ANY
        return t

    def expr_Not(self, e: ast.Not, scope) -> Type:
        t = self._pool_as_selector(e.operand, self.expr(e.operand, scope), scope)
        if t.kind in (Kind.SELECTOR, Kind.ANY):
            return Type(Kind.SELECTOR)
        hint = ""
        if t.kind is Kind.SCORES:
            hint = f"; to drop records by a score compare it, e.g. not {_snippet(e.operand)} > 0"
        self.error(f"'not' takes a Selector (it keeps the records the selector leaves out), got {t.describe()} "
                   f"({_snippet(e.operand)}){hint}", e.span)
        return ANY

    def expr_BinOp(self, e: ast.BinOp, scope) -> Type:
        left = self.expr(e.left, scope)
        right = self.expr(e.right, scope)
        if e.op in ("|", "&", "+", "-"):
            # `pool` reads as "every record" in set algebra: pool - cur, pool | topk(...).
            left = self._pool_as_selector(e.left, left, scope)
            right = self._pool_as_selector(e.right, right, scope)
        if Kind.ANY in (left.kind, right.kind):
            return self._binop_unknown(e, left, right)
        op = e.op
        if op == "|":
            return self._pipe(e, left, right)
        if op == "&":
            if left.kind is Kind.SELECTOR and right.kind is Kind.SELECTOR:
                return Type(Kind.SELECTOR)
            self._operands_error(e, left, right, "'&' intersects two selections (Selector & Selector)")
            return ANY
        if op in ("in", "not in") or Kind.STRING in (left.kind, right.kind):
            return self._text_or_member(e, left, right)
        if op in ast.COMPARISONS:
            numeric = (Kind.NUMBER, Kind.SCORES)
            if left.kind in numeric and right.kind in numeric and Kind.SCORES in (left.kind, right.kind):
                self._same_dataset(e, left, right)
                if (left.dataset or right.dataset or "pool") != "pool":
                    self.error(f"comparisons select records of the pool; these Scores cover {left.dataset or right.dataset}", e.span)
                return Type(Kind.SELECTOR)
            if left.kind is Kind.NUMBER and right.kind is Kind.NUMBER:
                self.error("comparing two numbers selects nothing; one side must be Scores", e.op_span)
                return ANY
            self._operands_error(e, left, right, f"'{op}' compares Scores with Scores or numbers, giving a Selector")
            return ANY
        if op in "+-":
            if left.kind is Kind.SELECTOR and right.kind is Kind.SELECTOR:
                return Type(Kind.SELECTOR)
            if left.kind in (Kind.NUMBER, Kind.SCORES) and right.kind in (Kind.NUMBER, Kind.SCORES):
                return self._arith_result(e, left, right)
            what = {"+": "the union", "-": "the difference"}[op]
            self._operands_error(e, left, right, f"'{op}' is {what} of two Selectors or arithmetic on Scores and numbers")
            return ANY
        if op in "*/":
            if op == "/" and exact_number(e.right) == 0:
                self.error(f"division by zero: {_snippet(e)}", e.op_span)
                return ANY
            if left.kind in (Kind.NUMBER, Kind.SCORES) and right.kind in (Kind.NUMBER, Kind.SCORES):
                return self._arith_result(e, left, right)
            self._operands_error(e, left, right, f"'{op}' is arithmetic on Scores and numbers")
            return ANY
        raise AssertionError(op)

    def _text_or_member(self, e: ast.BinOp, left: Type, right: Type) -> Type:
        """``s == "a"``, ``s != "a"``, ``s in [..]``, ``s not in [..]``: Scores against literals."""
        op = e.op
        scores, scores_expr, other, other_expr = left, e.left, right, e.right
        if op not in ("in", "not in") and right.kind is Kind.SCORES:
            scores, scores_expr, other, other_expr = right, e.right, left, e.left
        if scores.kind is not Kind.SCORES:
            self._operands_error(e, left, right, f"'{op}' compares Scores with a value, giving a Selector")
            return ANY
        if op in ("in", "not in"):
            ok, items = literal_value(other_expr)
            if not isinstance(other_expr, ast.ListLit) or not ok or not all(
                    isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in items):
                self.error(f"'{op}' needs a list of strings or numbers written out, e.g. "
                           f'{_snippet(scores_expr)} {op} ["a", "b"]; got {other.describe()} ({_snippet(other_expr)})',
                           other_expr.span)
                return ANY
            texts = any(isinstance(i, str) for i in items)
        else:
            if op not in ("==", "!="):
                self.error(f"'{op}' compares numbers; a string can only be compared with == or != "
                           f"(or 'in' a list)", e.op_span)
                return ANY
            texts = True
        if texts and not self._has_text(scores_expr):
            self.error(f"{_snippet(scores_expr)} is numeric: comparing it with a string needs per-record text, "
                       f'such as field("category") == "open_qa"', scores_expr.span)
            return ANY
        if (scores.dataset or "pool") != "pool":
            self.error(f"comparisons select records of the pool; these Scores cover {scores.dataset}", e.span)
        return Type(Kind.SELECTOR)

    def _has_text(self, expr: ast.Expr) -> bool:
        """Whether ``expr`` is an op that also gives each record's text (declares a ``text_hash`` column)."""
        spec = self._spec_of(expr)
        return spec is not None and "text_hash" in spec.column_names

    def _pool_as_selector(self, expr: ast.Expr, t: Type, scope) -> Type:
        if t.kind is Kind.DATASET and isinstance(expr, ast.Name) and expr.id == "pool" and "pool" not in scope:
            return self.record(expr, Type(Kind.SELECTOR))
        return t

    def _binop_unknown(self, e: ast.BinOp, left: Type, right: Type) -> Type:
        known = left if right.kind is Kind.ANY else right
        if e.op in ast.COMPARISONS or e.op == "&":
            return Type(Kind.SELECTOR)
        if e.op == "|":
            return Type(Kind.SELECTOR) if right.kind is Kind.ANY else (
                Type(Kind.SELECTOR) if right.kind is Kind.SELECTOR else right
            )
        return known if known.kind is not Kind.ANY else ANY

    def _same_dataset(self, e: ast.BinOp, left: Type, right: Type) -> None:
        if left.dataset and right.dataset and left.dataset != right.dataset:
            self.error(f"'{e.op}' combines Scores of {left.dataset} with Scores of {right.dataset}", e.op_span)

    def _arith_result(self, e: ast.BinOp, left: Type, right: Type) -> Type:
        if Kind.SCORES in (left.kind, right.kind):
            self._same_dataset(e, left, right)
            return Type(Kind.SCORES, left.dataset or right.dataset)
        return Type(Kind.NUMBER)

    def _operands_error(self, e: ast.BinOp, left: Type, right: Type, rule: str) -> None:
        self.error(
            f"{rule}; got {left.describe()} ({_snippet(e.left)}) and {right.describe()} ({_snippet(e.right)})",
            e.op_span,
        )

    def _pipe(self, e: ast.BinOp, left: Type, right: Type) -> Type:
        if left.kind not in (Kind.SELECTOR, Kind.PARTITION):
            hint = ""
            if left.kind is Kind.SCORES:
                hint = f"; to filter by a score compare it, e.g. {_snippet(e.left)} < 1"
            self.error(
                f"the left side of '|' must be a Selector or a Partition, got {left.describe()} ({_snippet(e.left)}){hint}",
                e.left.span,
            )
            return ANY
        if right.kind not in (Kind.SELECTOR, Kind.PARTITION):
            hint = ""
            if right.kind is Kind.SCORES:
                hint = f"; to keep the best records write topk({_snippet(e.right)}, 10%)"
            self.error(
                f"the right side of '|' must be a Selector or a Partition, got {right.describe()} ({_snippet(e.right)}){hint}",
                e.right.span,
            )
            return ANY
        if left.kind is Kind.PARTITION and right.kind is Kind.PARTITION:
            self.error("a Partition must be followed by a Selector to apply in each group, got another Partition", e.right.span)
            return ANY
        if left.kind is Kind.PARTITION:
            return Type(Kind.SELECTOR)
        return right

    # ----------------------------------------------------------------- calls
    def expr_Call(self, e: ast.Call, scope) -> Type:
        spec = self.ops.get(e.func)
        if spec is None:
            for a in e.args:
                if not isinstance(a, ast.Lambda):
                    self.expr(a, scope)
            for k in e.kwargs:
                self.expr(k.value, scope)
            if e.func in self.bindings or e.func in scope:
                self.error(f"'{e.func}' is a name, not an operator; it cannot be called", e.func_span)
            elif e.func in reg.planned_names():
                self.error(f"operator '{e.func}' is not available yet: it arrives with "
                           f"{reg.planned_names()[e.func]}", e.func_span)
            else:
                self.error(f"unknown operator '{e.func}'{_suggest(e.func, self.ops)}", e.func_span)
            return ANY
        if e.positional_after_keyword is not None:
            self.error(f"{spec.name}: a positional argument cannot follow keyword arguments",
                       e.positional_after_keyword)
        args: dict[str, ast.Expr] = {}
        params = list(spec.params)
        positional = [p for p in params]
        for i, a in enumerate(e.args):
            if i >= len(positional):
                self.error(f"{spec.name} takes at most {len(positional)} arguments, got {len(e.args)}  (signature: {spec.signature()})", a.span)
                break
            args[positional[i].name] = a
        for kw in e.kwargs:
            param = spec.param(kw.name)
            if param is None:
                self.error(f"{spec.name} has no parameter '{kw.name}'{_suggest(kw.name, [p.name for p in params])}", kw.span)
                self.expr(kw.value, scope)
                continue
            if kw.name in args:
                self.error(f"{spec.name}: argument '{kw.name}' given twice", kw.span)
                continue
            args[kw.name] = kw.value
        for p in params:
            if p.required and p.name not in args:
                self.error(f"{spec.name} needs argument '{p.name}' ({kind_name(p.kind)})  (signature: {spec.signature()})", e.span)
        args = self.default_refs(spec, args, e.func_span)
        info = CallInfo(spec, args)
        self.calls[id(e)] = info
        return self.call_result(spec, args, e, scope)

    @staticmethod
    def default_refs(spec: OpSpec, args: dict[str, ast.Expr], span: Span) -> dict[str, ast.Expr]:
        """Fill parameters whose default names a binding (``model``) with that name."""
        out = dict(args)
        for p in spec.params:
            if p.name not in out and isinstance(p.default, reg.Ref):
                out[p.name] = ast.Name(span, p.default.name)
        return out

    def call_result(self, spec: OpSpec, args: dict[str, ast.Expr], e: ast.Expr, scope) -> Type:
        """Check the arguments of a (possibly implicit) call and return its type."""
        per_record_dataset = None
        for position, p in enumerate(spec.params, start=1):
            if p.name not in args:
                continue
            a = args[p.name]
            where = f"argument {position} ({p.name})" if not self._is_keyword(e, p.name) else f"{p.name}="
            if isinstance(a, ast.Lambda):
                if not accepts(p.kind, Kind.FUNCTION):
                    self.error(f"{spec.name} does not take a function for {where}", a.span)
                    continue
                inner = dict(scope)
                inner[a.param] = Type(p.binds or Kind.SELECTOR)
                body = self.expr(a.body, inner)
                want = p.returns or Kind.SELECTOR
                if not accepts(want, body.kind):
                    self.error(f"the function given to {spec.name} must return a {want}, got {body.describe()}", a.body.span)
                self.record(a, Type(Kind.FUNCTION))
                continue
            t = self.expr(a, scope)
            if not accepts(p.kind, t.kind):
                if p.kind is Kind.FUNCTION or (isinstance(p.kind, tuple) and Kind.FUNCTION in p.kind):
                    self.error(f"{spec.name} expects a function (name -> expression) for {where}, got {t.describe()} ({_snippet(a)})", a.span)
                elif t.kind is Kind.NONE and not p.required and p.default is None:
                    pass
                else:
                    self.error(f"{spec.name} expects {kind_name(p.kind)} as {where}, got {t.describe()} ({_snippet(a)})", a.span)
                continue
            self._check_literal(spec, p, a, where)
            if t.kind in reg.PER_RECORD and t.dataset:
                if p.any_dataset:
                    continue  # read whole, e.g. similarity's target=embed(minilm, data=val)
                if spec.role in SET_ROLES and t.dataset != "pool":
                    hint = ""
                    if t.kind is Kind.FEATURES:
                        hint = (f"; to rank pool records by their similarity to {t.dataset}, use "
                                f"similarity(<pool features>, target={_snippet(a)})")
                    self.error(f"{spec.name} selects from the pool but {where} covers {t.dataset} ({_snippet(a)}){hint}", a.span)
                per_record_dataset = per_record_dataset or t.dataset
        self._check_column(spec, args)
        if spec.maps_over is not None:
            data = args.get(spec.maps_over)
            dataset = data.id if isinstance(data, ast.Name) and data.id in DATASETS else "pool"
            return Type(spec.result, dataset)
        if spec.result in reg.PER_RECORD:
            return Type(spec.result, per_record_dataset or "pool")
        return Type(spec.result)

    def _check_column(self, spec: OpSpec, args: dict[str, ast.Expr]) -> None:
        """A parameter naming a column of another op's output (``column(loss(m), "count")``) must name one."""
        for p in spec.params:
            if not p.column_of or p.name not in args or not isinstance(args[p.name], ast.String):
                continue
            source = args.get(p.column_of)
            target = self._spec_of(source) if source is not None else None
            if target is None or target.role is Role.MACRO:
                continue
            wanted = args[p.name].value
            if wanted not in target.column_names:
                names = ", ".join(f'"{c}"' for c in target.column_names)
                self.error(f"{spec.name}: {target.name} has no output column \"{wanted}\" (it has {names})"
                           f"{_suggest(wanted, target.column_names)}", args[p.name].span)

    def _spec_of(self, expr: ast.Expr) -> OpSpec | None:
        """The op an expression is a call of, following names bound to calls."""
        seen = set()
        while isinstance(expr, ast.Name) and expr.id in self.bindings and expr.id not in seen:
            seen.add(expr.id)
            expr = self.bindings[expr.id].expr
        if id(expr) in self.calls:
            return self.calls[id(expr)].spec
        return self.implicit.get(id(expr))

    @staticmethod
    def _is_keyword(e: ast.Expr, name: str) -> bool:
        return isinstance(e, ast.Call) and any(k.name == name for k in e.kwargs)

    def _check_literal(self, spec: OpSpec, p: Param, a: ast.Expr, where: str) -> None:
        exact = exact_number(a)
        if exact is not None and not _declares(p.kind, Kind.BUDGET):
            problem = p.problem(exact)
            if problem:
                self.error(f"{spec.name}: {problem}", a.span)
        if p.choices is not None and isinstance(a, ast.String) and a.value not in p.choices:
            options = ", ".join(f'"{c}"' for c in p.choices)
            self.error(f"{spec.name}: {where} must be one of {options}; got \"{a.value}\"{_suggest(a.value, p.choices)}", a.span)
        if not _declares(p.kind, Kind.BUDGET) or _declares(p.kind, Kind.NUMBER):
            return
        value = exact_number(a)
        if value is not None and value.denominator != 1:
            pct = format(float(value * 100), "g")
            self.error(f"{spec.name}: a budget is a whole count or a percentage; got {_snippet(a)} "
                       f"(for a share write {pct}%)", a.span)
        elif value is not None and value < 0:
            self.error(f"{spec.name}: a budget cannot be negative", a.span)


def merge_scopes(layers: list[tuple[Source, ast.Program]], overrides: dict[str, ast.Expr] | None,
                 errors: list[Diagnostic],
                 overridden: dict[str, ast.Binding] | None = None) -> tuple[dict[str, ast.Binding], set[str]]:
    """Merge bindings: later layers override earlier ones; duplicates within a layer are errors.

    ``--set`` overrides may only replace a binding that exists (a typo must not pass
    silently); the bindings they replace are collected in ``overridden``.
    """
    merged: dict[str, ast.Binding] = {}
    broken: set[str] = set()
    for source, program in layers:
        seen: dict[str, ast.Binding] = {}
        for b in program.bindings:
            if b.name in DATASETS:
                errors.append(Diagnostic(f"'{b.name}' is the built-in dataset and cannot be rebound", b.span))
                continue
            if b.name in RESERVED:
                errors.append(Diagnostic(f"'{b.name}' is a reserved word and cannot be bound", b.span))
                continue
            if b.name in seen:
                errors.append(Diagnostic(f"'{b.name}' is bound twice in {source.name}", b.span,
                                         notes=[("first bound here", seen[b.name].span)]))
                continue
            seen[b.name] = b
            merged[b.name] = b
        broken |= program.broken_names
    for name, expr in (overrides or {}).items():
        if name in DATASETS:
            errors.append(Diagnostic(f"'{name}' is the built-in dataset and cannot be set", expr.span))
            continue
        if name in RESERVED:
            errors.append(Diagnostic(f"'{name}' is a reserved word and cannot be set", expr.span))
            continue
        if name not in merged:
            if name in broken:
                continue  # its statement has a syntax error, reported already
            errors.append(Diagnostic(
                f"the recipe and the prelude bind no name '{name}', so this --set would change nothing"
                f"{_suggest(name, merged)}", expr.span))
            continue
        if overridden is not None:
            overridden[name] = merged[name]
        merged[name] = ast.Binding(name, expr, expr.span, expr.span.source.name)
    return merged, broken


def check(layers: list[tuple[Source, ast.Program]], overrides: dict[str, ast.Expr] | None = None,
          errors: list[Diagnostic] | None = None, *, select: ast.Expr | None = None) -> Checked:
    """Check a recipe (the last layer) over its prelude; raise :class:`RecipeError` on any error.

    ``errors`` are syntax errors found earlier; they are reported together
    with the checker's.  ``select`` replaces the recipe's ``select`` (used by
    ``datasel eval``, which evaluates an expression instead).
    """
    errors = list(errors or [])
    overridden: dict[str, ast.Binding] = {}
    bindings, broken = merge_scopes(layers, overrides, errors, overridden)
    source, program = layers[-1]
    first_select = select if select is not None else (program.selects[0].expr if program.selects else None)
    deep = nesting_errors(bindings, first_select)
    if deep:  # the checker's own recursion would fail on these: report them with what parsing found
        raise RecipeError(_dedupe(errors + deep))
    checker = Checker(bindings, broken)
    _check_overrides(checker, bindings, broken, overridden)
    source, program = layers[-1]
    target = select
    if target is None:
        if not program.selects:
            if not any(d.span is not None and d.span.source.name == source.name for d in errors):
                errors.append(Diagnostic(f"{source.name} has no 'select' statement (a recipe ends with: select <selector>)"))
        else:
            target = program.selects[0].expr
            for extra in program.selects[1:]:
                errors.append(Diagnostic("a recipe has exactly one 'select' statement", extra.span,
                                         notes=[("the first one is here", program.selects[0].span)]))
    for earlier_source, earlier in layers[:-1]:
        for s in earlier.selects:
            errors.append(Diagnostic(f"{earlier_source.name} is a prelude and cannot contain 'select'", s.span))
    # Check every binding, used or not, so that a broken prelude or recipe line is reported.
    for name in list(bindings):
        checker.binding_type(name, None)
    if target is not None:
        t = checker.expr(target, {})
        if select is None and t.kind not in (Kind.SELECTOR, Kind.ANY):
            hint = f"; did you mean topk({_snippet(target)}, 10%)?" if t.kind is Kind.SCORES else ""
            checker.error(f"select needs a Selector, got {t.describe()} ({_snippet(target)}){hint}", target.span)
    errors.extend(checker.errors)
    if errors:
        raise RecipeError(_dedupe(errors))
    # Expand macros (an AST -> AST pass) and check the result again for the planner.
    from datasel.dsl.macros import expand_macros

    macro_of = {k: info.spec for k, info in checker.calls.items() if info.spec.role is Role.MACRO}
    macro_of.update({k: spec for k, spec in checker.implicit.items() if spec.role is Role.MACRO})
    bindings, target, macro_errors = expand_macros(bindings, target, macro_of)
    if macro_errors:
        raise RecipeError(_dedupe(macro_errors))
    final = Checker(bindings, broken)
    for name in list(bindings):
        final.binding_type(name, None)
    if target is not None:
        final.expr(target, {})
    if final.errors:  # what only the expansion can show: column(ifd_loss, "x") names a column of what ifd_loss expands to
        raise RecipeError(_dedupe(final.errors))
    return Checked(
        select=target,
        bindings=bindings,
        types=final.result_types,
        calls=final.calls,
        implicit_calls=final.implicit,
        implicit_args=final.implicit_args,
        sources=[s for s, _ in layers],
    )


def _check_overrides(checker: Checker, bindings: dict[str, ast.Binding], broken: set[str],
                     overridden: dict[str, ast.Binding]) -> None:
    """A ``--set`` value must have the kind of the binding it replaces: one error, at the ``--set`` text.

    The replaced binding then counts as unknown (Any) for its uses, so a wrong
    ``--set model=3`` is not reported again at every operator that uses ``model``.
    """
    for name, original in overridden.items():
        new = checker.binding_type(name, None)
        scratch = Checker(dict(bindings, **{name: original}), broken)
        old = scratch.expr(original.expr, {})
        if Kind.ANY in (old.kind, new.kind) or accepts(old.kind, new.kind) or accepts(new.kind, old.kind):
            continue
        override = bindings[name]
        checker.error(f"'{name}' is a {old.kind} ({_snippet(original.expr)} in "
                      f"{original.span.source.name}), so the new value must be a {old.kind} too; got "
                      f"{new.describe()} ({_snippet(override.expr)})", override.expr.span)
        checker.binding_types[name] = ANY


def _dedupe(errors: list[Diagnostic]) -> list[Diagnostic]:
    seen = set()
    out = []
    for d in errors:
        key = (d.message, d.span.start if d.span else None, d.span.source.name if d.span else None)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def exact_number(expr: ast.Expr) -> Fraction | None:
    """The exact value of a number, or of arithmetic on numbers only (None otherwise, or on a division by zero)."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.Neg):
        inner = exact_number(expr.operand)
        return None if inner is None else -inner
    if isinstance(expr, ast.BinOp) and expr.op in ("+", "-", "*", "/"):
        a, b = exact_number(expr.left), exact_number(expr.right)
        if a is None or b is None or (expr.op == "/" and b == 0):
            return None
        return {"+": a + b, "-": a - b, "*": a * b}[expr.op] if expr.op != "/" else a / b
    return None


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def literal_value(expr: ast.Expr) -> tuple[bool, Any]:
    """``(True, value)`` when ``expr`` is a literal (budgets become :class:`Budget`)."""
    if isinstance(expr, ast.Number):
        return True, expr.python()
    if isinstance(expr, ast.Percent):
        return True, Budget(fraction=expr.fraction, of_pool=expr.of_pool)
    if isinstance(expr, ast.String):
        return True, expr.value
    if isinstance(expr, ast.Bool):
        return True, expr.value
    if isinstance(expr, ast.NoneLit):
        return True, None
    if isinstance(expr, (ast.Neg, ast.BinOp)):
        # Arithmetic on literal numbers is folded at compile time, exactly: topk(length, 2 + 3) keeps 5.
        exact = exact_number(expr)
        if exact is not None:
            return True, _number(exact)
    if isinstance(expr, ast.ListLit):
        values = []
        for item in expr.items:
            ok, v = literal_value(item)
            if not ok:
                return False, None
            values.append(v)
        return True, values
    return False, None

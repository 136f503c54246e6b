"""Macro expansion: an AST -> AST pass between two checks.

A macro operator (``ifd``, ``ppl``, ``lp``, ``uncertainty``) stands for an
expression over other operators; its declaration returns that expression built
with :class:`datasel.ops.contract.E`.  After the recipe has been checked once
(so a macro call's own arguments are checked against the macro's signature,
and errors name the macro, not its pieces), this pass replaces every macro
call by its expression, with the call's arguments in place and the call's
position on every new node; the program is then checked again and planned.
Because the pieces are ordinary calls, ``ifd(model)`` and ``loss(model,
given="none")`` in one recipe share one node after common-subexpression
elimination.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from datasel.dsl import ast
from datasel.dsl.diagnostics import Diagnostic, Span
from datasel.ops import registry as reg
from datasel.ops.contract import NOT_LITERAL, Budget, MacroArg, MacroCall, MacroOp, OpSpec, Ref, Role


def bind_arguments(spec: OpSpec, call: ast.Call) -> dict[str, ast.Expr]:
    """The call's arguments by parameter name (positional in declared order, then keywords).

    For calls the checker has accepted (or that a macro built), so nothing is reported here.
    """
    args: dict[str, ast.Expr] = {}
    for p, a in zip(spec.params, call.args):
        args[p.name] = a
    for kw in call.kwargs:
        args[kw.name] = kw.value
    return args


def literal_ast(value: Any, span: Span) -> ast.Expr:
    """A parameter default as the expression that would write it."""
    if isinstance(value, Ref):
        return ast.Name(span, value.name)
    if value is None:
        return ast.NoneLit(span)
    if isinstance(value, bool):
        return ast.Bool(span, value)
    if isinstance(value, (int, float)):
        return ast.Number(span, Fraction(value))
    if isinstance(value, str):
        return ast.String(span, value)
    if isinstance(value, Budget):
        if value.count is not None:
            return ast.Number(span, Fraction(value.count))
        return ast.Percent(span, value.fraction, value.of_pool)
    if isinstance(value, (list, tuple)):
        return ast.ListLit(span, [literal_ast(v, span) for v in value])
    raise AssertionError(f"cannot write {value!r} as an expression")


def _literal(expr: ast.Expr) -> Any:
    from datasel.dsl.checker import literal_value

    ok, value = literal_value(expr)
    return value if ok else NOT_LITERAL


class _Expander:
    def __init__(self, macro_of: dict[int, OpSpec]):
        self.macro_of = macro_of  # calls and bare names the checker resolved to a macro
        self.errors: list[Diagnostic] = []

    def expr(self, e: ast.Expr) -> ast.Expr:
        """``e`` with every macro call inside it expanded (a new tree where something changed)."""
        spec = self.macro_of.get(id(e))
        if isinstance(e, ast.Call):
            e = ast.Call(e.span, e.func, e.func_span, [self.expr(a) for a in e.args],
                         [ast.Keyword(k.name, self.expr(k.value), k.span) for k in e.kwargs],
                         e.positional_after_keyword)
            if spec is None:
                found = reg.get(e.func)
                spec = found if found is not None and found.role is Role.MACRO else None
            if spec is not None:
                return self.expand(spec, bind_arguments(spec, e), e.span)
            return e
        if isinstance(e, ast.Name):
            return self.expand(spec, {}, e.span) if spec is not None else e
        if isinstance(e, ast.BinOp):
            return ast.BinOp(e.span, e.op, self.expr(e.left), self.expr(e.right), e.op_span)
        if isinstance(e, ast.Neg):
            return ast.Neg(e.span, self.expr(e.operand))
        if isinstance(e, ast.Not):
            return ast.Not(e.span, self.expr(e.operand))
        if isinstance(e, ast.ListLit):
            return ast.ListLit(e.span, [self.expr(i) for i in e.items])
        if isinstance(e, ast.Lambda):
            return ast.Lambda(e.span, e.param, e.param_span, self.expr(e.body))
        return e

    def expand(self, spec: OpSpec, args: dict[str, ast.Expr], span: Span) -> ast.Expr:
        literals = {p.name: (_literal(args[p.name]) if p.name in args else p.default) for p in spec.params}
        try:
            built = spec.expand(**literals)
        except (ValueError, TypeError) as exc:
            self.errors.append(Diagnostic(f"{spec.name}: {exc}", span))
            return ast.Call(span, spec.name, span)
        expr = self.build(built, spec, args, span)
        return self.expr(expr)  # the expansion may use other macros (lp uses ppl)

    def build(self, item: Any, spec: OpSpec, args: dict[str, ast.Expr], span: Span) -> ast.Expr:
        if isinstance(item, MacroArg):
            if item.name in args:
                return args[item.name]
            param = spec.param(item.name)
            if param is None:
                raise AssertionError(f"macro {spec.name} refers to no parameter {item.name!r}")
            return literal_ast(param.default, span)
        if isinstance(item, MacroCall):
            return ast.Call(span, item.func, span, [self.build(a, spec, args, span) for a in item.args],
                            [ast.Keyword(k, self.build(v, spec, args, span), span) for k, v in item.kwargs])
        if isinstance(item, MacroOp):
            return ast.BinOp(span, item.symbol, self.build(item.left, spec, args, span),
                             self.build(item.right, spec, args, span), span)
        return literal_ast(item, span)


def expand_macros(bindings: dict[str, ast.Binding], select: ast.Expr | None,
                  macro_of: dict[int, OpSpec]) -> tuple[dict[str, ast.Binding], ast.Expr | None, list[Diagnostic]]:
    """Every binding and the ``select`` with macro calls replaced by their expressions.

    ``macro_of`` maps the checked program's macro calls (and bare macro names)
    to their declarations.  Returns the new bindings, the new select, and the
    errors a macro raised for its arguments (e.g. a non-literal ``kind=``).
    """
    expander = _Expander(macro_of)
    out = {name: ast.Binding(b.name, expander.expr(b.expr), b.span, b.source_name) for name, b in bindings.items()}
    new_select = expander.expr(select) if select is not None else None
    return out, new_select, expander.errors

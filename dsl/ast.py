"""The syntax tree of a recipe: what the parser produces and the checker reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from datasel.dsl.diagnostics import Span


@dataclass
class Expr:
    span: Span


@dataclass
class Number(Expr):
    value: Fraction  # exact, so that 10% of 50 is exactly 5

    @property
    def is_integer(self) -> bool:
        return self.value.denominator == 1

    def python(self) -> int | float:
        return int(self.value) if self.is_integer else float(self.value)


@dataclass
class Percent(Expr):
    fraction: Fraction
    of_pool: bool = False


@dataclass
class String(Expr):
    value: str


@dataclass
class Bool(Expr):
    value: bool


@dataclass
class NoneLit(Expr):
    pass


@dataclass
class Name(Expr):
    id: str


@dataclass
class Keyword:
    name: str
    value: Expr
    span: Span


@dataclass
class Call(Expr):
    func: str
    func_span: Span
    args: list[Expr] = field(default_factory=list)
    kwargs: list[Keyword] = field(default_factory=list)
    positional_after_keyword: Span | None = None  # reported by the checker


@dataclass
class ListLit(Expr):
    items: list[Expr] = field(default_factory=list)


@dataclass
class BinOp(Expr):
    """``|``, ``&``, ``+``, ``-``, ``*``, ``/`` and comparisons; meaning depends on kinds."""

    op: str
    left: Expr
    right: Expr
    op_span: Span


@dataclass
class Neg(Expr):
    operand: Expr


@dataclass
class Not(Expr):
    """``not x``: the records of the input that selector ``x`` leaves out."""

    operand: Expr


@dataclass
class Lambda(Expr):
    param: str
    param_span: Span
    body: Expr


@dataclass
class Binding:
    name: str
    expr: Expr
    span: Span  # the name
    source_name: str


@dataclass
class Select:
    expr: Expr
    span: Span


@dataclass
class Program:
    """The statements of one source, in order, plus the names that failed to parse."""

    bindings: list[Binding] = field(default_factory=list)
    selects: list[Select] = field(default_factory=list)
    broken_names: set[str] = field(default_factory=set)


COMPARISONS = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")


def walk(expr: Expr):
    """Yield ``expr`` and every expression below it."""
    yield expr
    if isinstance(expr, Call):
        for a in expr.args:
            yield from walk(a)
        for k in expr.kwargs:
            yield from walk(k.value)
    elif isinstance(expr, ListLit):
        for item in expr.items:
            yield from walk(item)
    elif isinstance(expr, BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, (Neg, Not)):
        yield from walk(expr.operand)
    elif isinstance(expr, Lambda):
        yield from walk(expr.body)

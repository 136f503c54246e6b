"""How deeply a recipe nests, and the one documented limit on it.

The compiler's passes (build, check, macros, plan) and the engine walk
expressions recursively.  A pipeline of ``n`` steps is ``n`` levels deep
(``a | b | c`` is ``(a | b) | c``), and a name counts as deep as the
expression it is bound to, so a chain ``v2 = v1 + 1``, ``v3 = v2 + 1`` ...
adds up.  Rather than let Python's recursion limit fail somewhere with no
position, every statement is measured here (without recursion) and a recipe
deeper than :data:`MAX_DEPTH` levels is a positioned compile error;
:func:`deep_recursion` then gives the passes the Python stack that depth needs.
"""

from __future__ import annotations

import contextlib
import sys
import threading

from lark import Tree

from datasel.dsl import ast
from datasel.dsl.diagnostics import Diagnostic

MAX_DEPTH = 1000
"""Levels of nesting a recipe may have, counting through names (docs/language.md, "Limits")."""

# Python frames allowed per level of nesting. The tests that compile and run recipes MAX_DEPTH
# levels deep (tests/dsl/test_hardening_recipes.py) pass with 4; 12 leaves room for new passes.
_FRAMES_PER_LEVEL = 12
_lock = threading.Lock()
_holders = 0
_saved_limit = 0


@contextlib.contextmanager
def deep_recursion():
    """Raise Python's recursion limit so that a recipe of :data:`MAX_DEPTH` levels can be compiled and run."""
    global _holders, _saved_limit
    needed = MAX_DEPTH * _FRAMES_PER_LEVEL + 2000
    with _lock:
        if _holders == 0:
            _saved_limit = sys.getrecursionlimit()
            sys.setrecursionlimit(max(_saved_limit, needed))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                sys.setrecursionlimit(_saved_limit)


def tree_too_deep(tree: Tree) -> bool:
    """Whether a statement's parse tree is deeper than the builder may recurse.

    A level of the recipe takes at most three levels of the parse tree (a call,
    its argument list, a keyword argument).
    """
    limit = 3 * MAX_DEPTH + 8
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))
    return False


def _children(expr: ast.Expr) -> list[ast.Expr]:
    if isinstance(expr, ast.Call):
        return list(expr.args) + [k.value for k in expr.kwargs]
    if isinstance(expr, ast.ListLit):
        return list(expr.items)
    if isinstance(expr, ast.BinOp):
        return [expr.left, expr.right]
    if isinstance(expr, (ast.Neg, ast.Not)):
        return [expr.operand]
    if isinstance(expr, ast.Lambda):
        return [expr.body]
    return []


def _local(expr: ast.Expr) -> tuple[int, list[tuple[int, str]]]:
    """The depth of ``expr`` by itself, and each name it uses with the level it is used at."""
    deepest, names = 0, []
    stack = [(expr, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, ast.Name):
            names.append((level, node.id))
        stack.extend((child, level + 1) for child in _children(node))
    return deepest, names


def nesting_errors(bindings: dict[str, ast.Binding], target: ast.Expr | None) -> list[Diagnostic]:
    """A positioned error for each statement nested deeper than :data:`MAX_DEPTH`, counting through names.

    Only the first statement to cross the limit along a chain is reported (the
    ones that use it are deep because of it). Cycles are the checker's to report.
    """
    local = {name: _local(b.expr) for name, b in bindings.items()}
    depth: dict[str, int] = {}
    for root in bindings:  # an iterative post-order walk over the names each binding uses
        stack, open_ = [(root, False)], set()
        while stack:
            name, ready = stack.pop()
            if ready:
                own, uses = local[name]
                depth[name] = max([own] + [level + depth[u] for level, u in uses if u in depth])
                open_.discard(name)
                continue
            if name in depth or name in open_:
                continue
            open_.add(name)
            stack.append((name, True))
            stack.extend((u, False) for _, u in local[name][1] if u in bindings and u not in depth and u not in open_)
    errors = []
    for name, b in bindings.items():
        if depth[name] > MAX_DEPTH and all(depth.get(u, 0) <= MAX_DEPTH for _, u in local[name][1]):
            errors.append(_too_deep(depth[name], b.expr))
    if target is not None:
        own, uses = _local(target)
        total = max([own] + [level + depth.get(u, 0) for level, u in uses])
        if total > MAX_DEPTH and all(depth.get(u, 0) <= MAX_DEPTH for _, u in uses):
            errors.append(_too_deep(total, target))
    return errors


def _too_deep(levels: int, expr: ast.Expr) -> Diagnostic:
    return Diagnostic(f"this expression nests {levels} levels deep, counting the names it uses; a recipe may "
                      f"nest at most {MAX_DEPTH} (pipeline steps, operator arguments and chained names all "
                      "count)", expr.span)


def too_deep_statement(span) -> Diagnostic:
    """The error for a statement whose parse tree alone is too deep to build."""
    return Diagnostic(f"this statement nests more than {MAX_DEPTH} levels deep; a recipe may nest at most "
                      f"{MAX_DEPTH} (pipeline steps, operator arguments and chained names all count)", span)

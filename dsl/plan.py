"""Checked program -> DAG of operator nodes.

Every node is one concrete computation of one declared operator.  Selectors
and partitions are functions of a subset of the pool, so the planner pushes
each one onto the set it is applied to: in ``a | topk(s, 5)`` the ``topk``
node's ``input`` is the node of ``a``; the ``select`` expression is applied to
the whole pool.  The language's own syntax (``|`` after a partition, ``&``,
``+``, comparisons, arithmetic) stands for built-in operators, found by the
syntax they implement (:func:`datasel.ops.registry.for_syntax`).  An argument
that is a function (``cur -> ...``), and the selector after a partition, is
planned once against a variable node; the engine binds it at run time.

Planning is followed by passes, plain functions ``plan -> plan`` applied in
this order (:data:`PASSES`):

1. :func:`eliminate_common_subexpressions` — identical sub-expressions, also
   ones reached through different names, become one node, whose identity is a
   hash of (op, op code version, canonical parameters, input identities), with
   the content fingerprint of each dataset at the leaves.
"""

from __future__ import annotations

import functools
import inspect

import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from datasel.dsl import ast
from datasel.dsl.checker import DATASETS, Checked, literal_value
from datasel.dsl.diagnostics import Span
from datasel.ops import registry as reg
from datasel.ops.contract import PER_RECORD, Budget, Kind, OpSpec, Role


def structure(expr: ast.Expr) -> Any:
    """A JSON-able description of an expression's structure (no positions), for identities."""
    if isinstance(expr, ast.Name):
        return ["name", expr.id]
    if isinstance(expr, ast.Number):
        return ["num", str(expr.value)]
    if isinstance(expr, ast.Percent):
        return ["pct", str(expr.fraction), expr.of_pool]
    if isinstance(expr, (ast.String, ast.Bool)):
        return [type(expr).__name__, expr.value]
    if isinstance(expr, ast.NoneLit):
        return ["none"]
    if isinstance(expr, ast.Call):
        return ["call", expr.func, [structure(a) for a in expr.args],
                sorted([k.name, structure(k.value)] for k in expr.kwargs)]
    if isinstance(expr, ast.ListLit):
        return ["list", [structure(i) for i in expr.items]]
    if isinstance(expr, ast.BinOp):
        return ["op", expr.op, structure(expr.left), structure(expr.right)]
    if isinstance(expr, (ast.Neg, ast.Not)):
        return [type(expr).__name__.lower(), structure(expr.operand)]
    if isinstance(expr, ast.Lambda):
        return ["fn", expr.param, structure(expr.body)]
    raise AssertionError(type(expr).__name__)


def canonical(value: Any) -> Any:
    """A JSON-able, hash-stable form of a parameter value."""
    if isinstance(value, Budget):
        return {"budget": value.canonical()}
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else float(value)
    if isinstance(value, float) and value.is_integer():
        return float(value)
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    return value


def digest(*parts: Any) -> str:
    """Stable 128-bit hex digest of JSON-able parts."""
    text = json.dumps([canonical(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class Node:
    """One computation of the plan: one application of a declared operator."""

    id: str
    op: str
    kind: Kind
    params: dict
    inputs: list[str]
    roles: list[str]  # the parameter name of each input
    spec: OpSpec
    names: list[str] = field(default_factory=list)  # bindings that name this node
    span: Span | None = None
    dataset: str | None = None  # for per-record kinds: which dataset they cover
    free_vars: frozenset = frozenset()
    body: str | None = None  # an op with a function argument: the root of the function's body
    var: str | None = None  # ... and the variable the body is planned against
    body_nodes: frozenset = frozenset()  # nodes that run once per call of the function
    values: dict = field(default_factory=dict, repr=False)  # params as Python values (Budget...)
    identity: Any = None  # what else tells this node apart (a dataset's content fingerprint)

    @property
    def version(self) -> str:
        return self.spec.code_version

    @property
    def role(self) -> Role:
        return self.spec.role

    def input(self, role: str) -> str | None:
        """The node id of input ``role``, or None."""
        return self.inputs[self.roles.index(role)] if role in self.roles else None

    def label(self) -> str:
        """A short readable description of what the node computes."""
        if self.spec.label is not None:
            # A label names what it needs (``lambda op: ...``); literal arguments given by name
            # (``arith(x, 0, "+")`` folds right=0 into the params) are not its business.
            wanted = _label_params(self.spec.label)
            return self.spec.label(**{k: v for k, v in self.params.items() if wanted is None or k in wanted})
        defaults = {p.name: canonical(p.default) for p in self.spec.params if not p.required}
        # Show what the recipe chose; defaults are in `datasel ops NAME` and the JSON plan.
        shown = {k: v for k, v in self.params.items() if k not in defaults or defaults[k] != v}
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        return f"{self.op}({args})" if args else self.op


@functools.lru_cache(maxsize=None)
def _label_params(fn) -> frozenset | None:
    """The parameter names a label function takes (None when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and "budget" in value:
        return value["budget"]
    return json.dumps(value)


@dataclass
class Plan:
    """The DAG: nodes by id (in creation order = a topological order) and the output."""

    nodes: dict[str, Node]
    output: str
    checked: Checked | None = None
    datasets: dict[str, str] = field(default_factory=dict)  # name -> fingerprint used

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def order(self) -> list[Node]:
        return list(self.nodes.values())

    def reachable(self, root: str | None = None) -> list[Node]:
        """Nodes the output (or ``root``) depends on, inputs before users."""
        seen: dict[str, None] = {}
        stack = [(root or self.output, False)]
        while stack:  # iterative: long pipes must not hit Python's recursion limit
            nid, expanded = stack.pop()
            if nid in seen:
                continue
            node = self.nodes[nid]
            if expanded:
                seen[nid] = None
                continue
            stack.append((nid, True))
            deps = list(node.inputs) + ([node.body] if node.body else [])
            stack.extend((d, False) for d in reversed(deps) if d not in seen)
        return [self.nodes[n] for n in self.nodes if n in seen]


def _leaf(role: Role) -> OpSpec:
    return next(s for s in reg.registry().values() if s.role is role)


def builtin(symbol: str, result: Kind) -> OpSpec:
    """The built-in operator a piece of syntax means for a result of kind ``result`` (``+``: union or arith)."""
    specs = [s for s in reg.for_syntax(symbol) if s.result is result]
    if not specs:
        raise AssertionError(f"no built-in operator for {symbol!r} giving {result}")
    return specs[0]


class Planner:
    """Builds a :class:`Plan` from a :class:`Checked` program (one node per occurrence; see :data:`PASSES`)."""

    def __init__(self, checked: Checked, fingerprints: dict[str, str] | None = None):
        self.checked = checked
        self.fingerprints = fingerprints or {}
        self.nodes: dict[str, Node] = {}
        self.binding_of: dict[int, str] = {id(b.expr): b.name for b in checked.bindings.values()}
        self._ids = itertools.count(1)
        self._memo: dict[tuple, str] = {}  # a binding planned once per (input, scope)

    # ------------------------------------------------------------ creation
    def add(self, spec: OpSpec, kind: Kind, params: dict, inputs: list[tuple[str, str]], *,
            span: Span | None = None, dataset: str | None = None, body: str | None = None,
            var: str | None = None, identity: Any = None) -> str:
        node_id = f"n{next(self._ids)}"
        self.nodes[node_id] = Node(
            id=node_id, op=spec.name, kind=kind, params={k: canonical(v) for k, v in params.items()},
            inputs=[i for _, i in inputs], roles=[r for r, _ in inputs], spec=spec, span=span, dataset=dataset,
            body=body, var=var, values=dict(params), identity=identity,
        )
        return node_id

    def name(self, node_id: str, expr: ast.Expr) -> str:
        binding = self.binding_of.get(id(expr))
        if binding and binding not in self.nodes[node_id].names:
            self.nodes[node_id].names.append(binding)
        return node_id

    def dataset(self, name: str) -> str:
        key = ("leaf", name)
        if key not in self._memo:
            self._memo[key] = self.add(_leaf(Role.DATASET), Kind.DATASET, {"name": name}, [],
                                       identity=self.fingerprints.get(name, "unknown"))
        return self._memo[key]

    def const(self, value: Any, span: Span | None = None) -> str:
        kind = Kind.NUMBER if isinstance(value, (int, float)) else Kind.ANY
        return self.add(_leaf(Role.CONST), kind, {"value": value}, [], span=span)

    def variable(self, name: str, scope: str, of: str, span: Span | None = None, identity: Any = None) -> str:
        """A variable bound per ``scope``; ``of`` is the node whose calls bind it (an edge, for identity)."""
        return self.add(_leaf(Role.VARIABLE), Kind.SELECTOR, {"name": name, "scope": scope}, [("of", of)],
                        span=span, identity=identity)

    # ------------------------------------------------------------ planning
    def plan(self) -> Plan:
        pool = self.dataset("pool")
        if self.kind(self.checked.select) in (Kind.SELECTOR, Kind.PARTITION):
            output = self.apply(self.checked.select, pool, {})
        else:  # `datasel eval` of Scores / Features
            output = self.value(self.checked.select, {})
        return Plan(self.nodes, output, self.checked, dict(self.fingerprints))

    def kind(self, expr: ast.Expr) -> Kind:
        return self.checked.type_of(expr).kind

    def _binding(self, name: str, how: str, input_set: str | None) -> str:
        """Plan a binding once per way it is used (a value, or applied to a given input set)."""
        key = ("binding", name, how, input_set)
        if key not in self._memo:
            b = self.checked.bindings[name]
            node = self.value(b.expr, {}) if how == "value" else self.apply(b.expr, input_set, {})
            self._memo[key] = self.name(node, b.expr)
        return self._memo[key]

    def value(self, e: ast.Expr, scope: dict[str, str]) -> str:
        """Plan an expression that is not applied to a set (scores, models, numbers...)."""
        kind = self.kind(e)
        if kind in (Kind.SELECTOR, Kind.PARTITION):
            # A selection used as a value (given=, data=) is taken from the whole pool.
            return self.apply(e, self.dataset("pool"), scope)
        if isinstance(e, ast.Name):
            if e.id in scope:
                return scope[e.id]
            if e.id in DATASETS:
                return self.dataset(e.id)
            if e.id in self.checked.bindings:
                return self._binding(e.id, "value", None)
            spec = self.checked.implicit_calls[id(e)]
            return self.call(spec, self.checked.implicit_args.get(id(e), {}), e, None, scope)
        if isinstance(e, ast.Call):
            info = self.checked.calls[id(e)]
            return self.call(info.spec, info.args, e, None, scope)
        dataset = self.checked.type_of(e).dataset
        ok, literal = literal_value(e)
        if ok:  # literals, and arithmetic on them, are folded into one constant
            return self.const(literal, e.span)
        if isinstance(e, ast.BinOp):
            left, right = self.value(e.left, scope), self.value(e.right, scope)
            result = Kind.NUMBER if kind is Kind.NUMBER else Kind.SCORES
            return self.add(builtin(e.op, result), kind, {"op": e.op}, [("left", left), ("right", right)],
                            span=e.span, dataset=dataset)
        if isinstance(e, ast.Neg):
            if kind is Kind.NUMBER:
                zero = self.const(0, e.span)
                return self.add(builtin("-", Kind.NUMBER), kind, {"op": "-"},
                                [("left", zero), ("right", self.value(e.operand, scope))], span=e.span)
            return self.add(builtin("unary -", Kind.SCORES), kind, {}, [("operand", self.value(e.operand, scope))],
                            span=e.span, dataset=dataset)
        raise AssertionError(f"cannot plan {type(e).__name__} as a value")

    def apply(self, e: ast.Expr, input_set: str, scope: dict[str, str]) -> str:
        """Plan a Selector or Partition expression applied to ``input_set``."""
        if isinstance(e, ast.Name):
            if e.id == "pool" and e.id not in scope:
                return input_set  # the whole pool as a selector keeps everything that reaches it
            if e.id in scope:
                var = scope[e.id]
                if self.nodes[input_set].role is Role.DATASET:
                    return var
                return self.add(builtin("bound name", Kind.SELECTOR), Kind.SELECTOR, {},
                                [("input", input_set), ("selection", var)], span=e.span)
            if e.id in self.checked.bindings:
                return self._binding(e.id, "apply", input_set)
            spec = self.checked.implicit_calls[id(e)]
            return self.call(spec, self.checked.implicit_args.get(id(e), {}), e, input_set, scope)
        if isinstance(e, ast.Call):
            info = self.checked.calls[id(e)]
            return self.call(info.spec, info.args, e, input_set, scope)
        if isinstance(e, ast.BinOp):
            if e.op == "|":
                if self.kind(e.left) is Kind.PARTITION:
                    return self.groupwise(e, input_set, scope)
                left = self.apply(e.left, input_set, scope)
                return self.apply(e.right, left, scope)
            if e.op in ("&", "+", "-") and self.kind(e) is Kind.SELECTOR:
                left = self.apply(e.left, input_set, scope)
                right = self.apply(e.right, input_set, scope)
                # The input is an explicit edge so that the funnel can tell what reached the combination.
                return self.add(builtin(e.op, Kind.SELECTOR), Kind.SELECTOR, {},
                                [("input", input_set), ("left", left), ("right", right)], span=e.span)
            if e.op in ast.COMPARISONS:
                return self.compare(e, input_set, scope)
        if isinstance(e, ast.Not):
            # not x = what reaches it minus what x keeps of it
            right = self.apply(e.operand, input_set, scope)
            return self.add(builtin("not", Kind.SELECTOR), Kind.SELECTOR, {},
                            [("input", input_set), ("left", input_set), ("right", right)], span=e.span)
        raise AssertionError(f"cannot apply {type(e).__name__} to a set")

    def groupwise(self, e: ast.BinOp, input_set: str, scope: dict[str, str]) -> str:
        """``P | sel``: ``sel`` planned once against a group variable, applied in every group of ``P``."""
        spec = builtin("|", Kind.SELECTOR)
        fn = spec.function_param
        partition = self.apply(e.left, input_set, scope)
        # What reaches the groups is what reached the partition (``a | groups(f) | sel``: a's records).
        reaching = self.nodes[partition].input("input") or input_set
        var = self.variable("group", fn.scope, partition)
        body = self.apply(e.right, var, scope)
        return self.add(spec, Kind.SELECTOR, {}, [("input", reaching), ("partition", partition)], span=e.span,
                        body=body, var=var)

    def compare(self, e: ast.BinOp, input_set: str, scope: dict[str, str]) -> str:
        op = e.op
        left_kind, right_kind = self.kind(e.left), self.kind(e.right)
        if op not in ("in", "not in") and left_kind is not Kind.SCORES and right_kind is Kind.SCORES:
            # Keep the score on the left: 1 > ifd is ifd < 1.
            flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[op]
            return self._compare(flipped, e.right, e.left, e, input_set, scope)
        return self._compare(op, e.left, e.right, e, input_set, scope)

    def _deref(self, e: ast.Expr, scope: dict[str, str]) -> ast.Expr:
        """Follow names bound to other expressions (``budget = 10%``) so literals stay parameters."""
        seen = set()
        while isinstance(e, ast.Name) and e.id not in scope and e.id in self.checked.bindings and e.id not in seen:
            seen.add(e.id)
            e = self.checked.bindings[e.id].expr
        return e

    def _compare(self, op, scores_expr, rhs_expr, e, input_set, scope) -> str:
        scores = self.value(scores_expr, scope)
        inputs = [("input", input_set), ("scores", scores)]
        params: dict[str, Any] = {"op": op}
        ok, literal = literal_value(self._deref(rhs_expr, scope))
        if ok:
            params["rhs"] = literal
        else:
            inputs.append(("rhs", self.value(rhs_expr, scope)))
        return self.add(builtin(op, Kind.SELECTOR), Kind.SELECTOR, params, inputs, span=e.span)

    def call(self, spec: OpSpec, args: dict[str, ast.Expr], e: ast.Expr, input_set: str | None,
             scope: dict[str, str]) -> str:
        params: dict[str, Any] = {}
        inputs: list[tuple[str, str]] = []
        takes_input = spec.role in (Role.SELECTOR, Role.PARTITION, Role.SET_SCORES)
        if takes_input:
            if input_set is None:
                input_set = self.dataset("pool")
            inputs.append(("input", input_set))
        body = var = None
        for p in spec.params:
            if p.name in args:
                a = args[p.name]
                if isinstance(a, ast.Lambda):
                    var = self.variable(a.param, p.scope, input_set or self.dataset("pool"),
                                        identity=structure(a.body))
                    body_scope = dict(scope)
                    body_scope[a.param] = var
                    body = self.apply(a.body, input_set or self.dataset("pool"), body_scope)
                    continue
                ok, literal = literal_value(self._deref(a, scope))
                if p.applied:
                    # e.g. iterate's init: applied to the same input set as the op itself.
                    inputs.append((p.name, self.apply(a, input_set, scope)))
                elif ok:
                    params[p.name] = literal
                elif p.kind is Kind.DATASET and isinstance(a, ast.Name) and a.id in DATASETS:
                    inputs.append((p.name, self.dataset(a.id)))
                else:
                    inputs.append((p.name, self.value(a, scope)))
            elif p.kind is Kind.DATASET and p.default in DATASETS:
                inputs.append((p.name, self.dataset(p.default)))
            else:
                params[p.name] = p.default
        dataset = None
        if spec.maps_over is not None:
            data = args.get(spec.maps_over)
            dataset = data.id if isinstance(data, ast.Name) else "pool"
        elif spec.result in PER_RECORD:
            dataset = self.checked.type_of(e).dataset or "pool"
        node = self.add(spec, spec.result, params, inputs, span=e.span, dataset=dataset, body=body, var=var)
        return self.name(node, e)


# ------------------------------------------------------------------- passes
def eliminate_common_subexpressions(plan: Plan) -> Plan:
    """Merge nodes that compute the same thing; every node's id becomes its content identity.

    Identity = hash of (op, op code version, canonical parameters, the
    identities of its inputs by role, of its body and variable, and its own
    ``identity``, e.g. a dataset's fingerprint).  Nodes come in creation order,
    which puts every node after what it refers to.
    """
    new_id: dict[str, str] = {}
    nodes: dict[str, Node] = {}
    for old in plan.nodes.values():
        inputs = [new_id[i] for i in old.inputs]
        body = new_id[old.body] if old.body else None
        var = new_id[old.var] if old.var else None
        nid = digest(old.op, old.version, old.params, inputs, old.roles, body, var, old.identity)
        new_id[old.id] = nid
        if nid in nodes:
            merged = nodes[nid]
            merged.names.extend(n for n in old.names if n not in merged.names)
            continue
        nodes[nid] = replace(old, id=nid, inputs=inputs, body=body, var=var, names=list(old.names))
    _scopes(nodes)
    return Plan(nodes, new_id[plan.output], plan.checked, plan.datasets)


def _scopes(nodes: dict[str, Node]) -> None:
    """Fill in each node's free variables and, for an op with a body, the nodes that run once per call."""
    for node in nodes.values():  # creation order: dependencies first
        free = set()
        for i in node.inputs:
            free |= nodes[i].free_vars
        if node.role is Role.VARIABLE:
            free = {node.id}
        if node.body is not None:
            free |= nodes[node.body].free_vars - {node.var}
            node.body_nodes = frozenset(n for n in _closure(nodes, node.body) if node.var in nodes[n].free_vars)
        node.free_vars = frozenset(free)


def _closure(nodes: dict[str, Node], root: str) -> set[str]:
    out, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(nodes[n].inputs)
        if nodes[n].body:
            stack.append(nodes[n].body)
    return out


#: The passes applied to every plan, in order.
PASSES = (eliminate_common_subexpressions,)


def build_plan(checked: Checked, fingerprints: dict[str, str] | None = None) -> Plan:
    """Plan a checked program and apply :data:`PASSES`; ``fingerprints`` maps dataset names to fingerprints."""
    plan = Planner(checked, fingerprints).plan()
    for run_pass in PASSES:
        plan = run_pass(plan)
    return plan

"""Checked program -> DAG of operator nodes.

Every node is one concrete computation.  Selectors and partitions are
functions of a subset of the pool, so the planner pushes each one onto the set
it is applied to: in ``a | topk(s, 5)`` the ``topk`` node's first input is the
node of ``a``; the ``select`` expression is applied to the whole pool.  A
partition followed by a selector becomes a ``per_group`` node whose body is
planned once against a group variable; ``iterate`` plans its function body
against a round variable.  The engine binds those variables at run time.

A node's identity is a hash of (op, op version, canonical parameters, input
identities); dataset nodes hash their content fingerprint.  Identical
sub-expressions therefore become one node (common-subexpression elimination),
also across prelude names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from datasel.dsl import ast
from datasel.dsl.checker import DATASETS, Checked, literal_value
from datasel.dsl.diagnostics import Span
from datasel.ops.registry import Budget, Kind, OpSpec

# Language operators that are not declared ops.
BUILTIN_OPS = {
    "dataset": "a dataset given on the command line",
    "const": "a literal value",
    "var": "a variable bound while the plan runs (a group, or an iteration's current selection)",
    "union": "records kept by either side (left's order, then right's new records)",
    "intersect": "records kept by both sides (left's order)",
    "difference": "records kept by the left side and not by the right",
    "compare": "records whose score satisfies the comparison",
    "restrict": "a fixed selection limited to the current input",
    "per_group": "applies a selector inside every group of a partition and unions the results",
    "arith": "arithmetic on Scores and numbers",
    "neg": "negation",
}


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
    if isinstance(expr, ast.Neg):
        return ["neg", structure(expr.operand)]
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
    """One computation of the plan."""

    id: str
    op: str
    kind: Kind
    params: dict
    inputs: list[str]
    roles: list[str]  # the parameter (or operand) name of each input
    spec: OpSpec | None = None
    names: list[str] = field(default_factory=list)  # bindings that name this node
    span: Span | None = None
    dataset: str | None = None  # for per-record kinds: which dataset they cover
    free_vars: frozenset = frozenset()
    body: str | None = None  # per_group / iterate: root of the body
    var: str | None = None  # per_group / iterate: the variable the body is planned against
    body_nodes: frozenset = frozenset()  # nodes that run once per group / round
    values: dict = field(default_factory=dict, repr=False)  # params as Python values (Budget...)

    @property
    def version(self) -> str:
        return self.spec.version if self.spec else "builtin-1"

    @property
    def role(self) -> str:
        if self.spec is not None:
            return self.spec.role
        return {
            "dataset": "value", "const": "value", "var": "var", "arith": "scores", "neg": "scores",
            "union": "combine", "intersect": "combine", "difference": "combine",
            "compare": "selector", "restrict": "combine", "per_group": "per_group",
        }[self.op]

    def label(self) -> str:
        """A short readable description of what the node computes."""
        if self.op == "dataset":
            return self.params["name"]
        if self.op == "const":
            return json.dumps(self.params["value"])
        if self.op == "var":
            return f"{self.params['name']} (bound per {self.params['scope']})"
        if self.op == "compare":
            rhs = self.params.get("rhs")
            return f"compare {self.params['op']} {json.dumps(rhs) if 'rhs' in self.params else ''}".rstrip()
        if self.op == "arith":
            return f"arith {self.params['op']}"
        defaults = {}
        if self.spec is not None:
            defaults = {p.name: canonical(p.default) for p in self.spec.params if not p.required}
        # Show what the recipe chose; defaults are in `datasel ops NAME` and the JSON plan.
        shown = {k: v for k, v in self.params.items() if k not in defaults or defaults[k] != v}
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        return f"{self.op}({args})" if args else self.op


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

        def visit(nid: str) -> None:
            if nid in seen:
                return
            node = self.nodes[nid]
            for i in node.inputs:
                visit(i)
            if node.body:
                visit(node.body)
            seen[nid] = None

        visit(root or self.output)
        return [self.nodes[n] for n in self.nodes if n in seen]


class Planner:
    """Builds a :class:`Plan` from a :class:`Checked` program."""

    def __init__(self, checked: Checked, fingerprints: dict[str, str] | None = None):
        self.checked = checked
        self.fingerprints = fingerprints or {}
        self.nodes: dict[str, Node] = {}
        self.binding_of: dict[int, str] = {id(b.expr): b.name for b in checked.bindings.values()}

    # ------------------------------------------------------------ creation
    def add(self, op: str, kind: Kind, params: dict, inputs: list[tuple[str, str]], *,
            spec: OpSpec | None = None, span: Span | None = None, dataset: str | None = None,
            body: str | None = None, var: str | None = None, extra_identity: Any = None) -> str:
        values = dict(params)
        params = {k: canonical(v) for k, v in params.items()}
        input_ids = [i for _, i in inputs]
        version = spec.version if spec else "builtin-1"
        node_id = digest(op, version, params, input_ids, [r for r, _ in inputs], body, var, extra_identity)
        if node_id in self.nodes:
            return node_id
        free = set()
        for i in input_ids:
            free |= self.nodes[i].free_vars
        if op == "var":
            free.add(node_id)
        body_nodes = frozenset()
        if body is not None:
            free |= self.nodes[body].free_vars - {var}
            body_nodes = frozenset(n for n in self._closure(body) if var in self.nodes[n].free_vars)
        self.nodes[node_id] = Node(
            id=node_id, op=op, kind=kind, params=params, inputs=input_ids, roles=[r for r, _ in inputs],
            spec=spec, span=span, dataset=dataset, free_vars=frozenset(free), body=body, var=var,
            body_nodes=body_nodes, values=values,
        )
        return node_id

    def _closure(self, root: str) -> set[str]:
        out, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            stack.extend(self.nodes[n].inputs)
            if self.nodes[n].body:
                stack.append(self.nodes[n].body)
        return out

    def name(self, node_id: str, expr: ast.Expr) -> str:
        binding = self.binding_of.get(id(expr))
        if binding and binding not in self.nodes[node_id].names:
            self.nodes[node_id].names.append(binding)
        return node_id

    def dataset(self, name: str) -> str:
        fp = self.fingerprints.get(name, "unknown")
        return self.add("dataset", Kind.DATASET, {"name": name}, [], extra_identity=fp)

    def const(self, value: Any, span: Span | None = None) -> str:
        return self.add("const", Kind.NUMBER if isinstance(value, (int, float)) else Kind.ANY,
                        {"value": value}, [], span=span)

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

    def value(self, e: ast.Expr, scope: dict[str, str]) -> str:
        """Plan an expression that is not applied to a set (scores, models, numbers...)."""
        if id(e) in self.checked.expansions:
            return self.name(self.value(self.checked.expansions[id(e)], scope), e)
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
                b = self.checked.bindings[e.id]
                return self.name(self.value(b.expr, {}), b.expr)
            spec = self.checked.implicit_calls[id(e)]
            return self.call(spec, self.checked.implicit_args.get(id(e), {}), e, None, scope)
        if isinstance(e, ast.Call):
            info = self.checked.calls[id(e)]
            return self.call(info.spec, info.args, e, None, scope)
        if isinstance(e, ast.BinOp):
            left, right = self.value(e.left, scope), self.value(e.right, scope)
            return self.add("arith", kind, {"op": e.op}, [("left", left), ("right", right)],
                            span=e.span, dataset=self.checked.type_of(e).dataset)
        if isinstance(e, ast.Neg):
            return self.add("neg", kind, {}, [("operand", self.value(e.operand, scope))], span=e.span,
                            dataset=self.checked.type_of(e).dataset)
        ok, literal = literal_value(e)
        if ok:
            return self.const(literal, e.span)
        raise AssertionError(f"cannot plan {type(e).__name__} as a value")

    def apply(self, e: ast.Expr, input_set: str, scope: dict[str, str]) -> str:
        """Plan a Selector or Partition expression applied to ``input_set``."""
        if id(e) in self.checked.expansions:
            return self.name(self.apply(self.checked.expansions[id(e)], input_set, scope), e)
        if isinstance(e, ast.Name):
            if e.id == "pool" and e.id not in scope:
                return input_set  # the whole pool as a selector keeps everything that reaches it
            if e.id in scope:
                var = scope[e.id]
                if self.nodes[input_set].op == "dataset":
                    return var
                return self.add("restrict", Kind.SELECTOR, {}, [("input", input_set), ("selection", var)], span=e.span)
            if e.id in self.checked.bindings:
                b = self.checked.bindings[e.id]
                return self.name(self.apply(b.expr, input_set, {}), b.expr)
            spec = self.checked.implicit_calls[id(e)]
            return self.call(spec, self.checked.implicit_args.get(id(e), {}), e, input_set, scope)
        if isinstance(e, ast.Call):
            info = self.checked.calls[id(e)]
            return self.call(info.spec, info.args, e, input_set, scope)
        if isinstance(e, ast.BinOp):
            if e.op == "|":
                if self.kind(e.left) is Kind.PARTITION:
                    partition = self.apply(e.left, input_set, scope)
                    var = self.add("var", Kind.SELECTOR, {"name": "group", "scope": "group"}, [],
                                   extra_identity=partition)
                    body = self.apply(e.right, var, scope)
                    return self.add("per_group", Kind.SELECTOR, {}, [("partition", partition)], span=e.span,
                                    body=body, var=var)
                left = self.apply(e.left, input_set, scope)
                return self.apply(e.right, left, scope)
            if e.op in ("&", "+", "-") and self.kind(e) is Kind.SELECTOR:
                op = {"&": "intersect", "+": "union", "-": "difference"}[e.op]
                left = self.apply(e.left, input_set, scope)
                right = self.apply(e.right, input_set, scope)
                # The input is an explicit edge so that the funnel can tell what reached the combination.
                return self.add(op, Kind.SELECTOR, {}, [("input", input_set), ("left", left), ("right", right)],
                                span=e.span)
            if e.op in ast.COMPARISONS:
                return self.compare(e, input_set, scope)
        if isinstance(e, ast.Not):
            # not x = what reaches it minus what x keeps of it
            right = self.apply(e.operand, input_set, scope)
            return self.add("difference", Kind.SELECTOR, {}, [("input", input_set), ("left", input_set),
                                                              ("right", right)], span=e.span)
        raise AssertionError(f"cannot apply {type(e).__name__} to a set")

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
        return self.add("compare", Kind.SELECTOR, params, inputs, span=e.span)

    def call(self, spec: OpSpec, args: dict[str, ast.Expr], e: ast.Expr, input_set: str | None,
             scope: dict[str, str]) -> str:
        params: dict[str, Any] = {}
        inputs: list[tuple[str, str]] = []
        if spec.role in ("selector", "partition"):
            if input_set is None:
                input_set = self.dataset("pool")
            inputs.append(("input", input_set))
        body = var = None
        for p in spec.params:
            if p.name in args:
                a = args[p.name]
                if isinstance(a, ast.Lambda):
                    var = self.add("var", Kind.SELECTOR, {"name": a.param, "scope": "round"}, [],
                                   extra_identity=[input_set, structure(a.body)])
                    body_scope = dict(scope)
                    body_scope[a.param] = var
                    body = self.apply(a.body, input_set, body_scope)
                    continue
                ok, literal = literal_value(self._deref(a, scope))
                if p.name in spec.extra.get("applied", ()):
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
        if spec.role == "map":
            data = args.get("data")
            dataset = data.id if isinstance(data, ast.Name) else "pool"
        elif spec.result in (Kind.SCORES, Kind.FEATURES, Kind.LABELS):
            dataset = self.checked.type_of(e).dataset or "pool"
        node = self.add(spec.name, spec.result, params, inputs, spec=spec, span=e.span, dataset=dataset,
                        body=body, var=var)
        return self.name(node, e)


def build_plan(checked: Checked, fingerprints: dict[str, str] | None = None) -> Plan:
    """Plan a checked program; ``fingerprints`` maps dataset names to content fingerprints."""
    return Planner(checked, fingerprints).plan()

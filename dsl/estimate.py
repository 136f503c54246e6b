"""What a run will do on a pool, before it runs: each node's cache state and model work.

``datasel compile --pool`` asks this module.  It follows the plan the way the
engine will: a selector asks its scores for the records that reach it, so a
language model behind ``length > 20`` is charged only for the survivors.
Selections that can be computed from cached values (cheap selectors over
cached scores) are computed, without writing anything; a selection that
needs work not done yet is replaced by an upper bound (the records that reach
it, at most its budget), and the numbers downstream of it are marked "at
most".  Per costly node the work is the op's own estimate (its ``cost``
hook): records, tokens forward and backward, optimizer steps, and a rough
time from a rate measured once on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from datasel.dsl.cache import Cache
from datasel.dsl.data import Dataset
from datasel.dsl.depth import deep_recursion
from datasel.dsl.engine import Engine, NotCached, RunContext
from datasel.dsl.plan import Node, Plan
from datasel.ops.context import Selection, Work
from datasel.ops.contract import PER_RECORD, SET_ROLES, Budget, BudgetBound, Kind, Role


@dataclass
class Rows:
    """Pool rows that reach a node: exactly ``indices``, or at most ``at_most`` of them."""

    indices: np.ndarray
    exact: bool = True
    at_most: int = -1

    def __post_init__(self):
        self.indices = np.unique(np.asarray(self.indices, dtype=np.int64))
        if self.exact or self.at_most < 0:
            self.at_most = len(self.indices)
        self.at_most = min(self.at_most, len(self.indices))


@dataclass
class Estimate:
    """One node's cache state for this pool and the work left, as ``explain.to_text`` shows it."""

    state: str  # hit | partial | miss
    fraction: float | None = None
    note: str = ""
    rows: int | None = None  # records still to compute (map ops)
    exact: bool = True
    work: Work | None = None

    def as_state(self) -> dict:
        out = {"state": self.state}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        if self.note:
            out["note"] = self.note
        if self.rows is not None:
            out["rows"] = self.rows
            out["exact"] = self.exact
        if self.work is not None:
            out["work"] = {k: v for k, v in vars(self.work).items() if v not in (0, None, "")}
        return out


@dataclass
class PlanEstimate:
    nodes: dict[str, Estimate] = field(default_factory=dict)

    def states(self) -> dict[str, dict]:
        return {nid: e.as_state() for nid, e in self.nodes.items()}

    def total_seconds(self) -> tuple[float, bool]:
        """Estimated seconds of model work left, and whether every part of it had a rate."""
        total, complete = 0.0, True
        for e in self.nodes.values():
            if e.work is None:
                continue
            if e.work.seconds is None:
                complete = False
            else:
                total += e.work.seconds
        return total, complete


class Estimator:
    """Walks a plan in the engine's order on a pool (see the module docstring)."""

    def __init__(self, plan: Plan, datasets: dict[str, Dataset], cache: Cache):
        self.plan = plan
        self.datasets = datasets
        self.engine = Engine(plan, datasets, cache, quiet=True, probe=True)
        self.cache = cache
        self.rows: dict[str, Rows] = {}  # what set nodes keep
        self.requests: dict[str, list[Rows]] = {}  # rows map nodes are asked for
        self.result = PlanEstimate()

    # ------------------------------------------------------------ walking
    def run(self) -> PlanEstimate:
        pool = self.datasets.get("pool")
        for node in self.plan.reachable():
            if node.free_vars or node.role in (Role.CONST, Role.VARIABLE):
                continue
            if node.role is Role.DATASET:
                ds = self.datasets.get(node.params["name"])
                if ds is not None:
                    self.rows[node.id] = Rows(np.arange(len(ds)))
                continue
            if node.role in SET_ROLES:
                self.set_node(node)
        for node in self.plan.reachable():
            if node.free_vars:
                continue
            if node.role is Role.MAP:
                self.map_node(node, pool)
            elif node.role is Role.VALUE and node.spec.costly:
                self.value_node(node)
        return self.result

    def input_rows(self, node: Node) -> Rows | None:
        source = node.input("input")
        return self.rows.get(source) if source is not None else None

    def set_node(self, node: Node) -> None:
        rows = self.input_rows(node)
        if rows is None:
            return
        for nid in self.per_record_inputs(node):
            self.request(nid, rows)
        try:
            result = self.engine.value(node.id, {})
        except NotCached:
            result = None
        except Exception as exc:  # an op that fails on cached inputs fails the same way in the run
            self.result.nodes[node.id] = Estimate("miss", note=_short(exc))
            result = None
        if node.role is Role.SET_SCORES:
            self.rows[node.id] = rows  # scores of what reaches it, not a selection
        elif result is not None:
            kept = result.subset if node.kind is Kind.PARTITION else result.indices
            self.rows[node.id] = Rows(kept)
        elif node.spec.filters_rows:
            self.rows[node.id] = self.partial_filter(node, rows)
        else:
            self.rows[node.id] = Rows(rows.indices, exact=False, at_most=self.bound(node, rows))
        try:
            cached = self.cache.has(self.engine.key(node.id, {}))
        except NotCached:
            cached = False
        self.result.nodes.setdefault(node.id, Estimate("hit" if cached else "miss"))

    def partial_filter(self, node: Node, rows: Rows) -> Rows:
        """A filter over partly cached scores: exact for the cached rows, "maybe" for the others."""
        known = np.ones(len(rows.indices), dtype=bool)
        for nid in self.per_record_inputs(node):
            known &= self.cached_mask(nid, rows.indices)
        try:
            args = self.engine.arguments(node, {})
            ctx = RunContext(self.engine, node, {}, self.engine.pool)
            passed = np.asarray(node.spec.fn(ctx, rows.indices[known], **args), dtype=np.int64)
        except Exception:
            return Rows(rows.indices, exact=False, at_most=rows.at_most)
        maybe = rows.indices[~known]
        return Rows(np.concatenate([passed, maybe]), exact=False, at_most=len(passed) + len(maybe))

    def cached_mask(self, node_id: str, idx: np.ndarray) -> np.ndarray:
        """Per row of ``idx``: whether every map op behind this per-record value has it cached."""
        node = self.plan.nodes[node_id]
        if node.role is Role.MAP:
            try:
                key = self.engine.key(node_id, {})
            except Exception:
                return np.zeros(len(idx), dtype=bool)
            dataset = self.datasets.get(node.dataset or "pool")
            return self.cache.map_store(key).locate(dataset.hashes[idx])[0]
        mask = np.ones(len(idx), dtype=bool)
        for nid in node.inputs:
            inp = self.plan.nodes[nid]
            if inp.kind in PER_RECORD and not inp.free_vars:
                mask &= self.cached_mask(nid, idx)
        return mask

    def bound(self, node: Node, rows: Rows) -> int:
        """At most how many records a selector can keep of ``rows``: its budget if it has one."""
        if node.kind is Kind.PARTITION:
            return rows.at_most
        for value in (node.values or {}).values():
            if isinstance(value, (Budget, BudgetBound)):
                return min(rows.at_most, value.resolve(rows.at_most, len(self.datasets["pool"])))
        return rows.at_most

    def per_record_inputs(self, node: Node) -> list[str]:
        """Per-record values a set node reads for the rows that reach it (inside a per-group body too)."""
        roots = [node.id]
        if node.body is not None:
            roots += list(node.body_nodes)
        out = []
        for root in roots:
            for nid in self.plan.nodes[root].inputs:
                inp = self.plan.nodes[nid]
                if inp.kind in PER_RECORD and not inp.free_vars:
                    out.append(nid)
        return out

    def request(self, node_id: str, rows: Rows) -> None:
        node = self.plan.nodes[node_id]
        if node.dataset not in (None, "pool"):
            ds = self.datasets.get(node.dataset)
            if ds is None:
                return
            rows = Rows(np.arange(len(ds)))  # per-record values of another dataset are read whole
        if node.role is Role.MAP:
            self.requests.setdefault(node_id, []).append(rows)
            return
        for nid in node.inputs:
            inp = self.plan.nodes[nid]
            if inp.kind in PER_RECORD and not inp.free_vars:
                self.request(nid, rows)

    # ------------------------------------------------------------ work
    def map_node(self, node: Node, pool: Dataset | None) -> None:
        asked = self.requests.get(node.id)
        if not asked:
            return  # nothing reads it (or only inside a body)
        dataset = self.datasets.get(node.dataset or "pool") or pool
        exact = all(r.exact for r in asked)
        rows = np.unique(np.concatenate([r.indices for r in asked]))
        at_most = len(rows) if exact else min(len(rows), sum(r.at_most for r in asked))
        try:
            key = self.engine.key(node.id, {})
        except NotCached:
            self.result.nodes[node.id] = Estimate("miss", note="depends on results not computed yet",
                                                  rows=at_most, exact=False)
            return
        except Exception as exc:
            self.result.nodes[node.id] = Estimate("miss", note=_short(exc))
            return
        hashes = dataset.hashes[rows]
        _, first = np.unique(hashes, return_index=True)
        distinct = rows[np.sort(first)]  # identical records are computed once
        found, _ = self.cache.map_store(key).locate(dataset.hashes[distinct])
        missing = distinct[~found]
        total = len(distinct)
        todo = len(missing) if exact else min(len(missing), at_most)
        cached = total - len(missing)
        state = "hit" if not len(missing) else ("miss" if cached == 0 else "partial")
        estimate = Estimate(state, fraction=cached / total if total else 1.0, rows=todo, exact=exact)
        if len(missing) and node.spec.cost is not None:
            estimate.work = self.work(node, missing, scale=todo / len(missing))
        self.result.nodes[node.id] = estimate

    def value_node(self, node: Node) -> None:
        try:
            args = self.arguments(node)
            ctx = RunContext(self.engine, node, {}, self.engine.pool)
            work = node.spec.cost(ctx, None, **args) if node.spec.cost is not None else None
        except NotCached:
            self.result.nodes[node.id] = Estimate("miss", note="depends on results not computed yet")
            return
        except Exception as exc:
            self.result.nodes[node.id] = Estimate("miss", note=_short(exc))
            return
        if work is None:
            return
        left = work.steps or work.tokens or work.backward_tokens
        self.result.nodes[node.id] = Estimate("miss" if left else "hit", work=work if left else None)

    def work(self, node: Node, rows: np.ndarray, scale: float = 1.0) -> Work | None:
        try:
            args = self.arguments(node)
            ctx = RunContext(self.engine, node, {}, self.datasets.get(node.dataset or "pool"))
            work = node.spec.cost(ctx, rows, **args)
        except Exception as exc:  # an estimate must never stop `compile`
            return Work(records=int(round(len(rows) * scale)), note=f"not estimated: {_short(exc)}")
        return work.scaled(scale) if scale != 1.0 else work

    def arguments(self, node: Node) -> dict:
        """The op's arguments as the run will give them; a model trained first is stood in for by its base."""
        spec = node.spec
        args = {}
        for p in spec.params:
            if p.name == spec.maps_over or p.binds is not None:
                continue  # the mapped dataset reaches the op through ctx; functions are not resolved
            if p.name in node.roles:
                value = self.resolve(node.inputs[node.roles.index(p.name)])
            elif p.name in node.values:
                value = node.values[p.name]
            else:
                continue
            if p.kind is Kind.BUDGET and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = Budget(count=int(value))
            args[p.name] = value
        return args

    def resolve(self, node_id: str):
        node = self.plan.nodes[node_id]
        if node.kind is Kind.SELECTOR and node.id in self.rows:
            return Selection(self.rows[node.id].indices, "estimate", "estimate")
        try:
            return self.engine.value(node_id, {})
        except NotCached:
            if node.kind is not Kind.MODEL:
                raise
            for nid in node.inputs:  # e.g. checkpoint(finetune(model)) -> model
                if self.plan.nodes[nid].kind is Kind.MODEL:
                    return self.resolve(nid)
            raise


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:80]


@deep_recursion()
def estimate(plan: Plan, datasets: dict[str, Dataset], cache: Cache) -> PlanEstimate:
    """Each node's cache state for this pool and the model work a run would do (see the module docstring)."""
    return Estimator(plan, datasets, cache).run()


def format_work(work: Work, exact: bool = True) -> str:
    """``569 records, 71,234 tokens forward, ≈ 3m10s`` (``at most ...`` when only a bound is known)."""
    from datasel.dsl.progress import duration as _duration

    parts = [f"{work.records:,} records"]
    if work.tokens:
        parts.append(f"{work.tokens:,} tokens forward")
    if work.backward_tokens:
        parts.append(f"{work.backward_tokens:,} tokens forward+backward")
    if work.steps:
        parts.append(f"{work.steps:,} optimizer steps")
    if work.generated_tokens:
        parts.append(f"{work.generated_tokens:,} tokens generated")
    if work.seconds is not None:
        parts.append(f"≈ {_duration(work.seconds)}")
    if work.note:
        parts.append(work.note)
    return ("" if exact else "at most ") + ", ".join(parts)

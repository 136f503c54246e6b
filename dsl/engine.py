"""Runs a plan against datasets, through the cache.

Evaluation is demand-driven.  The output selector asks its input set for its
records, a selector asks its scores for exactly the rows it sees, a map op
computes only the rows that are not cached yet (``length > 20 | topk(ifd, 5%)``
runs the language model on the survivors only).  Set-level results
(selections, partitions) are cached whole under a run-time key; map results
per record under the op's map key and the record's content hash.

Run-time keys are hashes of (op, op version, canonical parameters, the keys of
the inputs), with the pool's content fingerprint at the leaves; a variable
(a group, an iteration round's selection) contributes the identity of the
selection it is bound to, so every round is cached under its own selection.
Map keys leave out the dataset being mapped, which is what lets a grown pool
reuse every row computed before.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasel.dsl.cache import Cache
from datasel.dsl.data import Dataset
from datasel.dsl.plan import Node, Plan, digest
from datasel.ops.context import Grouping, Selection
from datasel.ops.registry import Budget, Kind


class OpError(Exception):
    """An operator failed; the message names the op and its recipe position."""

    def __init__(self, node: Node, message: str, cause: BaseException | None = None):
        where = f"{node.span.location()}: " if node.span else ""
        super().__init__(f"{where}error in {node.label()}: {message}")
        self.node = node
        self.cause = cause


class NotCached(Exception):
    """Raised in probe mode when a value would have to be computed."""


@dataclass
class NodeStats:
    """What happened to one plan node during a run (for the manifest)."""

    status: str = "cached"  # computed | cached | partial
    seconds: float = 0.0
    rows_computed: int = 0
    rows_cached: int = 0
    applications: int = 0
    from_cache: int = 0
    needed: bool = False
    # map ops: per dataset row, whether it was asked for yet in this run (to count each row once)
    seen: Any = None

    def to_json(self, node: Node) -> dict:
        status = self.status
        if node.role == "map":
            if self.rows_computed and self.rows_cached:
                status = "partial"
            elif self.rows_computed:
                status = "computed"
            else:
                status = "cached"
        elif self.applications > self.from_cache:
            status = "computed"
        else:
            status = "cached"
        return {
            "id": node.id,
            "op": node.op,
            "status": status,
            "seconds": round(self.seconds, 4),
            "rows_computed": self.rows_computed,
            "rows_cached": self.rows_cached,
            "applications": self.applications,
            "needed": self.needed,
        }


class Progress:
    """A tqdm bar on a terminal; silent with --quiet or when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    @contextmanager
    def bar(self, total: int, desc: str):
        if not self.enabled or total <= 0:
            yield _NullBar()
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit="rows", dynamic_ncols=True, leave=False, file=sys.stderr) as bar:
            yield bar


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def _selection(indices: np.ndarray, pool: Dataset) -> Selection:
    indices = np.asarray(indices, dtype=np.int64)
    ordered = np.sort(indices)
    key = hashlib.blake2b(pool.fingerprint.encode() + ordered.tobytes(), digest_size=16).hexdigest()
    # Order-free: the same records give the same identity in any pool, in any order.
    content = hashlib.blake2b(np.sort(pool.hashes[ordered]).tobytes(), digest_size=16).hexdigest()
    return Selection(indices, key, content)


class Values:
    """Per-record values of one node, evaluated lazily for any rows."""

    def __init__(self, engine: "Engine", node: Node, env: dict, dataset: Dataset, key: str):
        self.engine = engine
        self.node = node
        self.env = env
        self.dataset = dataset
        self.key = key

    @property
    def label(self) -> str:
        return self.node.names[0] if self.node.names else self.node.label()

    def values(self, idx) -> np.ndarray:
        return self.column("value", idx)

    def column(self, name: str, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.engine._compute_rows(self, name, idx)


class Engine:
    """Evaluates one plan; create one per run."""

    def __init__(self, plan: Plan, datasets: dict[str, Dataset], cache: Cache, *, quiet: bool = False,
                 probe: bool = False, log=None):
        self.plan = plan
        self.datasets = datasets
        self.cache = cache
        self.quiet = quiet
        self.probe = probe
        self.progress = Progress(not quiet)
        self.stats: dict[str, NodeStats] = {nid: NodeStats() for nid in plan.nodes}
        self.exclusions: dict[str, set] = {}
        self.warnings: list[str] = []
        self._memo: dict[tuple, Any] = {}
        self._keys: dict[tuple, str] = {}
        # group selection key -> (sizes of all groups of its partition, its position)
        self._groups: dict[str, tuple[tuple[int, ...], int]] = {}
        self._quotas: dict[tuple, list[int]] = {}
        # Seconds spent in nested timers, per open timer: inputs evaluated lazily inside an
        # op are charged to their own node, not to the op that pulled them.
        self._timer_children: list[float] = []
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        cache.on_corrupt = self._corrupt

    # ------------------------------------------------------------ reporting
    def log(self, message: str) -> None:
        if not self.quiet:
            self._log(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._log(f"warning: {message}")

    def exclude(self, reason: str, indices) -> None:
        """Record pool rows left out for ``reason`` (counted once per record in the manifest)."""
        self.exclusions.setdefault(reason, set()).update(int(i) for i in indices)

    def _corrupt(self, key: str, reason: str) -> None:
        self.warn(f"cache entry {key[:16]} failed verification ({reason}); recomputing it")

    # ------------------------------------------------------------ public API
    @property
    def pool(self) -> Dataset:
        return self.datasets["pool"]

    def run(self) -> Selection:
        """Evaluate the plan's output selection."""
        return self.selection(self.plan.output, {})

    def selection(self, node_id: str, env: dict) -> Selection:
        value = self.value(node_id, env)
        if isinstance(value, Dataset):
            return _selection(np.arange(len(value)), value)
        if not isinstance(value, Selection):
            raise TypeError(f"node {self.plan.nodes[node_id].label()} is not a selection")
        return value

    # ------------------------------------------------------------------ keys
    def key(self, node_id: str, env: dict) -> str:
        """The run-time identity of a node's result under variable bindings ``env``."""
        node = self.plan.nodes[node_id]
        bound = tuple(sorted((v, env[v].key) for v in node.free_vars if v in env))
        memo_key = (node_id, bound)
        if memo_key in self._keys:
            return self._keys[memo_key]
        if node.op == "dataset":
            ds = self.datasets.get(node.params["name"])
            key = ds.fingerprint if ds is not None else f"missing:{node.params['name']}"
        elif node.op == "var":
            key = env[node_id].key if node_id in env else f"var:{node_id}"
        else:
            parts = []
            for role, inp in zip(node.roles, node.inputs):
                if node.role == "map" and role == "data":
                    continue  # map results are per record: the dataset is not part of the key
                inp_node = self.plan.nodes[inp]
                if (node.role == "value" and inp_node.kind is Kind.SELECTOR
                        and all(v in env for v in inp_node.free_vars)):
                    # Models trained on a selection depend on the records' contents only.
                    parts.append((role, "content", self.selection(inp, env).content_key))
                    continue
                if node.role == "value" and inp_node.op == "dataset" and inp_node.params["name"] in self.datasets:
                    ds = self.datasets[inp_node.params["name"]]
                    parts.append((role, "content", _selection(np.arange(len(ds)), ds).content_key))
                    continue
                parts.append((role, self.key(inp, env)))
            body_key = None
            if node.body is not None:
                inner = {k: v for k, v in env.items() if k != node.var}
                body_key = self.key(node.body, inner)
            extra = None
            if node.spec is not None and node.spec.key_fn is not None:
                try:
                    extra = node.spec.key_fn(**node.values)
                except (KeyboardInterrupt, OpError):
                    raise
                except Exception as exc:  # e.g. a model that is not installed
                    raise self._op_error(node, exc) from exc
            key = digest(node.op, node.version, node.params, parts, body_key, extra)
        self._keys[memo_key] = key
        return key

    # ----------------------------------------------------------- evaluation
    def value(self, node_id: str, env: dict) -> Any:
        node = self.plan.nodes[node_id]
        bound = tuple(sorted((v, env[v].key) for v in node.free_vars if v in env))
        memo_key = (node_id, bound)
        if memo_key in self._memo:
            return self._memo[memo_key]
        self.stats[node_id].needed = True
        result = self._evaluate(node, env)
        self._memo[memo_key] = result
        return result

    def _evaluate(self, node: Node, env: dict) -> Any:
        role = node.role
        if node.op == "dataset":
            name = node.params["name"]
            if name not in self.datasets:
                raise OpError(node, f"this recipe uses the '{name}' dataset; pass it with --{name} FILE")
            return self.datasets[name]
        if node.op == "const":
            return node.values["value"]
        if node.op == "var":
            if node.id not in env:
                raise OpError(node, "variable used outside its scope")
            return env[node.id]
        if role == "map":
            data = self.value(node.inputs[node.roles.index("data")], env)
            return Values(self, node, env, data, self.key(node.id, env))
        if role == "scores":
            return Values(self, node, env, self._scores_dataset(node, env), self.key(node.id, env))
        if role == "value":
            return self._evaluate_value(node, env)
        return self._evaluate_set(node, env)

    def _scores_dataset(self, node: Node, env: dict) -> Dataset:
        return self.datasets.get(node.dataset or "pool") or self.pool

    # ---------------------------------------------------- set-level results
    def _cacheable(self, node: Node) -> bool:
        if self.probe:
            return True
        if not node.free_vars:
            return True
        return bool(node.spec is not None and node.spec.costly)

    def _evaluate_set(self, node: Node, env: dict):
        key = self.key(node.id, env)
        quotas = self._group_budgets(node, env)
        if quotas:
            key = digest(key, sorted((k, str(v)) for k, v in quotas.items()))
        stats = self.stats[node.id]
        stats.applications += 1
        cacheable = self._cacheable(node)
        if cacheable:
            cached = self._load_set(node, key)
            if cached is not None:
                stats.from_cache += 1
                return cached
        if self.probe:
            raise NotCached(node.id)
        if node.spec is not None and node.spec.costly:
            with self.cache.lock(key):
                cached = self._load_set(node, key)
                if cached is not None:
                    stats.from_cache += 1
                    return cached
                result = self._compute_set(node, env, key)
        else:
            result = self._compute_set(node, env, key)
        if cacheable:
            self._store_set(node, key, result)
        return result

    def _load_set(self, node: Node, key: str):
        entry = self.cache.get(key)
        if entry is None:
            return None
        if node.kind is Kind.PARTITION:
            if "labels" not in entry.arrays:
                return None
            subset = np.asarray(entry.arrays["subset"], dtype=np.int64)
            return Grouping(subset, np.asarray(entry.arrays["labels"], dtype=np.int64), key)
        if "indices" not in entry.arrays:
            return None
        return _selection(np.asarray(entry.arrays["indices"], dtype=np.int64), self.pool)

    def _store_set(self, node: Node, key: str, result) -> None:
        info = {"op": node.op, "node": node.id, "label": node.label()}
        if isinstance(result, Grouping):
            self.cache.put(key, {"subset": result.subset, "labels": result.labels}, info)
        else:
            self.cache.put(key, {"indices": result.indices}, info)

    def _compute_set(self, node: Node, env: dict, key: str):
        op = node.op
        if op in ("union", "intersect", "difference"):
            left = self.selection(node.inputs[0], env)
            right = self.selection(node.inputs[1], env)
            with self._timed(node):
                return _selection(_combine(op, left.indices, right.indices), self.pool)
        if op == "restrict":
            base = self.selection(node.inputs[0], env)
            fixed = self.selection(node.inputs[1], env)
            with self._timed(node):
                keep = fixed.indices[np.isin(fixed.indices, base.indices)]
                return _selection(keep, self.pool)
        if op == "per_group":
            return self._per_group(node, env)
        if node.spec is not None and node.body is not None:
            return self._iterate(node, env, key)
        input_set = self.selection(node.inputs[0], env)
        subset = np.sort(input_set.indices)
        if op == "compare":
            return self._compare(node, env, subset)
        args = self._arguments(node, env)
        args.update(self._group_budgets(node, env))
        ctx = RunContext(self, node, env, self.pool)
        with self._timed(node):
            try:
                result = node.spec.fn(ctx, subset, **args)
            except (OpError, KeyboardInterrupt, NotCached):
                raise
            except Exception as exc:
                raise self._op_error(node, exc) from exc
        if node.kind is Kind.PARTITION:
            labels = np.asarray(result, dtype=np.int64)
            if labels.shape != subset.shape:
                raise OpError(node, f"returned {labels.shape[0] if labels.ndim else 0} labels for {len(subset)} records")
            return Grouping(subset, labels, key)
        picks = np.asarray(result, dtype=np.int64).reshape(-1)
        if len(np.unique(picks)) != len(picks) or not np.isin(picks, subset).all():
            raise OpError(node, "returned indices outside its input or duplicated (a bug in the op)")
        return _selection(picks, self.pool)

    def _compare(self, node: Node, env: dict, subset: np.ndarray) -> Selection:
        scores = self.value(node.inputs[node.roles.index("scores")], env)
        values = np.asarray(scores.values(subset), dtype=np.float64)
        if "rhs" in node.roles:
            rhs_value = self.value(node.inputs[node.roles.index("rhs")], env)
            rhs = rhs_value.values(subset) if isinstance(rhs_value, Values) else float(rhs_value)
        else:
            rhs = float(node.values["rhs"])
        with self._timed(node):
            nan = np.isnan(values) | (np.isnan(rhs) if isinstance(rhs, np.ndarray) else math.isnan(rhs))
            with np.errstate(invalid="ignore"):
                mask = _COMPARE[node.params["op"]](values, rhs) & ~nan
            if nan.any():
                self.exclude(f"no score ({scores.label}) in comparison", subset[nan])
        return _selection(subset[mask], self.pool)

    def _per_group(self, node: Node, env: dict) -> Selection:
        grouping = self.value(node.inputs[0], env)
        picks = []
        groups = list(grouping.groups())
        sizes = tuple(len(members) for _, members in groups)
        with self.progress.bar(len(groups), f"{node.label()} groups") as bar:
            for position, (_, members) in enumerate(groups):
                inner = dict(env)
                group = _selection(members, self.pool)
                self._groups[group.key] = (sizes, position)
                inner[node.var] = group
                picks.append(self.selection(node.body, inner).indices)
                bar.update(1)
        indices = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        return _selection(indices, self.pool)

    def _iterate(self, node: Node, env: dict, key: str) -> Selection:
        args = self._arguments(node, env)
        current: Selection = args["init"]
        rounds = int(args["rounds"])
        for r in range(1, rounds + 1):
            round_key = digest("round", key, r)
            cached = self._load_set(node, round_key)
            if cached is not None:
                current = cached
                self.log(f"{node.label()}: round {r}/{rounds} cached ({len(current)} records)")
                continue
            inner = dict(env)
            inner[node.var] = current
            started = time.perf_counter()
            current = self.selection(node.body, inner)
            self._store_set(node, round_key, current)
            self.log(f"{node.label()}: round {r}/{rounds} done in {time.perf_counter() - started:.1f}s "
                     f"({len(current)} records)")
        return current

    def _group_budgets(self, node: Node, env: dict) -> dict[str, Budget]:
        """Percentage budgets of a selector applied directly to a partition's groups.

        ``kmeans(x, 100) | topk(s, 10%)`` keeps exactly ⌊10% × N⌋ records in
        all: each group gets ⌊10% × n_g⌋ and the records left over go, one
        each, to the groups with the largest remainders (ties: lower group
        number).  A selector that sees a filtered group (``P | (f < 1 |
        topk(s, 10%))``) uses ⌊10% × its input⌋ instead.
        """
        if node.spec is None or not node.inputs:
            return {}
        var = self.plan.nodes[node.inputs[0]]
        if var.op != "var" or var.params.get("scope") != "group" or node.inputs[0] not in env:
            return {}
        info = self._groups.get(env[node.inputs[0]].key)
        if info is None:
            return {}
        sizes, position = info
        if node.values.get("chunks", "exact") != "exact":
            return {}  # the op applies its own per-group rounding rule
        out = {}
        for p in node.spec.params:
            value = node.values.get(p.name)
            if isinstance(value, Budget) and value.fraction is not None and not value.of_pool:
                memo = (sizes, value.fraction)
                if memo not in self._quotas:
                    quotas = largest_remainder(value.fraction, sizes)
                    self._quotas[memo] = quotas
                    starved = sum(1 for q, n in zip(quotas, sizes) if n and not q)
                    if starved and not self.probe:
                        # Which groups go without is then decided by remainders and group
                        # numbers, not by the selector's scores: worth telling the user.
                        self.warn(f"{node.label()}: {value} of {sum(sizes)} records is {sum(quotas)}, fewer "
                                  f"than the {sum(1 for n in sizes if n)} non-empty groups, so {starved} "
                                  f"{'group gets' if starved == 1 else 'groups get'} none (largest remainder, ties to the lower group number); use fewer "
                                  f"groups or a larger budget")
                out[p.name] = Budget(count=self._quotas[memo][position])
        return out

    # ------------------------------------------------------------ values
    def _evaluate_value(self, node: Node, env: dict):
        args = self._arguments(node, env)
        ctx = RunContext(self, node, env, self.pool)
        stats = self.stats[node.id]
        stats.applications += 1
        with self._timed(node):
            try:
                return node.spec.fn(ctx, **args)
            except (OpError, KeyboardInterrupt, NotCached):
                raise
            except Exception as exc:
                raise self._op_error(node, exc) from exc

    def _arguments(self, node: Node, env: dict) -> dict:
        spec = node.spec
        args: dict[str, Any] = {}
        for p in spec.params:
            if spec.role == "map" and p.name == "data":
                continue  # the mapped dataset reaches the op through ctx
            if p.name in node.roles:
                inp = node.inputs[node.roles.index(p.name)]
                value = self.value(inp, env)
                if isinstance(value, Dataset) and p.kind is Kind.SELECTOR:
                    value = _selection(np.arange(len(value)), value)
                if p.kind is Kind.BUDGET and isinstance(value, (int, float, np.integer, np.floating)):
                    value = _count_budget(node, value)
                args[p.name] = value
            elif p.name in node.values:
                value = node.values[p.name]
                if p.kind is Kind.BUDGET and isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = _count_budget(node, value)
                args[p.name] = value
        return args

    # ------------------------------------------------------------ map rows
    def _compute_rows(self, handle: Values, column: str, idx: np.ndarray) -> np.ndarray:
        node = handle.node
        if node.role == "scores":
            return self._scores_rows(handle, idx)
        stats = self.stats[node.id]
        dataset = handle.dataset
        if len(idx) == 0:
            width = node.spec.extra.get("width")
            return np.zeros((0,) if width is None else (0, width))
        store = self.cache.map_store(handle.key)
        found, where = store.locate(dataset.hashes[idx])
        found_before = found
        if not found.all():
            if self.probe:
                raise NotCached(node.id)
            with self.cache.lock(f"map-{handle.key}"):
                store.refresh()  # another process may have filled rows meanwhile
                found, where = store.locate(dataset.hashes[idx])
                found_before = found
                missing = idx[~found]
                if len(missing):
                    # Identical records are computed once.
                    _, first = np.unique(dataset.hashes[missing], return_index=True)
                    self._fill_rows(handle, store, missing[np.sort(first)])
                    found, where = store.locate(dataset.hashes[idx])
        # A row counts as cached if it was in the cache the first time this run asked for it.
        if stats.seen is None or len(stats.seen) != len(dataset):
            stats.seen = np.zeros(len(dataset), dtype=np.bool_)
        first_ask = ~stats.seen[idx]
        stats.seen[idx] = True
        stats.rows_cached += int(np.count_nonzero(first_ask & found_before))
        if not found.all():
            raise OpError(node, "results missing from the cache after computing them")
        return store.read(column, where)

    def _fill_rows(self, handle: Values, store, rows: np.ndarray) -> None:
        node = handle.node
        spec = node.spec
        stats = self.stats[node.id]
        args = self._arguments(node, handle.env)
        ctx = RunContext(self, node, handle.env, handle.dataset)
        chunk = max(1, spec.chunk_rows)
        info = {"op": node.op, "node": node.id, "label": node.label(), "version": spec.version}
        with self.progress.bar(len(rows), node.names[0] if node.names else node.label()) as bar:
            ctx._bar = bar
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                ctx._advanced = 0
                with self._timed(node):
                    try:
                        out = spec.fn(ctx, part, **args)
                    except (OpError, KeyboardInterrupt, NotCached):
                        raise
                    except Exception as exc:
                        raise self._op_error(node, exc) from exc
                columns = out if isinstance(out, dict) else {"value": out}
                for name, array in columns.items():
                    array = np.asarray(array)
                    if array.shape[:1] != (len(part),):
                        raise OpError(node, f"column {name!r} has {array.shape[:1]} rows for {len(part)} records")
                    columns[name] = array
                # Persist every chunk as it finishes: an interrupted run keeps it.
                store.append(handle.dataset.hashes[part], columns, info)
                stats.rows_computed += len(part)
                bar.update(max(0, len(part) - ctx._advanced))

    def _scores_rows(self, handle: Values, idx: np.ndarray) -> np.ndarray:
        node = handle.node
        env = handle.env
        if node.op == "arith":
            left = self.value(node.inputs[0], env)
            right = self.value(node.inputs[1], env)
            a = left.values(idx) if isinstance(left, Values) else float(left)
            b = right.values(idx) if isinstance(right, Values) else float(right)
            with np.errstate(divide="ignore", invalid="ignore"):
                return _ARITH[node.params["op"]](np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        if node.op == "neg":
            inner = self.value(node.inputs[0], env)
            return -np.asarray(inner.values(idx), dtype=np.float64)
        args = self._arguments(node, env)
        ctx = RunContext(self, node, env, handle.dataset)
        try:
            result = node.spec.fn(ctx, idx, **args)
        except (OpError, KeyboardInterrupt, NotCached):
            raise
        except Exception as exc:
            raise self._op_error(node, exc) from exc
        return np.asarray(result)

    # ------------------------------------------------------------ helpers
    @contextmanager
    def _timed(self, node: Node):
        started = time.perf_counter()
        self._timer_children.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            children = self._timer_children.pop()
            self.stats[node.id].seconds += max(0.0, elapsed - children)
            if self._timer_children:
                self._timer_children[-1] += elapsed

    def _op_error(self, node: Node, exc: Exception) -> OpError:
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, (ValueError, RuntimeError, FileNotFoundError)) or os.environ.get("DATASEL_DEBUG"):
            message = f"{type(exc).__name__}: {message}"
        return OpError(node, message, exc)

    def node_stats(self) -> list[dict]:
        return [self.stats[n.id].to_json(n) for n in self.plan.reachable()]


def largest_remainder(fraction, sizes) -> list[int]:
    """Split ⌊fraction × Σsizes⌋ over groups: ⌊fraction × n_g⌋ each, then +1 by largest remainder."""
    from fractions import Fraction

    fraction = Fraction(fraction)
    exact = [fraction * n for n in sizes]
    quotas = [int(x) for x in exact]
    left = int(fraction * sum(sizes)) - sum(quotas)
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - quotas[g]), g))
    for g in order[:left]:
        quotas[g] += 1
    return quotas


def _count_budget(node: Node, value) -> Budget:
    if float(value) != int(value) or value < 0:
        raise OpError(node, f"a budget must be a whole, non-negative count; got {value}")
    return Budget(count=int(value))


def _combine(op: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    if op == "union":
        extra = right[~np.isin(right, left)]
        return np.concatenate([left, extra])
    if op == "intersect":
        return left[np.isin(left, right)]
    return left[~np.isin(left, right)]


_COMPARE = {
    "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
    "==": np.equal, "!=": np.not_equal,
}
_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}


class RunContext:
    """The ``ctx`` handed to op implementations (see :mod:`datasel.ops.context`)."""

    def __init__(self, engine: Engine, node: Node, env: dict, dataset: Dataset):
        self._engine = engine
        self._node = node
        self._env = env
        self._dataset = dataset
        self._bar = _NullBar()
        self._advanced = 0

    @property
    def n_pool(self) -> int:
        return len(self._engine.pool)

    @property
    def node_label(self) -> str:
        return self._node.label()

    @property
    def cache_root(self) -> Path:
        return self._engine.cache.root

    @property
    def quiet(self) -> bool:
        return self._engine.quiet

    def dataset(self, name: str = "pool") -> Dataset:
        return self._engine.datasets[name]

    def records(self, idx, data: Dataset | None = None) -> list[dict]:
        ds = data or self._dataset
        return [ds.records[int(i)] for i in idx]

    def raw(self, idx, data: Dataset | None = None) -> list[dict]:
        ds = data or self._dataset
        return [ds.raw[int(i)] for i in idx]

    def exclude(self, reason: str, indices) -> None:
        if len(indices):
            self._engine.exclude(reason, indices)

    def advance(self, rows: int) -> None:
        self._advanced += rows
        self._bar.update(rows)

    def progress(self, total: int, desc: str):
        return self._engine.progress.bar(total, desc)

    def work_dir(self) -> Path:
        return self._engine.cache.work_dir(self._engine.key(self._node.id, self._env))

    def log(self, message: str) -> None:
        self._engine.log(f"{self._node.label()}: {message}")

    def warn(self, message: str) -> None:
        self._engine.warn(f"{self._node.label()}: {message}")

    def traceback(self) -> str:  # pragma: no cover - debugging aid
        return traceback.format_exc()

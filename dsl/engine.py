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
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasel.dsl.cache import Cache, ReadOnlyCacheError
from datasel.dsl.data import Dataset
from datasel.dsl.executor import Executor, LocalExecutor
from datasel.dsl.plan import Node, Plan, digest
from datasel.dsl.progress import NullBar, Progress, duration
from datasel.ops.contract import Batch, Budget, Grouping, Kind, Role, Selection


#: Map results are persisted at least this often (seconds of work), and at most every chunk_rows records.
PERSIST_SECONDS = 60.0
#: The first chunk of a map fill is small, to measure the rate before sizing the next ones.
FIRST_CHUNK_ROWS = 4
#: Batch size on the Ray executor (batches are spread over workers, not sized by time).
RAY_BATCH_ROWS = 64
#: How often a fill looks again when every row it needs is being computed by another process.
WAIT_SECONDS = 0.5


class OpError(Exception):
    """An operator failed; the message names the op and its recipe position."""

    def __init__(self, node: Node, message: str, cause: BaseException | None = None):
        where = f"{node.span.location()}: " if node.span else ""
        super().__init__(f"{where}error in {node.label()}: {message}")
        self.node = node
        self.cause = cause


class NotCached(Exception):
    """Raised in probe mode when a value would have to be computed."""


#: The in-process executor, shared by the engines of one process (it keeps set-up models for reuse).
LOCAL = LocalExecutor()

#: Raised inside an op but not the op's fault: passed on as they are, not wrapped in an OpError.
PASS_THROUGH = (OpError, KeyboardInterrupt, NotCached, ReadOnlyCacheError)


@dataclass
class Exclusion:
    """Records an op dropped with a reason of its own (``ctx.exclude``), kept with its cached result."""

    reason: str
    detail: str | None
    indices: np.ndarray
    values: dict


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
        if node.role is Role.MAP:
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


def _index_problem(name: str, a: np.ndarray, n: int) -> str | None:
    if a.ndim != 1 or a.dtype.kind not in "iu":
        return f"{name} is not a list of record numbers ({a.dtype}, {a.ndim}-d)"
    if len(a) and (a.min() < 0 or a.max() >= n):
        return f"{name} holds record numbers outside 0..{n - 1}"
    if len(np.unique(a)) != len(a):
        return f"{name} holds a record twice"
    return None


def _stored_set_problem(node: Node, entry, n: int) -> str | None:
    """Why a verified cache entry cannot be this selection / partition node's result on a pool of ``n``
    records (wrong arrays, record numbers out of range or repeated, lengths that disagree), or None."""
    arrays = entry.arrays
    if node.kind is Kind.PARTITION or node.role is Role.SET_SCORES:
        second = "labels" if node.kind is Kind.PARTITION else "scores"
        if "subset" not in arrays or second not in arrays:
            return f"no subset/{second} arrays"
        problem = _index_problem("subset", arrays["subset"], n)
        if problem is None and (arrays[second].ndim == 0 or len(arrays[second]) != len(arrays["subset"])):
            problem = f"{len(arrays['subset'])} records but {second} for a different number"
        if problem is None and node.kind is Kind.PARTITION and arrays["labels"].dtype.kind not in "iu":
            problem = "group labels are not whole numbers"
        if problem is not None or node.role is Role.SET_SCORES:
            return problem
    else:
        if "indices" not in arrays:
            return "no indices array"
        problem = _index_problem("indices", arrays["indices"], n)
    exclusions = entry.info.get("exclusions", []) if isinstance(entry.info, dict) else []
    if problem is None and not isinstance(exclusions, list):
        return "exclusions are not a list"
    for i, desc in enumerate(exclusions):
        if problem is not None:
            break
        if not isinstance(desc, dict) or not isinstance(desc.get("reason"), str) or f"x{i}_indices" not in arrays:
            return f"exclusion {i} is malformed"
        problem = _index_problem(f"exclusion {i}", arrays[f"x{i}_indices"], n)
        for name in desc.get("values", []) if problem is None else ():
            column = arrays.get(f"x{i}_v_{name}")
            if column is None or column.ndim == 0 or len(column) != len(arrays[f"x{i}_indices"]):
                problem = f"exclusion {i} value {name!r} does not match its records"
    return problem


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


class SubsetScores:
    """Per-record Scores of a set-level op (``set_scores``): computed for a subset together, cached whole.

    Rows outside the subset have no value (NaN).
    """

    def __init__(self, engine: "Engine", node: Node, env: dict, subset: np.ndarray, scores: np.ndarray, key: str):
        self.engine, self.node, self.env, self.key = engine, node, env, key
        self.dataset = engine.pool
        self.subset = np.asarray(subset, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.indices = self.subset  # what reached it (for plan bookkeeping)

    @property
    def label(self) -> str:
        return self.node.names[0] if self.node.names else self.node.label()

    def values(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        pos = np.searchsorted(self.subset, idx)
        inside = pos < len(self.subset)
        inside[inside] &= self.subset[pos[inside]] == idx[inside]
        out = np.full(len(idx), np.nan)
        out[inside] = self.scores[pos[inside]]
        return out

    def column(self, name: str, idx) -> np.ndarray:
        if name != "value":
            raise KeyError(f"{self.label} has only one output")
        return self.values(idx)


class Engine:
    """Evaluates one plan; create one per run."""

    def __init__(self, plan: Plan, datasets: dict[str, Dataset], cache: Cache, *, quiet: bool = False,
                 probe: bool = False, log=None, recipe: str | None = None,
                 persist_seconds: float = PERSIST_SECONDS, progress: Progress | None = None,
                 executor: Executor | None = None):
        self.plan = plan
        self.executor = executor or LOCAL
        self.recipe = recipe
        self.persist_seconds = float(persist_seconds)
        self.datasets = datasets
        self.cache = cache
        self._stores: dict = {}  # one MapStore per map key for the whole run (see _store)
        self.quiet = quiet
        self.probe = probe
        self.progress = progress or Progress(not quiet)
        self.stats: dict[str, NodeStats] = {nid: NodeStats() for nid in plan.nodes}
        # (node id, bound variables) -> what the op said about the records it dropped
        self.exclusions: dict[tuple, list[Exclusion]] = {}
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
        cache.on_repair = self.warn
        self.warnings.extend(cache.repairs)  # repairs made when the cache was opened (already printed)
        self._rejected: set[str] = set()  # keys whose stored entry held the wrong content: overwrite them

    # ------------------------------------------------------------ reporting
    def log(self, message: str) -> None:
        if not self.quiet:
            self._log(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._log(f"warning: {message}")

    def record_exclusion(self, node: Node, env: dict, reason: str, indices, detail: str | None = None,
                         values: dict | None = None) -> None:
        """Keep what an op said about records it dropped (``ctx.exclude``), for the funnel and ``why``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        clean = {}
        for name, column in (values or {}).items():
            column = np.asarray(column)
            if column.shape[:1] != indices.shape:
                raise OpError(node, f"exclude(): value {name!r} has {column.shape[:1]} rows for {len(indices)} records")
            if column.dtype == object:
                column = column.astype(str)
            clean[name] = column
        self.exclusions.setdefault(self.bound_key(node.id, env), []).append(
            Exclusion(reason, detail, indices, clean))

    def exclusions_of(self, node_id: str, env: dict) -> list[Exclusion]:
        """What the op of ``node_id`` said about the records it dropped, under ``env``."""
        return self.exclusions.get(self.bound_key(node_id, env), [])

    def bound_key(self, node_id: str, env: dict) -> tuple:
        """The memo key of a node under variable bindings: its id and the identities of its bound variables."""
        node = self.plan.nodes[node_id]
        return node_id, tuple(sorted((v, env[v].key) for v in node.free_vars if v in env))

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
        if node.role is Role.DATASET:
            ds = self.datasets.get(node.params["name"])
            key = ds.fingerprint if ds is not None else f"missing:{node.params['name']}"
        elif node.role is Role.VARIABLE:
            key = env[node_id].key if node_id in env else f"var:{node_id}"
        elif node.role is Role.CONST:
            key = digest(node.op, node.params)
        else:
            parts = []
            for role, inp in zip(node.roles, node.inputs):
                if node.spec.maps_over == role:
                    continue  # map results are per record: the dataset is not part of the key
                inp_node = self.plan.nodes[inp]
                if (node.role is Role.VALUE and inp_node.kind is Kind.SELECTOR
                        and all(v in env for v in inp_node.free_vars)):
                    # Models trained on a selection depend on the records' contents only.
                    parts.append((role, "content", self.selection(inp, env).content_key))
                    continue
                if node.role is Role.VALUE and inp_node.role is Role.DATASET and inp_node.params["name"] in self.datasets:
                    ds = self.datasets[inp_node.params["name"]]
                    parts.append((role, "content", _selection(np.arange(len(ds)), ds).content_key))
                    continue
                part = (role, self.key(inp, env))
                data = inp_node.input(inp_node.spec.maps_over) if inp_node.spec.maps_over else None
                if node.role is not Role.MAP and data is not None:
                    # A map key leaves out the mapped dataset (per-record results are shared), so a
                    # consumer of per-record values of another dataset (similarity's target=embed(minilm,
                    # data=val)) adds that dataset's fingerprint: another --val is another result.
                    data_node = self.plan.nodes[data]
                    # A value computed from the pool's per-record values (knn_graph over the pool) has no
                    # selection input to carry the pool's identity: it adds the pool's too.
                    if data_node.role is Role.DATASET and (data_node.params["name"] != "pool"
                                                           or node.role is Role.VALUE):
                        part = part + (self.key(data_node.id, env),)
                parts.append(part)
            body_key = None
            if node.body is not None:
                inner = {k: v for k, v in env.items() if k != node.var}
                body_key = self.key(node.body, inner)
            extra = None
            if node.spec.key_fn is not None:
                try:
                    extra = node.spec.key_fn(**node.values)
                except PASS_THROUGH:
                    raise
                except Exception as exc:  # e.g. a model that is not installed
                    raise self._op_error(node, exc) from exc
            key = digest(node.op, node.version, node.params, parts, body_key, extra)
        self._keys[memo_key] = key
        return key

    # ----------------------------------------------------------- evaluation
    def value(self, node_id: str, env: dict) -> Any:
        node = self.plan.nodes[node_id]
        memo_key = self.bound_key(node_id, env)
        if memo_key in self._memo:
            return self._memo[memo_key]
        self.stats[node_id].needed = True
        result = self._evaluate(node, env)
        self._memo[memo_key] = result
        return result

    def _evaluate(self, node: Node, env: dict) -> Any:
        role = node.role
        if role is Role.DATASET:
            name = node.params["name"]
            if name not in self.datasets:
                raise OpError(node, f"this recipe uses the '{name}' dataset; pass it with --{name} FILE")
            return self.datasets[name]
        if role is Role.CONST:
            return node.values["value"]
        if role is Role.VARIABLE:
            if node.id not in env:
                raise OpError(node, "variable used outside its scope")
            return env[node.id]
        if role is Role.MAP:
            data = self.value(node.input(node.spec.maps_over), env)
            return Values(self, node, env, data, self.key(node.id, env))
        if role is Role.SCORES:
            return Values(self, node, env, self._scores_dataset(node, env), self.key(node.id, env))
        if role is Role.VALUE:
            return self._evaluate_value(node, env)
        return self._evaluate_set(node, env)

    def _scores_dataset(self, node: Node, env: dict) -> Dataset:
        return self.datasets.get(node.dataset or "pool") or self.pool

    # ---------------------------------------------------- set-level results
    def _cacheable(self, node: Node) -> bool:
        return not node.free_vars or node.spec.costly

    def _evaluate_set(self, node: Node, env: dict):
        key = self.key(node.id, env)
        quotas = self._group_budgets(node, env)
        if quotas:
            key = digest(key, sorted((k, str(v)) for k, v in quotas.items()))
        stats = self.stats[node.id]
        stats.applications += 1
        cacheable = self._cacheable(node)
        if cacheable:
            cached = self._load_set(node, key, env)
            if cached is not None:
                stats.from_cache += 1
                return cached
        if self.probe:
            # A dry run computes cheap selections from cached values, never costly ones, and writes nothing.
            if node.spec.costly:
                raise NotCached(node.id)
            return self._compute_set(node, env, key)
        if node.spec.costly:
            with self.cache.lock(key):
                cached = self._load_set(node, key, env)
                if cached is not None:
                    stats.from_cache += 1
                    return cached
                result = self._compute_set(node, env, key)
        else:
            result = self._compute_set(node, env, key)
        if cacheable:
            self._store_set(node, key, result, self.exclusions_of(node.id, env))
        return result

    def _load_set(self, node: Node, key: str, env: dict | None = None):
        """A cached selection or partition, with the exclusions stored beside it (restored into ``env``'s memo)."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        problem = _stored_set_problem(node, entry, len(self.pool))
        if problem is not None:
            self._rejected.add(key)
            self.cache.discard(key, None)
            self.warn(f"cache entry {key[:16]} holds a wrong result ({problem}); recomputing it")
            return None
        if node.kind is Kind.PARTITION:
            if "labels" not in entry.arrays or (env is not None and not self._restore_exclusions(node, entry, env)):
                return None
            subset = np.asarray(entry.arrays["subset"], dtype=np.int64)
            return Grouping(subset, np.asarray(entry.arrays["labels"], dtype=np.int64), key)
        if node.role is Role.SET_SCORES:
            if "scores" not in entry.arrays:
                return None
            return SubsetScores(self, node, env or {}, np.asarray(entry.arrays["subset"]),
                                np.asarray(entry.arrays["scores"]), key)
        if "indices" not in entry.arrays:
            return None
        if env is not None and not self._restore_exclusions(node, entry, env):
            return None
        return _selection(np.asarray(entry.arrays["indices"], dtype=np.int64), self.pool)

    def _restore_exclusions(self, node: Node, entry, env: dict) -> bool:
        """Put the exclusions stored with a cached set-level result back into ``env``'s memo (False: incomplete)."""
        restored = []
        for i, desc in enumerate(entry.info.get("exclusions", [])):
            prefix = f"x{i}_"
            if prefix + "indices" not in entry.arrays:
                return False
            values = {name: np.asarray(entry.arrays[prefix + "v_" + name]) for name in desc.get("values", [])}
            restored.append(Exclusion(desc["reason"], desc.get("detail"),
                                      np.asarray(entry.arrays[prefix + "indices"], dtype=np.int64), values))
        self.exclusions[self.bound_key(node.id, env)] = restored
        return True

    def entry_info(self, node: Node) -> dict:
        """What a cache entry was computed for (shown by ``datasel cache ls``)."""
        info = {"op": node.op, "node": node.id, "label": node.label()}
        if self.recipe:
            info["recipe"] = self.recipe
        if "pool" in self.datasets:
            info["pool_fingerprint"] = self.pool.fingerprint
            info["pool_path"] = str(self.pool.path)
        return info

    def _store_set(self, node: Node, key: str, result, exclusions: list[Exclusion] = ()) -> None:
        info = self.entry_info(node)
        if isinstance(result, SubsetScores):
            self.cache.put(key, {"subset": result.subset, "scores": result.scores}, info, replace=key in self._rejected)
            return
        arrays = ({"subset": result.subset, "labels": result.labels} if isinstance(result, Grouping)
                  else {"indices": result.indices})
        described = []
        for i, ex in enumerate(exclusions):
            arrays[f"x{i}_indices"] = ex.indices
            for name, column in ex.values.items():
                arrays[f"x{i}_v_{name}"] = column
            described.append({"reason": ex.reason, "detail": ex.detail, "values": sorted(ex.values)})
        if described:
            info["exclusions"] = described
        self.cache.put(key, arrays, info, replace=key in self._rejected)

    def _compute_set(self, node: Node, env: dict, key: str):
        input_set = self.selection(node.input("input"), env)
        subset = np.sort(input_set.indices)
        args = self._arguments(node, env, key)
        args.update(self._group_budgets(node, env))
        ctx = RunContext(self, node, env, self.pool)
        with self._timed(node), self._announced(node, f"on {len(subset):,} records"):
            try:
                result = node.spec.fn(ctx, subset, **args)
            except PASS_THROUGH:
                raise
            except Exception as exc:
                raise self._op_error(node, exc) from exc
        if node.kind is Kind.PARTITION:
            labels = np.asarray(result, dtype=np.int64)
            if labels.shape != subset.shape:
                raise OpError(node, f"returned {labels.shape[0] if labels.ndim else 0} labels for {len(subset)} records")
            # Label -1: the op left the record out of every group (and said why with ctx.exclude).
            grouped = labels >= 0
            return Grouping(subset[grouped], labels[grouped], key)
        if node.role is Role.SET_SCORES:
            scores = np.asarray(result, dtype=np.float64)
            if scores.shape != subset.shape:
                raise OpError(node, f"returned {scores.shape[0] if scores.ndim else 0} scores for {len(subset)} records")
            return SubsetScores(self, node, env, subset, scores, key)
        picks = np.asarray(result, dtype=np.int64).reshape(-1)
        if len(np.unique(picks)) != len(picks) or not np.isin(picks, subset).all():
            raise OpError(node, "returned indices outside its input or duplicated (a bug in the op)")
        return _selection(picks, self.pool)

    def function(self, node: Node, env: dict, key: str, param):
        """The callable an op receives for a function argument: it evaluates the body with the variable bound.

        ``fn(selection, group=(sizes, position))``: ``group`` tells the body's
        budgets how the groups of a partition share them.  With the parameter's
        ``cache_calls``, each call's result is cached under the selection it was
        given (an interrupted ``iterate`` resumes at the last finished round).
        """
        calls = [0]

        def call(selection: Selection, group: tuple | None = None) -> Selection:
            inner = dict(env)
            inner[node.var] = selection
            if group is not None:
                self._groups[selection.key] = group
            if not param.cache_calls:
                return self.selection(node.body, inner)
            calls[0] += 1
            call_key = digest("call", key, selection.key)
            cached = self._load_set(node, call_key, None)
            if cached is not None:
                self.log(f"{node.label()}: {param.scope} {calls[0]} from the cache ({len(cached)} records)")
                return cached
            result = self.selection(node.body, inner)
            if not self.probe:
                self._store_set(node, call_key, result)
            return result

        return call

    def selection_of(self, indices) -> Selection:
        """A selection of pool indices, with its identity."""
        return _selection(indices, self.pool)

    def _group_budgets(self, node: Node, env: dict) -> dict[str, Budget]:
        """Percentage budgets of a selector applied directly to a partition's groups.

        ``kmeans(x, 100) | topk(s, 10%)`` keeps exactly ⌊10% × N⌋ records in
        all: each group gets ⌊10% × n_g⌋ and the records left over go, one
        each, to the groups with the largest remainders (ties: lower group
        number).  A selector that sees a filtered group (``P | (f < 1 |
        topk(s, 10%))``) uses ⌊10% × its input⌋ instead.
        """
        source = node.input("input")
        if source is None:
            return {}
        var = self.plan.nodes[source]
        if var.role is not Role.VARIABLE or var.params.get("scope") != "group" or source not in env:
            return {}
        info = self._groups.get(env[source].key)
        if info is None:
            return {}
        sizes, position = info
        if not node.spec.shares_budget(node.values):
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
        args = self._arguments(node, env, None)
        ctx = RunContext(self, node, env, self.pool)
        stats = self.stats[node.id]
        stats.applications += 1
        if self.probe and node.spec.costly:
            # A dry run uses a costly value (a fine-tuned model) only when it is already complete.
            work = node.spec.cost(ctx, None, **args) if node.spec.cost is not None else None
            if work is None or work.steps or work.tokens or work.backward_tokens:
                raise NotCached(node.id)
        with self._timed(node), self._announced(node, ""):
            try:
                return node.spec.fn(ctx, **args)
            except PASS_THROUGH:
                raise
            except Exception as exc:
                raise self._op_error(node, exc) from exc

    def arguments(self, node: Node, env: dict) -> dict:
        """The arguments an op implementation receives under ``env`` (group budgets included)."""
        args = self._arguments(node, env)
        args.update(self._group_budgets(node, env))
        return args

    def _arguments(self, node: Node, env: dict, key: str | None = None) -> dict:
        spec = node.spec
        args: dict[str, Any] = {}
        for p in spec.params:
            if p.name == spec.maps_over:
                continue  # the mapped dataset reaches the op through ctx
            if p.binds is not None:
                if node.body is not None:
                    args[p.name] = self.function(node, env, key or self.key(node.id, env), p)
                continue
            if p.name in node.roles:
                value = self.value(node.input(p.name), env)
                if isinstance(value, Dataset) and p.kind is Kind.SELECTOR:
                    value = _selection(np.arange(len(value)), value)
                problem = p.problem(value) if isinstance(value, (int, float, np.integer, np.floating)) else None
                if problem:  # a computed number (literals were checked when compiling)
                    raise OpError(node, problem)
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
        if node.role is Role.SCORES:
            return self._scores_rows(handle, idx)
        stats = self.stats[node.id]
        dataset = handle.dataset
        if len(idx) == 0:
            return np.zeros((0,))
        store = self._store(handle.key)
        found, where = store.locate(dataset.hashes[idx])
        found_before = found
        if not found.all():
            if self.probe:
                raise NotCached(node.id)
            store.refresh_if_changed()  # another process sharing the cache may have stored some since
            found, where = store.locate(dataset.hashes[idx])
            found_before = found
        if not found.all():
            missing = idx[~found]
            # Identical records are computed once.
            _, first = np.unique(dataset.hashes[missing], return_index=True)
            self._fill_rows(handle, store, missing[np.sort(first)])
            store.refresh_if_changed()  # rows another process computed while we filled ours
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

    def _store(self, key: str):
        """The run's one MapStore per map key: its index of record hashes is built once, not per call
        (a per-group selector asks for its features once per group)."""
        if key not in self._stores:
            self._stores[key] = self.cache.map_store(key)
        return self._stores[key]

    def _fill_rows(self, handle: Values, store, rows: np.ndarray) -> None:
        """Compute the missing ``rows`` of a map node batch by batch, saving each batch as it finishes.

        Each batch is claimed on the map's claim board first, so processes
        sharing the cache split the rows instead of computing them twice; rows
        another live process holds are waited for.  In this process a batch
        ends at ``chunk_rows`` records or after about ``persist_seconds`` of
        work, whichever comes first (the size follows the measured rate,
        starting small), so an interrupt or a kill loses at most about that
        much work on any pool.  Rows go in order of record size, so that each
        batch pads little.
        """
        node = handle.node
        spec = node.spec
        stats = self.stats[node.id]
        dataset = handle.dataset
        args = self._arguments(node, handle.env)
        static = {k: v for k, v in args.items() if not isinstance(v, Values)}
        per_record = {k: v for k, v in args.items() if isinstance(v, Values)}
        limit = max(1, spec.chunk_rows)
        floor = min(limit, max(1, spec.min_batch_rows))
        adaptive = self.executor.name == "local"
        size = [max(floor, min(limit, FIRST_CHUNK_ROWS)) if adaptive else max(floor, min(limit, RAY_BATCH_ROWS))]
        rows = rows[np.argsort(dataset.sizes[rows], kind="stable")]
        hashes = dataset.hashes[rows]
        info = dict(self.entry_info(node), version=spec.code_version)
        claims = self.cache.claims(handle.key)
        open_claims: dict[int, str] = {}  # id(batch) -> claim
        started = [0.0]

        def batches():
            done = np.zeros(len(rows), dtype=bool)
            shared = [False]  # another process works on this map: look at what it stored before choosing

            def choose(taken):
                shared[0] = shared[0] or bool(taken)
                # Rows another process stored since we last looked (it may hold no claim right now,
                # between two of its batches) are done: never compute them again.
                if store.refresh_if_changed() or shared[0]:
                    done[:] |= store.locate(hashes)[0]
                pending = np.flatnonzero(~done)
                free = pending[[h not in taken for h in hashes[pending].tolist()]] if taken else pending
                return free[: size[0]]

            while True:
                if done.all():
                    return
                picked, name = claims.claim(hashes, choose)
                if not len(picked):
                    if done.all():
                        return
                    # Every row left is being computed by another process: wait for its results.
                    time.sleep(WAIT_SECONDS)
                    continue
                done[picked] = True
                part = rows[picked]
                batch = Batch(part, [dataset.records[int(i)] for i in part], [dataset.raw[int(i)] for i in part],
                              {k: v.values(part) for k, v in per_record.items()})
                open_claims[id(batch)] = name
                started[0] = time.perf_counter()
                yield batch

        label = node.names[0] if node.names else node.label()
        ragged = {c.name for c in spec.columns if c.ragged}
        try:
            with self.progress.bar(len(rows), label) as bar, self._timed(node):
                for batch, columns in self.executor.run(spec, static, handle.key, batches()):
                    took = time.perf_counter() - started[0]
                    for name, array in columns.items():
                        array = [list(v) for v in array] if name in ragged else np.asarray(array)
                        if len(array) != len(batch):
                            raise OpError(node, f"column {name!r} has {len(array)} rows for {len(batch)} records")
                        columns[name] = array
                    # Persist every batch as it finishes: an interrupted run keeps it.
                    store.append(dataset.hashes[batch.rows], columns, info)
                    claims.release(open_claims.pop(id(batch), None))
                    stats.rows_computed += len(batch)
                    bar.update(len(batch))
                    if adaptive:
                        size[0] = int(min(limit, max(floor, len(batch) * self.persist_seconds / took))) \
                            if took > 0 else limit
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise self._op_error(node, exc) from exc
        finally:
            claims.release_all()

    def _scores_rows(self, handle: Values, idx: np.ndarray) -> np.ndarray:
        node = handle.node
        args = self._arguments(node, handle.env)
        ctx = RunContext(self, node, handle.env, handle.dataset)
        try:
            result = node.spec.fn(ctx, idx, **args)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise self._op_error(node, exc) from exc
        return np.asarray(result)

    # ------------------------------------------------------- missing values
    def why_missing(self, handle: Values, rows, _top: str | None = None) -> list[str]:
        """Why ``handle`` has no value (NaN) at ``rows``: the first operator upstream that produced none."""
        top = handle.label if _top is None else _top
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return []
        node = handle.node
        out: list[str | None] = [None] * len(rows)
        if node.role not in (Role.MAP, Role.SET_SCORES):
            # A transform is NaN where an input is: blame the first input with no value.
            todo = np.ones(len(rows), dtype=bool)
            for inp in node.inputs:
                value = self.value(inp, handle.env)
                if not isinstance(value, Values) or value.node.kind is not Kind.SCORES:
                    continue
                nan = todo & np.isnan(np.asarray(value.values(rows), dtype=np.float64).reshape(len(rows), -1)).any(axis=1)
                if nan.any():
                    for pos, text in zip(np.flatnonzero(nan), self.why_missing(value, rows[nan], top)):
                        out[pos] = text
                    todo &= ~nan
            own = np.flatnonzero(todo)
            if len(own):
                texts = None
                if node.spec.why_missing is not None:
                    ctx = RunContext(self, node, handle.env, handle.dataset)
                    texts = node.spec.why_missing(ctx, rows[own], **self._arguments(node, handle.env))
                for pos, text in zip(own, texts or [f"{handle.label} is undefined for this record"] * len(own)):
                    out[pos] = text
            return [str(t) for t in out]
        spec = node.spec
        texts = None
        if spec.why_missing is not None:
            columns = ({"value": handle.values(rows)} if node.role is Role.SET_SCORES
                       else {c: self._compute_rows(handle, c, rows) for c in spec.column_names})
            ctx = RunContext(self, node, handle.env, handle.dataset)
            texts = spec.why_missing(ctx, rows, columns, **self._arguments(node, handle.env))
        if texts is None:
            texts = ["no value for this record"] * len(rows)
        where = "" if handle.label == top else f" (in {handle.label})"
        return [f"{t}{where}" for t in texts]

    # ------------------------------------------------------------ helpers
    @contextmanager
    def _announced(self, node: Node, what: str):
        """A line when a costly set-level or value op starts and when it ends (none for cheap ones)."""
        if not node.spec.costly or node.free_vars:
            yield
            return
        label = node.names[0] if node.names else node.label()
        self.progress.line(f"{label}: running{' ' + what if what else ''}")
        started = time.monotonic()
        yield
        self.progress.line(f"{label}: done in {duration(time.monotonic() - started)}")

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


class RunContext:
    """The ``ctx`` handed to op implementations (see :mod:`datasel.ops.context`)."""

    def __init__(self, engine: Engine, node: Node, env: dict, dataset: Dataset):
        self._engine = engine
        self._node = node
        self._env = env
        self._dataset = dataset
        self._bar = NullBar()
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

    @property
    def expression(self) -> str:
        """What the recipe wrote for this node (whitespace collapsed), else its label."""
        span = self._node.span
        return " ".join(span.text.split()) if span is not None else self._node.label()

    def dataset(self, name: str = "pool") -> Dataset:
        return self._engine.datasets[name]

    def selection(self, indices) -> Selection:
        return self._engine.selection_of(indices)

    def records(self, idx, data: Dataset | None = None) -> list[dict]:
        ds = data or self._dataset
        return [ds.records[int(i)] for i in idx]

    def raw(self, idx, data: Dataset | None = None) -> list[dict]:
        ds = data or self._dataset
        return [ds.raw[int(i)] for i in idx]

    def exclude(self, reason: str, indices, *, detail: str | None = None, **values) -> None:
        if len(indices):
            self._engine.record_exclusion(self._node, self._env, reason, indices, detail, values)

    def why_missing(self, scores, idx) -> list[str]:
        return self._engine.why_missing(scores, idx)

    def advance(self, rows: int) -> None:
        self._advanced += rows
        self._bar.update(rows)

    def progress(self, total: int, desc: str):
        return self._engine.progress.bar(total, desc)

    def work_dir(self, create: bool = True) -> Path | None:
        key = self._engine.key(self._node.id, self._env)
        if not create:
            return self._engine.cache.find_work_dir(key)
        return self._engine.cache.work_dir(key)

    def log(self, message: str) -> None:
        self._engine.log(f"{self._node.label()}: {message}")

    def warn(self, message: str) -> None:
        self._engine.warn(f"{self._node.label()}: {message}")

    def traceback(self) -> str:  # pragma: no cover - debugging aid
        return traceback.format_exc()

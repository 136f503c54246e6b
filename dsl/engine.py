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
from datasel.ops.context import NO_TEXT, Grouping, Selection, text_hash
from datasel.ops.registry import Budget, Kind


#: Map results are persisted at least this often (seconds of work), and at most every chunk_rows records.
PERSIST_SECONDS = 60.0
#: The first chunk of a map fill is small, to measure the rate before sizing the next ones.
FIRST_CHUNK_ROWS = 4


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


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Progress of long steps on stderr: a live line on a terminal, a line every ~30 s elsewhere.

    On a terminal the line is redrawn in place; in a log (CI, ``nohup``) a
    step prints a line when it starts, one about every ``interval`` seconds
    (rows, rows/s, ETA) and one when it ends.  The rate and ETA count from the
    end of the first batch, so loading a model does not distort them.  Silent
    with ``--quiet``.
    """

    def __init__(self, enabled: bool, stream=None, *, interval: float = 30.0, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval

    @contextmanager
    def bar(self, total: int, desc: str, unit: str = "rows"):
        if not self.enabled or total <= 0:
            yield _NullBar()
            return
        task = _Task(self, total, desc, unit)
        try:
            yield task
        finally:
            task.close()

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


class _Task:
    """One step with a known amount of work (see :class:`Progress`)."""

    def __init__(self, progress: Progress, total: int, desc: str, unit: str):
        self.p, self.total, self.desc, self.unit = progress, total, desc, unit
        self.done = 0
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, rows) at the end of the first batch
        self.last_shown = 0.0
        self.postfix = ""
        if not self.p.tty:
            self.p.line(f"{desc}: {total:,} {unit} to compute")

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def status(self) -> str:
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        now = time.monotonic()
        if self.first is not None and now > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (now - self.first[0])
            text += f", {rate:.3g} {self.unit}/s, ETA {_duration((self.total - self.done) / rate)}"
        elif self.done < self.total:
            text += ", ETA after the first batch"
        return text + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if self.p.tty:
            if now - self.last_shown >= 0.2 or self.done >= self.total:
                self.last_shown = now
                self.p.stream.write("\r\033[K" + self.status())
                self.p.stream.flush()
        elif now - self.last_shown >= self.p.interval and self.done < self.total:
            self.last_shown = now
            self.p.line(self.status())

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.p.tty:
            self.p.stream.write("\r\033[K")
            self.p.stream.flush()
        if self.done:
            rate = f" ({self.done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 else ""
            self.p.line(f"{self.desc}: {self.done:,} {self.unit} in {_duration(elapsed)}{rate}")


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
                 probe: bool = False, log=None, recipe: str | None = None,
                 persist_seconds: float = PERSIST_SECONDS, progress: Progress | None = None):
        self.plan = plan
        self.recipe = recipe
        self.persist_seconds = float(persist_seconds)
        self.datasets = datasets
        self.cache = cache
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
                part = (role, self.key(inp, env))
                if node.role != "map" and inp_node.role == "map" and "data" in inp_node.roles:
                    # A map key leaves out the mapped dataset (per-record results are shared), so a
                    # consumer of per-record values of another dataset (similarity's target=embed(minilm,
                    # data=val)) adds that dataset's fingerprint: another --val is another result.
                    data_node = self.plan.nodes[inp_node.inputs[inp_node.roles.index("data")]]
                    if data_node.op == "dataset" and data_node.params["name"] != "pool":
                        part = part + (self.key(data_node.id, env),)
                parts.append(part)
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
        memo_key = self.bound_key(node_id, env)
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
            cached = self._load_set(node, key, env)
            if cached is not None:
                stats.from_cache += 1
                return cached
        if self.probe:
            # A dry run computes cheap selections from cached values, never costly ones, and writes nothing.
            if node.spec is not None and node.spec.costly:
                raise NotCached(node.id)
            return self._compute_set(node, env, key)
        if node.spec is not None and node.spec.costly:
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
        if node.kind is Kind.PARTITION:
            if "labels" not in entry.arrays:
                return None
            subset = np.asarray(entry.arrays["subset"], dtype=np.int64)
            return Grouping(subset, np.asarray(entry.arrays["labels"], dtype=np.int64), key)
        if "indices" not in entry.arrays:
            return None
        if env is not None:
            restored = []
            for i, desc in enumerate(entry.info.get("exclusions", [])):
                prefix = f"x{i}_"
                if prefix + "indices" not in entry.arrays:
                    return None
                values = {name: np.asarray(entry.arrays[prefix + "v_" + name]) for name in desc.get("values", [])}
                restored.append(Exclusion(desc["reason"], desc.get("detail"),
                                          np.asarray(entry.arrays[prefix + "indices"], dtype=np.int64), values))
            self.exclusions[self.bound_key(node.id, env)] = restored
        return _selection(np.asarray(entry.arrays["indices"], dtype=np.int64), self.pool)

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
        if isinstance(result, Grouping):
            self.cache.put(key, {"subset": result.subset, "labels": result.labels}, info)
            return
        arrays = {"indices": result.indices}
        described = []
        for i, ex in enumerate(exclusions):
            arrays[f"x{i}_indices"] = ex.indices
            for name, column in ex.values.items():
                arrays[f"x{i}_v_{name}"] = column
            described.append({"reason": ex.reason, "detail": ex.detail, "values": sorted(ex.values)})
        if described:
            info["exclusions"] = described
        self.cache.put(key, arrays, info)

    def _compute_set(self, node: Node, env: dict, key: str):
        op = node.op
        if op in ("union", "intersect", "difference"):
            left = self.selection(node.inputs[node.roles.index("left")], env)
            right = self.selection(node.inputs[node.roles.index("right")], env)
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
        with self._timed(node), self._announced(node, f"on {len(subset):,} records"):
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
        if compares_text(node):
            present, match = self.text_matches(node, scores, subset)
            return _selection(subset[present & match], self.pool)
        values = np.asarray(scores.values(subset), dtype=np.float64)
        if node.params["op"] in ("in", "not in"):
            nan = np.isnan(values)
            member = np.isin(values, np.asarray(node.values["rhs"], dtype=np.float64))
            keep = member if node.params["op"] == "in" else ~member
            return _selection(subset[keep & ~nan], self.pool)
        if "rhs" in node.roles:
            rhs_value = self.value(node.inputs[node.roles.index("rhs")], env)
            rhs = rhs_value.values(subset) if isinstance(rhs_value, Values) else float(rhs_value)
        else:
            rhs = float(node.values["rhs"])
        with self._timed(node):
            nan = np.isnan(values) | (np.isnan(rhs) if isinstance(rhs, np.ndarray) else math.isnan(rhs))
            with np.errstate(invalid="ignore"):
                mask = _COMPARE[node.params["op"]](values, rhs) & ~nan
        return _selection(subset[mask], self.pool)

    def text_matches(self, node: Node, scores: Values, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a comparison with strings: (record has a value, the comparison holds) per row of ``subset``."""
        hashes = np.asarray(scores.column("text_hash", subset))
        present = hashes != NO_TEXT
        rhs = node.values["rhs"]
        wanted = np.frombuffer(b"".join(text_hash(v) for v in (rhs if isinstance(rhs, list) else [rhs])),
                               dtype="S16")
        hit = np.isin(hashes, wanted)
        return present, (~hit if node.params["op"] in ("!=", "not in") else hit)

    def group_bindings(self, node: Node, env: dict):
        """``(group label, members, env with the group variable bound)`` for every group of a per_group node."""
        grouping = self.value(node.inputs[node.roles.index("partition")], env)
        groups = list(grouping.groups())
        sizes = tuple(len(members) for _, members in groups)
        for position, (label, members) in enumerate(groups):
            inner = dict(env)
            group = _selection(members, self.pool)
            # Percentage budgets inside the body are shared out over all groups (largest remainder).
            self._groups[group.key] = (sizes, position)
            inner[node.var] = group
            yield label, members, inner

    def _per_group(self, node: Node, env: dict) -> Selection:
        picks = []
        grouping = self.value(node.inputs[node.roles.index("partition")], env)
        with self.progress.bar(len(np.unique(grouping.labels)), f"{node.label()} groups") as bar:
            for _, _, inner in self.group_bindings(node, env):
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
            cached = self._load_set(node, round_key, None)
            if cached is not None:
                current = cached
                self.log(f"{node.label()}: round {r}/{rounds} cached ({len(current)} records)")
                continue
            inner = dict(env)
            inner[node.var] = current
            started = time.perf_counter()
            current = self.selection(node.body, inner)
            if self.probe:
                continue
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
        if self.probe and node.spec.costly:
            # A dry run uses a costly value (a fine-tuned model) only when it is already complete.
            work = node.spec.cost(ctx, None, **args) if node.spec.cost is not None else None
            if work is None or work.steps or work.tokens or work.backward_tokens:
                raise NotCached(node.id)
        with self._timed(node), self._announced(node, ""):
            try:
                return node.spec.fn(ctx, **args)
            except (OpError, KeyboardInterrupt, NotCached):
                raise
            except Exception as exc:
                raise self._op_error(node, exc) from exc

    def arguments(self, node: Node, env: dict) -> dict:
        """The arguments an op implementation receives under ``env`` (group budgets included)."""
        args = self._arguments(node, env)
        args.update(self._group_budgets(node, env))
        return args

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
        """Compute the missing ``rows`` of a map node in chunks, persisting each chunk as it finishes.

        A chunk ends at ``chunk_rows`` records or after about ``persist_seconds`` of work,
        whichever comes first (the chunk size follows the measured rate, starting small), so
        an interrupt or a kill loses at most about that much work on any pool.  Rows go in
        order of record size, so that each chunk's batches pad little.
        """
        node = handle.node
        spec = node.spec
        stats = self.stats[node.id]
        args = self._arguments(node, handle.env)
        ctx = RunContext(self, node, handle.env, handle.dataset)
        limit = max(1, spec.chunk_rows)
        size = min(limit, FIRST_CHUNK_ROWS)
        rows = rows[np.argsort(handle.dataset.sizes[rows], kind="stable")]
        info = dict(self.entry_info(node), version=spec.version)
        with self.progress.bar(len(rows), node.names[0] if node.names else node.label()) as bar:
            ctx._bar = bar
            start = 0
            while start < len(rows):
                part = rows[start : start + size]
                ctx._advanced = 0
                began = time.perf_counter()
                with self._timed(node):
                    try:
                        out = spec.fn(ctx, part, **args)
                    except (OpError, KeyboardInterrupt, NotCached):
                        raise
                    except Exception as exc:
                        raise self._op_error(node, exc) from exc
                took = time.perf_counter() - began
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
                start += len(part)
                if took > 0:
                    size = int(min(limit, max(1, len(part) * self.persist_seconds / took)))
                else:
                    size = limit

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

    # ------------------------------------------------------- missing values
    def why_missing(self, handle: Values, rows, _top: str | None = None) -> list[str]:
        """Why ``handle`` has no value (NaN) at ``rows``: the first operator upstream that produced none."""
        top = handle.label if _top is None else _top
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return []
        node = handle.node
        out: list[str | None] = [None] * len(rows)
        if node.role != "map":
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
                if node.spec is not None and node.spec.why_missing is not None:
                    ctx = RunContext(self, node, handle.env, handle.dataset)
                    texts = node.spec.why_missing(ctx, rows[own], **self._arguments(node, handle.env))
                for pos, text in zip(own, texts or [f"{handle.label} is undefined for this record"] * len(own)):
                    out[pos] = text
            return [str(t) for t in out]
        spec = node.spec
        texts = None
        if spec.why_missing is not None:
            columns = {c: self._compute_rows(handle, c, rows) for c in spec.columns}
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
        if node.spec is None or not node.spec.costly or node.free_vars:
            yield
            return
        label = node.names[0] if node.names else node.label()
        self.progress.line(f"{label}: running{' ' + what if what else ''}")
        started = time.monotonic()
        yield
        self.progress.line(f"{label}: done in {_duration(time.monotonic() - started)}")

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


def compares_text(node: Node) -> bool:
    """Whether a compare node tests text (a string, or a list holding one) rather than numbers."""
    rhs = node.values.get("rhs")
    return isinstance(rhs, str) or (isinstance(rhs, list) and any(isinstance(v, str) for v in rhs))


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

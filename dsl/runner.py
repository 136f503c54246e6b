"""The library API behind ``datasel run``, ``datasel eval`` and ``datasel compile --pool``."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from datasel.dsl.accounting import Accounting, account
from datasel.dsl.cache import Cache
from datasel.dsl.compiler import Compiled, compile_recipe, recipe_source
from datasel.dsl.data import DataError, Dataset, load_dataset, output_container, write_selection
from datasel.dsl.data import default_output as default_output_path
from datasel.dsl.depth import deep_recursion
from datasel.dsl.engine import PERSIST_SECONDS, Engine, Values
from datasel.dsl.estimate import estimate
from datasel.dsl.executor import Executor
from datasel.dsl.explain import to_json
from datasel.dsl.plan import Plan
from datasel.ops.context import Grouping
from datasel.ops.registry import Kind


def load_inputs(pool: str | Path | None, val: str | Path | None = None, *, pool_format: str | None = None,
                val_format: str | None = None, on_bad_record: str = "fail") -> dict[str, Dataset]:
    """Load the pool (and the validation/target set) given on the command line."""
    datasets = {}
    if pool is not None:
        datasets["pool"] = load_dataset(pool, name="pool", schema=pool_format, on_bad_record=on_bad_record)
    if val is not None:
        datasets["val"] = load_dataset(val, name="val", schema=val_format, on_bad_record=on_bad_record)
    return datasets


def fingerprints(datasets: dict[str, Dataset]) -> dict[str, str]:
    return {name: ds.fingerprint for name, ds in datasets.items()}


@deep_recursion()
def cache_state(plan: Plan, datasets: dict[str, Dataset], cache: Cache) -> dict[str, dict]:
    """For each node of the plan: ``hit`` / ``partial`` (with a fraction) / ``miss`` for this pool, and the
    work a run would still do (see :mod:`datasel.dsl.estimate`).

    Nothing runs and nothing is written; cheap selections are computed from
    cached values so that the states agree with what a run will do.
    """
    return estimate(plan, datasets, cache).states()


@dataclass
class RunResult:
    """What ``datasel run`` produced."""

    selected: np.ndarray  # pool indices (positions of records in the input file), selection order
    manifest: dict
    output: Path | None
    engine: Engine = field(repr=False)
    accounting: Accounting | None = field(default=None, repr=False)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("datasel", "numpy", "torch", "transformers", "scikit-learn", "faiss-cpu", "lark"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


@deep_recursion()
def run(recipe: str | Path, pool: str | Path, *, val: str | Path | None = None, output: str | Path | None = None,
        sets: list[str] | dict | None = None, cache_dir: str | Path | None = None, on_bad_record: str = "fail",
        pool_format: str | None = None, val_format: str | None = None, quiet: bool = False,
        recipe_text: str | None = None, log=None, persist_seconds: float = PERSIST_SECONDS,
        cache_write: str | Path | None = None, default_output: bool = False,
        executor: Executor | None = None) -> RunResult:
    """Compile ``recipe``, run it on ``pool`` and write the selection and its manifest.

    The selection goes to ``output`` in the format its extension names
    (``.jsonl``, ``.json``, ``.parquet``; the pool's own without one); with no
    ``output`` nothing is written, unless ``default_output`` asks for
    ``<pool stem>.selected.<ext>`` next to the pool.  The manifest
    (``OUTPUT.manifest.json``) holds the recipe text and hash, the plan, the
    selected pool indices in selection order, the funnel and every pool
    record's fate, and per node: status (computed / cached / partial), seconds
    and rows.
    """
    started = time.perf_counter()
    source = recipe_source(recipe_text if recipe_text is not None else recipe,
                           name=str(recipe) if recipe_text is not None else None)
    datasets = load_inputs(pool, val, pool_format=pool_format, val_format=val_format, on_bad_record=on_bad_record)
    if output is None and default_output:
        output = default_output_path(pool, datasets["pool"].container)
    if output is not None:
        check_output(datasets["pool"], output)  # before any work, not after it
    compiled = compile_recipe(source, sets, fingerprints(datasets))
    cache = Cache(cache_dir, write_root=cache_write)
    engine = Engine(compiled.plan, datasets, cache, quiet=quiet, log=log, recipe=source.name,
                    persist_seconds=persist_seconds, executor=executor)
    selection = engine.run()
    pool_ds = datasets["pool"]
    positions = pool_ds.positions[selection.indices]
    node_stats = engine.node_stats()  # before the accounting re-reads cached results
    accounting = account(engine, selection.indices)
    manifest = _manifest(compiled, datasets, engine, selection.indices, positions, time.perf_counter() - started,
                         node_stats, accounting)
    out_path = None
    if output is not None:
        out_path = write_selection(pool_ds, selection.indices, output)
        manifest_path = manifest_path_for(out_path)
        manifest["output"] = str(out_path)
        tmp = manifest_path.with_name(manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(manifest_path)
        manifest["manifest_path"] = str(manifest_path)
    return RunResult(positions, manifest, out_path, engine, accounting)


def check_output(pool: Dataset, output: str | Path) -> None:
    """Fail now, not after the run, when ``output`` has an unknown extension or its folder cannot be written."""
    output_container(pool, output)
    folder = Path(output).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".datasel-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{output}: cannot write the selection there ({exc.strerror or exc}); choose another -o") from None


def manifest_path_for(output: str | Path) -> Path:
    """Where ``run`` writes the manifest for ``output``: ``OUTPUT.manifest.json``."""
    return Path(str(output) + ".manifest.json")


def _manifest(compiled: Compiled, datasets: dict[str, Dataset], engine: Engine, indices: np.ndarray,
              positions: np.ndarray, seconds: float, node_stats: list[dict], accounting: Accounting) -> dict:
    pool = datasets["pool"]
    exclusions: dict[str, Any] = {}
    for name, ds in datasets.items():
        for reason, count in sorted(ds.excluded.items()):
            exclusions[f"{name}: bad record: {reason}"] = count
    accounts = accounting.to_json()
    for stage in accounts["funnel"][1:]:
        for reason, count in stage["dropped"].items():
            exclusions[f"stage {stage['stage']} ({stage['label']}): {reason}"] = count
    text = compiled.source.text
    return {
        "datasel_manifest": 1,
        "recipe": {"path": compiled.source.name, "text": text,
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
        "pool": {"path": str(pool.path), "format": pool.schema, "formats": dict(pool.formats), "container": pool.container,
                 "fingerprint": pool.fingerprint, "records_in_file": pool.total},
        "val": ({"path": str(datasets["val"].path), "fingerprint": datasets["val"].fingerprint,
                 "size": len(datasets["val"])} if "val" in datasets else None),
        "pool_size": len(pool),
        "selected_count": int(len(indices)),
        "selected": [int(p) for p in positions],
        "order": "selection",
        "exclusions": exclusions,
        "funnel": accounts["funnel"],
        "records": accounts["records"],
        "bad_records": [dict(d, dataset=name) for name, ds in datasets.items() for d in ds.excluded_details],
        "warnings": engine.warnings,
        "plan": to_json(compiled.plan),
        "nodes": node_stats,
        "seconds": round(seconds, 3),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class EvalResult:
    kind: Kind
    values: np.ndarray  # one row per pool record (Scores / Features) or group labels (Partition)
    positions: np.ndarray
    label: str


@deep_recursion()
def evaluate(expression: str, pool: str | Path, *, recipe: str | Path | None = None, val: str | Path | None = None,
             sets=None, cache_dir=None, on_bad_record: str = "fail", pool_format: str | None = None,
             quiet: bool = False, log=None, persist_seconds: float = PERSIST_SECONDS,
             cache_write: str | Path | None = None, executor: Executor | None = None) -> EvalResult:
    """Evaluate a Scores, Features or Partition expression for every pool record.

    Per-record values of another dataset (``grad(run, data=val)``) are given for every record of
    that dataset instead.

    Names resolve in the prelude and, with ``recipe``, the recipe's bindings.
    """
    source = recipe_source(recipe) if recipe is not None else recipe_source("", name="<eval>")
    datasets = load_inputs(pool, val, pool_format=pool_format, on_bad_record=on_bad_record)
    compiled = compile_recipe(source, sets, fingerprints(datasets), expression=expression)
    plan = compiled.plan
    kind = compiled.checked.type_of(compiled.checked.select).kind
    if kind not in (Kind.SCORES, Kind.FEATURES, Kind.PARTITION, Kind.SELECTOR, Kind.LABELS):
        raise ValueError(f"eval needs a Scores, Features, Partition or Selector expression; '{expression}' is {kind}")
    engine = Engine(plan, datasets, Cache(cache_dir, write_root=cache_write), quiet=quiet, log=log,
                    persist_seconds=persist_seconds, executor=executor,
                    recipe=source.name)
    pool_ds = datasets["pool"]
    everything = np.arange(len(pool_ds))
    if kind is Kind.PARTITION:
        grouping: Grouping = engine.value(plan.output, {})
        labels = np.full(len(pool_ds), -1, dtype=np.int64)
        labels[grouping.subset] = grouping.labels
        values = labels
    elif kind is Kind.SELECTOR:
        selection = engine.selection(plan.output, {})
        values = np.zeros(len(pool_ds), dtype=bool)
        values[selection.indices] = True
    else:
        handle = engine.value(plan.output, {})
        if isinstance(handle, Values) and handle.dataset is not pool_ds:
            # per-record values of another dataset (grad(run, data=val)): that dataset's rows
            rows = handle.dataset
            return EvalResult(kind, np.asarray(handle.values(np.arange(len(rows)))), rows.positions, expression)
        values = handle.values(everything) if isinstance(handle, Values) else np.full(len(pool_ds), handle)
    return EvalResult(kind, np.asarray(values), pool_ds.positions, expression)


def write_values(result: EvalResult, out: str | Path | None) -> str | None:
    """Write eval results as JSONL (one object per record), .npy or .parquet; None = JSONL to stdout."""
    values = result.values
    if out is not None and str(out).endswith(".npy"):
        np.save(out, values, allow_pickle=False)
        return None
    if out is not None and str(out).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = values.tolist()
        pq.write_table(pa.table({"index": result.positions.tolist(), "value": column}), out)
        return None
    lines = []
    for pos, v in zip(result.positions, values):
        value = v.tolist() if isinstance(v, np.ndarray) else (v.item() if hasattr(v, "item") else v)
        if isinstance(value, float) and not np.isfinite(value):
            value = None  # JSON has no NaN; null marks "no score"
        lines.append(json.dumps({"index": int(pos), "value": value}))
    text = "\n".join(lines) + "\n"
    if out is None:
        return text
    Path(out).write_text(text, encoding="utf-8")
    return None

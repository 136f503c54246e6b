"""Executors: how the batches of a map op are computed — in this process, or on a Ray cluster.

The engine decides *which* rows to compute (the rows not cached yet, claimed
on the map's claim board) and persists every finished batch; an executor only
runs an op's ``setup`` once per worker and its pure ``compute(state, batch)``
per batch, and hands the results back as they finish.  So a run can switch
executors and keep its cache, and results are the same (bitwise for the same
batch composition).

``local`` (the default) runs in this process and keeps each op's set-up state
(a loaded model) for the next map of the same op.  ``ray`` runs batches with
Ray Data (``map_batches`` over an actor pool: every actor runs ``setup`` once),
with the resources the op declares (CPUs, a GPU or a fraction of one when the
cluster has GPUs); ``ray.init()`` starts a local cluster unless an address is
given.  Selection ops always run on the driver.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any, Iterator, Protocol

from datasel.ops import registry as reg
from datasel.ops.contract import Batch, OpSpec


def _setup(spec: OpSpec, args: dict) -> Any:
    return spec.setup(args, spec.resources) if spec.setup is not None else None


def compute(spec: OpSpec, state: Any, batch: Batch, args: dict) -> dict:
    """One batch through an op's compute: columns by name (a bare array is the ``value`` column)."""
    out = spec.fn(state, batch, **args)
    return out if isinstance(out, dict) else {"value": out}


class Executor(Protocol):
    """Runs the batches of one map op and yields ``(batch, columns)`` as each batch finishes."""

    name: str

    def run(self, spec: OpSpec, args: dict, key: str, batches: Iterator[Batch]) -> Iterator[tuple[Batch, dict]]:
        ...


class LocalExecutor:
    """Batches one after another in this process; each op's set-up state is kept for reuse (a few at a time)."""

    name = "local"

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._states: OrderedDict[str, Any] = OrderedDict()

    def state(self, spec: OpSpec, args: dict, key: str) -> Any:
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        state = _setup(spec, args)
        self._states[key] = state
        while len(self._states) > self.keep:
            self._states.popitem(last=False)
        return state

    def run(self, spec: OpSpec, args: dict, key: str, batches: Iterator[Batch]) -> Iterator[tuple[Batch, dict]]:
        state = None
        for batch in batches:
            if state is None:  # after the first batch is chosen: nothing to set up for an empty fill
                state = self.state(spec, args, key)
            yield batch, compute(spec, state, batch, args)


# ----------------------------------------------------------------------- Ray
class _RayWorker:
    """A Ray actor: ``setup`` once, then one pickled batch at a time (Ray moves the bytes, never the cache)."""

    def __init__(self, op: str, args: bytes, env: dict):
        os.environ.update(env)
        self.spec = reg.get(op)
        self.args = pickle.loads(args)
        threads = max(1, int(self.spec.resources.cpus))
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover
            pass
        self.state = _setup(self.spec, self.args)

    def __call__(self, items: dict) -> dict:
        out = []
        for blob in items["batch"]:
            batch = pickle.loads(blob)
            out.append(pickle.dumps(compute(self.spec, self.state, batch, self.args)))
        return {"index": items["index"], "columns": out}


#: Environment a Ray worker needs to find the same models and stay offline.
_FORWARDED_ENV = ("DATASEL_MODELS", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


class RayExecutor:
    """Batches on a Ray cluster through Ray Data (see the module docstring).

    ``address``: an existing cluster (``ray://host:10001`` or ``auto``); None
    starts one on this machine.  ``actors``: how many workers per op (default:
    what the op's declared CPUs allow, leaving one CPU to the driver).  All the
    batches of one map fill go into one dataset, so each actor runs ``setup``
    once per fill; results stream back, and the engine saves each as it comes.
    """

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None):
        self.address = address
        self.actors = actors

    def _ray(self):
        import ray

        if not ray.is_initialized():
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", runtime_env={"env_vars": env} if env else None)
            import logging

            from ray.data import DataContext

            context = DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            context.verbose_stats_logs = False
            logging.getLogger("ray").setLevel(logging.ERROR)  # Ray Data logs every dataset at INFO
        return ray

    def _placement(self, ray, spec: OpSpec) -> tuple[int, float, float]:
        resources = ray.cluster_resources()
        cpus = max(0.25, min(spec.resources.cpus, float(resources.get("CPU", 1)) / 2))
        gpus = spec.resources.gpus if resources.get("GPU", 0) >= spec.resources.gpus > 0 else 0.0
        if self.actors is not None:
            actors = self.actors
        elif gpus:
            actors = max(1, int(resources.get("GPU", 1) // gpus))
        else:
            actors = max(1, int((resources.get("CPU", 1) - 1) // cpus))
        return actors, cpus, gpus

    def run(self, spec: OpSpec, args: dict, key: str, batches: Iterator[Batch]) -> Iterator[tuple[Batch, dict]]:
        ray = self._ray()
        import ray.data  # noqa: F401

        actors, cpus, gpus = self._placement(ray, spec)
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        window = list(batches)
        if not window:
            return
        items = [{"index": i, "batch": pickle.dumps(b)} for i, b in enumerate(window)]
        ds = ray.data.from_items(items).map_batches(
            _RayWorker, fn_constructor_kwargs={"op": spec.name, "args": pickle.dumps(args), "env": env},
            batch_size=1, concurrency=min(actors, len(window)), num_cpus=cpus, num_gpus=gpus or None)
        for row in ds.iter_rows():
            yield window[int(row["index"])], pickle.loads(row["columns"])


def executor(name: str = "local", **options) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise RuntimeError("the ray executor needs Ray: pip install 'datasel[ray]'") from None
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; use local or ray")

"""Graphs over records: ``knn_graph(features, k)``, the top-K cosine neighbour lists a walk follows.

A Graph holds, for every record of the dataset its features belong to (the pool, normally), its
``k`` most similar other records, most similar first, and their cosines.  It is computed once
per (features, dataset, k) and kept in the cache's work folder, memory-mapped when read back.
Consumers restrict it to the records that reach them (neighbours outside are skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from datasel.ops.registry import Kind, Param, op


@dataclass
class Graph:
    """Neighbour lists over the rows of one dataset: ``neighbours[i]`` (row ids, most similar first)."""

    neighbours: np.ndarray  # (n, k) int64 rows of the dataset
    sims: np.ndarray  # (n, k) float32 cosines
    fingerprint: str  # the dataset's

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    def restricted(self, rows: np.ndarray) -> np.ndarray:
        """Neighbour lists for ``rows`` as positions into ``rows`` (−1 pads the neighbours outside them)."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.full(len(self.neighbours), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        return position[np.asarray(self.neighbours[rows])]

    def describe(self) -> str:
        return f"{len(self.neighbours):,} records × {self.k} neighbours"


def _read(folder, fingerprint: str, k: int) -> Graph | None:
    meta = folder / "graph.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != fingerprint or info.get("k") != k:
        return None
    neighbours = np.load(folder / "neighbours.npy", mmap_mode="r", allow_pickle=False)
    sims = np.load(folder / "sims.npy", mmap_mode="r", allow_pickle=False)
    if neighbours.shape != (info["n"], k) or sims.shape != neighbours.shape:
        return None
    return Graph(neighbours, sims, fingerprint)


@op("knn_graph", [Param("features", Kind.FEATURES, doc="one vector per record (cosine similarity)"),
                  Param("k", Kind.NUMBER, 10, integer=True, low=1, doc="neighbours per record (capped at n − 1)")],
    Kind.GRAPH, role="value", version="1", family="graphs", costly=True)
def knn_graph(ctx, features, k=10):
    """Each record's ``k`` most similar other records by cosine, exact (faiss, blockwise: no n × n matrix).

    Over every record of the features' dataset; cached in the work folder (neighbours and cosines
    as .npy, memory-mapped when read back).  ``graphwalk(…, graph=knn_graph(embed(minilm), 10))``
    walks gradient features along an embedding graph.
    """
    import os
    import tempfile
    from pathlib import Path

    from datasel.ops.algos.knn import knn_graph as build
    from datasel.ops.diversity import _features

    dataset = features.dataset
    n, k = len(dataset), int(k)
    k_eff = int(min(k, max(n - 1, 0)))
    folder = Path(ctx.work_dir())
    found = _read(folder, dataset.fingerprint, k_eff)
    if found is not None:
        return found
    X = _features(features, np.arange(n), "knn_graph")
    with ctx.progress(n, f"knn_graph over {n:,} records") as bar:
        neighbours, sims = build(X, k_eff, progress=bar.update)
    tmp = Path(tempfile.mkdtemp(prefix=".graph-", dir=folder))
    np.save(tmp / "neighbours.npy", neighbours, allow_pickle=False)
    np.save(tmp / "sims.npy", sims, allow_pickle=False)
    for name in ("neighbours.npy", "sims.npy"):
        os.replace(tmp / name, folder / name)
    # The metadata last: the arrays are trusted only with it.
    (folder / "graph.json").write_text(json.dumps({"fingerprint": dataset.fingerprint, "k": k_eff, "n": n}))
    tmp.rmdir()
    return Graph(neighbours, sims, dataset.fingerprint)

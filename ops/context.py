"""What an operator implementation may use at run time.

The engine passes an object with this interface as ``ctx`` to every op.  Ops
never import the engine, the planner or the CLI; everything they need from
the run comes through ``ctx`` and their arguments.

Arguments arrive as run-time values:

* Scores / Features / Labels: an object with ``values(idx)`` (rows of its
  dataset, aligned with ``idx``), ``column(name, idx)`` for ops with several
  outputs, ``dataset`` and ``key``;
* Selector: a :class:`Selection` (``indices`` in selection order);
* Partition: a :class:`Grouping` (``subset`` and aligned ``labels``);
* Dataset: the loaded dataset (``records``, ``hashes``, ``len``);
* Budget: :class:`datasel.ops.registry.Budget`; numbers, strings, bools, lists
  as Python values; models as whatever the model op returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Selection:
    """Chosen pool indices in selection order."""

    indices: np.ndarray
    key: str  # identity of this selection (pool fingerprint + indices)
    content_key: str  # identity of the selected records' contents only

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Grouping:
    """A partition of ``subset`` (sorted pool indices) into groups ``labels``."""

    subset: np.ndarray
    labels: np.ndarray
    key: str

    def groups(self):
        """(label, member indices) for every non-empty group, by label."""
        order = np.argsort(self.labels, kind="stable")
        labels = self.labels[order]
        members = self.subset[order]
        bounds = np.flatnonzero(np.diff(labels)) + 1
        for chunk_labels, chunk in zip(np.split(labels, bounds), np.split(members, bounds)):
            if len(chunk):
                yield int(chunk_labels[0]), chunk


class OpContext(Protocol):
    """The run-time services available to op implementations."""

    n_pool: int  # size of the pool

    def dataset(self, name: str = "pool") -> Any:
        """A loaded dataset by name (``pool`` or ``val``)."""

    def records(self, idx: np.ndarray, data: Any = None) -> list[dict]:
        """Normalised records at ``idx`` of ``data`` (default: the dataset being mapped, or the pool)."""

    def raw(self, idx: np.ndarray, data: Any = None) -> list[dict]:
        """The records at ``idx`` exactly as read from the file (for fields datasel does not normalise)."""

    def exclude(self, reason: str, indices: np.ndarray) -> None:
        """Count pool records left out of a selection for ``reason`` (reported in the manifest)."""

    def advance(self, rows: int) -> None:
        """Report progress: ``rows`` more rows done (map ops with internal batching)."""

    def progress(self, total: int, desc: str):
        """A progress bar for a long step inside an op (``update(n)``, context manager)."""

    def work_dir(self) -> Any:
        """A persistent folder owned by this op application (e.g. for checkpoints)."""

    def log(self, message: str) -> None:
        """A note for the user (shown unless --quiet)."""

    def warn(self, message: str) -> None:
        """A warning for the user, also recorded in the manifest."""

    @property
    def cache_root(self) -> Any:
        """The cache directory (for model folders)."""

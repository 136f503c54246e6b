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

from typing import Any, Protocol

import numpy as np

# Run-time values are part of the contract; re-exported here for op modules.
from datasel.ops.contract import NO_TEXT, Grouping, Selection, Verdict, Work, text_hash  # noqa: F401


class OpContext(Protocol):
    """The run-time services available to op implementations."""

    n_pool: int  # size of the pool

    def dataset(self, name: str = "pool") -> Any:
        """A loaded dataset by name (``pool`` or ``val``)."""

    def records(self, idx: np.ndarray, data: Any = None) -> list[dict]:
        """Normalised records at ``idx`` of ``data`` (default: the dataset being mapped, or the pool)."""

    def raw(self, idx: np.ndarray, data: Any = None) -> list[dict]:
        """The records at ``idx`` exactly as read from the file (for fields datasel does not normalise)."""

    def exclude(self, reason: str, indices: np.ndarray, *, detail: str | None = None, **values: np.ndarray) -> None:
        """Say why pool records of a selector's input were left out (the funnel, the manifest, ``datasel why``).

        ``reason`` is a short category that the funnel counts ("exact duplicate").
        ``detail`` is the per-record text, with ``{name}`` placeholders for
        ``values`` (arrays aligned with ``indices``); a value named ``record``
        holds pool indices and is shown as that record's file position, e.g.
        ``ctx.exclude("near duplicate", dropped, detail="near duplicate of {record} (Jaccard {jaccard:.2f})",
        record=kept_twin, jaccard=sim)``.  Records a selector drops without a
        call get the op's own explanation (or "not picked").
        """

    def why_missing(self, scores: Any, idx: np.ndarray) -> list[str]:
        """For rows where ``scores`` is NaN: why there is no value ("the prompt fills max_length ...").

        Follows the score back through its transforms (``ratio``, ``exp``, arithmetic) to the
        operator that produced no value, and asks that op's ``why_missing`` hook.
        """

    def advance(self, rows: int) -> None:
        """Report progress: ``rows`` more rows done (map ops with internal batching)."""

    def progress(self, total: int, desc: str):
        """A progress bar for a long step inside an op (``update(n)``, context manager)."""

    def work_dir(self, create: bool = True) -> Any:
        """A persistent folder owned by this op application (e.g. for checkpoints).

        With ``create=False``: the folder if it exists already, else None (cost estimates look, never write).
        """

    def log(self, message: str) -> None:
        """A note for the user (shown unless --quiet)."""

    def warn(self, message: str) -> None:
        """A warning for the user, also recorded in the manifest."""

    @property
    def cache_root(self) -> Any:
        """The cache directory (for model folders)."""

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


def text_hash(value: Any) -> bytes:
    """The 16-byte identity of a per-record text value, for ``==``, ``!=`` and ``in`` against strings.

    Ops whose values are also text (``field``) store it as a ``text_hash``
    column (zeros where the record has no value); the engine hashes the
    recipe's string the same way.  Strings hash as themselves, other JSON
    values as their compact JSON text.
    """
    import hashlib
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                                                           sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


NO_TEXT = bytes(16)


@dataclass
class Work:
    """What an op will do for some records, before it runs (``datasel compile --pool``).

    ``tokens`` go forward through a model, ``backward_tokens`` also backward
    (training); ``steps`` are optimizer steps; ``seconds`` is a rough time from
    a rate measured once on this machine (None when no rate is known).
    """

    records: int = 0
    tokens: int = 0
    backward_tokens: int = 0
    steps: int = 0
    generated_tokens: int = 0
    seconds: float | None = None
    note: str = ""

    def scaled(self, factor: float) -> "Work":
        """This work for ``factor`` times as many records (an upper bound taken from a superset)."""
        def s(x):
            return int(round(x * factor))
        return Work(s(self.records), s(self.tokens), s(self.backward_tokens), s(self.steps),
                    s(self.generated_tokens), None if self.seconds is None else self.seconds * factor, self.note)


@dataclass
class Verdict:
    """How a selector treated each record of its input: the funnel's and ``datasel why``'s raw material.

    ``case[i]`` indexes ``notes``: one ``(kept, reason, text)`` triple per kind
    of outcome, where ``reason`` is the short category the funnel counts
    ("below the cut-off") and ``text`` a template formatted per record with
    the values of that row (``"{scores} = {score:.4g}, rank {rank} of {n}"``).
    ``values`` holds arrays aligned with the input rows; a value named
    ``record`` holds pool indices, shown as the record's file position.
    Built by an op's ``explain`` hook after the run (from cached values, so
    a cached rerun explains the same way) or from ``ctx.exclude`` calls.
    """

    notes: list[tuple[bool, str, str]]
    case: np.ndarray
    values: dict[str, Any]

    def text(self, row: int, render_record=None) -> str:
        """The note of input row ``row`` with its values filled in."""
        _, _, template = self.notes[int(self.case[row])]
        fields = {}
        for name, column in self.values.items():
            value = column if np.ndim(column) == 0 and not isinstance(column, (list, tuple)) else column[row]
            if name == "record" and render_record is not None and value is not None:
                value = render_record(int(value))
            elif isinstance(value, np.generic):
                value = value.item()
            fields[name] = value
        try:
            return template.format(**fields)
        except (KeyError, ValueError, TypeError, IndexError):
            return template


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

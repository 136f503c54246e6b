"""Targeted selection: pool records scored by their similarity to a target set (``--val``).

``similarity`` gives each pool record its cosine similarity to a target set
(max or mean over the target records) as Scores; ``roundrobin`` is RDS+'s
selection rule, where target records (or target tasks) take turns picking
their most similar pool record.

RDS+ — Ivison et al., "Large-Scale Data Selection for Instruction Tuning"
(arXiv 2503.01807, 2025; code: hamishivi/automated-instruction-selection).
What the paper's code does:

* representation: the base LM that is about to be fine-tuned (Llama 2 7B in
  the README's commands), last hidden layer, position-weighted mean pooling
  (weights proportional to the position, after SGPT, Muennighoff 2022) over
  the whole chat-formatted example, L2-normalised; query (target) examples
  are embedded the same way (``compute_influence_cosinesim.py``,
  ``--pooling weighted_mean``);
* score: the cosine similarity of every pool example to every query example;
* one target task (``get_top_influences.py --selection_method max``):
  round-robin over the query examples: in each round every query example
  takes the next example of its own ranking (most similar first); one that
  is already selected is skipped and that query's turn is spent;
* several tasks (``get_top_aggregated_influences.py``, ``minmax`` with
  ``max``): a task's score of a pool example is the max over the task's query
  examples, and the tasks take turns in the same way;
* ``mean_max`` (mean over the query examples, then the top k) is the
  ``similarity(reduce="mean")`` + ``topk`` variant.

Where datasel differs: the selection stops exactly at k, in round order (the
single-task script finishes the round, then cuts an unordered set to k); ties
in a ranking go to the earlier pool record (as the reference's stable sort);
the representation is whatever Features the recipe passes (``recipes/rds.sel``
uses MiniLM offline).  Both ops read the target's vectors whole and compare
them with blocks of pool rows, so no pool x target matrix larger than one block
(about 16M float32 values) is built.
"""

from __future__ import annotations

import math

import numpy as np

from datasel.ops.registry import Kind, Param, op

REDUCE = ("max", "mean")


def _unit(X: np.ndarray, what: str) -> np.ndarray:
    """float32 L2-normalised rows; an all-zero row stays zero (cosine 0 with everything)."""
    from datasel.ops.algos.kernels import prepare_kernel

    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{what} needs one vector per record (Features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if X.shape[0] == 0:
        return np.zeros(X.shape, dtype=np.float32)
    return prepare_kernel(X, "cosine").Z


def _target_vectors(target, what: str) -> np.ndarray:
    n = len(target.dataset)
    if n == 0:
        raise ValueError(f"{what}: the target set is empty")
    return _unit(target.values(np.arange(n)), f"{what}'s target")


def _check_dims(X: np.ndarray, T: np.ndarray, what: str) -> None:
    if X.shape[1] != T.shape[1]:
        raise ValueError(f"{what}: the records have {X.shape[1]}-dimensional features but the target "
                         f"{T.shape[1]}-dimensional ones; embed both with the same encoder")


def cosine_to_targets(X: np.ndarray, T: np.ndarray, reduce: str = "max") -> np.ndarray:
    """Per row of ``X``: max or mean cosine similarity to the rows of ``T`` (both already unit rows).

    ``max`` works in blocks of rows of ``X`` (one block x len(T) float32 product at a time);
    ``mean`` is the inner product with the mean target vector, in float64.
    """
    from datasel.ops.algos.kernels import block_rows

    if reduce == "mean":
        return X.astype(np.float64) @ T.astype(np.float64).mean(axis=0)
    if reduce != "max":
        raise ValueError(f"reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
    out = np.empty(X.shape[0], dtype=np.float64)
    step = block_rows(T.shape[0])
    Tt = np.ascontiguousarray(T.T)
    for i0 in range(0, X.shape[0], step):
        out[i0 : i0 + step] = (X[i0 : i0 + step] @ Tt).max(axis=1)
    return out


@op("similarity", [Param("features", Kind.FEATURES, doc="vectors of the records to score (normalised internally)"),
                   Param("target", Kind.FEATURES, doc="vectors of the target set, e.g. embed(minilm, data=val)",
                         any_dataset=True),
                   Param("reduce", Kind.STRING, "max", doc="max (RDS+) or mean over the target records",
                         choices=REDUCE)],
    Kind.SCORES, role="scores", version="1")
def similarity(ctx, idx, features, target, reduce="max"):
    """Cosine similarity of each record to a target set: the max (default) or mean over the target records.

    ``similarity(emb, target=embed(minilm, data=val))`` scores the pool by how
    close each record comes to the ``--val`` records; ``topk`` of it is
    "the records most similar to any target record".  Both sides are
    L2-normalised, so this is the cosine of RDS+ (Ivison et al., 2025), where
    ``reduce="max"`` is the paper's per-task aggregate and ``"mean"`` its
    ``mean_max`` variant.  RDS+ itself picks by round-robin over the target
    records: ``roundrobin``.  Computed in blocks of records (no records x
    targets matrix beyond one block); an all-zero vector scores 0.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.float64)
    X = _unit(features.values(idx), "similarity")
    T = _target_vectors(target, "similarity")
    _check_dims(X, T, "similarity")
    return cosine_to_targets(X, T, reduce)


def _task_labels(ctx, target, by: str | None) -> np.ndarray:
    """Group number per target record: its own (by=None) or by the value of field ``by``, in order of appearance."""
    from datasel.ops.scores import _lookup

    n = len(target.dataset)
    if by is None:
        return np.arange(n, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    ids: dict[str, int] = {}
    for i, raw in enumerate(ctx.raw(np.arange(n), data=target.dataset)):
        value = _lookup(raw, by)
        labels[i] = ids.setdefault("\x00missing" if value is None else repr(value), len(ids))
    return labels


def _group_rankings(X: np.ndarray, T: np.ndarray, labels: np.ndarray, depth: int) -> np.ndarray:
    """(groups, depth) row indices of X: per group, its ``depth`` rows with the largest max-cosine, best first.

    Ties go to the lower row.  Built over blocks of rows of X with per-group top-``depth`` heaps
    (the same merge the kNN graph uses), so memory is groups x depth plus one block.
    """
    from datasel.ops.algos.kernels import _merge_topm, _sort_topm, block_rows

    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    n_groups = starts.size
    Ts = np.ascontiguousarray(T[order])
    n = X.shape[0]
    sentinel = np.int64(n + 1)
    best_s = np.full((n_groups, depth), -np.inf, dtype=np.float32)
    best_i = np.full((n_groups, depth), sentinel, dtype=np.int64)
    group_rows = np.arange(n_groups, dtype=np.int64)
    single = n_groups == Ts.shape[0]  # every target its own group: no reduction needed
    step = block_rows(Ts.shape[0])
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        S = Ts @ X[i0:i1].T  # (targets, block) float32
        if not single:
            S = np.maximum.reduceat(S, starts, axis=0)
        _merge_topm(best_s, best_i, group_rows, np.ascontiguousarray(S, dtype=np.float32),
                    np.arange(i0, i1, dtype=np.int64))
    _sort_topm(best_s, best_i, sentinel)
    # groups were numbered by sorted label; labels are 0..G-1 in order of appearance, so this is the same order
    return best_i


def round_robin(X: np.ndarray, T: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """RDS+'s round-robin: row indices of X in pick order.

    In round r every group (in label order) offers its r-th most similar row of X (a group's
    score of a row is the max cosine over its targets); an offer already taken is skipped and
    the group's turn is spent; picking stops at ``k``.  X and T are unit rows; ``labels`` number
    the target rows' groups 0..G-1.
    """
    n = X.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    n_groups = int(labels.max()) + 1
    depth = min(n, max(64, 2 * math.ceil(k / n_groups)))
    while True:
        ranking = _group_rankings(X, T, labels, depth)
        taken = np.zeros(n, dtype=bool)
        picks: list[np.ndarray] = []
        count = 0
        for r in range(depth):
            offers = ranking[:, r]
            offers = offers[(offers >= 0) & (offers < n)]
            fresh = offers[~taken[offers]]
            _, first = np.unique(fresh, return_index=True)
            fresh = fresh[np.sort(first)][: k - count]
            taken[fresh] = True
            picks.append(fresh)
            count += fresh.size
            if count >= k:
                return np.concatenate(picks)
        if depth >= n:  # every ranking is complete, so every row has been offered
            return np.concatenate(picks)
        depth = min(n, 2 * depth)


@op("roundrobin", [Param("features", Kind.FEATURES, doc="vectors of the pool records"),
                   Param("k", Kind.BUDGET, doc="how many to pick"),
                   Param("target", Kind.FEATURES, doc="vectors of the target records, e.g. embed(minilm, data=val)",
                         any_dataset=True),
                   Param("by", Kind.STRING, None,
                         doc="a field of the target records naming their task: tasks take turns, each ranking by "
                             "the max over its records; default: every target record takes turns")],
    Kind.SELECTOR, role="selector", version="1", costly=True)
def roundrobin(ctx, subset, features, k, target, by=None):
    """RDS+'s selection: target records take turns picking their most similar record (cosine).

    In round r every target record, in file order, offers its r-th most
    similar record among those that reach the op; a record already picked is
    skipped (that target's turn is spent), and picking stops at k.  With
    ``by="task"`` the target records are grouped by that field (in order of
    first appearance; records without it form one group), a group ranks by
    the max cosine over its records, and the groups take turns: RDS+'s
    multi-task selection.  Ivison et al. (2025); see ``similarity`` and
    ``recipes/rds.sel``.  Ties go to the earlier record.
    """
    rows = np.sort(np.asarray(subset, dtype=np.int64))
    n = k.resolve(len(rows), ctx.n_pool)
    if n == 0 or rows.size == 0:
        return rows[:0]
    X = _unit(features.values(rows), "roundrobin")
    T = _target_vectors(target, "roundrobin")
    _check_dims(X, T, "roundrobin")
    return rows[round_robin(X, T, _task_labels(ctx, target, by), n)]

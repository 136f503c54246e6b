"""Partitions that need no model."""

from __future__ import annotations

import numpy as np

from datasel.ops.registry import Kind, Param, op
from datasel.ops.scores import _lookup


@op("groups", [Param("name", Kind.STRING, doc="field whose value names the group (dots reach into objects)")],
    Kind.PARTITION, role="partition", version="1")
def groups(ctx, subset, name):
    """Group records by the value of a field (records without it form one group of their own).

    Groups are numbered in order of first appearance in the pool;
    ``groups("category") | topk(length, 10)`` keeps the 10 longest per category.
    """
    labels = np.empty(len(subset), dtype=np.int64)
    ids: dict[str, int] = {}
    for i, raw in enumerate(ctx.raw(subset)):
        value = _lookup(raw, name)
        label = "\x00missing" if value is None else repr(value)
        labels[i] = ids.setdefault(label, len(ids))
    return labels

"""Duplicate removal."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from datasel.ops.registry import Kind, Param, op
from datasel.ops.scores import TEXT_FIELDS, record_text


@op("dedup_exact", [Param("field", Kind.STRING, "all", doc="which text must match", choices=TEXT_FIELDS + ("record",)),
                    Param("normalize", Kind.BOOL, False,
                          doc="compare case-folded text with whitespace collapsed")],
    Kind.SELECTOR, role="selector", version="1")
def dedup_exact(ctx, subset, field="all", normalize=False):
    """Keep the first record (in pool order) of every group of exact duplicates.

    ``field="all"`` compares instruction, input and response together;
    ``"record"`` compares the whole raw record (every field); other fields
    compare just that text.  With ``normalize`` case and runs of whitespace
    are ignored.  Dropped records are counted in the manifest.
    """
    seen: set[bytes] = set()
    keep = np.zeros(len(subset), dtype=bool)
    if field == "record":
        texts = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in ctx.raw(subset)]
    else:
        texts = [record_text(r, field) for r in ctx.records(subset)]
    for i, text in enumerate(texts):
        if normalize:
            text = " ".join(text.casefold().split())
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            keep[i] = True
    dropped = subset[~keep]
    ctx.exclude(f"exact duplicate ({field})", dropped)
    return subset[keep]

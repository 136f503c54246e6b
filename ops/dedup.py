"""Duplicate removal: exact (``dedup_exact``) and near duplicates (``dedup_near``: MinHash or embeddings)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re

import numpy as np

from datasel.ops.context import Verdict
from datasel.ops.contract import E
from datasel.ops.registry import Kind, Param, macro, op
from datasel.ops.scores import TEXT_FIELDS, record_text


def _explain_dedup(ctx, subset, kept, field="all", normalize=False):
    # Dropped records carry the twin they duplicate (ctx.exclude above); this covers the kept ones.
    return Verdict([(True, "first copy", "no earlier copy of this text"),
                    (False, "exact duplicate", "an exact duplicate of an earlier record")],
                   np.where(np.isin(subset, kept), 0, 1), {})


@op("dedup_exact", [Param("field", Kind.STRING, "all", doc="which text must match", choices=TEXT_FIELDS + ("record",)),
                    Param("normalize", Kind.BOOL, False,
                          doc="compare case-folded text with whitespace collapsed")],
    Kind.SELECTOR, role="selector", version="2", explain=_explain_dedup)
def dedup_exact(ctx, subset, field="all", normalize=False):
    """Keep the first record (in pool order) of every group of exact duplicates.

    ``field="all"`` compares instruction, input and response together;
    ``"record"`` compares the whole raw record (every field); other fields
    compare just that text.  With ``normalize`` case and runs of whitespace
    are ignored.  Dropped records are counted in the manifest.
    """
    first: dict[bytes, int] = {}
    keep = np.zeros(len(subset), dtype=bool)
    twin = np.zeros(len(subset), dtype=np.int64)
    if field == "record":
        texts = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in ctx.raw(subset)]
    else:
        texts = [record_text(r, field) for r in ctx.records(subset)]
    for i, text in enumerate(texts):
        if normalize:
            text = " ".join(text.casefold().split())
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        twin[i] = subset[first.setdefault(digest, i)]
        keep[i] = twin[i] == subset[i]
    ctx.exclude("exact duplicate", subset[~keep], detail="duplicate of {record}" + (
        f" ({field}, case and spacing ignored)" if normalize else f" ({field})"), record=twin[~keep])
    return subset[keep]


# ------------------------------------------------------------ near duplicates
_WORDS = re.compile(r"\w+")

#: LSH band weights (false positive, false negative): candidates are verified on their estimated
#: Jaccard, so a false positive costs one signature comparison while a false negative is a missed
#: duplicate; datasketch's default is (0.5, 0.5).
_LSH_WEIGHTS = (0.1, 0.9)
#: Cosine candidates come from float32 inner products within this margin of the threshold and are
#: then decided on float64 inner products of the normalised rows.
_COSINE_MARGIN = 1e-4
#: Records per block of the cosine search (a block x block float32 Gram matrix, 16 MB).
_COSINE_BLOCK = 2048


def word_shingles(text: str, size: int, normalize: bool = True) -> list[bytes]:
    """The set of ``size``-word shingles of ``text`` as UTF-8 bytes (MinHash input).

    ``normalize`` casefolds and keeps only word characters (``\\w+``), so punctuation,
    case and whitespace edits do not count; otherwise words are split on whitespace.
    A text with at most ``size`` words is one shingle (an empty text is the empty shingle).
    """
    tokens = _WORDS.findall(text.casefold()) if normalize else text.split()
    if len(tokens) <= size:
        return [" ".join(tokens).encode("utf-8")]
    return list({" ".join(tokens[i : i + size]).encode("utf-8") for i in range(len(tokens) - size + 1)})


def _whole(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _threshold(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
        raise ValueError(f"{what} threshold must be a number in (0, 1], got {value!r}")
    return float(value)


def _minhash_scheme() -> str:
    """The permutation scheme of datasketch's MinHash: signatures of different schemes never mix in the cache."""
    import datasketch

    scheme = getattr(datasketch.MinHash(num_perm=1), "scheme", "legacy")
    return f"datasketch-minhash-{scheme}"


@op("minhash", [Param("field", Kind.STRING, "all", doc="which text to hash", choices=TEXT_FIELDS),
                Param("shingle", Kind.NUMBER, 5, integer=True, low=1, doc="words per shingle"),
                Param("num_perm", Kind.NUMBER, 128, integer=True, low=1, high=4096, doc="permutations (signature length)"),
                Param("seed", Kind.NUMBER, 1, integer=True, low=0, high=2**32 - 1, doc="seed of the permutations"),
                Param("normalize", Kind.BOOL, True, doc="casefold and drop punctuation before shingling")],
    Kind.FEATURES, role="map", version="1", chunk_rows=4096, key_fn=lambda **_: _minhash_scheme())
def minhash(state, batch, field="all", shingle=5, num_perm=128, seed=1, normalize=True):
    """MinHash signature of each record's set of word shingles (datasketch), cached per record.

    Row i is ``num_perm`` unsigned 32-bit values; the fraction of equal
    positions of two rows estimates the Jaccard similarity of the two shingle
    sets (Broder, 1997).  Shingles are ``shingle`` consecutive words after
    normalisation (see ``dedup_near``); a text with fewer words is one shingle.
    Used by ``dedup_near``; a grown pool hashes only its new records.
    """
    from datasketch import MinHash

    size = _whole(shingle, "shingle", 1)
    perms = _whole(num_perm, "num_perm", 8, 4096)
    m = MinHash(num_perm=perms, seed=_whole(seed, "seed", 0, 2**32 - 1))
    out = np.empty((len(batch), perms), dtype=np.uint32)
    for row, record in enumerate(batch.records):
        m.clear()
        m.update_batch(word_shingles(record_text(record, field), size, bool(normalize)))
        out[row] = m.hashvalues
    return out


@functools.lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for a Jaccard ``threshold``: datasketch's MinHashLSH choice, weighted toward recall."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    return int(lsh.b), int(lsh.r)


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band and record (FNV-1a over the band's 32-bit values); equal bands give equal keys."""
    keys = np.empty((sig.shape[0], bands), dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for b in range(bands):
        acc = np.full(sig.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
        for col in range(b * rows, (b + 1) * rows):
            acc ^= sig[:, col].astype(np.uint64)
            acc *= prime  # wraps modulo 2^64
        keys[:, b] = acc
    return keys


def near_duplicates_minhash(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal in row order on MinHash signatures.

    Row i is dropped when an earlier *kept* row j has an estimated Jaccard
    (fraction of equal signature values) >= ``threshold``; candidates j are the
    kept rows that share an LSH band with i (banding of Indyk & Motwani (1998)
    as in datasketch's MinHashLSH; bands from :func:`lsh_bands`), so only kept
    rows are indexed.  Returns (keep mask, twin row per row or -1, estimate):
    the twin is the most similar such j, the earliest on ties.
    """
    sig = np.ascontiguousarray(sig)
    n, perms = sig.shape
    keep = np.zeros(n, dtype=bool)
    twin = np.full(n, -1, dtype=np.int64)
    est = np.zeros(n, dtype=np.float64)
    if n == 0:
        return keep, twin, est
    bands, rows = lsh_bands(float(threshold), perms)
    keys = _band_keys(sig, bands, rows).tolist()
    tables: list[dict] = [{} for _ in range(bands)]
    need = threshold * perms - 1e-9  # est >= threshold  <=>  matches >= threshold * perms
    for i in range(n):
        row_keys = keys[i]
        cands: set[int] = set()
        for table, key in zip(tables, row_keys):
            hit = table.get(key)
            if hit is not None:
                cands.update(hit)
        if cands:
            c = np.fromiter(sorted(cands), dtype=np.int64, count=len(cands))
            matches = np.count_nonzero(sig[c] == sig[i], axis=1)
            best = int(np.argmax(matches))  # the first maximum: the earliest row on ties
            if matches[best] >= need:
                twin[i] = c[best]
                est[i] = matches[best] / perms
                continue
        keep[i] = True
        for table, key in zip(tables, row_keys):
            table.setdefault(key, []).append(i)
    return keep, twin, est


def near_duplicates_cosine(X: np.ndarray, threshold: float, *, index: str = "auto", nprobe: int = 16,
                           seed: int = 0, block: int = _COSINE_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal in row order by cosine similarity (rows L2-normalised).

    Row i is dropped when an earlier *kept* row j has cos(i, j) >= ``threshold``.
    Rows are processed in blocks: each block is range-searched (faiss, inner
    product) against the rows kept so far, and compared within itself by one
    Gram matrix; only kept rows are indexed, so a cluster of m copies costs m
    queries, not m^2 pairs.  Candidates within ``_COSINE_MARGIN`` of the threshold in
    float32 are decided on float64 inner products.  ``index="flat"`` is exact;
    ``"ivf"`` (an inverted file of about 2 sqrt(n) lists, each query probing
    ``nprobe``) misses a pair whose rows fall in lists the query does not probe;
    ``"auto"`` = flat up to ``EXACT_KNN_MAX`` rows.  An all-zero row has cosine
    0 with everything.  Returns (keep mask, twin row or -1, cosine to the twin);
    the twin is the most similar earlier kept row, the earliest on ties.
    """
    from datasel.ops.algos.kernels import EXACT_KNN_MAX, _faiss, prepare_kernel

    n = X.shape[0]
    keep = np.zeros(n, dtype=bool)
    twin = np.full(n, -1, dtype=np.int64)
    cos = np.zeros(n, dtype=np.float64)
    if n == 0:
        return keep, twin, cos
    Z = prepare_kernel(X, "cosine").Z  # float32, unit rows (zero rows stay zero)
    d = Z.shape[1]
    faiss = _faiss()
    if index == "auto":
        index = "flat" if n <= EXACT_KNN_MAX else "ivf"
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = int(max(1, min(round(2 * math.sqrt(n)), 4096, n // 39)))
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = Z if n <= 64 * nlist else Z[np.sort(rng.choice(n, size=64 * nlist, replace=False))]
        idx.cp.seed = int(seed)
        idx.train(np.ascontiguousarray(train))
        idx.nprobe = int(min(nlist, max(1, nprobe)))
    else:
        raise ValueError(f"unknown index {index!r}; expected 'auto', 'flat' or 'ivf'")
    kept_rows = np.zeros(0, dtype=np.int64)  # faiss id -> row
    radius = float(threshold) - _COSINE_MARGIN
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        Q = Z[b0:b1]
        # (query row, earlier row) candidate pairs: against kept rows of earlier blocks, then within the block
        pq: list[np.ndarray] = []
        pr: list[np.ndarray] = []
        if idx.ntotal:
            lims, _, ids = idx.range_search(Q, radius)
            counts = np.diff(lims).astype(np.int64)
            pq.append(np.repeat(np.arange(b0, b1, dtype=np.int64), counts))
            pr.append(kept_rows[ids.astype(np.int64)])
        G = Q @ Q.T
        qi, rj = np.nonzero(np.tril(G >= radius, k=-1))
        pq.append(qi.astype(np.int64) + b0)
        pr.append(rj.astype(np.int64) + b0)
        q_all = np.concatenate(pq)
        r_all = np.concatenate(pr)
        block_keep = np.ones(b1 - b0, dtype=bool)
        if q_all.size:
            sims = _dot64(Z, q_all, r_all)
            ok = sims >= threshold
            q_all, r_all, sims = q_all[ok], r_all[ok], sims[ok]
            order = np.lexsort((r_all, -sims, q_all))  # per query: most similar first, then earliest
            q_all, r_all, sims = q_all[order], r_all[order], sims[order]
            starts = np.flatnonzero(np.r_[True, q_all[1:] != q_all[:-1]]) if q_all.size else q_all
            ends = np.r_[starts[1:], q_all.size].astype(np.int64) if q_all.size else q_all
            for s, e in zip(starts.tolist(), ends.tolist()):
                i = int(q_all[s])
                for t in range(s, e):  # the first earlier partner that is kept
                    j = int(r_all[t])
                    if keep[j] or (j >= b0 and block_keep[j - b0]):
                        twin[i] = j
                        cos[i] = sims[t]
                        block_keep[i - b0] = False
                        break
        keep[b0:b1] = block_keep
        new = np.flatnonzero(block_keep) + b0
        if new.size:
            idx.add(np.ascontiguousarray(Z[new]))
            kept_rows = np.concatenate([kept_rows, new])
    return keep, twin, cos


def _dot64(Z: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """float64 inner products of rows a[t] and b[t] of Z."""
    out = np.empty(a.size, dtype=np.float64)
    for s in range(0, a.size, chunk):
        A = Z[a[s : s + chunk]].astype(np.float64)
        B = Z[b[s : s + chunk]].astype(np.float64)
        out[s : s + chunk] = np.einsum("ij,ij->i", A, B)
    return out


def _rows_in_pool_order(subset) -> np.ndarray:
    return np.sort(np.asarray(subset, dtype=np.int64))


def _explain_near(ctx, subset, kept, **_):
    # Dropped records carry their kept twin and the similarity (ctx.exclude); this covers the kept ones.
    return Verdict([(True, "first copy", "no earlier kept record is a near duplicate"),
                    (False, "near duplicate", "a near duplicate of an earlier record")],
                   np.where(np.isin(subset, kept), 0, 1), {})


@op("dedup_minhash", [Param("signatures", Kind.FEATURES, doc="MinHash signatures: minhash(...)"),
                      Param("threshold", Kind.NUMBER, 0.8, low=0, high=1, doc="estimated Jaccard at or above which a record "
                                                              "is a near duplicate")],
    Kind.SELECTOR, role="selector", version="1", explain=_explain_near)
def dedup_minhash(ctx, subset, signatures, threshold=0.8):
    """Keep the first record (pool order) of every group of MinHash near duplicates; see ``dedup_near``.

    A record is dropped when an earlier kept record shares an LSH band with it
    and their signatures estimate a Jaccard similarity >= ``threshold``.
    ``dedup_near`` (no features) is the usual way to call it.
    """
    t = _threshold(threshold, "the Jaccard")
    rows = _rows_in_pool_order(subset)
    if rows.size == 0:
        return rows
    sig = np.asarray(signatures.values(rows))
    if sig.ndim != 2 or (sig.size and not np.issubdtype(sig.dtype, np.integer)):
        raise ValueError("dedup_minhash needs MinHash signatures (minhash(...)); for embeddings use "
                         "dedup_near(features=...)")
    keep, twin, est = near_duplicates_minhash(sig, t)
    dropped = ~keep
    ctx.exclude("near duplicate", rows[dropped], detail="near duplicate of {record} (Jaccard ≈ {jaccard:.2f})",
                record=rows[twin[dropped]], jaccard=est[dropped])
    return rows[keep]


@op("dedup_cosine", [Param("features", Kind.FEATURES, doc="embeddings (normalised internally)"),
                     Param("threshold", Kind.NUMBER, 0.95, low=-1, high=1, doc="cosine similarity at or above which a record "
                                                               "is a near duplicate"),
                     Param("index", Kind.STRING, "auto", doc="flat (exact), ivf (approximate), auto: flat up "
                                                             "to 50,000 records", choices=("auto", "flat", "ivf")),
                     Param("nprobe", Kind.NUMBER, 16, integer=True, low=1, doc="ivf: lists probed per query")],
    Kind.SELECTOR, role="selector", version="1", costly=True, explain=_explain_near)
def dedup_cosine(ctx, subset, features, threshold=0.95, index="auto", nprobe=16):
    """Keep the first record (pool order) of every group of records with cosine similarity >= threshold.

    faiss range search (inner product of L2-normalised rows) against the
    records kept so far; see ``dedup_near``, the usual way to call it.
    """
    t = _threshold(threshold, "the cosine")
    rows = _rows_in_pool_order(subset)
    if rows.size == 0:
        return rows
    X = np.asarray(features.values(rows))
    if X.ndim == 2 and np.issubdtype(X.dtype, np.integer):
        raise ValueError("dedup_cosine compares embeddings, but these features are integers (MinHash "
                         "signatures?); for MinHash use dedup_near without features")
    from datasel.ops.diversity import _features

    X = _features(features, rows, "dedup_cosine")
    keep, twin, cos = near_duplicates_cosine(X, t, index=index, nprobe=_whole(nprobe, "nprobe", 1))
    dropped = ~keep
    ctx.exclude("near duplicate", rows[dropped], detail="near duplicate of {record} (cosine {cosine:.3f})",
                record=rows[twin[dropped]], cosine=cos[dropped])
    return rows[keep]


_MINHASH_ONLY = ("field", "shingle", "num_perm", "seed", "normalize")


@macro("dedup_near", [
    Param("features", Kind.FEATURES, None,
          doc="embeddings to compare by cosine, e.g. embed(minilm, text=\"whole\"); none: MinHash of the text"),
    Param("threshold", Kind.NUMBER, None, low=-1, high=1, doc="near duplicates at or above it: estimated Jaccard (default 0.8) "
                                              "or cosine (default 0.95)"),
    Param("field", Kind.STRING, None, doc="MinHash: which text (default \"all\")", choices=TEXT_FIELDS),
    Param("shingle", Kind.NUMBER, None, integer=True, low=1, doc="MinHash: words per shingle (default 5)"),
    Param("num_perm", Kind.NUMBER, None, integer=True, low=1, high=4096, doc="MinHash: permutations (default 128)"),
    Param("seed", Kind.NUMBER, None, integer=True, low=0, high=2**32 - 1, doc="MinHash: permutation seed (default 1)"),
    Param("normalize", Kind.BOOL, None, doc="MinHash: casefold and drop punctuation first (default true)"),
    Param("index", Kind.STRING, None, doc="cosine: flat, ivf or auto (default; flat up to 50,000 records)",
          choices=("auto", "flat", "ivf")),
], Kind.SELECTOR, version="1")
def dedup_near(features=None, threshold=None, field=None, shingle=None, num_perm=None, seed=None, normalize=None,
               index=None):
    """Keep the first record (pool order) of every group of near duplicates.

    Without ``features``: MinHash over word shingles (``minhash``, cached per
    record, datasketch), LSH candidates, and a record is a near duplicate of
    an earlier one when their signatures estimate a Jaccard similarity of at
    least ``threshold``.  Defaults: shingles of 5 words after casefolding and
    dropping punctuation, threshold 0.8, 128 permutations — the 5-gram / 0.8
    setting of Lee et al. (ACL 2022), who use 9,000 permutations.  A text with
    fewer words than ``shingle`` is one shingle.  Short records are the weak
    spot of shingles: one word swapped in a 9-word record leaves J = 0.33 on
    5-word shingles (0.75 on single words).  LSH misses a pair with
    probability (1 − J^r)^b (b bands of r rows chosen by datasketch's
    MinHashLSH, weighted 0.1 / 0.9 toward recall: 14 × 9 at 0.8 / 128,
    missing 2.5% of pairs at J = 0.85 and 0.1% at 0.9), and the estimate has a
    standard deviation of √(J(1−J)/num_perm), about 0.035 at J = 0.8.

    With ``features`` (e.g. ``embed(minilm, text="whole")``): cosine
    similarity of the L2-normalised vectors, faiss range search (inner product
    >= threshold, default 0.95), exact up to 50,000 records (``index``).
    Embedding near-duplicate removal is SemDeDup's idea (Abbas et al., 2023),
    which searches within k-means clusters; this searches the whole input.

    Greedy in pool order: a record is dropped when an earlier *kept* record is
    its near duplicate, so in a chain a ~ b ~ c with a ≁ c, b goes and c stays.
    Each dropped record is reported with its kept twin (the most similar one)
    and the similarity.  The MinHash parameters (field, shingle, num_perm,
    seed, normalize) mean nothing with features, and index nothing without:
    mixing them is an error.
    """
    given_minhash = [name for name, value in zip(_MINHASH_ONLY, (field, shingle, num_perm, seed, normalize))
                     if value is not None]
    literal = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if threshold is not None and literal(threshold) and not 0 < float(threshold) <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if features is not None:
        if given_minhash:
            raise ValueError(f"{', '.join(given_minhash)} only appl{'y' if len(given_minhash) > 1 else 'ies'} "
                             "to MinHash (without features); with features the records are compared by cosine")
        options = {name: E.arg(name) for name, v in (("threshold", threshold), ("index", index)) if v is not None}
        return E.call("dedup_cosine", E.arg("features"), **options)
    if index is not None:
        raise ValueError("index only applies to embeddings (features=...); MinHash candidates come from LSH")
    for name, value, low in (("shingle", shingle, 1), ("num_perm", num_perm, 8), ("seed", seed, 0)):
        if value is not None and literal(value):
            _whole(value, name, low)
    signatures = E.call("minhash", **{name: E.arg(name) for name in given_minhash})
    options = {"threshold": E.arg("threshold")} if threshold is not None else {}
    return E.call("dedup_minhash", signatures, **options)

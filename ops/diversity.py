"""Embeddings and diversity: embed, k-means, nearest-to-centroid, k-center,
facility location (with QDIT's quality term), NovelSelect, and reward scores.

The selection algorithms live in :mod:`datasel.ops.algos` as plain array
functions (exact lazy greedy, incremental k-center and NovelSelect, faiss
k-means); these declarations adapt them to the language: they read the
features of the records that reach them, map picks back to pool indices and
report excluded rows.
"""

from __future__ import annotations

import numpy as np

from datasel.ops.algos import templates as T
from datasel.ops.registry import Kind, Param, Ref, Resources, op

TEXT_KINDS = tuple(T.TEXT_KINDS)


# ------------------------------------------------------------------ embed
def _load_encoder(args: dict, resources):
    """Setup of ``embed``: the sentence encoder, once per worker."""
    return args["encoder"].load()


def _embed_cost(ctx, idx, encoder, text="instruction_input", normalize=True, max_length=None, batch=None):
    from datasel.ops.algos.throughput import encoder_rates
    from datasel.ops.context import Work

    rates = encoder_rates(encoder.key, encoder.load, encoder.device)
    words = sum(len(T.text_for(text, r).split()) for r in ctx.records(idx))
    # The rate was measured on texts of ~40 words; cost grows about linearly with length.
    seconds = len(idx) / rates["texts"] * max(0.25, words / max(1, len(idx)) / rates["words_per_text"])
    return Work(records=len(idx), seconds=seconds)


@op("embed", [Param("encoder", Kind.MODEL, Ref("minilm"), doc="a sentence encoder (default: the prelude's minilm)"),
              Param("text", Kind.STRING, "instruction_input", doc="what to embed", choices=TEXT_KINDS),
              Param("normalize", Kind.BOOL, True, doc="L2-normalise the vectors"),
              Param("max_length", Kind.NUMBER, None, integer=True, low=1, doc="token limit (default: the encoder's own, 256 for MiniLM)"),
              Param("batch", Kind.NUMBER, None, integer=True, low=1,
                    doc="encoder batch size; default 16 on CPU (less padding beats bigger batches there: "
                        "MiniLM on 2,000 Dolly texts takes 22.4 s at 16 vs 25.8 s at 64, 1.15x; "
                        "`python benchmarks/run.py embed`), 128 on CUDA")],
    Kind.FEATURES, role="map", version="2", chunk_rows=8192,
    key_fn=lambda text, **_: "text:" + T.text_digest(text), cost=_embed_cost, setup=_load_encoder,
    resources=Resources(cpus=1.0, gpus=0.25, memory_gb=1.0))
def embed(model, records, encoder, text="instruction_input", normalize=True, max_length=None, batch=None):
    """Sentence embeddings of each record, cached per record.

    ``text`` picks the rendering: ``instruction``, ``instruction_input``
    (default), ``response``, ``whole`` (Superfiltering-D's instruction, input
    and output), ``small2large`` (Small2Large's clustering text),
    ``alpaca_prompt``, ``alpaca_full``, ``nuggets_full``.  Batches are sorted by
    length (sentence-transformers' ``encode``).  A digest of the rendering
    (``templates.text_digest``) is part of the cache key, so editing a text
    kind recomputes the vectors made with it.
    """
    import torch

    texts = [T.text_for(text, r) for r in records.records]
    # The loaded encoder is shared by every embed in the process: set the limit only for this call.
    default_length = model.max_seq_length
    if max_length is not None:
        model.max_seq_length = int(max_length)
    if batch is None:
        batch = 128 if str(model.device).startswith("cuda") else 16
    try:
        with torch.inference_mode():
            vectors = model.encode(texts, batch_size=int(batch), normalize_embeddings=bool(normalize),
                                   convert_to_numpy=True, show_progress_bar=False)
    finally:
        model.max_seq_length = default_length
    return np.asarray(vectors, dtype=np.float32)


def _features(features, subset: np.ndarray, what: str) -> np.ndarray:
    X = np.asarray(features.values(subset), dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{what} needs one vector per record (Features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{what}: the features contain NaN or infinite values")
    return X


def _defined_features(ctx, features, subset: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(positions into subset with features, their vectors)``; records whose features are NaN (a
    gradient of a record whose answer was cut off) are left out with the reason."""
    X = np.asarray(features.values(subset), dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{what} needs one vector per record (Features), got shape {X.shape}")
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        left = subset[~finite]
        ctx.exclude("no features", left, detail=f"no {features.label} features for {what}: {{missing}}",
                    missing=np.asarray(ctx.why_missing(features, left), dtype=str))
    rows = np.flatnonzero(finite)
    return rows, np.ascontiguousarray(X[rows])


def _quality(ctx, quality, rows: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Quality values for ``rows``; rows without one are excluded (and counted)."""
    q = np.asarray(quality.values(rows), dtype=np.float64)
    nan = np.isnan(q)
    if nan.any():
        ctx.exclude("no quality score", rows[nan], detail=f"no {quality.label} score for {what}'s quality term: "
                    "{missing}", missing=np.asarray(ctx.why_missing(quality, rows[nan]), dtype=str))
    return rows[~nan], q[~nan]


# ----------------------------------------------------------------- kmeans
@op("kmeans", [Param("features", Kind.FEATURES, doc="vectors to cluster"),
               Param("k", Kind.NUMBER, integer=True, low=1, doc="number of clusters (capped at the number of records)"),
               Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1),
               Param("iters", Kind.NUMBER, 300, integer=True, low=1, doc="at most this many Lloyd iterations"),
               Param("tol", Kind.NUMBER, 1e-4, low=0,
                     doc="stop when the centroids move less than tol × the features' mean variance (scikit-learn's "
                         "rule and default); 0 runs every iteration"),
               Param("metric", Kind.STRING, "l2", doc="l2, or cosine (spherical k-means)", choices=("l2", "cosine")),
               Param("n_init", Kind.NUMBER, 1, integer=True, low=1, doc="restarts; the lowest inertia wins")],
    Kind.PARTITION, role="partition", version="2", costly=True)
def kmeans(ctx, subset, features, k, seed=0, iters=300, tol=1e-4, metric="l2", n_init=1):
    """k-means clusters of the records that reach it (faiss; k-means++ initialisation).

    Lloyd iterations stop as scikit-learn's do: when an iteration moves the
    centroids (squared Frobenius norm) by less than ``tol`` times the mean
    per-feature variance, at most ``iters`` iterations (its defaults, 1e-4 and
    300).  Empty clusters are re-seeded by faiss during training; a cluster
    still empty at the end is dropped, so the groups are numbered 0..k'−1.
    With fewer records than ``k`` every record is its own group.  Records without features
    (NaN: a gradient of a record whose answer was cut off, say) are left out of every group and
    counted, with the reason.
    """
    from datasel.ops.algos.kmeans import kmeans as run_kmeans

    if len(subset) == 0:
        return np.zeros(0, dtype=np.int64)
    k = int(k)
    if k < 1:
        raise ValueError("k must be at least 1")
    rows, X = _defined_features(ctx, features, subset, "kmeans")
    labels = np.full(len(subset), -1, dtype=np.int64)  # -1: in no group
    if k >= len(rows):
        labels[rows] = np.arange(len(rows))
        return labels
    result = run_kmeans(X, k, seed=int(seed), iters=int(iters),
                        tol=float(tol) if tol else None, metric=metric, n_init=int(n_init))
    if result.empty_dropped:
        ctx.warn(f"{result.empty_dropped} of {k} clusters ended empty and were dropped")
    labels[rows] = result.labels
    return labels


@op("nearest", [Param("features", Kind.FEATURES, doc="vectors"),
                Param("k", Kind.BUDGET, 1, doc="how many to keep"),
                Param("metric", Kind.STRING, "l2", choices=("l2", "cosine"))],
    Kind.SELECTOR, role="selector", version="1")
def nearest(ctx, subset, features, k=None, metric="l2"):
    """Keep the k records closest to the centroid (mean vector) of the records that reach it.

    After a partition this is "the member nearest its cluster's centre":
    ``kmeans(f, 100) | nearest(f)`` picks Nuggets-style anchors.  With
    ``metric="cosine"`` rows and centroid are normalised first.  Ties go to
    the earlier record.
    """
    from datasel.ops.registry import Budget

    budget = k if isinstance(k, Budget) else Budget(count=1)
    n = budget.resolve(len(subset), ctx.n_pool)
    if n == 0 or len(subset) == 0:
        return subset[:0]
    X = _features(features, subset, "nearest").astype(np.float64)
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        centre = X.mean(axis=0)
        centre /= max(np.linalg.norm(centre), 1e-12)
        dist = 1.0 - X @ centre
    else:
        centre = X.mean(axis=0)
        dist = ((X - centre) ** 2).sum(axis=1)
    order = np.lexsort((subset, dist))
    return subset[order[:n]]


# ---------------------------------------------------------------- kcenter
@op("kcenter", [Param("features", Kind.FEATURES, doc="vectors"),
                Param("k", Kind.BUDGET, doc="how many to add"),
                Param("given", Kind.SELECTOR, None, doc="records already selected: they are centres, never picked"),
                Param("metric", Kind.STRING, "l2", doc="l2 on the raw vectors (DiverseEvol) or cosine",
                      choices=("l2", "cosine")),
                Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1, doc="chooses the first centre when nothing is given")],
    Kind.SELECTOR, role="selector", version="1", costly=True)
def kcenter(ctx, subset, features, k, given=None, metric="l2", seed=0):
    """Greedy k-center (farthest-first): each pick is the record farthest from every centre so far.

    With ``given`` (e.g. the current selection inside ``iterate``), those
    records are the initial centres, as in DiverseEvol's rounds and
    experimental design.  Without it the first centre is drawn with ``seed``.
    Ties go to the earlier record.  Exact incremental algorithm: one pass over
    the candidates per pick.
    """
    from datasel.ops.algos.kcenter import kcenter as run_kcenter

    rows, given_rows = _with_given(subset, given)
    n = min(k.resolve(len(subset), ctx.n_pool), len(rows) - len(given_rows))
    if n <= 0:
        return subset[:0]
    X = _features(features, rows, "kcenter")
    given_pos = np.searchsorted(rows, given_rows)
    candidates = np.setdiff1d(np.searchsorted(rows, subset), given_pos)
    result = run_kcenter(X, n, given=given_pos if len(given_pos) else None, candidates=candidates,
                         metric=metric, seed=int(seed))
    return rows[result.order]


def _with_given(subset: np.ndarray, given) -> tuple[np.ndarray, np.ndarray]:
    """Rows to load features for (subset ∪ given, sorted) and the given rows."""
    if given is None:
        return subset, np.zeros(0, dtype=np.int64)
    given_rows = np.unique(np.asarray(given.indices, dtype=np.int64))
    return np.union1d(subset, given_rows), given_rows


# --------------------------------------------------------------- facility
@op("facility", [Param("features", Kind.FEATURES, doc="vectors"),
                 Param("k", Kind.BUDGET, doc="how many to pick"),
                 Param("kernel", Kind.STRING, "cosine",
                       doc="cosine = max(cos, 0); rbf = exp(−gamma‖x−y‖²); euclid_exp = exp(−‖x−y‖/d) "
                           "(Superfiltering-D)", choices=("cosine", "rbf", "euclid_exp")),
                 Param("quality", Kind.SCORES, None, doc="per-record quality for QDIT's (1−α)·FL + α·Σq"),
                 Param("alpha", Kind.NUMBER, 0.0, low=0, high=1, doc="weight of the quality term, 0..1"),
                 Param("knn", Kind.NUMBER, None, integer=True, low=1, doc="sparse variant: each record counts only its knn most "
                                                      "similar records (for pools past ~40k)"),
                 Param("optimizer", Kind.STRING, "lazy", doc="lazy (exact) or stochastic",
                       choices=("lazy", "stochastic")),
                 Param("epsilon", Kind.NUMBER, 0.01, doc="stochastic greedy's ε"),
                 Param("gamma", Kind.NUMBER, None, low=0, doc="rbf width (default 1/d)"),
                 Param("given", Kind.SELECTOR, None, doc="records already selected (they count as covered)"),
                 Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1),
                 Param("coverage", Kind.STRING, "mean",
                       doc="with quality: mean = (1−α)·mean coverage + α·mean quality of the picks, two "
                           "averages on one [0, 1] scale; sum = (1−α)·FL + α·Σq, the raw sums",
                       choices=("mean", "sum"))],
    Kind.SELECTOR, role="selector", version="3", costly=True)
def facility(ctx, subset, features, k, kernel="cosine", quality=None, alpha=0.0, knn=None, optimizer="lazy",
             epsilon=0.01, gamma=None, given=None, seed=0, coverage="mean"):
    """Facility location: pick records so that every record has a similar pick (greedy, in pick order).

    Maximises Σ_v max_{a∈S} s(v, a) over the records that reach it, with
    exact lazy greedy (identical picks to the plain greedy, ties to the earlier
    record).  ``quality`` + ``alpha`` give QDIT's trade-off.  By default both
    terms are averages — (1−α)·(FL / records covered) + α·(Σq / k), the mean
    coverage of the pool and the mean quality of the k picks — so a quality
    in [0, 1] (``minmax(...)``) and coverage weigh the same at α = 0.5;
    ``coverage="sum"`` uses the raw sums (1−α)·FL + α·Σq.  The budget k is
    fixed, so this is the same objective up to the weights.
    ``knn`` switches to the sparse objective for large pools; ``optimizer=
    "stochastic"`` trades exactness for speed.
    """
    from datasel.ops.algos.facility import facility_location

    rows = subset  # the candidates; every record that reaches the op still counts for coverage
    q = None
    if quality is not None and float(alpha) > 0:
        rows, q = _quality(ctx, quality, subset, "facility")
    rows_all, given_rows = _with_given(subset, given)
    candidates = np.setdiff1d(np.searchsorted(rows_all, rows), np.searchsorted(rows_all, given_rows))
    n = min(k.resolve(len(subset), ctx.n_pool), len(candidates))
    if n <= 0:
        return subset[:0]
    X = _features(features, rows_all, "facility")
    q_all = None
    if q is not None:
        # (1−α)·FL/|V| + α·Σq/k has the same maximiser as (1−α)·FL + α·(|V|/k)·Σq.
        scale = float(len(rows_all)) / n if coverage == "mean" else 1.0
        q_all = np.zeros(len(rows_all))
        q_all[np.searchsorted(rows_all, rows)] = q * scale
    result = facility_location(
        X, n, kernel=kernel, gamma=None if gamma is None else float(gamma), quality=q_all, alpha=float(alpha),
        knn=None if knn is None else int(knn), optimizer=optimizer, epsilon=float(epsilon), seed=int(seed),
        given=np.searchsorted(rows_all, given_rows) if len(given_rows) else None, candidates=candidates,
    )
    return rows_all[result.order]


# --------------------------------------------------------------- novelsum
@op("novelsum", [Param("features", Kind.FEATURES, doc="vectors (normalised internally for distances)"),
                 Param("k", Kind.BUDGET, doc="how many to pick"),
                 Param("alpha", Kind.NUMBER, 1.0, low=0, doc="proximity weighting: the r-th nearest counts 1/r^alpha"),
                 Param("beta", Kind.NUMBER, 0.5, doc="density power"),
                 Param("knn", Kind.NUMBER, 10, integer=True, low=1, doc="neighbours for the density estimate"),
                 Param("density", Kind.STRING, "sum",
                       doc="sum = σi+σj (the selection code); row = σi (the metric); product = σi·σj",
                       choices=("sum", "row", "product")),
                 Param("quality", Kind.SCORES, None, doc="multiply each candidate's value by a quality score"),
                 Param("seed", Kind.NUMBER, 42, integer=True, low=0, high=2**32 - 1, doc="draws the first pick"),
                 Param("density_index", Kind.STRING, "unique",
                       doc="unique = the density neighbours are the distinct vectors, exact duplicates never count "
                           "(the authors' code); all = every record, a duplicate counts at distance 0",
                       choices=("unique", "all"))],
    Kind.SELECTOR, role="selector", version="2", costly=True)
def novelsum(ctx, subset, features, k, alpha=1.0, beta=0.5, knn=10, density="sum", quality=None, seed=42,
             density_index="unique"):
    """NovelSelect: greedily add the record with the largest density-weighted, proximity-weighted novelty.

    Yang et al., ACL 2025 (code: UmeanNever/NovelSum).  Published defaults
    (k neighbours 10, β 0.5, α 1, seed 42, first pick at random).  The
    density σ = 1 / (mean squared L2 distance to the knn nearest + 1e-9)^β
    comes from the raw vectors of the records that reach it; distances are
    cosine distances.  The NovelSum metric scales by σ_i while the published
    selection code uses σ_i + σ_j: ``density`` chooses.  Exact incremental
    algorithm.

    Exact duplicates: by default (``density_index="unique"``) the density is
    computed as in the authors' code (``utils.py``, ``FaissIndex``): the
    index holds the distinct vectors (``np.unique``), each record searches
    knn + 1 of them and drops the first hit, which is its own vector at
    distance 0 — so its exact twins are dropped with it and σ averages the
    knn nearest *other distinct* vectors; twins get the same σ as a single
    copy.  ``density_index="all"`` (version 1's behaviour) indexes every
    record and drops only the record itself, so a twin counts as a neighbour
    at distance 0 and inflates the σ of duplicated records (NovelSelect
    then tends to pick them early: on the first 400 records of a sorted
    databricks-dolly-15k pool with ``embed(minilm)``, k 10, "all" picks one
    of six copies of a prompt third, the default picks no copy).  knn is
    capped at the number of distinct vectors (records with "all") minus one.
    """
    from datasel.ops.algos.novelsum import novelselect

    rows = subset
    q = None
    if quality is not None:
        rows, q = _quality(ctx, quality, subset, "novelsum")
    n = min(k.resolve(len(subset), ctx.n_pool), len(rows))
    if n <= 0:
        return subset[:0]
    X = _features(features, rows, "novelsum")
    # Densities come from the records that reach the op, so K is capped by how many (distinct) there are.
    indexed = len(rows) if density_index == "all" else len(np.unique(X, axis=0))
    # One distinct vector: all candidates are the same vector and tie whatever σ is (no kNN search possible).
    sigma = np.ones(len(rows)) if indexed < 2 and n > 1 else None
    result = novelselect(X, n, sigma=sigma, K=min(int(knn), max(1, indexed - 1)), beta=float(beta),
                         alpha=float(alpha), density_combine=density, quality=q, seed=int(seed),
                         density_index=density_index)
    return rows[result.order]


# ----------------------------------------------------------------- reward
def _load_reward_model(args: dict, resources):
    """Setup of ``reward``: the model as a sequence classifier, once per worker."""
    from transformers import AutoModelForSequenceClassification

    return args["model"].load_as(AutoModelForSequenceClassification)


@op("reward", [Param("model", Kind.MODEL, doc="a sequence-classification reward model, e.g. hf(\"path/to/rm\")"),
               Param("format", Kind.STRING, "pair",
                     doc="pair: tokenizer(prompt, response); chat: the tokenizer's chat template",
                     choices=("pair", "chat")),
               Param("max_length", Kind.NUMBER, 512, integer=True, low=1), Param("batch", Kind.NUMBER, 16, integer=True, low=1),
               Param("label", Kind.NUMBER, 0, integer=True, low=0, doc="which output logit is the reward")],
    Kind.SCORES, role="map", version="1", chunk_rows=512, setup=_load_reward_model,
    resources=Resources(cpus=1.0, gpus=1.0, memory_gb=2.0))
def reward(state, chunk, model, format="pair", max_length=512, batch=16, label=0):
    """Reward-model score of each record's response (QDIT's quality), higher = better.

    Loads the model with ``AutoModelForSequenceClassification``; the score is
    logit ``label`` of the (prompt, response) pair.  Multi-turn records are
    scored on their last assistant turn.
    """
    import torch

    from datasel.ops.scores import record_text

    clf, tok = state
    records = chunk.records
    out = np.zeros(len(records), dtype=np.float64)
    order = np.argsort([len(r["output"]) + len(r["instruction"]) for r in records], kind="stable")
    device = next(clf.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), int(batch)):
            part = order[start : start + int(batch)]
            if format == "chat":
                texts = [tok.apply_chat_template(records[i]["messages"], tokenize=False) for i in part]
                enc = tok(texts, padding=True, truncation=True, max_length=int(max_length), return_tensors="pt")
            else:
                prompts = [record_text(records[i], "prompt") for i in part]
                answers = [records[i]["output"] for i in part]
                enc = tok(prompts, answers, padding=True, truncation=True, max_length=int(max_length),
                          return_tensors="pt")
            logits = clf(**{k: v.to(device) for k, v in enc.items()}).logits
            out[part] = logits[:, int(label)].float().cpu().numpy()
    return out

"""Tag sets per record and MIG's information-gain selection over a label graph.

* ``tags(field=…)``: each record's tags (a list of strings at a dotted path of the raw record,
  InsTag-style), optionally kept to a vocabulary file: Labels, a ragged per-record value.
* ``deita(...)``: DEITA's per-record score, the mean over turns of quality × complexity.
* ``label_graph(labels, encoder, threshold, self_weight)``: the propagation graph over the
  labels' vocabulary (see :mod:`datasel.ops.algos.mig`).
* ``mig(labels, k, quality=, graph=)``: the greedy information-gain selection.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from datasel.ops.contract import Column
from datasel.ops.registry import Kind, Param, Ref, op
from datasel.ops.scores import _lookup  # a dotted path into the raw record, as field() reads it


def _read_vocabulary(path: str) -> list[str]:
    file = Path(path).expanduser()
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"tags: cannot read the vocabulary {file} ({e})") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"tags: the vocabulary {file} must be a JSON array of strings")
    return values


def _tags_key(field: str = "tags", vocabulary: str | None = None) -> str:
    if vocabulary is None:
        return "vocabulary:none"
    return "vocabulary:" + hashlib.sha256(json.dumps(_read_vocabulary(vocabulary)).encode()).hexdigest()


def _tags_setup(args: dict, resources):
    vocabulary = args.get("vocabulary")
    return None if vocabulary is None else frozenset(_read_vocabulary(vocabulary))


@op("tags", [Param("field", Kind.STRING, "tags",
                   doc='dotted path of a list of strings in the raw record, e.g. "annotation.instag.content"'),
             Param("vocabulary", (Kind.STRING, Kind.NONE), None,
                   doc="a JSON array of valid tags (a file); tags outside it are dropped (MIG: 4,531 InsTag tags)")],
    Kind.LABELS, role="map", version="1", family="labels", chunk_rows=65536, key_fn=_tags_key,
    setup=_tags_setup, columns=(Column("value", ragged=True),))
def tags(state, batch, field="tags", vocabulary=None):
    """Each record's tags, read from a field (InsTag annotations, say): a list of strings per record.

    A record without the field has no tags; a value that is not a list of strings is an error
    naming the record.  With ``vocabulary`` only the listed tags are kept.  Duplicates within a
    record are dropped, the order kept.
    """
    out = []
    for raw in batch.raw:
        value = _lookup(raw, field) if isinstance(raw, dict) else None
        if value is None:
            out.append([])
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"tags: {field!r} of a record is {type(value).__name__} {str(value)[:60]!r}, "
                             f"not a list of strings")
        kept = [v for v in dict.fromkeys(value) if state is None or v in state]
        out.append(kept)
    return out


def _mean_product(a, b) -> float:
    if not isinstance(a, list) or not isinstance(b, list) or not a or len(a) != len(b):
        return float("nan")
    try:
        return float(np.mean([float(x) * float(y) for x, y in zip(a, b)]))
    except (TypeError, ValueError):
        return float("nan")


@op("deita", [Param("quality", Kind.STRING, "annotation.deita.quality_scores",
                    doc="dotted path of the per-turn quality scores"),
              Param("complexity", Kind.STRING, "annotation.deita.complexity_scores",
                    doc="dotted path of the per-turn complexity scores")],
    Kind.SCORES, role="map", version="1", family="labels", chunk_rows=65536)
def deita(state, batch, quality="annotation.deita.quality_scores", complexity="annotation.deita.complexity_scores"):
    """DEITA's score from a record's annotations: the mean over turns of quality × complexity (MIG's quality).

    No value (NaN) when either list is missing, empty, of different lengths or not numeric.
    """
    return np.fromiter((_mean_product(_lookup(r, quality), _lookup(r, complexity)) if isinstance(r, dict)
                        else float("nan") for r in batch.raw), dtype=np.float64, count=len(batch))


def _vocabulary_and_ids(values) -> tuple[list[str], list[list[int]]]:
    vocabulary = sorted({t for row in values for t in row})
    index = {t: j for j, t in enumerate(vocabulary)}
    return vocabulary, [[index[t] for t in row] for row in values]


@op("label_graph", [Param("labels", Kind.LABELS, doc="the records' tags, e.g. tags(field=...)"),
                    Param("encoder", Kind.MODEL, Ref("minilm"), doc="embeds the tag strings (MIG: e5-mistral-7b)"),
                    Param("threshold", Kind.NUMBER, 0.9, low=-1, high=1, doc="cosine below which two tags are unlinked"),
                    Param("self_weight", Kind.NUMBER, 1.0, low=0,
                          doc="a tag's weight on itself against its neighbours' cosines (1 / the code's prop_weight)")],
    Kind.GRAPH, role="value", version="1", family="labels", costly=True)
def label_graph(ctx, labels, encoder, threshold=0.9, self_weight=1.0):
    """MIG's label graph: tag embeddings, cosine kept at or above the threshold, column-normalised.

    The vocabulary is every tag of the labels' dataset, sorted.  Cached in the work folder.
    """
    import scipy.sparse as sp

    from datasel.ops.algos import mig as M

    dataset = labels.dataset
    values = labels.values(np.arange(len(dataset)))
    vocabulary, _ = _vocabulary_and_ids(values)
    if not vocabulary:
        raise ValueError("label_graph: no record has a tag")
    folder = Path(ctx.work_dir())
    meta = folder / "graph.json"
    digest = hashlib.sha256("\0".join(vocabulary).encode()).hexdigest()
    try:
        if json.loads(meta.read_text()).get("vocabulary") == digest:
            return M.LabelGraph(vocabulary, sp.load_npz(folder / "matrix.npz").tocsr())
    except (OSError, ValueError):
        pass
    model = encoder.load()
    with ctx.progress(len(vocabulary), f"label_graph: embedding {len(vocabulary):,} tags") as bar:
        E = np.asarray(model.encode(vocabulary, batch_size=64, normalize_embeddings=True, show_progress_bar=False))
        bar.update(len(vocabulary))
    graph = M.label_graph(vocabulary, E, float(threshold), float(self_weight))
    sp.save_npz(folder / "matrix.npz.tmp.npz", graph.matrix)
    (folder / "matrix.npz.tmp.npz").replace(folder / "matrix.npz")
    meta.write_text(json.dumps({"vocabulary": digest, "labels": len(vocabulary)}))
    return graph


@op("mig", [Param("labels", Kind.LABELS, doc="the records' tags"),
            Param("k", Kind.BUDGET, doc="how many to pick"),
            Param("quality", (Kind.SCORES, Kind.NONE), None, doc="s_i (MIG: deita); none: 1 for every record"),
            Param("graph", (Kind.GRAPH, Kind.NONE), None, doc="label_graph(labels, encoder); none: no propagation"),
            Param("phi", Kind.STRING, "power", choices=("power", "exp"),
                  doc="power: (x + a)^b; exp: 1 − e^(−alpha·x)"),
            Param("a", Kind.NUMBER, 1e-6, low=0), Param("b", Kind.NUMBER, 0.8, low=0, high=1),
            Param("alpha", Kind.NUMBER, 1.0, low=0),
            Param("normalize", Kind.BOOL, False, doc="spread s_i over a record's tags (s_i / #tags)"),
            Param("gain", Kind.STRING, "exact", choices=("exact", "linear"),
                  doc="exact: E(S + i) − E(S); linear: V'_i · φ'(x), the code's pick")],
    Kind.SELECTOR, role="selector", version="1", family="labels", costly=True)
def mig(ctx, subset, labels, k, quality=None, graph=None, phi="power", a=1e-6, b=0.8, alpha=1.0, normalize=False,
        gain="exact"):
    """MIG: greedily maximise the information Σ_ℓ φ(x_ℓ) of the picks' propagated label scores.

    Exact lazy greedy (identical picks to the plain greedy, tested); records with no tag or no
    quality score are left out and counted.  See :mod:`datasel.ops.algos.mig`.
    """
    import scipy.sparse as sp

    from datasel.ops.algos import mig as M

    subset = np.asarray(subset, dtype=np.int64)
    values = labels.values(subset) if len(subset) else []
    has_tags = np.fromiter((len(v) > 0 for v in values), dtype=bool, count=len(subset))
    if (~has_tags).any():
        ctx.exclude("no tags", subset[~has_tags], detail="no tags: nothing for MIG's information gain")
    keep = has_tags
    q = np.ones(len(subset))
    if quality is not None:
        q = np.asarray(quality.values(subset), dtype=np.float64)
        nan = np.isnan(q) & keep
        if nan.any():
            ctx.exclude("no quality score", subset[nan], detail=f"no {quality.label} score for MIG's quality")
        keep = keep & ~np.isnan(q)
        if (q[keep] < 0).any():
            raise ValueError(f"mig: {quality.label} has negative values; the information gain needs quality ≥ 0")
    rows = subset[keep]
    kept_values = [values[i] for i in np.flatnonzero(keep)]
    total = k.resolve(len(subset), ctx.n_pool)
    if not len(rows) or total <= 0:
        return rows[:0]
    if graph is None:
        vocabulary, ids = _vocabulary_and_ids(kept_values)
        graph = M.LabelGraph(vocabulary, sp.identity(len(vocabulary), format="csr"))
    else:
        if not isinstance(graph, M.LabelGraph):
            raise ValueError("mig: graph must be a label graph (label_graph(labels, encoder)), not a record graph")
        index = {t: j for j, t in enumerate(graph.vocabulary)}
        missing = sorted({t for row in kept_values for t in row if t not in index})
        if missing:
            raise ValueError(f"mig: {len(missing)} tags are not in the graph's vocabulary (e.g. {missing[0]!r}); "
                             f"build the graph from the same labels")
        ids = [[index[t] for t in row] for row in kept_values]
    Vp = M.propagate(ids, q[keep], graph, normalize=bool(normalize))
    order = M.mig_greedy(Vp, total, phi=phi, a=float(a), b=float(b), alpha=float(alpha), gain=gain)
    return rows[order]

"""Gradient features and influence: LESS (Xia et al., ICML 2024; princeton-nlp/LESS @ 8abf962).

``grad(run, …)`` gives each record one block of features per trained checkpoint of a LoRA
fine-tuning run (``finetune(…)``): the record's per-example LoRA gradient, turned into an
optimiser-aware feature (Adam's update direction from the checkpoint's moments, or the plain
gradient) and randomly projected; ``influence(train, target, run=…)`` is LESS's score, the
learning-rate-weighted sum over checkpoints of the cosine to the target set's features, averaged
within each target sub-task and maximised over sub-tasks.  The algorithms and where they differ
from LESS's code are in :mod:`datasel.ops.algos.gradients`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from datasel.ops.algos import templates as T
from datasel.ops.context import Work
from datasel.ops.registry import Budget, Kind, Param, Resources, op

OPTIMIZERS = ("adam", "sgd", "sign")
PROJECTORS = ("rademacher", "sparse", "none")
REDUCE = ("mean_then_max", "max", "mean")
_RESOURCES = Resources(cpus=1.0, gpus=1.0, memory_gb=4.0)


def _run_of(run):
    from datasel.ops.models import Checkpoints

    if not isinstance(run, Checkpoints):
        raise ValueError("grad needs a LoRA fine-tuning run, e.g. grad(finetune(model, data=random(5%), "
                         "epochs=4)); its checkpoints' adapters and Adam moments give the features")
    if run.epochs < 1:
        raise ValueError("grad needs a run of at least one epoch (the checkpoints after each epoch are used)")
    return run


def _setup(args: dict, resources):
    """Load the run's model once per worker with the first trained adapter, and every checkpoint's state."""
    from safetensors.torch import load_file

    from datasel.ops.algos import finetune as F
    from datasel.ops.algos import gradients as G
    from datasel.ops.models import quiet_transformers

    run = _run_of(args["run"])
    quiet_transformers()
    base = run.base

    def base_loader(spec):
        from datasel.ops.algos import lm_loading

        return lm_loading.load_causal_lm(base.spec, dtype="float32", device=base.device, memo=False, log=base.log)

    meta = F._read_meta(run.paths[1])
    if meta is None or meta.get("kind") != "lora":
        raise ValueError("grad needs a LoRA fine-tuning run (finetune(..., lora=true)); a full fine-tune's "
                         "gradients are the size of the model")
    model = F.load_checkpoint(run.paths[1], base_loader, dtype="float32", device=base.device, merge=False)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.eval()
    G.check_raw_dim(model, args["projector"])
    checkpoints = []
    for path in run.paths[1:]:
        adapter = load_file(str(path / "adapter_model.safetensors"))
        moments = G.read_moments(path) if args["optimizer"] == "adam" else None
        checkpoints.append((adapter, moments))
    _, tok = base.load()
    projector = G.Projector(args["projector"], int(args["dim"]), seed=int(args["seed"]))
    return model, tok, checkpoints, projector


def _grad_cost(ctx, idx, run, optimizer="adam", adam="code", dim=8192, projector="rademacher", seed=0,
               normalize=True, template="alpaca", max_length=512, batch_size=4):
    from datasel.ops.lm import _rates, _token_lengths

    run = _run_of(run)
    _, tok = run.base.load()
    rendered = [T.render(template, r, tok) for r in ctx.records(idx)]
    tokens = int(_token_lengths(tok, [c + a for c, a in rendered], max_length).sum())
    work = Work(records=len(idx), backward_tokens=tokens * run.epochs)
    work.seconds = work.backward_tokens / _rates(run.base)["train"]
    work.note = f"{run.epochs} checkpoint{'s' if run.epochs != 1 else ''}"
    return work


def _template_key(template: str, **_) -> str:
    return "template:" + T.template_digest(template)


@op("grad", [Param("run", Kind.MODEL, doc="a LoRA fine-tuning run (finetune(...)): one block per epoch's checkpoint"),
             Param("optimizer", Kind.STRING, "adam",
                   doc="adam: Adam's update direction from the checkpoint's moments (LESS's pool features); "
                       "sgd: the gradient (LESS's target features); sign: its sign", choices=OPTIMIZERS),
             Param("adam", Kind.STRING, "code",
                   doc="code: LESS's m'/sqrt(v'+eps), no bias correction; paper: bias-corrected m̂/(sqrt(v̂)+eps)",
                   choices=("code", "paper")),
             Param("dim", Kind.NUMBER, 8192, integer=True, low=1, high=1 << 16,
                   doc="projected dimensions per checkpoint (ignored with projector=\"none\")"),
             Param("projector", Kind.STRING, "rademacher",
                   doc="rademacher: dense ±1 (TRAK's kind, device-independent); sparse: 8 signed slots per "
                       "coordinate; none: the raw gradient (small LoRA only)", choices=PROJECTORS),
             Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1, doc="the projection's seed"),
             Param("normalize", Kind.BOOL, True, doc="L2-normalise each checkpoint's block (LESS does)"),
             Param("template", Kind.STRING, "alpaca", doc="prompt template (part of the cache key)",
                   choices=tuple(T.TEMPLATES)),
             Param("max_length", Kind.NUMBER, 512, integer=True, low=2,
                   doc="tokens; longer records keep their prompt and lose the end of the answer"),
             Param("batch_size", Kind.NUMBER, 4, integer=True, low=1,
                   doc="records per forward/backward pass (length-sorted)")],
    Kind.FEATURES, role="map", version="1", family="gradients", chunk_rows=128, min_batch_rows=64, key_fn=_template_key,
    cost=_grad_cost, setup=_setup, resources=_RESOURCES)
def grad(state, batch, run, optimizer="adam", adam="code", dim=8192, projector="rademacher", seed=0,
         normalize=True, template="alpaca", max_length=512, batch_size=4):
    """Per-example LoRA gradient features of each record, one block per checkpoint of a run (LESS).

    The gradient of the record's token-mean answer loss (the fine-tuning loss) with respect to
    the LoRA parameters, at each checkpoint after epoch 1..E, from batched forward/backward
    passes with hooks (equal to a batch-1 autograd loop: relative error < 1e-4, tested);
    transformed by ``optimizer`` with that checkpoint's Adam moments, projected to ``dim``
    dimensions parameter by parameter in fp32, and L2-normalised per block.  A record with no
    answer token within ``max_length`` gets NaN.  ``datasel eval 'grad(…)' -o f.npy`` writes them.
    """
    import torch
    from peft import set_peft_model_state_dict

    from datasel.ops.algos import finetune as F
    from datasel.ops.algos import gradients as G

    micro = int(batch_size)
    model, tok, checkpoints, proj = state
    pairs = [T.render(template, r, tok) for r in batch.records]
    examples, skipped = F.encode_pairs(pairs, tok, max_length=int(max_length))
    rows = [i for i in range(len(pairs)) if i not in set(skipped)]
    width = proj.k if proj.kind != "none" else sum(m.weight.numel() for _, m in G.lora_factors(model))
    out = np.full((len(pairs), len(checkpoints) * width), np.nan, dtype=np.float32)
    if not examples:
        return out
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # length buckets: little padding
    factors = G.lora_factors(model)
    # Every checkpoint's features first, then one projection of them all: the projection matrix is
    # the same for every checkpoint, and drawing it (not multiplying by it) is what a call costs.
    parts: dict[str, list] = {}
    for adapter, moments in checkpoints:
        set_peft_model_state_dict(model, adapter)
        for s in range(0, len(order), micro):
            chunk = [examples[i] for i in order[s:s + micro]]
            grads = G.per_example_grads(model, chunk, pad, factors)
            for name, g in grads.items():
                key = _moment_name(name, moments)
                feature = G.optimizer_feature(g, optimizer, moments[key] if moments is not None else None, adam)
                parts.setdefault(name, []).append(feature)
    with torch.no_grad():
        projected = proj.project({n: torch.cat(v) for n, v in parts.items()}).cpu().numpy()
    n = len(order)
    for c in range(len(checkpoints)):
        block = projected[c * n:(c + 1) * n]
        if normalize:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block = block / np.where(norms > 0, norms, 1)
        placed = np.empty_like(block)
        placed[np.asarray(order)] = block
        out[np.asarray(rows), c * width:(c + 1) * width] = placed
    return out


def _moment_name(name: str, moments) -> str:
    """The optimiser state's key for a parameter (datasel saves them by the same peft names)."""
    if moments is None or name in moments:
        return name
    raise ValueError(f"the checkpoint's optimiser state has no moments for {name!r}")


# ------------------------------------------------------------------ influence
@op("influence", [Param("train", Kind.FEATURES, doc="the pool's gradient features, grad(run)"),
                  Param("target", Kind.FEATURES, doc="the target set's, grad(run, data=val, optimizer=\"sgd\")",
                        any_dataset=True),
                  Param("run", Kind.MODEL, doc="the fine-tuning run both were computed from (its learning rates)"),
                  Param("weights", Kind.STRING, "lr",
                        doc="lr: each checkpoint weighs its epoch's mean learning rate (LESS); uniform: equally",
                        choices=("lr", "uniform")),
                  Param("reduce", Kind.STRING, "mean_then_max",
                        doc="mean_then_max: mean over each sub-task's target records, then max over sub-tasks "
                            "(LESS); max or mean over all target records", choices=REDUCE),
                  Param("groups", Kind.STRING, None,
                        doc="a field of the target records naming its sub-task (one sub-task when none)")],
    Kind.SCORES, role="scores", version="1", family="gradients")
def influence(ctx, idx, train, target, run, weights="lr", reduce="mean_then_max", groups=None):
    """LESS's influence score of each record on a target set, from gradient features.

    For checkpoint i with weight w_i (the epoch's mean learning rate, renormalised to sum to 1),
    S(z, v) = Σ_i w_i cos(Γ_i(z), ∇_i(v)); a record's score is the mean of S over each
    sub-task's target records, maximised over sub-tasks.  LESS reshapes its validation
    features into equal, contiguous sub-tasks from a hard-coded table; here ``groups`` names
    the field that says which sub-task a target record belongs to, of any sizes and order.
    """
    from datasel.ops.algos import finetune as F
    from datasel.ops.algos import gradients as G
    from datasel.ops.targeted import _task_labels

    run = _run_of(run)
    idx = np.asarray(idx, dtype=np.int64)
    n_target = len(target.dataset)
    if n_target == 0:
        raise ValueError("influence: the target set is empty")
    X = np.asarray(train.values(idx), dtype=np.float32)
    V = np.asarray(target.values(np.arange(n_target)), dtype=np.float32)
    blocks = run.epochs
    if X.shape[1] != V.shape[1] or X.shape[1] % blocks:
        raise ValueError(f"influence: the features have {X.shape[1]} and {V.shape[1]} columns, which are not "
                         f"{blocks} blocks (one per checkpoint of the run) of one size; compute both with "
                         f"grad() of this run")
    if idx.size == 0:
        return np.zeros(0, dtype=np.float64)
    if weights == "lr":
        w = np.asarray(G.epoch_learning_rates(F._read_meta(run.paths[-1])), dtype=np.float64)
    else:
        w = np.ones(blocks)
    w = w / w.sum()
    labels = np.zeros(n_target, dtype=np.int64) if groups is None else _task_labels(ctx, target, groups)
    if reduce == "mean" or reduce == "max":
        labels = np.arange(n_target) if reduce == "max" else np.zeros(n_target, dtype=np.int64)
    usable = np.isfinite(V).all(axis=1)  # a target record with no answer token has no gradient
    if not usable.any():
        raise ValueError("influence: no target record has gradient features (all have no answer token to score)")
    V, labels = V[usable], np.unique(labels[usable], return_inverse=True)[1]
    n_target = len(V)
    n_groups = int(labels.max()) + 1
    member = np.zeros((n_target, n_groups), dtype=np.float64)
    member[np.arange(n_target), labels] = 1.0
    member /= member.sum(axis=0, keepdims=True)  # mean within each group
    size = X.shape[1] // blocks
    scores = np.empty(len(idx), dtype=np.float64)
    step = max(1, (1 << 24) // max(1, n_target))
    Vn = [_unit_rows(V[:, c * size:(c + 1) * size]) for c in range(blocks)]
    for r0 in range(0, len(idx), step):
        S = np.zeros((min(step, len(idx) - r0), n_target), dtype=np.float64)
        for c in range(blocks):
            S += w[c] * (_unit_rows(X[r0:r0 + step, c * size:(c + 1) * size]) @ Vn[c].T)
        scores[r0:r0 + step] = (S @ member).max(axis=1)
    bad = ~np.isfinite(X).all(axis=1)
    scores[bad] = np.nan
    return scores


def _unit_rows(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1)


# ------------------------------------------------------------------ G2IS
@op("pca", [Param("features", Kind.FEATURES, doc="the target set's features, e.g. grad(run, data=val, optimizer=\"sgd\")",
                  any_dataset=True),
            Param("ratio", Kind.NUMBER, 0.5, low=0, high=1,
                  doc="variance: the explained-variance share to reach; count: the share of the rank to keep"),
            Param("mode", Kind.STRING, "variance", choices=("variance", "count")),
            Param("orient", Kind.STRING, "mean",
                  doc="mean: each component points towards the mean target vector; reference: scikit-learn's "
                      "sign (the released G2IS code)", choices=("mean", "reference"))],
    Kind.COMPONENTS, role="value", version="1", family="gradients")
def pca(ctx, features, ratio=0.5, mode="variance", orient="mean"):
    """The principal directions of a target set's features with their explained-variance weights (G2IS's
    "core knowledge"): centred PCA, as scikit-learn's, keeping the fewest components that explain
    ``ratio`` of the variance (or ``ratio`` of the rank).  See :mod:`datasel.ops.algos.g2is`."""
    from datasel.ops.algos.g2is import pca_components

    n = len(features.dataset)
    V = np.asarray(features.values(np.arange(n)), dtype=np.float64)
    V = V[np.isfinite(V).all(axis=1)]  # a target record without an answer token has no gradient
    return pca_components(V, float(ratio), mode, orient)


@op("graphwalk", [Param("features", Kind.FEATURES, doc="the records' gradient features, e.g. grad(run)"),
                  Param("anchors", Kind.COMPONENTS, doc="core-knowledge directions: pca(target features, 0.5)"),
                  Param("k", Kind.BUDGET, Budget(fraction=Fraction(1, 100)), doc="how many to pick (G2IS: 1%)"),
                  Param("delta", Kind.NUMBER, 0.8, low=0, high=1,
                        doc="a pick may lower the walk's alignment with its component to at most this factor"),
                  Param("knn", Kind.NUMBER, None, integer=True, low=1,
                        doc="graph neighbours per record (the K of a top-K similarity graph); none: every record"),
                  Param("anchor_pool", Kind.NUMBER, 1000, integer=True, low=1,
                        doc="anchors come from this many records best aligned with each component"),
                  Param("graph", (Kind.GRAPH, Kind.NONE), None,
                        doc="neighbour lists to walk instead of the features' own similarities, e.g. "
                            "knn_graph(embed(minilm), 10)")],
    Kind.SELECTOR, role="selector", version="1", family="gradients", costly=True)
def graphwalk(ctx, subset, features, anchors, k=None, delta=0.8, knn=None, anchor_pool=1000, graph=None):
    """G2IS's gradient-graph walk: per core-knowledge component, from an anchor, pick graph neighbours that
    conflict with none of the component's picks and keep the walk aligned with the component.

    Budget shared over components by their weights (largest remainder, exact); a component
    that runs out of valid records stays under-filled, as in the reference.  Identical picks to
    the reference loop (tested against a naive walk), one matrix-vector product per pick.
    With ``graph``, the walk follows its neighbour lists (neighbours that did not reach the walk
    are skipped); conflicts and alignment are still judged on ``features``.  Records without
    features (NaN: a gradient of a record whose answer was cut off) are left out and counted.
    """
    from datasel.ops.algos.g2is import graph_walk
    from datasel.ops.diversity import _defined_features

    subset = np.asarray(subset, dtype=np.int64)
    if graph is not None and knn is not None:
        raise ValueError("graphwalk: give knn (the features' own top-K graph) or graph, not both")
    total = (k or Budget(fraction=Fraction(1, 100))).resolve(len(subset), ctx.n_pool)
    if total <= 0 or subset.size == 0:
        return subset[:0]
    rows, G = _defined_features(ctx, features, subset, "graphwalk")
    subset = subset[rows]
    neighbours = None
    if graph is not None:
        if graph.fingerprint != ctx.dataset("pool").fingerprint:
            raise ValueError("graphwalk: the graph is over another dataset than the pool; build it from pool features")
        neighbours = graph.restricted(subset)
    order, counts = graph_walk(G, anchors, total, delta=float(delta), knn=None if knn is None else int(knn),
                               anchor_pool=int(anchor_pool), neighbours=neighbours)
    picked = subset[order]
    short = total - len(picked)
    if short > 0:
        left = np.setdiff1d(subset, picked)
        ctx.exclude("graphwalk under-filled", left,
                    detail=f"not picked: the walk found no more records free of conflict and aligned with its "
                           f"components ({len(picked)} of {total} picked)")
    return picked

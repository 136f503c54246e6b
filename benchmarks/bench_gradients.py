"""Gradient-feature benchmarks: datasel's hook-batched per-example LoRA gradients vs LESS's batch-1 loop.

grad_features: SmolLM2-135M-Instruct with LoRA r 8 on q, k, v, o (D = 921,600 parameters; B drawn
    N(0, 0.02) so that every factor has a gradient, as after warmup) and seeded Adam moments, on a
    seeded sample of the real pool (64 rows, quick 8), alpaca template, max_length 512, fp32.
    Baseline (LESS's ``collect_grad_reps.py`` loop, written here): per record, a batch-1 forward
    with ``labels``, ``autograd.grad`` over the LoRA parameters, the gradients concatenated into
    one D-vector, Adam's code formula on that vector.  Ours: ``per_example_grads`` on
    length-sorted batches of 4 and of 8, then the same Adam formula per parameter.  ``same_result``:
    every record's feature within relative L2 error 1e-4 of the loop's.  Then the projection to
    8,192 dimensions of the 64 features, seconds per record, for the dense Rademacher projector
    (drawn block by block, as it is for a model this size) and the sparse one.

graphwalk: G2IS's walk on n = 20,000 unit rows of d = 1,024 (quick 2,000 × 256) in 20 weak clusters around a weak
    shared direction (conflicts are common: the walk stops after 59 of its 200 picks; measured 2026-12-04, with the
    shared direction at 0.2 or 0.5 the walk fills its budget, almost every first neighbour passes, and the
    reference's per-candidate checks, O(picks · d) each, beat the vectorised walk's O(n · d) per pick: 0.085 s vs
    1.08 s),
    anchors from the PCA of 200 target rows (50% of the variance), 1% budget, δ 0.8, a top-100
    similarity graph computed once beforehand for both.  Baseline: the released code's loop
    (zy125413/G2IS): per candidate, Python checks of its dot product with every pick of the
    component and of the walk's alignment, a full argsort of the projections per fallback.
    ``same_result``: identical ordered picks.

``DATASEL_BENCH_ROWS`` / ``DATASEL_BENCH_DEVICE`` override sizes and device.
"""

from __future__ import annotations

import numpy as np

from _common import Timer, env_info, load_pool, peak_rss_gb, pool_label, ratio, rows_override, sample_rows, skipped

TEMPLATE = "alpaca"
MAX_LENGTH = 512
RANK = 8
DIM = 8192


def _model(device: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from datasel.ops.algos.lm_loading import load_causal_lm

    base, tok = load_causal_lm("smollm", dtype="float32", device=device, memo=False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, bias="none",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    g = torch.Generator().manual_seed(1)
    moments = {n: (torch.randn(p.shape, generator=g) * 1e-4, torch.rand(p.shape, generator=g) * 1e-8, 100.0)
               for n, p in model.named_parameters() if p.requires_grad}
    return model, tok, moments


def _adam_code(g, m, v):
    import torch

    m1, v1 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return m1 / torch.sqrt(v1 + 1e-8)


def bench_grad_features(quick: bool) -> dict:
    name = "grad_features"
    try:
        import torch

        from _common import torch_device

        device = torch_device()
        model, tok, moments = _model(device)
    except Exception as exc:  # noqa: BLE001 - a missing model or package skips the benchmark
        return skipped(name, f"SmolLM2 with LoRA unavailable: {type(exc).__name__}: {exc}")
    from datasel.ops.algos import gradients as G
    from datasel.ops.algos.finetune import collate, encode_pairs
    from datasel.ops.algos.templates import render

    n = rows_override(8 if quick else 64)
    ds = load_pool()
    records = [ds.records[i] for i in sample_rows(n)]
    examples, skipped_rows = encode_pairs([render(TEMPLATE, r, tok) for r in records], tok, max_length=MAX_LENGTH)
    pad = tok.pad_token_id
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    names = sorted(params)
    dim_total = sum(p.numel() for p in params.values())

    # warm-up (allocator, kernels) outside the timings
    G.per_example_grads(model, examples[:2], pad)

    with Timer(device) as t_loop:
        loop = []
        for ex in examples:
            batch = collate([ex], pad)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device))
            grads = torch.autograd.grad(out.loss, [params[k] for k in names])
            flat = torch.cat([g.reshape(-1) for g in grads])
            m = torch.cat([moments[k][0].reshape(-1) for k in names]).to(flat)
            v = torch.cat([moments[k][1].reshape(-1) for k in names]).to(flat)
            loop.append(_adam_code(flat, m, v).cpu())
        loop = torch.stack(loop)

    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    results = {}
    for micro in (4, 8):
        with Timer(device) as t:
            feats: dict[str, list] = {}
            for s in range(0, len(order), micro):
                grads = G.per_example_grads(model, [examples[i] for i in order[s:s + micro]], pad)
                for k, g in grads.items():
                    feats.setdefault(k, []).append(G.optimizer_feature(g, "adam", moments[k]))
            ours = torch.cat([torch.cat(feats[k]).reshape(len(order), -1) for k in names], dim=1).cpu()
        placed = torch.empty_like(ours)
        placed[torch.tensor(order)] = ours
        rel = ((placed - loop).norm(dim=1) / loop.norm(dim=1)).max().item()
        results[micro] = (t.s, rel, {k: torch.cat(feats[k]) for k in names})

    projections = {}
    for kind in ("rademacher", "sparse"):
        grads = results[4][2]
        proj = G.Projector(kind, DIM, seed=0, keep_bytes=0)
        with Timer(device) as tp:
            proj.project(grads)
        projections[kind] = round(tp.s / len(examples), 4)

    t4, rel4, _ = results[4]
    t8, rel8, _ = results[8]
    out = {
        "name": name,
        "n": len(examples),
        "k": None,
        "skipped_rows": len(skipped_rows),
        "rows": pool_label(),
        "what": f"per-example LoRA r {RANK} (q,k,v,o) Adam gradient features of SmolLM2, D = {dim_total:,}, fp32",
        "baseline": "LESS's loop: batch 1, labels loss, autograd.grad, concatenate, Adam on the D-vector",
        "baseline_s": round(t_loop.s, 3),
        "baseline_s_per_record": round(t_loop.s / len(examples), 4),
        "ours_s": round(min(t4, t8), 3),
        "ours_batch4_s": round(t4, 3),
        "ours_batch8_s": round(t8, 3),
        "speedup": ratio(t_loop.s, min(t4, t8)),
        "speedup_batch4": ratio(t_loop.s, t4),
        "speedup_batch8": ratio(t_loop.s, t8),
        "max_relative_error": max(rel4, rel8),
        "same_result": max(rel4, rel8) < 1e-4,
        "tolerance": "per-record relative L2 error < 1e-4",
        "projection_dim": DIM,
        "rademacher_projection_s_per_record": projections["rademacher"],
        "sparse_projection_s_per_record": projections["sparse"],
    }
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def _reference_walk(G, comps, budget, graph, delta=0.8, anchor_pool=1000):
    """The released walk's pattern: candidates checked one by one in Python (numpy dot products)."""
    from datasel.ops.algos.g2is import share_budget

    n = len(G)
    selected = np.zeros(n, dtype=bool)
    order = []
    for c, b_c in enumerate(share_budget(budget, comps.weights)):
        if b_c == 0:
            continue
        k = comps.vectors[c]
        proj = G @ k
        ranked = np.argsort(-proj, kind="stable")
        anchor = next((int(j) for j in ranked[:anchor_pool] if not selected[j]), None)
        if anchor is None:
            break
        S, s = [anchor], G[anchor].copy()
        selected[anchor] = True

        def ok(j):
            if selected[j]:
                return False
            for u in S:
                if float(G[j] @ G[u]) < 0:
                    return False
            old = abs(float(s @ k)) / np.linalg.norm(s)
            t = s + G[j]
            return abs(float(t @ k)) / np.linalg.norm(t) >= delta * old

        while len(S) < b_c:
            j = next((int(j) for j in graph[S[-1]] if ok(j)), None)
            if j is None:
                j = next((int(j) for j in np.argsort(-proj, kind="stable") if ok(j)), None)
            if j is None:
                break
            S.append(j)
            selected[j] = True
            s = s + G[j]
        order += S
    return order


def bench_graphwalk(quick: bool) -> dict:
    from datasel.ops.algos.g2is import graph_walk, pca_components

    n, d, knn = (2000, 256, 100) if quick else (20000, 1024, 100)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, d))
    # Weak clusters around a weak shared direction (gradients of one task share one).
    shared = rng.standard_normal(d)
    G = rng.standard_normal((n, d)) + 0.15 * centres[rng.integers(0, 20, n)] + 0.1 * shared
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    V = rng.standard_normal((200, d)) * 0.5 + centres[:3].mean(axis=0) + centres[rng.integers(0, 3, 200)]
    comps = pca_components(V, 0.5)
    budget = n // 100
    graph = np.empty((n, knn), dtype=np.int64)  # top-K by cosine, self excluded, ties to the lower index
    for s0 in range(0, n, 1024):
        sims = G[s0:s0 + 1024] @ G.T
        sims[np.arange(len(sims)), np.arange(s0, s0 + len(sims))] = -np.inf
        near = np.argpartition(-sims, knn, axis=1)[:, :knn]
        for r in range(len(sims)):
            row = near[r]
            graph[s0 + r] = row[np.lexsort((row, -sims[r, row]))]
    with Timer() as t_ours:
        ours, _ = graph_walk(G, comps, budget, knn=knn)
    with Timer() as t_ref:
        ref = _reference_walk(G, comps, budget, graph)
    out = {"name": "graphwalk", "n": n, "k": budget, "d": d, "components": len(comps.weights),
           "ours_s": round(t_ours.s, 3), "baseline": "the released walk's per-candidate Python loop, same graph",
           "baseline_s": round(t_ref.s, 3), "speedup": ratio(t_ref.s, t_ours.s),
           "same_result": ours.tolist() == ref, "picked": len(ours)}
    out["peak_rss_gb"] = peak_rss_gb()
    return out


BENCHMARKS = {"grad_features": bench_grad_features, "graphwalk": bench_graphwalk}

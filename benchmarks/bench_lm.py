"""Language-model scoring benchmarks: datasel's batched sequence scorer vs a reference-style batch-1 loop.

All on SmolLM2-135M-Instruct (``load_causal_lm("smollm")``, dequantised once into ``.bench/cache``), on a seeded
sample of the real pool (Dolly when present), CUDA when available else CPU.

ifd:          CherryLLM loss-ratio IFD, template ``alpaca``, max_length 512, 256 rows (quick 16).
              Ours: ``encode_pairs`` (conditioned: context = rendered prompt; direct: empty context with
              ``budget_contexts=prompts``) + ``score_pairs`` for both passes, fp32, then the same in bf16.
              Baseline (written here, independent of seqscore): per row, two batch-1 fp32 forwards of the full
              sequence with full ``[1, T, V]`` logits (conditioned: prompt ids + answer ids; direct: BOS/EOS id +
              answer ids; the answer clipped to ``max_length - len(prompt_ids)`` in both, i.e. the same token
              sets), log-softmax over the vocabulary, CE at every answer position, mean; IFD = mean_cond /
              mean_direct.  The baseline is generous to the reference: CE is one vectorised gather per row under
              ``no_grad`` (the Cherry scripts loop over positions with a host sync each) and no hidden states are
              requested.
loss:         the conditioned pass alone (rows/s), vs the same batch-1 loop; ``same_result`` = allclose(rtol 1e-4,
              atol 1e-5) on the mean CE.  This project's stricter fp32 batched-vs-batch-1 tolerance (rtol 1e-5,
              atol 1e-6) is checked on our own path (``score_pairs`` batched vs ``max_batch=1``, untimed); against the
              full-logits loop a few rows miss it by ~1e-5 relative because the output layer is applied to the
              gathered answer rows instead of all T rows (another fp32 GEMM shape), so those rows are counted
              (``methods_tolerance_fail_rows``) rather than failing the check.
hidden:       ``hidden_states`` (the ``hidden`` op default: ``alpaca_full_eos`` text, last layer after the final
              norm, mean over tokens, max_length 512), vs batch-1 ``model(..., output_hidden_states=True)`` and a
              mean of ``hidden_states[-1]`` (DiverseEvol pattern); allclose(rtol 1e-4, atol 1e-5).
uncertainty:  ``generation_uncertainty`` (greedy, KV cache, left-padded batches of 8, prompts cut to their last
              512 tokens -- as the ``generation_stats`` op calls it), alpaca prompts, 64 rows x 32 new tokens
              (quick: 16 rows x 16).  No baseline; rows/s and generated tokens/s, the prefill's real vs padded
              prompt tokens, and a greedy-token check of the first 4 rows against batch-1 ``model.generate``
              (untimed).

``DATASEL_BENCH_ROWS`` / ``DATASEL_BENCH_MAX_NEW_TOKENS`` / ``DATASEL_BENCH_DEVICE`` override sizes and device.
Timings taken on a shared 2-core machine are noisy; the thread count is reported (``torch_threads``).
"""

from __future__ import annotations

import math

import numpy as np

from _common import (
    Timer,
    env_info,
    model_cache_dir,
    new_tokens_override,
    peak_rss_gb,
    pool_label,
    ratio,
    rows_override,
    sample_rows,
    load_pool,
    skipped,
    torch_device,
)

TEMPLATE = "alpaca"
MAX_LENGTH = 512
MAX_PROMPT = 512  # the uncertainty op's default max_prompt_length


# ------------------------------------------------------------------ setup

def _load(dtype: str, device: str):
    from datasel.ops.algos.lm_loading import load_causal_lm

    return load_causal_lm("smollm", cache_dir=model_cache_dir(), dtype=dtype, device=device)


def _setup(name: str, dtype: str = "float32"):
    """``(model, tokenizer, device)`` or a skip result dict."""
    try:
        import torch  # noqa: F401  (fail early, with the skip reason, when torch is missing)

        device = torch_device()
        model, tok = _load(dtype, device)
    except Exception as exc:  # ModelNotAvailable, missing gguf package, no torch...
        return skipped(name, f"SmolLM2 unavailable: {type(exc).__name__}: {exc}")
    return model, tok, device


def _records(n: int) -> tuple[list[dict], np.ndarray]:
    ds = load_pool()
    idx = sample_rows(n)
    return [ds.records[i] for i in idx], idx


def _rendered(records):
    from datasel.ops.algos.templates import render

    pairs = [render(TEMPLATE, r) for r in records]
    return [p for p, _ in pairs], [a for _, a in pairs]


# -------------------------------------------------------------- reference-style baseline

def _ref_encode(tok, prompts, answers, max_length):
    """Reference-style token ids, written independently of seqscore: per row
    ``(cond_ids, cond_start, direct_ids, direct_start)`` where ``*_start`` is the index of the first answer
    token.  The prompt gets the tokenizer's own special tokens (BOS when it adds one); the answer is tokenised
    alone and clipped to ``max_length - len(prompt_ids)``; the direct pass starts from the tokenizer's BOS
    (or EOS when it has none) so that both passes score the same answer tokens."""
    auto_start = list(tok("", add_special_tokens=True)["input_ids"])
    if not auto_start:
        first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        auto_start = [int(first)]
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = list(tok(prompt, add_special_tokens=True)["input_ids"])
        a = list(tok(answer, add_special_tokens=False)["input_ids"])
        a = a[: max(max_length - len(p), 0)]
        rows.append((p + a, len(p), auto_start + a, len(auto_start)))
    return rows


def _ref_mean_ce(model, ids: list[int], start: int, device) -> float:
    """One batch-1 fp32 forward with full [1, T, V] logits; mean CE of tokens ids[start:]."""
    import torch

    if start >= len(ids) or start < 1:
        return math.nan
    x = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model(input_ids=x).logits  # [1, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)[0]
    target = x[0, start:]
    ce = -logp[start - 1 : len(ids) - 1].gather(1, target[:, None]).squeeze(1)
    return float(ce.double().mean().item())


def _ref_ifd(model, rows, device):
    import torch

    cond = np.empty(len(rows))
    direct = np.empty(len(rows))
    model.eval()
    with torch.no_grad():
        for i, (c_ids, c_start, d_ids, d_start) in enumerate(rows):
            cond[i] = _ref_mean_ce(model, c_ids, c_start, device)
            direct[i] = _ref_mean_ce(model, d_ids, d_start, device)
    return cond, direct


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a / b
    out[~np.isfinite(out)] = np.nan
    return out


# -------------------------------------------------------------------- ours

def _ours_pairs(tok, prompts, answers):
    from datasel.ops.algos.seqscore import encode_pairs

    cond = encode_pairs(tok, prompts, answers, max_length=MAX_LENGTH)
    direct = encode_pairs(tok, [""] * len(prompts), answers, max_length=MAX_LENGTH, budget_contexts=prompts)
    return cond, direct


def _ours_ifd(model, tok, prompts, answers):
    from datasel.ops.algos.seqscore import score_pairs

    cond_pairs, direct_pairs = _ours_pairs(tok, prompts, answers)
    rc = score_pairs(model, cond_pairs)
    rd = score_pairs(model, direct_pairs)
    return rc, rd, _ratio(rc.mean, rd.mean)


def _same_tokens(tok, prompts, answers, ref_rows) -> bool:
    """Do ours and the baseline feed the same ids and score the same answer tokens?"""
    cond, direct = _ours_pairs(tok, prompts, answers)
    for (cc, ca), (dc, da), (c_ids, c_start, d_ids, d_start) in zip(cond, direct, ref_rows):
        if list(cc) + list(ca) != c_ids or len(cc) != c_start:
            return False
        if list(dc) + list(da) != d_ids or len(dc) != d_start:
            return False
    return True


def _compare(ours: np.ndarray, ref: np.ndarray, atol: float) -> tuple[bool, float | None]:
    """(same_result, max |diff| over rows finite in both): same finite pattern and max diff < atol."""
    fo, fr = np.isfinite(ours), np.isfinite(ref)
    both = fo & fr
    diff = float(np.max(np.abs(ours[both] - ref[both]))) if both.any() else None
    same = bool(np.array_equal(fo, fr) and (diff is None or diff < atol))
    return same, diff


def _allclose(ours: np.ndarray, ref: np.ndarray, *, rtol: float, atol: float):
    """(same finite pattern and allclose on the rows finite in both, max |diff|, rows outside the tolerance)."""
    fo, fr = np.isfinite(ours), np.isfinite(ref)
    both = fo & fr
    d = np.abs(ours[both] - ref[both])
    fails = int((d > atol + rtol * np.abs(ref[both])).sum())
    return bool(np.array_equal(fo, fr) and fails == 0), (float(d.max()) if d.size else None), fails


def _warm(model, tok, prompts, answers, device):
    """One tiny call of each path, so first-call costs (thread pools, kernels) are not timed."""
    rows = _ref_encode(tok, prompts[:1], answers[:1], 64)
    _ref_ifd(model, rows, device)
    _ours_ifd(model, tok, prompts[:2], answers[:2])


# --------------------------------------------------------------------- ifd

def bench_ifd(quick: bool) -> dict:
    name = "ifd"
    n = rows_override(16 if quick else 256)
    setup = _setup(name)
    if isinstance(setup, dict):
        return setup
    model, tok, device = setup
    records, _ = _records(n)
    n = len(records)
    prompts, answers = _rendered(records)
    _warm(model, tok, prompts, answers, device)

    with Timer(device) as t_ours:
        rc, rd, ifd_ours = _ours_ifd(model, tok, prompts, answers)

    with Timer(device) as t_base:
        ref_rows = _ref_encode(tok, prompts, answers, MAX_LENGTH)
        cond_ref, direct_ref = _ref_ifd(model, ref_rows, device)
        ifd_ref = _ratio(cond_ref, direct_ref)

    same, max_diff = _compare(ifd_ours, ifd_ref, 1e-4)
    _, max_diff_cond = _compare(rc.mean, cond_ref, 1e-4)
    _, max_diff_direct = _compare(rd.mean, direct_ref, 1e-4)

    out = {
        "name": name,
        "n": n,
        "k": None,
        "rows": pool_label(),
        "model": "SmolLM2-135M-Instruct",
        "template": TEMPLATE,
        "max_length": MAX_LENGTH,
        "ours_s": round(t_ours.s, 3),
        "baseline": "reference-style loop: per row 2 batch-1 fp32 forwards, full [1,T,V] logits, log-softmax, "
        "answer-span CE (vectorised gather), mean; IFD = cond/direct",
        "baseline_s": round(t_base.s, 3),
        "speedup": ratio(t_base.s, t_ours.s),
        "same_result": same,
        "max_abs_diff_ifd": max_diff,
        "max_abs_diff_ce_cond": max_diff_cond,
        "max_abs_diff_ce_direct": max_diff_direct,
        "same_tokens": _same_tokens(tok, prompts, answers, ref_rows),
        "nan_rows": int(np.isnan(ifd_ours).sum()),
        "nan_empty_answer": int(sum(1 for a in answers if a == "")),
        "nan_prompt_fills_max_length": int(sum(1 for _, start, _, _ in ref_rows if start >= MAX_LENGTH)),
        "ifd_gt_1": int(np.nansum(ifd_ours > 1)),
        "real_tokens": rc.stats["real_tokens"] + rd.stats["real_tokens"],
        "pad_fraction_cond": round(rc.stats["pad_fraction"], 4),
        "pad_fraction_direct": round(rd.stats["pad_fraction"], 4),
        "batches_cond": rc.stats["batches"],
        "batches_direct": rd.stats["batches"],
        "ours_rows_per_s": round(n / t_ours.s, 2),
        "baseline_rows_per_s": round(n / t_base.s, 2),
    }

    # bf16: a separately loaded bf16 copy of the model, the same scorer.
    try:
        model_bf16, _ = _load("bfloat16", device)
        _ours_ifd(model_bf16, tok, prompts[:2], answers[:2])  # warm
        with Timer(device) as t_bf16:
            _, _, ifd_bf16 = _ours_ifd(model_bf16, tok, prompts, answers)
        both = np.isfinite(ifd_bf16) & np.isfinite(ifd_ours)
        out["bf16_s"] = round(t_bf16.s, 3)
        out["bf16_speedup"] = ratio(t_base.s, t_bf16.s)
        out["bf16_vs_fp32_ours"] = ratio(t_ours.s, t_bf16.s)
        if both.sum() >= 3:
            from scipy.stats import spearmanr

            out["bf16_spearman"] = round(float(spearmanr(ifd_ours[both], ifd_bf16[both])[0]), 5)
            out["bf16_median_abs_diff_ifd"] = float(np.median(np.abs(ifd_ours[both] - ifd_bf16[both])))
            out["bf16_max_abs_diff_ifd"] = float(np.max(np.abs(ifd_ours[both] - ifd_bf16[both])))
        out["bf16_same_nan_pattern"] = bool(np.array_equal(np.isfinite(ifd_bf16), np.isfinite(ifd_ours)))
    except Exception as exc:  # bf16 unsupported on this CPU / build
        out["bf16_skipped"] = f"{type(exc).__name__}: {exc}"
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# -------------------------------------------------------------------- loss

def bench_loss(quick: bool) -> dict:
    name = "loss"
    n = rows_override(16 if quick else 256)
    setup = _setup(name)
    if isinstance(setup, dict):
        return setup
    model, tok, device = setup
    from datasel.ops.algos.seqscore import encode_pairs, score_pairs
    import torch

    records, _ = _records(n)
    n = len(records)
    prompts, answers = _rendered(records)
    _warm(model, tok, prompts, answers, device)

    with Timer(device) as t_ours:
        pairs = encode_pairs(tok, prompts, answers, max_length=MAX_LENGTH)
        res = score_pairs(model, pairs)

    with Timer(device) as t_base:
        ref_rows = _ref_encode(tok, prompts, answers, MAX_LENGTH)
        ref = np.empty(n)
        with torch.no_grad():
            for i, (c_ids, c_start, _, _) in enumerate(ref_rows):
                ref[i] = _ref_mean_ce(model, c_ids, c_start, device)

    same, max_diff, _ = _allclose(res.mean, ref, rtol=1e-4, atol=1e-5)
    _, _, methods_fails = _allclose(res.mean, ref, rtol=1e-5, atol=1e-6)
    # The strict fp32 batched-vs-batch-1 check (rtol 1e-5, atol 1e-6) on our own path (untimed, at most 64 rows).
    n1 = min(n, 64)
    res1 = score_pairs(model, pairs[:n1], max_batch=1)
    b1_same, b1_diff, _ = _allclose(res.mean[:n1], res1.mean, rtol=1e-5, atol=1e-6)
    out = {
        "name": name,
        "n": n,
        "k": None,
        "rows": pool_label(),
        "what": "answer CE given the alpaca prompt (loss(given='prompt')), fp32",
        "ours_s": round(t_ours.s, 3),
        "baseline": "batch-1 fp32 full-logits loop (log-softmax over [1,T,V], answer-span CE, mean)",
        "baseline_s": round(t_base.s, 3),
        "speedup": ratio(t_base.s, t_ours.s),
        "same_result": same,
        "tolerance": "allclose rtol 1e-4 atol 1e-5, same NaN rows",
        "max_abs_diff": max_diff,
        "methods_tolerance_fail_rows": methods_fails,
        "methods_tolerance_note": "rows outside the strict batched-vs-batch-1 tolerance allclose(rtol 1e-5, "
        "atol 1e-6) vs the full-logits "
        "baseline; the output layer applied to the gathered answer rows vs all T rows is a different fp32 GEMM "
        "shape (~1e-5 relative on the mean CE)",
        "batched_vs_batch1_rows": n1,
        "batched_vs_batch1_allclose": b1_same,
        "batched_vs_batch1_max_abs_diff": b1_diff,
        "ours_rows_per_s": round(n / t_ours.s, 2),
        "baseline_rows_per_s": round(n / t_base.s, 2),
        "ours_tokens_per_s": round(res.stats["padded_tokens"] / t_ours.s, 1),
        "pad_fraction": round(res.stats["pad_fraction"], 4),
        "batches": res.stats["batches"],
    }
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ------------------------------------------------------------------ hidden

def bench_hidden(quick: bool) -> dict:
    name = "hidden"
    n = rows_override(16 if quick else 256)
    setup = _setup(name)
    if isinstance(setup, dict):
        return setup
    model, tok, device = setup
    from datasel.ops.algos.seqscore import hidden_states
    from datasel.ops.algos.templates import text_for
    import torch

    records, _ = _records(n)
    n = len(records)
    text_kind = "alpaca_full_eos"
    texts = [text_for(text_kind, r, tok) for r in records]

    def baseline(batch_texts):
        vecs = []
        with torch.no_grad():
            for text in batch_texts:
                ids = list(tok(text, add_special_tokens=True)["input_ids"])[:MAX_LENGTH]
                x = torch.tensor([ids], dtype=torch.long, device=device)
                h = model(input_ids=x, output_hidden_states=True).hidden_states[-1]
                vecs.append(h[0].float().mean(0).cpu().numpy())
        return np.stack(vecs)

    hidden_states(model, tok, texts[:2], max_length=MAX_LENGTH)  # warm
    baseline(texts[:1])
    with Timer(device) as t_ours:
        ours = hidden_states(model, tok, texts, max_length=MAX_LENGTH, pool="mean")
    with Timer(device) as t_base:
        ref = baseline(texts)

    diff = np.abs(ours - ref)
    out = {
        "name": name,
        "n": n,
        "k": None,
        "rows": pool_label(),
        "what": f"mean-pooled last hidden layer of text_for({text_kind!r}), max_length {MAX_LENGTH}, fp32",
        "ours_s": round(t_ours.s, 3),
        "baseline": "batch-1 fp32 forward with output_hidden_states=True, mean of hidden_states[-1]",
        "baseline_s": round(t_base.s, 3),
        "speedup": ratio(t_base.s, t_ours.s),
        "same_result": bool(ours.shape == ref.shape and np.allclose(ours, ref, rtol=1e-4, atol=1e-5)),
        "tolerance": "allclose rtol 1e-4 atol 1e-5",
        "max_abs_diff": float(diff.max()) if diff.size else None,
        "max_abs_value": float(np.abs(ref).max()) if ref.size else None,
        "dim": int(ours.shape[1]) if ours.ndim == 2 else None,
        "ours_rows_per_s": round(n / t_ours.s, 2),
        "baseline_rows_per_s": round(n / t_base.s, 2),
    }
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ------------------------------------------------------------- uncertainty

def bench_uncertainty(quick: bool) -> dict:
    name = "uncertainty"
    n = rows_override(16 if quick else 64)
    max_new = new_tokens_override(16 if quick else 32)
    setup = _setup(name)
    if isinstance(setup, dict):
        return setup
    model, tok, device = setup
    from datasel.ops.algos.uncertainty import generation_uncertainty
    import torch

    records, _ = _records(n)
    n = len(records)
    prompts, _ = _rendered(records)
    # As the uncertainty op runs it: the last MAX_PROMPT prompt tokens (a 5,000-token Dolly context
    # would otherwise set the padded width of its whole batch of 8).
    prompt_ids = [tok(p, add_special_tokens=True)["input_ids"][-MAX_PROMPT:] for p in prompts]
    # Prefill shape as generation_uncertainty batches it (longest first, batches of 8, left-padded).
    plens = sorted((len(x) for x in prompt_ids), reverse=True)
    prefill_padded = sum(len(plens[i:i + 8]) * plens[i] for i in range(0, len(plens), 8))
    generation_uncertainty(model, tok, prompt_ids[:2], max_new_tokens=2)  # warm
    with Timer(device) as t_ours:
        res = generation_uncertainty(model, tok, prompt_ids, max_new_tokens=max_new, return_tokens=True)
    generated = int(np.asarray(res["n_tokens"]).sum())

    # Untimed check: the batched, left-padded decode picks the same greedy tokens as batch-1 generate.
    check_rows = min(4, n)
    matches = 0
    check_error = None
    try:
        from transformers import GenerationConfig

        eos = set()
        for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if src is not None:
                eos.update([src] if isinstance(src, int) else list(src))
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos),
                               pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            for i in range(check_rows):
                ids = torch.tensor([prompt_ids[i]], device=device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
                new = gen[0, ids.shape[1]:].tolist()
                if new == list(res["tokens"][i]):
                    matches += 1
    except Exception as exc:  # generate API drift must not hide the timing
        check_error = f"{type(exc).__name__}: {exc}"

    out = {
        "name": name,
        "n": n,
        "k": None,
        "rows": pool_label(),
        "what": f"greedy generation uncertainty, alpaca prompts (last {MAX_PROMPT} tokens), max_new_tokens {max_new}, batch 8, fp32",
        "ours_s": round(t_ours.s, 3),
        "baseline": "none",
        "baseline_s": None,
        "speedup": None,
        "same_result": None,
        "ours_rows_per_s": round(n / t_ours.s, 2),
        "generated_tokens": generated,
        "generated_tokens_per_s": round(generated / t_ours.s, 1),
        "greedy_check": f"{matches}/{check_rows} rows identical to batch-1 model.generate",
        "prompt_tokens_max": plens[0] if plens else None,
        "prompt_tokens_median": float(np.median(plens)) if plens else None,
        "prefill_real_tokens": int(sum(plens)),
        "prefill_padded_tokens": int(prefill_padded),
    }
    if check_error:
        out["greedy_check_error"] = check_error
    out.update(env_info())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


BENCHMARKS = {
    "ifd": bench_ifd,
    "loss": bench_loss,
    "hidden": bench_hidden,
    "uncertainty": bench_uncertainty,
}

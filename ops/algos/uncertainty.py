"""Uncertainty of a causal LM over its own greedy response.

The measures of Bhatt et al., "An Experimental Design Framework for Label-Efficient Supervised
Finetuning of Large Language Models" (Findings of ACL 2024, arXiv 2401.06692; no public code).

For a prompt x the model decodes greedily ŷ_1..ŷ_T; p_t is its next-token
distribution at step t and p_t^(1) ≥ p_t^(2) its two largest probabilities.

* ``entropy``          (1/T) Σ_t H(p_t)                 — pick highest
* ``least_confidence`` 1 − Π_t p_t(ŷ_t)                 — pick highest
* ``mean_margin``      (1/T) Σ_t (p_t^(1) − p_t^(2))    — pick lowest
* ``min_margin``       min_t (p_t^(1) − p_t^(2))        — pick lowest
* ``sequence_logprob`` Σ_t log p_t(ŷ_t)                 — extra: the same ranking as
  least confidence (reversed) without its saturation at 1.0 for long answers.

**Which steps count.**  T is the number of generated tokens *including* the
terminating EOS when the model emits one: choosing to stop is a prediction of
the model like any other, and the step's distribution is part of p(ŷ|x).
Generation stops at the first EOS or after ``max_new_tokens`` steps (then the
response is truncated and T = ``max_new_tokens``).  Rows that generate no token
(``max_new_tokens=0`` or an empty prompt) get NaN.  Distributions are the model's
raw softmax (no temperature, repetition penalty or other processors).

The loop decodes a batch with a KV cache and LEFT padding (pad id = the
tokenizer's pad, else EOS; pads are masked, positions count real tokens only),
and reduces every step's [B, V] logits at once to four numbers per row
(entropy, chosen-token log-prob, p1 − p2), so no [T, V] tensor is ever kept.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["DEFAULT_KINDS", "UNCERTAINTY_KINDS", "generation_uncertainty", "step_statistics"]

UNCERTAINTY_KINDS = ("entropy", "least_confidence", "mean_margin", "min_margin", "sequence_logprob")
DEFAULT_KINDS = ("entropy", "least_confidence", "mean_margin", "min_margin")


def step_statistics(logits):
    """Reduce one decoding step's logits [B, V] to per-row statistics.

    Returns ``(chosen, entropy, chosen_logprob, margin)``, each [B]: the greedy
    token (``argmax``, first index on ties, as ``generate`` does), the entropy of
    the softmax in nats, the chosen token's log-probability and
    p^(1) − p^(2).  Computed in fp32 for half-precision models (fp64 stays fp64).
    """
    import torch

    if logits.dtype not in (torch.float32, torch.float64):  # bf16/fp16 models: reduce in fp32
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # p·log p is 0 for p = 0 (a -inf logit would otherwise give 0·-inf = NaN).
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    chosen = logits.argmax(dim=-1)
    chosen_logprob = logp.gather(-1, chosen[:, None])[:, 0]
    top2 = p.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    return chosen, entropy, chosen_logprob, margin


def _forward_conventions(model) -> tuple[dict, str]:
    """(extra forward kwargs, name of the KV-cache argument) for this model's ``forward``.

    Asks for last-position logits only when the model supports it (saves
    [B, L, V] at prefill).  The cache argument was renamed from
    ``past_key_values`` to ``cache`` in transformers 5.x.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        extra["num_logits_to_keep"] = 1
    cache_arg = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
    return extra, cache_arg


def _returned_cache(out, cache_arg: str):
    value = getattr(out, cache_arg, None)
    if value is None:
        value = getattr(out, "past_key_values", None) if cache_arg == "cache" else getattr(out, "cache", None)
    return value


def _eos_ids(model, tokenizer, eos_token_ids) -> list[int]:
    if eos_token_ids is not None:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    else:
        # Stop where `generate` would: the generation config's EOS ids, plus the
        # tokenizer's EOS (chat models often end turns with it).
        ids = []
        gen = getattr(model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            ids.extend([src] if isinstance(src, int) else list(src))
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError("generation_uncertainty: the tokenizer has no EOS token; pass eos_token_ids")
    return ids


def generation_uncertainty(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    kinds: Iterable[str] = DEFAULT_KINDS,
    progress: Callable[[int], object] | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    add_special_tokens: bool = True,
    max_prompt_tokens: int | None = None,
    return_tokens: bool = False,
) -> dict[str, np.ndarray | list]:
    """Greedy-decode every prompt and measure the model's uncertainty over its own answer.

    ``prompts`` are already rendered by the caller (template applied); strings
    are tokenized with ``add_special_tokens`` (so the tokenizer adds its BOS
    when it has one), lists of ints are used as given.  ``max_prompt_tokens``
    keeps only the last that many prompt tokens (None: no truncation).

    Returns ``{kind: float64 array (n,)}`` for each requested kind (see the
    module docstring for the definitions and the EOS convention) plus
    ``"n_tokens"``: int64 (n,) generated tokens per row, EOS included; with
    ``return_tokens=True`` also ``"tokens"``: the generated ids per row.
    Rows with no generated token are NaN.  ``progress(k)`` is called with the
    number of rows finished after each batch (``tqdm.update`` fits).

    Batches are formed from prompts sorted by length (less padding); results
    come back in input order.  The model's train/eval mode is restored after.
    """
    import torch

    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in UNCERTAINTY_KINDS]
    if unknown:
        raise ValueError(f"unknown uncertainty kind(s) {unknown}; known: {', '.join(UNCERTAINTY_KINDS)}")
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be ≥ 0")

    n = len(prompts)
    ids: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            ids.append(list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]))
        else:
            ids.append([int(t) for t in p])
    if max_prompt_tokens is not None:
        ids = [x[-max_prompt_tokens:] if max_prompt_tokens > 0 else [] for x in ids]

    eos = _eos_ids(model, tokenizer, eos_token_ids)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos[0]

    sum_entropy = np.zeros(n)
    sum_logprob = np.zeros(n)
    sum_margin = np.zeros(n)
    min_margin = np.full(n, np.inf)
    n_tokens = np.zeros(n, dtype=np.int64)
    tokens: list[list[int]] = [[] for _ in range(n)]

    device = next(model.parameters()).device
    fwd_kwargs = _forward_conventions(model)
    eos_t = torch.tensor(eos, device=device)
    was_training = model.training
    model.eval()
    # Longest first: padding is small within a batch, and an out-of-memory
    # error, if any, comes on the first batch rather than after an hour.
    runnable = sorted((i for i in range(n) if ids[i]), key=lambda i: -len(ids[i]))
    if progress is not None and len(runnable) < n:
        progress(n - len(runnable))
    try:
        with torch.inference_mode():
            for start in range(0, len(runnable), batch_size):
                rows = runnable[start:start + batch_size]
                if max_new_tokens > 0:
                    steps = _decode_batch(model, [ids[i] for i in rows], max_new_tokens, pad_id, eos_t,
                                          device, fwd_kwargs)
                    ent, lp, mar, valid, chosen = (s.double().cpu().numpy() if k < 3 else s.cpu().numpy()
                                                   for k, s in enumerate(steps))
                    # steps are [T, B]; invalid entries (after a row's EOS) are zeroed/ignored.
                    sum_entropy[rows] = (ent * valid).sum(0)
                    sum_logprob[rows] = (lp * valid).sum(0)
                    sum_margin[rows] = (mar * valid).sum(0)
                    min_margin[rows] = np.where(valid, mar, np.inf).min(0)
                    n_tokens[rows] = valid.sum(0)
                    if return_tokens:
                        for b, i in enumerate(rows):
                            tokens[i] = chosen[valid[:, b], b].tolist()
                if progress is not None:
                    progress(len(rows))
    finally:
        if was_training:
            model.train()

    with np.errstate(invalid="ignore", divide="ignore"):
        t = n_tokens.astype(np.float64)
        empty = n_tokens == 0
        values = {
            "entropy": sum_entropy / t,
            # 1 − exp(Σ log p) via expm1: accurate when the product is close to 1.
            "least_confidence": -np.expm1(sum_logprob),
            "mean_margin": sum_margin / t,
            "min_margin": min_margin,
            "sequence_logprob": sum_logprob.copy(),
        }
    result: dict[str, np.ndarray | list] = {}
    for k in kinds:
        v = np.asarray(values[k], dtype=np.float64)
        v[empty] = np.nan
        result[k] = v
    result["n_tokens"] = n_tokens
    if return_tokens:
        result["tokens"] = tokens
    return result


def _decode_batch(model, batch_ids, max_new_tokens, pad_id, eos_t, device, conventions):
    """Greedy decoding of one left-padded batch; returns per-step stats stacked as [T, B]."""
    import torch

    fwd_kwargs, cache_arg = conventions
    b = len(batch_ids)
    width = max(len(x) for x in batch_ids)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, x in enumerate(batch_ids):
        input_ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    # Positions count real tokens only, so a left-padded row sees exactly the
    # positions it would see alone (pads get a dummy position; they are masked).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **fwd_kwargs)
    logits = out.logits[:, -1, :]
    past = _returned_cache(out, cache_arg)

    finished = torch.zeros(b, dtype=torch.bool, device=device)
    ents, lps, mars, valids, chosens = [], [], [], [], []
    for step in range(max_new_tokens):
        chosen, ent, lp, mar = step_statistics(logits)
        valids.append(~finished)
        ents.append(ent)
        lps.append(lp)
        mars.append(mar)
        chosens.append(chosen)
        finished = finished | torch.isin(chosen, eos_t)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        # Finished rows keep decoding pads (their statistics are masked out):
        # dropping them from the KV cache would cost more than it saves.
        feed = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_arg: past}, **fwd_kwargs)
        logits = out.logits[:, -1, :]
        past = _returned_cache(out, cache_arg)
    stack = torch.stack
    return stack(ents), stack(lps), stack(mars), stack(valids), stack(chosens)

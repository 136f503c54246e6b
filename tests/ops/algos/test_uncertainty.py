"""generation_uncertainty against an independent naive greedy loop, and by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datasel.ops.algos.uncertainty import UNCERTAINTY_KINDS, generation_uncertainty, step_statistics

ALL = ("entropy", "least_confidence", "mean_margin", "min_margin", "sequence_logprob")


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok), initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peakier next-token distributions, far from greedy near-ties
        m.lm_head.weight.mul_(4.0)
    return m


PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon and a knight who met in a dark forest.",
    "2+2=",
    "What is the capital of France? Answer briefly.",
    "x",
]


def naive(model, tok, prompt, max_new_tokens, eos):
    """Batch 1, no cache, full logits kept; the four quantities straight from their definitions."""
    ids = tok(prompt)["input_ids"]
    gen, ents, chosen_p, margins = [], [], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + gen])).logits[0, -1].double()
            p = torch.softmax(logits, -1)
            ents.append(float(-(p * torch.log(p)).sum()))
            srt = torch.sort(p, descending=True).values
            margins.append(float(srt[0] - srt[1]))
            y = int(torch.argmax(logits))
            chosen_p.append(float(p[y]))
            gen.append(y)
            if y in eos:
                break
    t = len(gen)
    return {
        "entropy": sum(ents) / t,
        "least_confidence": 1 - math.prod(chosen_p),
        "mean_margin": sum(margins) / t,
        "min_margin": min(margins),
        "sequence_logprob": sum(math.log(q) for q in chosen_p),
        "n_tokens": t,
        "tokens": gen,
    }


@pytest.fixture(scope="module")
def model64(model):
    import copy

    return copy.deepcopy(model).double()


def check_against_naive(model, tok, prompts, max_new_tokens, eos, batch_size, rtol=1e-9, atol=1e-11):
    got = generation_uncertainty(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 kinds=ALL, eos_token_ids=eos, return_tokens=True)
    refs = [naive(model, tok, p, max_new_tokens, eos) for p in prompts]
    assert got["tokens"] == [r["tokens"] for r in refs]
    assert got["n_tokens"].tolist() == [r["n_tokens"] for r in refs]
    for k in ALL:
        assert got[k].dtype == np.float64
        np.testing.assert_allclose(got[k], [r[k] for r in refs], rtol=rtol, atol=atol, err_msg=k)
    return got


def test_matches_naive_loop_with_padding(model64, tok):
    # fp64 on both sides, so padding/KV-cache bugs cannot hide in fp32 noise.
    # batch_size 2 over 5 prompts of very different lengths: every batch is left-padded.
    got = check_against_naive(model64, tok, PROMPTS, 6, [tok.eos_token_id], batch_size=2)
    assert (got["n_tokens"] == 6).all()


def test_matches_naive_loop_fp32(model, tok):
    # The fp32 model: padded/cached vs unpadded recomputation differ by fp32 rounding only.
    check_against_naive(model, tok, PROMPTS, 4, [tok.eos_token_id], batch_size=3, rtol=1e-4, atol=2e-5)


def test_matches_naive_loop_with_early_eos(model64, tok):
    # Declare as "EOS" the 3rd token one row generates: that row stops after 3
    # tokens (EOS included) while its batch neighbours keep decoding.
    free = naive(model64, tok, PROMPTS[1], 8, eos=[])["tokens"]
    k = next(i for i in range(2, 8) if free[i] not in free[:i])
    eos = [free[k]]
    got = check_against_naive(model64, tok, PROMPTS, 8, eos, batch_size=3)
    assert got["n_tokens"][1] == k + 1
    assert got["tokens"][1][-1] == eos[0]
    assert got["n_tokens"].max() == 8 and got["n_tokens"].min() < 8


def test_batch_size_does_not_change_results(model64, tok):
    a = generation_uncertainty(model64, tok, PROMPTS, max_new_tokens=4, batch_size=1, kinds=ALL)
    b = generation_uncertainty(model64, tok, PROMPTS, max_new_tokens=4, batch_size=5, kinds=ALL)
    for k in ALL:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-11)


class FixedLogits(torch.nn.Module):
    """Stub causal LM whose next-token logits are always the same vector."""

    def __init__(self, logits):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.table.expand(b, n, -1).clone(), past_key_values=None)


NO_EOS_TOK = SimpleNamespace(eos_token_id=None, pad_token_id=0)


def test_one_step_by_hand():
    p = [0.5, 0.3, 0.1, 0.05, 0.05]
    stub = FixedLogits(np.log(p))
    r = generation_uncertainty(stub, NO_EOS_TOK, [[1, 2, 3], [4]], max_new_tokens=1, kinds=ALL, eos_token_ids=[9])
    h = -sum(q * math.log(q) for q in p)
    assert r["n_tokens"].tolist() == [1, 1]
    np.testing.assert_allclose(r["entropy"], [h, h], rtol=1e-6)
    np.testing.assert_allclose(r["least_confidence"], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(r["mean_margin"], [0.2, 0.2], rtol=1e-5)  # p1 - p2 = 0.5 - 0.3
    np.testing.assert_allclose(r["min_margin"], [0.2, 0.2], rtol=1e-5)


def test_margin_of_a_tie_is_zero_and_product_over_steps():
    stub = FixedLogits(np.log([0.4, 0.4, 0.2]))
    r = generation_uncertainty(stub, NO_EOS_TOK, [[1]], max_new_tokens=3, kinds=ALL, eos_token_ids=[7])
    assert r["n_tokens"].tolist() == [3]
    assert r["min_margin"][0] == 0.0 and r["mean_margin"][0] == 0.0
    np.testing.assert_allclose(r["least_confidence"], [1 - 0.4 ** 3], rtol=1e-6)
    np.testing.assert_allclose(r["sequence_logprob"], [3 * math.log(0.4)], rtol=1e-6)


def test_eos_step_is_counted():
    # The greedy token (index 0) is EOS: the response is just EOS, T = 1, and its step counts.
    stub = FixedLogits(np.log([0.7, 0.2, 0.1]))
    r = generation_uncertainty(stub, NO_EOS_TOK, [[1]], max_new_tokens=5, kinds=ALL, eos_token_ids=[0],
                               return_tokens=True)
    assert r["n_tokens"].tolist() == [1] and r["tokens"] == [[0]]
    np.testing.assert_allclose(r["least_confidence"], [0.3], rtol=1e-6)
    np.testing.assert_allclose(r["min_margin"], [0.5], rtol=1e-6)


def test_zero_tokens_give_nan_and_progress_counts_rows():
    stub = FixedLogits(np.log([0.6, 0.4]))
    seen = []
    r = generation_uncertainty(stub, NO_EOS_TOK, [[1], [], [2, 3]], max_new_tokens=2, eos_token_ids=[5],
                               batch_size=1, progress=seen.append)
    assert sum(seen) == 3
    assert r["n_tokens"].tolist() == [2, 0, 2]
    for k in ("entropy", "least_confidence", "mean_margin", "min_margin"):
        assert np.isnan(r[k][1]) and not np.isnan(r[k][0])
    r0 = generation_uncertainty(stub, NO_EOS_TOK, [[1]], max_new_tokens=0, eos_token_ids=[5])
    assert r0["n_tokens"].tolist() == [0] and np.isnan(r0["entropy"][0])


def test_step_statistics_handles_masked_logits():
    logits = torch.tensor([[0.0, 0.0, -float("inf")]])
    chosen, ent, lp, mar = step_statistics(logits)
    assert int(chosen[0]) == 0
    np.testing.assert_allclose(float(ent[0]), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(lp[0]), math.log(0.5), rtol=1e-6)
    assert float(mar[0]) == 0.0


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown uncertainty kind"):
        generation_uncertainty(FixedLogits([0.0, 1.0]), NO_EOS_TOK, [[1]], kinds=("confidence",), eos_token_ids=[0])
    assert set(ALL) == set(UNCERTAINTY_KINDS)


def test_restores_training_mode(model, tok):
    model.train()
    try:
        generation_uncertainty(model, tok, ["Hi"], max_new_tokens=1)
        assert model.training
    finally:
        model.eval()

"""Per-example LoRA gradients, optimiser features and projections, against simple references.

References written here: a batch-size-1 autograd loop over the LoRA parameters (the LESS loop),
Adam's formulas by hand, and explicit dense projection matrices.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from datasel.ops.algos import gradients as G
from datasel.ops.algos.finetune import collate, encode_pairs


def _tokenizer():
    from transformers import AutoTokenizer

    from datasel.ops.algos.lm_loading import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token = "[SEP]"
    return tok


def _lora(model, targets, r=4):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                                                  bias="none", task_type="CAUSAL_LM",
                                                  fan_in_fan_out=type(model).__name__.startswith("GPT2")))
    with torch.no_grad():  # B starts at 0: give it values so that every factor has a gradient
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model.eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if request.param == "llama":
        base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                            pad_token_id=tok.pad_token_id))
        return _lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"])
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128))
    return _lora(base, ["c_attn"])


def _examples(tok, max_length=40):
    pairs = [("Say hello.", "hello there, friend"), ("Add 2 and 3.", "5"),
             ("Write a long sentence about the sea and the sky and the wind.",
              "The sea is wide and the sky is high and the wind blows across them both all day long " * 3),
             ("Q?", "a b c d e f g")]
    examples, skipped = encode_pairs(pairs, tok, max_length=max_length)
    assert not skipped and len({len(ids) for ids, _ in examples}) > 2  # padding matters
    assert any(len(ids) == max_length for ids, _ in examples)  # and truncation
    return examples


def _batch1_grads(model, example, pad_id):
    """LESS's loop: one record, model loss, autograd over the LoRA parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = collate([example], pad_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    grads = torch.autograd.grad(out.loss, list(params.values()))
    return dict(zip(params, grads))


def test_hook_gradients_equal_batch1_autograd_with_padding_and_truncation(model, tok):
    examples = _examples(tok)
    pad = tok.pad_token_id
    got = G.per_example_grads(model, examples, pad)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == names
    for b, ex in enumerate(examples):
        want = _batch1_grads(model, ex, pad)
        g_vec = torch.cat([got[n][b].reshape(-1) for n in sorted(names)])
        w_vec = torch.cat([want[n].reshape(-1) for n in sorted(names)])
        rel = float((g_vec - w_vec).norm() / w_vec.norm())
        assert rel < 1e-4, (b, rel)


def test_gradients_do_not_depend_on_the_batch_they_are_in(model, tok):
    examples = _examples(tok)
    pad = tok.pad_token_id
    together = G.per_example_grads(model, examples, pad)
    alone = G.per_example_grads(model, examples[1:2], pad)
    a = torch.cat([together[n][1].reshape(-1) for n in sorted(together)])
    b = torch.cat([alone[n][0].reshape(-1) for n in sorted(alone)])
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_no_parameter_gradient_is_accumulated(model, tok):
    G.per_example_grads(model, _examples(tok), tok.pad_token_id)
    assert all(p.grad is None for p in model.parameters())


def test_lora_factors_refuse_a_model_without_lora(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok)))
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        G.lora_factors(plain)


# ------------------------------------------------------------------ optimiser features
def test_adam_feature_matches_the_formulas():
    torch.manual_seed(0)
    g = torch.randn(3, 5, 7) * 1e-3
    m, v = torch.randn(5, 7) * 1e-3, torch.rand(5, 7) * 1e-6
    step = 12.0
    code = G.optimizer_feature(g, "adam", (m, v, step), adam="code")
    paper = G.optimizer_feature(g, "adam", (m, v, step), adam="paper")
    for b in range(3):
        for i in range(5):
            for j in range(7):
                gi, mi, vi = float(g[b, i, j]), float(m[i, j]), float(v[i, j])
                m1 = 0.9 * mi + 0.1 * gi
                v1 = 0.999 * vi + 0.001 * gi * gi
                assert math.isclose(float(code[b, i, j]), m1 / math.sqrt(v1 + 1e-8), rel_tol=1e-5)
                t = step + 1
                want = (m1 / (1 - 0.9 ** t)) / (math.sqrt(v1 / (1 - 0.999 ** t)) + 1e-8)
                assert math.isclose(float(paper[b, i, j]), want, rel_tol=1e-5)
    assert torch.equal(G.optimizer_feature(g, "sgd"), g)
    assert torch.equal(G.optimizer_feature(g, "sign"), torch.sign(g))


# ------------------------------------------------------------------ projections
def _dense_rademacher(seed, name, rows, k):
    blocks = [G.rademacher_block(seed, name, b, min(G._ROW_BLOCK, rows - s), k)
              for b, s in enumerate(range(0, rows, G._ROW_BLOCK))]
    return torch.cat(blocks)


def close(a, b, tol=1e-5) -> bool:
    """Relative L2 error below ``tol`` (sums of thousands of terms differ in the last bits by order)."""
    return float((a - b).norm() / b.norm()) < tol


def _grads(shapes, b=3, seed=0):
    torch.manual_seed(seed)
    return {n: torch.randn(b, *s) for n, s in shapes.items()}


SHAPES = {"layer.1.lora_A.default.weight": (4, 9000), "layer.0.lora_B.default.weight": (30, 4)}


@pytest.mark.parametrize("keep", [0, 1 << 30])
def test_rademacher_projection_equals_an_explicit_dense_matrix(keep):
    grads = _grads(SHAPES)
    got = G.Projector("rademacher", 64, seed=3, keep_bytes=keep).project(grads)
    want = torch.zeros(3, 64)
    for n in sorted(SHAPES):
        flat = grads[n].reshape(3, -1)
        P = _dense_rademacher(3, n, flat.shape[1], 64)
        assert set(P.unique().tolist()) == {-1.0, 1.0}
        want += flat @ P
    assert close(got, want)


def test_projection_is_the_same_for_any_batch_composition_and_run():
    grads = _grads(SHAPES, b=5)
    whole = G.Projector("rademacher", 32, seed=1).project(grads)
    parts = torch.cat([G.Projector("rademacher", 32, seed=1).project({n: g[i:i + 2] for n, g in grads.items()})
                       for i in range(0, 5, 2)])
    assert close(whole, parts)
    reordered = dict(reversed(list(grads.items())))  # module order does not matter
    assert close(G.Projector("rademacher", 32, seed=1).project(reordered), whole)
    assert not torch.allclose(G.Projector("rademacher", 32, seed=2).project(grads), whole)


def test_sparse_projection_equals_its_explicit_matrix():
    grads = _grads(SHAPES)
    got = G.Projector("sparse", 50, seed=0).project(grads)
    want = torch.zeros(3, 50)
    for n in sorted(SHAPES):
        flat = grads[n].reshape(3, -1)
        slots, signs = G.sparse_slots(0, n, flat.shape[1], 50)
        P = torch.zeros(flat.shape[1], 50)
        for j in range(flat.shape[1]):
            for s in range(G.SPARSE_SLOTS):
                P[j, slots[j, s]] += signs[j, s]
        want += flat @ P
    assert close(got, want)


def test_projection_preserves_inner_products_roughly():
    # JL: with k = 2048 unscaled ±1 entries, <Px, Py> / k estimates <x, y>.
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2000)
    y = x + 0.5 * torch.randn(1, 4, 2000)
    px = G.Projector("rademacher", 2048).project({"p": x})
    py = G.Projector("rademacher", 2048).project({"p": y})
    cos_true = float(torch.nn.functional.cosine_similarity(x.reshape(1, -1), y.reshape(1, -1)))
    cos_proj = float(torch.nn.functional.cosine_similarity(px, py))
    assert abs(cos_true - cos_proj) < 0.05


def test_none_projector_concatenates_by_name():
    grads = _grads(SHAPES)
    got = G.Projector("none", 0).project(grads)
    want = torch.cat([grads[n].reshape(3, -1) for n in sorted(SHAPES)], dim=1)
    assert torch.equal(got, want)


def test_raw_gradients_of_a_large_model_are_refused(model, monkeypatch):
    monkeypatch.setattr(G, "MAX_RAW_DIM", 10)
    with pytest.raises(ValueError, match="keeps the raw LoRA gradient"):
        G.check_raw_dim(model, "none")
    assert G.check_raw_dim(model, "rademacher") > 10


# ------------------------------------------------------------------ checkpoints
def test_epoch_learning_rates_are_the_mean_of_the_schedule():
    from datasel.ops.algos.finetune import lr_factor

    meta = {"steps_per_epoch": 105, "config": {"epochs": 4, "warmup_ratio": 0.03, "lr": 2e-5, "schedule": "linear"}}
    got = G.epoch_learning_rates(meta)
    total, warm = 420, math.ceil(0.03 * 420)
    for e in range(4):
        steps = range(e * 105, (e + 1) * 105)
        assert math.isclose(got[e], sum(2e-5 * lr_factor(s, total, warm, "linear") for s in steps) / 105)
    # LESS's README lists 1.6877e-5, 1.2859e-5, 7.7030e-6, 2.5616e-6 for checkpoints at steps
    # 105/211/317/420 (epochs of 105-106 steps, so not exactly this 4 × 105 schedule): within 2%.
    for mine, theirs in zip(got, [1.6877e-5, 1.2859e-5, 7.7030e-6, 2.5616e-6]):
        assert abs(mine - theirs) / theirs < 0.02

"""grad and influence through the engine, against independent computations written here.

The references: LESS's loop (each record alone, the model's own ``labels`` loss, autograd over
the LoRA parameters, Adam's code formula with the checkpoint's moments), explicit projection
matrices, and LESS's score by hand (cosine per checkpoint, learning-rate weights, mean per
sub-task, max over sub-tasks).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from datasel.ops.algos import gradients as G

pytestmark = pytest.mark.usefixtures("cache_dir")

POOL = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning!", "output": "Guten Morgen!"},
    {"instruction": "Sort ascending", "input": "9, 3, 7, 1", "output": "1, 3, 7, 9"},
    {"instruction": "Name a colour of the rainbow.", "input": "", "output": "Blue"},
    {"instruction": "Write a haiku about autumn leaves falling in the park.", "input": "",
     "output": "Red leaves drift and fall, the quiet path remembers every step we took."},
]
VAL = [
    {"instruction": "Add the numbers.", "input": "3 + 4", "output": "3 + 4 = 7", "task": "math"},
    {"instruction": "Multiply.", "input": "6 * 7", "output": "42", "task": "math"},
    {"instruction": "Translate to French", "input": "Thank you", "output": "Merci", "task": "lang"},
]
EPOCHS = 3  # 2 steps per epoch, warmup 1 step of 6: epochs' mean learning rates 0.025, 0.035, 0.015
FT = 'finetune(hf("{folder}"), data=random(4, seed=0), epochs=3, lr=0.05, batch=2, lora_r=4)'


def _run_folder(cache_dir) -> list:
    """The trained checkpoints of the one finetune run in the cache (epoch-1 … epoch-EPOCHS)."""
    metas = sorted(cache_dir.rglob("datasel_checkpoint.json"))
    folders = sorted({m.parent for m in metas if m.parent.name != "epoch-0"})
    assert [f.name for f in folders] == [f"epoch-{e}" for e in range(1, EPOCHS + 1)]
    return folders


def _reference_features(folders, base_dir, records, *, optimizer="adam", max_length=512):
    """LESS's loop: batch 1, labels loss, autograd, then Adam's code formula, raw (unprojected)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasel.ops.algos import templates as T
    from datasel.ops.algos.finetune import collate, encode_pairs, load_checkpoint

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    blocks = []
    for folder in folders:
        model = load_checkpoint(folder, lambda spec: AutoModelForCausalLM.from_pretrained(str(base_dir)).float(),
                                dtype="float32", device="cpu", merge=False)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        model.eval()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = load_file(str(folder / "optimizer.safetensors"))
        rows = []
        for rec in records:
            (example,), _ = encode_pairs([T.render("alpaca", rec, tok)], tok, max_length=max_length)
            batch = collate([example], tok.pad_token_id)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            parts = []
            for name in sorted(params):
                g = grads[name].double()
                if optimizer == "adam":
                    m, v = state[f"{name}::exp_avg"].double(), state[f"{name}::exp_avg_sq"].double()
                    m1, v1 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                    g = m1 / torch.sqrt(v1 + 1e-8)
                parts.append(g.reshape(-1))
            rows.append(torch.cat(parts).numpy())
        blocks.append(np.stack(rows))
    return blocks


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def raw_features(eval_expr, tiny_llama_dir, cache_dir):
    ft = FT.format(folder=tiny_llama_dir)
    values = eval_expr(f'grad({ft}, projector="none", normalize=false)', POOL)
    return values, _run_folder(cache_dir), ft


def test_grad_equals_lesss_batch1_loop_with_adam(raw_features, tiny_llama_dir):
    values, folders, _ = raw_features
    want = _reference_features(folders, tiny_llama_dir, POOL)
    width = want[0].shape[1]
    assert values.shape == (len(POOL), EPOCHS * width)
    for c in range(EPOCHS):
        for r in range(len(POOL)):
            assert _rel(values[r, c * width:(c + 1) * width], want[c][r]) < 1e-4, (c, r)
    assert _rel(values[:, :width], values[:, width:2 * width]) > 1e-3  # the checkpoints differ


def test_projected_and_normalised_features_are_the_raw_ones_times_the_matrix(raw_features, eval_expr):
    values, _, ft = raw_features
    projected = eval_expr(f"grad({ft}, dim=64, seed=5)", POOL)
    width = values.shape[1] // EPOCHS
    from peft import PeftModel  # noqa: F401  (the names below are peft's)

    names = _param_names_and_sizes(raw_features)
    for c in range(EPOCHS):
        raw = values[:, c * width:(c + 1) * width].astype(np.float64)
        want = np.zeros((len(POOL), 64))
        start = 0
        for name, size in names:
            P = torch.cat([G.rademacher_block(5, name, b, min(G._ROW_BLOCK, size - s), 64)
                           for b, s in enumerate(range(0, size, G._ROW_BLOCK))]).double().numpy()
            want += raw[:, start:start + size] @ P
            start += size
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        assert _rel(projected[:, c * 64:(c + 1) * 64], want) < 1e-5
        np.testing.assert_allclose(np.linalg.norm(projected[:, c * 64:(c + 1) * 64], axis=1), 1, rtol=1e-5)


def _param_names_and_sizes(raw_features):
    from transformers import AutoModelForCausalLM

    from datasel.ops.algos.finetune import load_checkpoint

    _, folders, _ = raw_features
    meta = json.loads((folders[0] / "datasel_checkpoint.json").read_text())
    base = meta["base_model"]
    model = load_checkpoint(folders[0], lambda spec: AutoModelForCausalLM.from_pretrained(base).float(),
                            dtype="float32", device="cpu", merge=False)
    return sorted((n, p.numel()) for n, p in model.named_parameters() if "lora_" in n)


def test_grad_of_a_model_that_is_not_a_run_is_an_error(eval_expr, tiny_llama_dir):
    from datasel.dsl.engine import OpError

    with pytest.raises(OpError, match="grad needs a LoRA fine-tuning run"):
        eval_expr(f'grad(hf("{tiny_llama_dir}"))', POOL)


def test_raw_features_of_too_many_parameters_are_refused(eval_expr, tiny_llama_dir, monkeypatch):
    from datasel.dsl.engine import OpError

    monkeypatch.setattr(G, "MAX_RAW_DIM", 100)
    with pytest.raises(OpError, match="keeps the raw LoRA gradient"):
        eval_expr(f'grad({FT.format(folder=tiny_llama_dir)}, projector="none")', POOL)


# ------------------------------------------------------------------ influence
def _naive_influence(X, V, lrs, labels):
    """LESS's aggregation, written plainly: Σ_c w_c cos per pair, mean per sub-task, max over sub-tasks."""
    w = np.asarray(lrs) / sum(lrs)
    blocks = len(w)
    size = X.shape[1] // blocks
    out = []
    for x in X:
        per_target = []
        for v in V:
            s = 0.0
            for c in range(blocks):
                a, b = x[c * size:(c + 1) * size], v[c * size:(c + 1) * size]
                s += w[c] * float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            per_target.append(s)
        per_target = np.asarray(per_target)
        out.append(max(per_target[labels == g].mean() for g in sorted(set(labels))))
    return np.asarray(out)


def test_influence_is_lesss_aggregation_of_adam_pool_and_sgd_target_features(eval_expr, tiny_llama_dir,
                                                                               cache_dir, write_pool):
    ft = FT.format(folder=tiny_llama_dir)
    val = write_pool(VAL, name="val.jsonl")
    raw = 'projector="none", normalize=false'
    train, target = f"grad({ft}, {raw})", f'grad({ft}, data=val, optimizer="sgd", {raw})'
    got = eval_expr(f'influence({train}, {target}, run={ft}, groups="task")', POOL, val=val)
    folders = _run_folder(cache_dir)
    X = np.hstack(_reference_features(folders, tiny_llama_dir, POOL))
    V = np.hstack(_reference_features(folders, tiny_llama_dir, VAL, optimizer="sgd"))
    meta = json.loads((folders[-1] / "datasel_checkpoint.json").read_text())
    lrs = G.epoch_learning_rates(meta)
    assert len(lrs) == EPOCHS and len(set(lrs)) == EPOCHS
    np.testing.assert_allclose(got, _naive_influence(X, V, lrs, np.array([0, 0, 1])), rtol=1e-4, atol=1e-6)
    flat = eval_expr(f"influence({train}, {target}, run={ft})", POOL, val=val)
    np.testing.assert_allclose(flat, _naive_influence(X, V, lrs, np.zeros(3, dtype=int)), rtol=1e-4, atol=1e-6)
    uniform = eval_expr(f'influence({train}, {target}, run={ft}, weights="uniform", reduce="max")', POOL, val=val)
    np.testing.assert_allclose(uniform, _naive_influence(X, V, [1] * EPOCHS, np.arange(3)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got, flat) and not np.allclose(got, uniform)


def test_a_less_recipe_runs_and_its_rerun_computes_no_gradient(run_recipe, tiny_llama_dir, write_pool):
    ft = FT.format(folder=tiny_llama_dir)
    val = write_pool(VAL, name="val.jsonl")
    text = (f"warm = {ft}\n"
            f"select topk(influence(grad(warm, dim=32), grad(warm, data=val, optimizer=\"sgd\", dim=32), "
            f"run=warm, groups=\"task\"), 2)\n")
    first = run_recipe(text, POOL, val=val)
    assert len(first.selected) == 2
    again = run_recipe(text, POOL, val=val)
    assert again.selected == first.selected
    grads = again.nodes("grad")
    assert len(grads) == 2 and all(n["status"] == "cached" for n in grads), grads

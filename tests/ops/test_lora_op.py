"""lora(model, r=, alpha=, dropout=, targets=[…]): the adapter finetune trains, and the features grad reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")

POOL = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning!", "output": "Guten Morgen!"},
]


def _adapter_config(cache_dir, epoch=1) -> dict:
    (path,) = [p for p in cache_dir.rglob(f"epoch-{epoch}/adapter_config.json")]
    return json.loads(path.read_text())


def test_finetune_trains_the_adapter_lora_describes(eval_expr, tiny_llama_dir, cache_dir):
    run = (f'finetune(lora(hf("{tiny_llama_dir}"), r=2, alpha=6, dropout=0.1, targets=["q_proj", "v_proj"]), '
           f'data=random(2, seed=0), epochs=1, batch=2)')
    values = eval_expr(f'grad({run}, projector="none", normalize=false, optimizer="sgd")', POOL)
    config = _adapter_config(cache_dir)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 6, 0.1)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # 2 layers × (q, v) × (A: r × 64, B: out × r); q: 64 out, v: 32 out (2 key-value heads of 16)
    assert values.shape == (len(POOL), 2 * (2 * 64 + 64 * 2) + 2 * (2 * 64 + 32 * 2))


def test_lora_settings_given_twice_are_an_error(eval_expr, tiny_llama_dir):
    from datasel.dsl.engine import OpError

    run = f'finetune(lora(hf("{tiny_llama_dir}"), r=2), data=random(2, seed=0), lora_r=4)'
    with pytest.raises(OpError, match="give r, alpha and dropout there"):
        eval_expr(f'grad({run}, optimizer="sgd", dim=4)', POOL)
    run = f'finetune(lora(hf("{tiny_llama_dir}"), r=2), data=random(2, seed=0), lora=false)'
    with pytest.raises(OpError, match="is trained with LoRA"):
        eval_expr(f'grad({run}, optimizer="sgd", dim=4)', POOL)


def test_a_target_that_names_no_layer_is_an_error_listing_the_layers(eval_expr, tiny_llama_dir):
    from datasel.dsl.engine import OpError

    run = f'finetune(lora(hf("{tiny_llama_dir}"), targets=["c_attn"]), data=random(2, seed=0))'
    with pytest.raises(OpError, match=r"'c_attn' matches no linear layer.*q_proj"):
        eval_expr(f'grad({run}, optimizer="sgd", dim=4)', POOL)


def test_lora_of_a_run_is_an_error(eval_expr, tiny_llama_dir):
    from datasel.dsl.engine import OpError

    inner = f'finetune(hf("{tiny_llama_dir}"), data=random(2, seed=0))'
    with pytest.raises(OpError, match="lora needs a base model"):
        eval_expr(f'grad(finetune(lora({inner}), data=random(2, seed=0)), optimizer="sgd", dim=4)', POOL)


def test_an_untrained_lora_scores_as_its_base(eval_expr, tiny_llama_dir):
    base = eval_expr(f'loss(hf("{tiny_llama_dir}"))', POOL)
    adapted = eval_expr(f'loss(lora(hf("{tiny_llama_dir}"), r=2))', POOL)
    np.testing.assert_array_equal(base, adapted)

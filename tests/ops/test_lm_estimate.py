"""Cost estimates of the language-model ops before a run (tiny random Llama): tokens, steps, what is done."""
from __future__ import annotations

import pytest

from datasel.dsl.cache import Cache
from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.estimate import estimate
from datasel.dsl.runner import fingerprints, load_inputs, run

pytestmark = pytest.mark.usefixtures("cache_dir")

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
RECORDS = [{"instruction": f"Say the number {i}.", "input": "", "output": " ".join(["number"] * (i + 1))}
           for i in range(12)]


def work_of(recipe: str, pool, cache_dir) -> dict[str, dict]:
    datasets = load_inputs(pool)
    compiled = compile_recipe(recipe_source(recipe, name="r.sel"), None, fingerprints(datasets))
    result = estimate(compiled.plan, datasets, Cache(cache_dir)).states()
    return {compiled.plan.nodes[k].op: v for k, v in result.items()}


def test_loss_work_counts_the_tokens_of_the_records_that_reach_it(write_pool, cache_dir, tiny_llama_dir,
                                                                 smol_tok):
    pool = write_pool(RECORDS)
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text="select length > 30")
    got = work_of(f'select length > 30 | topk(loss(hf("{tiny_llama_dir}"), max_length=64), 2)', pool, cache_dir)
    survivors = [r for r in RECORDS if len(r["output"]) > 30]
    expected = sum(min(64, len(smol_tok(ALPACA.format(**r) + r["output"])["input_ids"])) for r in survivors)
    work = got["loss"]["work"]
    assert got["loss"]["rows"] == len(survivors) == 8  # outputs of 5+ words are over 30 characters
    assert work["records"] == 8 and work["tokens"] == expected
    assert work["seconds"] > 0


def test_finetune_work_is_its_steps_and_nothing_once_trained(write_pool, cache_dir, tiny_llama_dir):
    pool = write_pool(RECORDS)
    recipe = f'select topk(loss(finetune(hf("{tiny_llama_dir}"), data=pool, epochs=2, batch=5, max_length=64)), 3)'
    before = work_of(recipe, pool, cache_dir)["finetune"]
    assert before["state"] == "miss"
    assert before["work"]["steps"] == 2 * 3  # 12 records in batches of 5, twice
    assert before["work"]["records"] == 12 and before["work"]["backward_tokens"] > 0
    # the loss under the fine-tuned model is estimated with its base's tokenizer and rate
    assert work_of(recipe, pool, cache_dir)["loss"]["work"]["records"] == 12
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text=recipe)
    after = work_of(recipe, pool, cache_dir)
    assert after["finetune"] == {"state": "hit"}
    assert after["loss"]["state"] == "hit" and after["loss"]["rows"] == 0

"""Why a language-model score is missing, as the funnel and `datasel why` say it (tiny random Llama)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")

LONG = " ".join(["please"] * 70)
RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there, how are you doing today?"},
    {"instruction": LONG, "input": "", "output": "This prompt alone fills the window."},
    {"instruction": "Add.", "input": "1 + 1", "output": "2"},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
]


def test_a_prompt_filling_max_length_is_named_as_the_reason(run_recipe, tiny_llama_dir, smol_tok):
    prompt = "Below is an instruction that describes a task. Write a response that appropriately completes " \
             f"the request.\n\n### Instruction:\n{LONG}\n\n### Response:"
    assert len(smol_tok(prompt)["input_ids"]) >= 64  # the set-up: record 1's prompt alone fills 64 tokens
    model = f'hf("{tiny_llama_dir}")'
    out = run_recipe(f"s = ifd({model}, max_length=64)\nselect s < 100 | topk(s, 2)", RECORDS)
    funnel = out.manifest["funnel"]
    assert funnel[1]["dropped"] == {"no score": 1}
    reason = dict(zip(out.manifest["records"]["position"], out.manifest["records"]["reason"]))[1]
    # The ratio is NaN because its conditioned loss scored no token, and that is because of the prompt.
    assert reason.startswith("no s score: the prompt fills max_length (64 tokens), leaving no answer tokens to "
                             "score (in loss(")
    assert "max_length=64" in reason

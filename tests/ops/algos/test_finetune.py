"""finetune: answer-only loss, checkpoints, resume, LoRA and full, with tiny random models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from datasel.ops.algos import finetune as ft
from datasel.ops.algos.finetune import (
    batch_loss,
    collate,
    default_target_modules,
    encode_pairs,
    finetune,
    load_checkpoint,
    lr_factor,
    mean_answer_loss,
)
from datasel.ops.algos.lm_loading import clear_model_memo, load_causal_lm, model_fingerprint


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(tok, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


PAIRS = [
    ("Question: what is two plus two?\nAnswer:", " Four."),
    ("Translate to French: cat\n", " chat"),
    ("Name a colour.", " Blue is a colour."),
    ("Say hello.", " Hello there, friend!"),
    ("Capital of Italy?", " Rome"),
    ("Reverse 'abc'.", " cba"),
    ("Count to three.", " one two three"),
    ("What do bees make?", " Honey."),
    ("Opposite of hot?", " Cold"),
    ("Spell dog.", " d-o-g"),
]


def test_encode_pairs_spans_eos_and_truncation(tok):
    eos = tok.eos_token_id
    (ex, n_ctx), = encode_pairs([PAIRS[0]], tok)[0]
    ctx = tok(PAIRS[0][0])["input_ids"]
    ans = tok(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    assert ex == ctx + ans + [eos] and n_ctx == len(ctx)
    # ids in, an answer already ending with EOS keeps one EOS
    examples, skipped = encode_pairs([([5, 6], [7, eos]), ([5, 6, 7, 8], [9]), ([], [3])], tok, max_length=4)
    assert examples[0] == ([5, 6, 7, eos], 2)
    assert skipped == [1]  # the context fills max_length: no answer token left
    assert examples[1] == ([3, eos], 0)  # empty context: only EOS (position 1) is scored
    with pytest.raises(ValueError, match="mixes"):
        encode_pairs([("a", [1])], tok)


def test_collate_masks_context_and_padding(tok):
    examples = [([10, 11, 12, 13], 2), ([20, 21, 22], 1)]
    b = collate(examples, pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 12, 13], [-100, 21, 22, -100]]


def naive_loss(model, examples):
    """Σ over examples and answer positions of −log p(token | prefix), / count; batch 1, full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_ctx in examples:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(max(n_ctx, 1), len(ids)):
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total / count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_loss_matches_naive(tok, arch, monkeypatch):
    model = tiny_llama(tok) if arch == "llama" else tiny_gpt2(tok)
    examples, _ = encode_pairs(PAIRS[:4], tok)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        fast, n = batch_loss(model, batch)
        # the full-logits fallback (used for architectures with unusual heads) agrees
        monkeypatch.setattr(ft, "_PLAIN_HEAD_TYPES", frozenset())
        full, n2 = batch_loss(model, batch)
    assert n == n2 == sum(len(ids) - max(c, 1) for ids, c in examples)
    ref = naive_loss(model, examples)
    np.testing.assert_allclose(float(fast), ref, rtol=1e-5)
    np.testing.assert_allclose(float(full), ref, rtol=1e-5)


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "linear") == 0.0
    assert lr_factor(5, 100, 10, "linear") == 0.5
    assert lr_factor(10, 100, 10, "linear") == 1.0
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "linear") == 0.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(0, 10, 0, "linear") == 1.0


def test_default_target_modules():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32, vocab_size=50))
    assert sorted(n.rpartition(".")[2] for n in default_target_modules(llama)) == ["k_proj", "o_proj", "q_proj",
                                                                                     "v_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
    names = default_target_modules(gpt2)
    assert sorted(names) == sorted(f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj"))


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    counted = []
    paths = finetune(str(base_dir), PAIRS, out_dir=out, epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0,
                     progress=counted.append)
    return out, paths, counted


def test_lora_checkpoints_and_loss_decrease(lora_run, base_dir, tok):
    out, paths, counted = lora_run
    assert paths == [out / f"epoch-{i}" for i in range(3)]
    assert sum(counted) == 2 * len(PAIRS)
    for i, p in enumerate(paths):
        meta = json.loads((p / ft.CHECKPOINT_META).read_text())
        assert meta["epoch"] == i and meta["kind"] == "lora"
        assert (p / "adapter_model.safetensors").is_file()
    # LoRA optimizer state is kept with every trained checkpoint
    assert [(p / "optimizer.safetensors").exists() for p in paths] == [False, True, True]
    assert not list(out.glob(".*tmp*"))

    base, _ = load_causal_lm(base_dir, cache_dir=None, memo=False)
    m0 = load_checkpoint(paths[0])
    m2 = load_checkpoint(paths[2])
    ids = torch.tensor([tok("Name a colour. Blue")["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(m0(ids).logits.numpy(), base(ids).logits.numpy(), rtol=1e-6, atol=1e-6)
    before = mean_answer_loss(base, tok, PAIRS)
    mid = mean_answer_loss(load_checkpoint(paths[1]), tok, PAIRS)
    after = mean_answer_loss(m2, tok, PAIRS)
    # (a random tiny model with rank-8 attention adapters moves slowly: ~0.4 nats in 6 steps)
    assert after < mid < before - 0.1 and after < before - 0.2, (before, mid, after)
    meta2 = json.loads((paths[2] / ft.CHECKPOINT_META).read_text())
    assert meta2["train_loss"] < before
    # unmerged adapter gives the same outputs as the merged model
    pm = load_checkpoint(paths[2], merge=False)
    with torch.no_grad():
        np.testing.assert_allclose(pm(input_ids=ids).logits.numpy(), m2(ids).logits.numpy(), rtol=1e-4, atol=1e-5)
    # load_causal_lm understands a checkpoint folder, and fingerprints tell epochs apart
    m2b, tok2 = load_causal_lm(paths[2], cache_dir=None, memo=False)
    with torch.no_grad():
        np.testing.assert_allclose(m2b(ids).logits.numpy(), m2(ids).logits.numpy(), rtol=1e-6, atol=1e-6)
    assert tok2.eos_token_id == tok.eos_token_id
    assert len({model_fingerprint(p) for p in paths}) == 3


def test_resume_skips_finished_epochs_and_matches(lora_run, base_dir, tmp_path):
    out, paths, _ = lora_run
    # all finished: nothing is trained again
    counted = []
    assert finetune(str(base_dir), PAIRS, out_dir=out, epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0,
                    progress=counted.append) == paths
    assert counted == []
    # a run killed during epoch 2, resumed with the same arguments
    stopped = tmp_path / "stopped"
    counted = []
    _interrupt_after_epoch(base_dir, stopped, stop_epoch=1)
    assert (stopped / "epoch-1" / "optimizer.safetensors").is_file()
    assert not (stopped / "epoch-2").exists() and not list(stopped.glob(".*tmp*"))
    mtime1 = (stopped / "epoch-1" / ft.CHECKPOINT_META).stat().st_mtime_ns
    finetune(str(base_dir), PAIRS, out_dir=stopped, epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0,
             progress=counted.append)
    assert sum(counted) == len(PAIRS)  # only epoch 2 was trained
    assert (stopped / "epoch-1" / ft.CHECKPOINT_META).stat().st_mtime_ns == mtime1
    _assert_same_adapter(out / "epoch-2", stopped / "epoch-2")
    # a finished run whose last checkpoint was deleted
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(partial / "epoch-2")
    counted = []
    finetune(str(base_dir), PAIRS, out_dir=partial, epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0,
             progress=counted.append)
    assert sum(counted) == len(PAIRS)
    _assert_same_adapter(out / "epoch-2", partial / "epoch-2")


def _assert_same_adapter(x, y):
    from safetensors.torch import load_file

    a = load_file(str(x / "adapter_model.safetensors"))
    b = load_file(str(y / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def _interrupt_after_epoch(base_dir, out, stop_epoch):
    """Run finetune and kill it (an exception from the progress callback) in the epoch after ``stop_epoch``."""
    seen = []

    def progress(k):
        seen.append(k)
        if sum(seen) > stop_epoch * len(PAIRS):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(str(base_dir), PAIRS, out_dir=out, epochs=2, lr=1e-2, batch_size=4, warmup_ratio=0.0,
                 progress=progress)


def test_other_arguments_in_same_out_dir_is_an_error(lora_run, base_dir):
    out, _, _ = lora_run
    with pytest.raises(ValueError, match="different training run"):
        finetune(str(base_dir), PAIRS, out_dir=out, epochs=2, lr=5e-3, batch_size=4, warmup_ratio=0.0)


def test_full_finetune(base_dir, tok, tmp_path):
    paths = finetune(str(base_dir), PAIRS, out_dir=tmp_path, epochs=2, lora=False, lr=3e-3, batch_size=5,
                     schedule="cosine", warmup_ratio=0.1)
    assert [p.name for p in paths] == ["epoch-0", "epoch-1", "epoch-2"]
    assert (paths[1] / "model.safetensors").is_file()
    # full-model optimizer state is kept only with the latest checkpoint
    assert [(p / "optimizer.safetensors").exists() for p in paths] == [False, False, True]
    base, _ = load_causal_lm(base_dir, cache_dir=None, memo=False)
    m0, m2 = load_checkpoint(paths[0]), load_checkpoint(paths[2])
    ids = torch.tensor([tok("Say hello. Hello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(m0(ids).logits, base(ids).logits)
    assert mean_answer_loss(m2, tok, PAIRS) < mean_answer_loss(base, tok, PAIRS) - 0.5
    # the latest checkpoint deleted: epoch-1 has no optimizer state, so epochs 1-2 are recomputed
    with torch.no_grad():
        ref = m2(ids).logits.clone()
    shutil.rmtree(paths[2])
    with pytest.warns(UserWarning, match="no optimizer state"):
        finetune(str(base_dir), PAIRS, out_dir=tmp_path, epochs=2, lora=False, lr=3e-3, batch_size=5,
                 schedule="cosine", warmup_ratio=0.1)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(paths[2])(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_given_model_is_left_unchanged(tok, tmp_path):
    model = tiny_gpt2(tok)
    ids = torch.tensor([tok("Spell dog. d-o-g")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    names_before = [n for n, _ in model.named_modules()]
    paths = finetune((model, tok), PAIRS[:4], out_dir=tmp_path, epochs=1, lr=1e-2, batch_size=2)
    assert [n for n, _ in model.named_modules()] == names_before  # LoRA layers removed again
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
        # the LoRA checkpoint applied to the same (given) base moves the outputs
        import copy

        tuned = load_checkpoint(paths[1], lambda spec: copy.deepcopy(model))
        assert not torch.allclose(tuned(ids).logits, before)


def test_load_checkpoint_never_mutates_memoised_base(base_dir, lora_run, tok):
    _, paths, _ = lora_run
    clear_model_memo()
    try:
        shared, _ = load_causal_lm(base_dir, cache_dir=None)
        ids = torch.tensor([tok("Capital of Italy? Rome")["input_ids"]])
        with torch.no_grad():
            before = shared(ids).logits.clone()
        load_checkpoint(paths[2], lambda spec: load_causal_lm(spec, cache_dir=None))
        with torch.no_grad():
            torch.testing.assert_close(shared(ids).logits, before)
    finally:
        clear_model_memo()


def test_all_pairs_too_long_is_an_error(base_dir, tmp_path):
    with pytest.raises(ValueError, match="no pair"), pytest.warns(UserWarning, match="skipped"):
        finetune(str(base_dir), [("a b c d e f g h", "x")], out_dir=tmp_path, max_length=3)


def test_lora_base_dtype_is_honoured_and_part_of_the_run(tmp_path, base_dir, tok, monkeypatch):
    """A LoRA run on a spec loads its frozen base in the requested dtype, and that dtype is in the run's hash."""
    from datasel.ops.algos import finetune as F

    seen = []
    real = F.load_causal_lm

    def spy(spec, **kw):
        seen.append(kw.get("dtype"))
        return real(spec, **kw)

    monkeypatch.setattr(F, "load_causal_lm", spy)
    pairs = [("Say hi.", "Hi!"), ("Count to two.", "1 2")]
    a = F.finetune(str(base_dir), pairs, out_dir=tmp_path / "a", epochs=1, batch_size=2, device="cpu",
                   dtype="bfloat16")
    assert seen and seen[-1] == torch.bfloat16
    b = F.finetune(str(base_dir), pairs, out_dir=tmp_path / "b", epochs=1, batch_size=2, device="cpu",
                   dtype="float32")
    assert seen[-1] == torch.float32
    meta = [json.loads((p[-1] / F.CHECKPOINT_META).read_text(encoding="utf-8")) for p in (a, b)]
    assert meta[0]["run_hash"] != meta[1]["run_hash"]
    assert meta[0]["config"]["dtype"] == "torch.bfloat16" and meta[1]["config"]["dtype"] == "torch.float32"

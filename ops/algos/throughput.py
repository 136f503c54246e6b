"""How fast a model runs on this machine: a one-off micro-benchmark, kept in the model store.

``datasel compile --pool`` turns token counts into rough times with these
rates.  Each is measured once per (model fingerprint, device, dtype, torch
threads) on a few short batches of random token ids, takes a few seconds,
and is stored as JSON next to the shared models, so later estimates cost
nothing.  The numbers are rough by design: real batches differ in length
and padding, and a busy machine is slower.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

FORMAT = 1
BATCH, LENGTH, DECODE_STEPS = 4, 128, 8


def _store(key: str) -> Path:
    from datasel.ops.algos.lm_loading import model_store_dir

    name = hashlib.blake2b(key.encode("utf-8"), digest_size=12).hexdigest()
    return model_store_dir() / "throughput" / f"{name}.json"


def _read(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if data.get("format") == FORMAT and data.get("key") == key else None


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only store: measure again next time


def _rate_key(model_key: str, device: str, kind: str) -> str:
    import torch

    return f"{kind}|{model_key}|{device}|threads={torch.get_num_threads()}"


def _fastest(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls (another process on the CPU only slows calls down)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def lm_rates(model_key: str, load, device: str, *, remeasure: bool = False) -> dict[str, float]:
    """Tokens per second of a causal LM: ``forward``, ``train`` (forward + backward), and batched
    ``decode_steps`` per second (generation of ``decode_batch`` rows at once).

    The forward pass is timed without the output layer over every position, as
    datasel's scorer sends only answer positions through it.  ``load()`` returns
    ``(model, tokenizer)``; it is called only when no rate is stored yet.
    """
    key = _rate_key(model_key, device, "causal_lm")
    path = _store(key)
    cached = None if remeasure else _read(path, key)
    if cached is not None:
        return cached["rates"]
    import torch

    model, tokenizer = load()
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen).to(next(model.parameters()).device)
    body = model.base_model
    with torch.inference_mode():
        body(input_ids=ids)  # warm-up at the measured shape
        forward = BATCH * LENGTH / _fastest(lambda: body(input_ids=ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def decode():
            model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=DECODE_STEPS,
                           min_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=pad)

        decode()
        decode_steps = DECODE_STEPS / _fastest(decode)
    # Training: activation gradients through the frozen model, as LoRA's backward needs.
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def train():
        with torch.enable_grad():
            body(inputs_embeds=embeds).last_hidden_state.float().square().mean().backward()

    train()
    rates = {"forward": forward, "train": BATCH * LENGTH / _fastest(train), "decode_steps": decode_steps,
             "decode_batch": BATCH}
    _write(path, {"format": FORMAT, "key": key, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "rates": rates})
    return rates


def encoder_rates(model_key: str, load, device: str, *, remeasure: bool = False) -> dict[str, float]:
    """Texts per second of a sentence encoder on 64 texts of about 40 words (``encode``)."""
    key = _rate_key(model_key, device, "encoder")
    path = _store(key)
    cached = None if remeasure else _read(path, key)
    if cached is not None:
        return cached["rates"]
    model = load()
    texts = [" ".join(f"word{i}{j}" for j in range(40)) for i in range(64)]
    model.encode(texts[:16], batch_size=16, show_progress_bar=False)
    seconds = _fastest(lambda: model.encode(texts, batch_size=16, show_progress_bar=False))
    rates = {"texts": len(texts) / seconds, "words_per_text": 40}
    _write(path, {"format": FORMAT, "key": key, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "rates": rates})
    return rates


def describe(rates: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in rates.items())

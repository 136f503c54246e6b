"""A small supervised fine-tuner (answer-only loss) with per-epoch checkpoints.

Used where a method trains a model and then scores data with it: CherryLLM's
pre-experienced model (Li et al., NAACL 2024; tianyi-lab/Cherry_LLM @ 01fac8d),
Small2Large's per-epoch checkpoints (Mekala et al., Findings of ACL 2024;
dheeraj7596/Small2Large @ 9f4867e), DiverseEvol's rounds (Wu et al., arXiv
2311.08182; OFA-Sys/DiverseEvol @ a22e952).

Conventions (those of the answer-only scorer, :mod:`datasel.ops.algos.seqscore`):

* **Examples.** Each pair is (context, answer), given as strings or token ids.
  Strings are tokenized separately and concatenated (exact spans): the
  context with the tokenizer's special tokens (its BOS, if any), the answer
  without.  EOS is appended to the answer unless it already ends with it.  The
  concatenation is cut on the right at ``max_length`` (the context is kept, the
  answer shortened); a pair left with no answer token is skipped, counted in
  each checkpoint's metadata and warned about.
* **Loss.** Cross-entropy on answer tokens + EOS only (context labels −100),
  reduced as the **token mean over the batch** (Σ CE over the batch's answer
  tokens / their count) — the reduction of ``transformers``' causal-LM loss
  and hence of the Alpaca-style trainers the references use.  Long answers
  therefore weigh more than short ones, as in those references.
* **Optimiser.** AdamW (betas 0.9/0.999, eps 1e-8, ``weight_decay`` 0 by
  default as in the references), learning rate with linear warmup over
  ``ceil(warmup_ratio · total_steps)`` steps then linear or cosine decay to 0
  (the formulas of ``transformers``' schedulers).  fp32 master weights; on
  CUDA the forward runs under bf16 autocast (a LoRA base model stays in its
  loaded dtype, bf16 by default on CUDA, and is frozen).
* **Determinism.** Epoch e shuffles with a generator seeded from (seed, e),
  and the global torch RNG (dropout, LoRA init) is re-seeded from (seed, e)
  inside a forked RNG state, so callers' RNG streams are untouched.

Checkpoints: ``out_dir/epoch-0`` is the starting point (for LoRA: the freshly
initialised adapter, whose B = 0 makes it equal to the base model), then
``out_dir/epoch-<i>`` after each epoch.  A LoRA checkpoint holds the adapter
(peft ``save_pretrained``), a full one the whole model; both hold the tokenizer
and ``datasel_checkpoint.json`` (base model, training configuration and its
hash, epoch, step, mean training loss).  Each is written to a temporary folder
and renamed into place, so a folder that exists is complete.

Resume: checkpoints after epoch 0 also hold the optimiser state
(``optimizer.safetensors``; no pickle).  Rerunning ``finetune`` with the same
arguments on the same ``out_dir`` skips finished epochs and continues from the
latest one with its weights, AdamW moments, step count (hence learning rate)
and per-epoch seeds, so an interrupted run ends where an uninterrupted one
does on the same device (up to non-deterministic kernels).  Full fine-tuning
keeps the optimiser state only in the latest checkpoint (it is twice the
model); if that checkpoint is deleted, training steps back to the latest one
that has it and recomputes the later epochs.  A different configuration, data
or base model in the same ``out_dir`` is an error.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from datasel.ops.algos.lm_loading import (
    _CHECKPOINT_META,
    _dtype_kwarg,
    _fsync_tree,
    _resolve_lm_source,
    hub_offline,
    load_causal_lm,
    memoised_models,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "finetune",
    "load_checkpoint",
    "default_target_modules",
    "encode_pairs",
    "collate",
    "batch_loss",
    "mean_answer_loss",
    "lr_factor",
    "CHECKPOINT_META",
]

CHECKPOINT_META = _CHECKPOINT_META
_OPTIMIZER_FILE = "optimizer.safetensors"
_FORMAT = 1

# Architectures whose causal-LM head is exactly `lm_head(decoder(x).last_hidden_state)`:
# for them the loss projects only answer positions through the output layer.
# Others (logit soft-capping, logit scaling, ...) take the full forward.
_PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2",
    "smollm3", "starcoder2",
})

_ATTN_PROJ_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                               "Wqkv"})
# Leaves that are the attention output projection only when they sit inside an attention block
# (GPT-2's `c_proj` also names an MLP layer).
_ATTN_OUT_LEAVES = frozenset({"c_proj", "out_proj", "dense"})


# ---------------------------------------------------------------------------
# data


def encode_pairs(pairs, tokenizer, *, max_length: int = 512, add_special_tokens: bool = True):
    """Turn (context, answer) pairs into ``(input_ids, n_context)`` examples.

    See the module docstring for tokenization, EOS and truncation.  Returns
    ``(examples, skipped)`` where ``skipped`` lists the indices of pairs that
    keep no answer token after truncation (they are not in ``examples``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("finetune: the tokenizer has no EOS token")
    examples: list[tuple[list[int], int]] = []
    skipped: list[int] = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"finetune: pair {i} is not (context, answer)")
        ctx, ans = pair
        if isinstance(ctx, str) != isinstance(ans, str):
            raise ValueError(f"finetune: pair {i} mixes text and token ids")
        if isinstance(ctx, str):
            ctx_ids = list(tokenizer(ctx, add_special_tokens=add_special_tokens)["input_ids"]) if ctx else []
            ans_ids = list(tokenizer(ans, add_special_tokens=False)["input_ids"])
        else:
            ctx_ids, ans_ids = [int(t) for t in ctx], [int(t) for t in ans]
        if not ans_ids or ans_ids[-1] != eos:
            ans_ids.append(eos)
        ids = (ctx_ids + ans_ids)[:max_length]
        # Position 0 is never predicted, so a scored token needs index ≥ 1.
        if len(ids) <= max(len(ctx_ids), 1):
            skipped.append(i)
            continue
        examples.append((ids, len(ctx_ids)))
    return examples, skipped


def collate(examples, pad_id: int):
    """Right-pad examples into ``{input_ids, attention_mask, labels}`` (labels −100 off-answer)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for r, (ids, n_ctx) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, : len(ids)] = t
        mask[r, : len(ids)] = 1
        labels[r, n_ctx: len(ids)] = t[n_ctx:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _split_head(model):
    """(decoder, lm_head) when the loss may project only answer positions, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def answer_logits(model, input_ids, mask, sel):
    """Logits at the positions ``sel`` (B, T-1) that predict answer tokens, only those through the output layer
    for plain-head architectures."""
    split = _split_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return head(hidden[:, :-1][sel])
    return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1][sel]


def batch_loss(model, batch, *, autocast: bool | None = None):
    """Answer-only CE of one collated batch: ``(token-mean loss, number of answer tokens)``.

    Position t predicts token t+1; only positions whose target label is not −100
    are projected through the output layer (for plain-head architectures) and
    the CE is computed in fp32.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    targets = batch["labels"].to(device)[:, 1:]
    sel = targets != -100
    n = int(sel.sum())
    if autocast is None:
        autocast = device.type == "cuda"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = answer_logits(model, input_ids, mask, sel)
    if n == 0:
        return logits.float().sum() * 0.0, 0
    loss = F.cross_entropy(logits.float(), targets[sel], reduction="sum") / n
    return loss, n


def mean_answer_loss(model, tokenizer, pairs, *, batch_size: int = 8, max_length: int = 512) -> float:
    """Token-mean answer-only CE of ``model`` over ``pairs`` (no gradient), as trained on."""
    import torch

    examples, _ = encode_pairs(pairs, tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(examples), batch_size):
            loss, n = batch_loss(model, collate(examples[s:s + batch_size], pad))
            total += float(loss) * n
            count += n
    return total / count if count else float("nan")


# ---------------------------------------------------------------------------
# schedule, targets


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warmup from 0, then linear or (half-period) cosine decay to 0 at
    ``total_steps`` — the formulas of ``transformers``' linear/cosine schedules.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use linear, cosine or constant")


def _is_linear(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def default_target_modules(model) -> list[str]:
    """Full names of the attention q/k/v/o projections, found by name.

    Llama-style ``q_proj k_proj v_proj o_proj``, fused ``qkv_proj`` /
    ``query_key_value`` / ``Wqkv``, GPT-2 ``c_attn`` plus the ``c_proj`` inside
    ``attn`` (its MLP ``c_proj`` is left alone), ``out_proj``/``dense`` inside an
    attention block.
    """
    names = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module):
            continue
        parent, _, leaf = name.rpartition(".")
        parent_leaf = parent.rpartition(".")[2].lower()
        if leaf in _ATTN_PROJ_LEAVES or (leaf in _ATTN_OUT_LEAVES and ("attn" in parent_leaf or "attention" in parent_leaf)):
            names.append(name)
    if not names:
        raise ValueError(
            "finetune: found no attention projections by name in this model; pass target_modules=[...]"
        )
    return names


# ---------------------------------------------------------------------------
# identity, checkpoints


def _check_targets(targets: list[str], modules: dict) -> None:
    """Every target names at least one linear layer (peft matches a name as a suffix of module paths)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _is_linear(m)})
    for t in targets:
        if not any((n == t or n.endswith("." + t)) and _is_linear(m) for n, m in modules.items()):
            raise ValueError(f"LoRA target {t!r} matches no linear layer of this model; its linear layers are "
                             f"named {', '.join(leaves)}")


def _nothing_to_restore() -> None:
    pass


@contextlib.contextmanager
def _peft_quietly():
    """peft (0.21) calls a transformers method that warns about its own deprecation; the
    warning is about peft's code, not the user's, so it is hidden while peft wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _data_hash(examples) -> str:
    h = hashlib.sha256(b"sft-examples-v1\0")
    for ids, n_ctx in examples:
        h.update(f"{n_ctx}:{len(ids)}:".encode())
        h.update(",".join(map(str, ids)).encode())
        h.update(b";")
    return h.hexdigest()


def _object_fingerprint(model) -> str:
    """Identity of an in-memory model: its config, parameter shapes and sampled values.

    About 4k evenly strided values per tensor are hashed: training moves every
    trainable weight, and reading all of an 8B model would cost seconds.
    """
    import torch

    h = hashlib.sha256(b"object-v1\0")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64).numpy()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode() + sample.tobytes())
    return h.hexdigest()


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return None


def _optimizer_tensors(optimizer, names: list[str]) -> dict:
    import torch

    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{names[idx]}::{key}"] = t.detach().to("cpu").contiguous().clone()
    return out


def _load_optimizer(optimizer, names: list[str], path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    index = {n: i for i, n in enumerate(names)}
    for full, t in tensors.items():
        name, _, key = full.rpartition("::")
        if name not in index:
            raise ValueError(f"finetune resume: optimizer state names an unknown parameter {name!r}")
        state.setdefault(index[name], {})[key] = t
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def _save_checkpoint(final: Path, *, model, lora: bool, tokenizer, meta: dict, opt_tensors: dict | None) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with hub_offline():
            if lora:
                model.save_pretrained(str(tmp))
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        if opt_tensors is not None:
            save_file(opt_tensors, str(tmp / _OPTIMIZER_FILE))
        # Metadata last: a folder is trusted only with it (and only after the rename).
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():  # a leftover without metadata (never produced by a rename of ours)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------
# training


def finetune(
    model,
    pairs: Sequence[tuple[Any, Any]],
    *,
    out_dir: str | os.PathLike,
    epochs: int = 1,
    lr: float | None = None,
    lora: bool = True,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    warmup_ratio: float = 0.03,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
    device: Any = None,
    dtype: Any = None,
    progress: Callable[[int], object] | None = None,
) -> list[Path]:
    """Fine-tune on (context, answer) pairs with the answer-only loss; return the checkpoint folders.

    ``model``: a spec for :func:`~datasel.ops.algos.lm_loading.load_causal_lm`
    (``"smollm"``, a folder, an offline hub id; loaded privately, never the
    memoised instance) or a ``(model, tokenizer)`` pair.  A passed model is not
    changed: LoRA layers are injected for the run and removed afterwards
    (``requires_grad`` and train/eval mode restored; it trains on the device it
    is on); full fine-tuning trains a copy in fp32 on ``device`` (default: the
    model's device).  A ``load_causal_lm`` memo instance passed for LoRA carries
    the adapter while training runs, so do not share it with another thread then.

    ``lr`` defaults to 2e-4 with LoRA and 2e-5 for full fine-tuning.
    ``target_modules`` defaults to :func:`default_target_modules`.  ``schedule``
    is ``"linear"``, ``"cosine"`` or ``"constant"`` (after warmup).
    ``progress(k)`` is called with the number of examples of each finished step
    (``tqdm.update`` fits).  ``cache_dir`` is where ``"smollm"`` is materialised.
    ``dtype`` is the frozen base model's dtype for a LoRA run on a spec
    (default: bf16 on CUDA, fp32 elsewhere); full fine-tuning always trains fp32.

    Returns ``[out_dir/epoch-0, ..., out_dir/epoch-<epochs>]``; load one with
    :func:`load_checkpoint` (or ``load_causal_lm(folder)``).  See the module
    docstring for the loss, the schedule, determinism and resume.  One run per
    ``out_dir`` at a time (a file lock): a concurrent call with the same
    arguments waits and then returns the finished checkpoints.  When every
    checkpoint is already there, they are returned without writing anything (no
    lock file), so a finished run on a read-only cache is usable.
    """
    if epochs < 0 or batch_size < 1 or max_length < 2:
        raise ValueError("finetune: need epochs ≥ 0, batch_size ≥ 1, max_length ≥ 2")
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use linear, cosine or constant")
    if lr is None:
        lr = 2e-4 if lora else 2e-5
    out = Path(out_dir)
    dev = resolve_device(device)

    # -- identity of the base model and tokenizer (without loading weights when a spec)
    given = not isinstance(model, (str, os.PathLike))
    if given:
        base_model, tokenizer = model
        if device is None or lora:  # a given model trains where it lives (LoRA never moves it)
            dev = next(base_model.parameters()).device
        base_spec = str(getattr(base_model.config, "_name_or_path", "") or getattr(base_model, "name_or_path", ""))
        base_fp = _object_fingerprint(base_model)
    else:
        base_spec = os.fspath(model)
        base_fp = model_fingerprint(base_spec)
        tokenizer = _load_tokenizer(base_spec, cache_dir)

    examples, skipped = encode_pairs(pairs, tokenizer, max_length=max_length)
    if skipped:
        warnings.warn(f"finetune: {len(skipped)} of {len(pairs)} pairs keep no answer token within "
                      f"max_length={max_length} and are skipped", stacklevel=2)
    if not examples:
        raise ValueError("finetune: no pair has an answer token to train on")

    config = _run_config(base_fp, examples, epochs=epochs, lr=lr, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, target_modules=target_modules, batch_size=batch_size,
                         max_length=max_length, seed=seed, warmup_ratio=warmup_ratio, schedule=schedule,
                         weight_decay=weight_decay, dtype=dtype, dev=dev, given=given)
    finished = _finished(out, _hash_json(config), epochs)
    if finished is not None:  # all done: read-only from here on
        return finished

    # One run per out_dir at a time: a second process (sharing a cache) waits,
    # then finds the epochs done and returns them.
    from filelock import FileLock

    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".finetune.lock")):
        # Temporary folders left by a killed run (ours are only ever renamed into place).
        for stale in out.glob(".epoch-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return _finetune_locked(
            given, base_model if given else None, tokenizer, base_spec, base_fp, examples, skipped,
            out=out, dev=dev, epochs=epochs, lr=lr, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, target_modules=target_modules, batch_size=batch_size,
            max_length=max_length, seed=seed, warmup_ratio=warmup_ratio, schedule=schedule,
            weight_decay=weight_decay, cache_dir=cache_dir, dtype=dtype, progress=progress,
        )


def _run_config(base_fp, examples, *, epochs, lr, lora, lora_r, lora_alpha, lora_dropout, target_modules,
                batch_size, max_length, seed, warmup_ratio, schedule, weight_decay, dtype, dev, given) -> dict:
    """Everything that makes a training run what it is; its hash names the run in each checkpoint."""
    return {
        "format": _FORMAT, "base_fingerprint": base_fp, "data": _data_hash(examples),
        "n_examples": len(examples), "epochs": epochs, "lr": lr, "lora": lora, "lora_r": lora_r,
        "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "target_modules": sorted(target_modules) if target_modules is not None else "auto",
        "batch_size": batch_size, "max_length": max_length, "seed": seed, "warmup_ratio": warmup_ratio,
        "schedule": schedule, "weight_decay": weight_decay,
        # the base model's dtype for a LoRA run on a model loaded here (full fine-tuning is fp32)
        "dtype": str(resolve_dtype(dtype, dev)) if lora and not given else None,
    }


def _finished(out: Path, run_hash: str, epochs: int) -> list[Path] | None:
    """The checkpoint folders when every epoch of this run is done in ``out`` (and nothing else is), else None."""
    paths = [out / f"epoch-{i}" for i in range(epochs + 1)]
    metas = [_read_meta(p) for p in paths]
    if any(m is None or m.get("run_hash") != run_hash for m in metas):
        return None
    others = (_read_meta(p) for p in out.glob("epoch-*") if p not in paths)
    if any(m is not None and m.get("run_hash") != run_hash for m in others):
        return None  # another run's checkpoints: the locked path reports it
    return paths


def _finetune_locked(given, base_model, tokenizer, base_spec, base_fp, examples, skipped, *, out, dev,
                     epochs, lr, lora, lora_r, lora_alpha, lora_dropout, target_modules, batch_size, max_length,
                     seed, warmup_ratio, schedule, weight_decay, cache_dir, dtype, progress) -> list[Path]:
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = _run_config(base_fp, examples, epochs=epochs, lr=lr, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, target_modules=target_modules, batch_size=batch_size,
                         max_length=max_length, seed=seed, warmup_ratio=warmup_ratio, schedule=schedule,
                         weight_decay=weight_decay, dtype=dtype, dev=dev, given=given)
    run_hash = _hash_json(config)
    paths = [out / f"epoch-{i}" for i in range(epochs + 1)]

    # -- what is already done
    for p in sorted(out.glob("epoch-*")):
        meta = _read_meta(p)
        if meta is not None and meta.get("run_hash") != run_hash:
            raise ValueError(
                f"finetune: {out} holds checkpoints of a different training run ({p.name} has other "
                "arguments, data or base model); use a fresh out_dir"
            )
    done = -1
    while done < epochs and _read_meta(paths[done + 1]) is not None:
        done += 1
    if done == epochs:
        return paths
    # Resuming needs the optimizer state saved with a checkpoint; full fine-tuning
    # keeps it only in the latest one, so if that one was deleted, step back to
    # the latest checkpoint that has it and recompute (identically) from there.
    resume = done
    while resume > 0 and not (paths[resume] / _OPTIMIZER_FILE).is_file():
        resume -= 1
    if resume < done:
        warnings.warn(f"finetune: {paths[done].name} has no optimizer state; resuming from "
                      f"{paths[resume].name} and recomputing the epochs after it", stacklevel=3)
        done = resume

    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    base_meta = {
        "format": _FORMAT, "kind": "lora" if lora else "full", "epochs": epochs, "run_hash": run_hash,
        "base_model": base_spec, "base_fingerprint": base_fp,
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir is not None else None,
        "config": config, "n_skipped": len(skipped), "steps_per_epoch": steps_per_epoch,
    }

    # -- the model to train
    restore: Callable[[], None] = _nothing_to_restore
    if not given:
        dt = resolve_dtype(dtype, dev) if lora else torch.float32
        base_model, _ = load_causal_lm(base_spec, dtype=dt, device=dev, cache_dir=cache_dir, memo=False)
        base_model.to(dev)
    elif not lora:
        base_model = copy.deepcopy(base_model).to(device=dev, dtype=torch.float32)
    else:
        flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
        was_training = base_model.training

        def restore_flags(m=base_model, flags=flags, was_training=was_training):
            for n, p in m.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            m.train(was_training)

        restore = restore_flags

    cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    peft_model = None
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(_epoch_seed(seed, 0))
            if lora:
                from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

                targets = list(target_modules) if target_modules is not None else default_target_modules(base_model)
                modules = dict(base_model.named_modules())
                _check_targets(targets, modules)
                # GPT-2's Conv1D stores weights transposed; peft must be told (it warns otherwise).
                conv1d = any(type(modules.get(t)).__name__ == "Conv1D" for t in targets)
                lcfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                  target_modules=targets, bias="none", task_type="CAUSAL_LM",
                                  fan_in_fan_out=conv1d)
                with _peft_quietly():
                    peft_model = get_peft_model(base_model, lcfg)
                train_model = peft_model
            else:
                train_model = base_model
                for p in train_model.parameters():
                    p.requires_grad_(True)

            named = [(n, p) for n, p in train_model.named_parameters() if p.requires_grad]
            names = [n for n, _ in named]
            optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=weight_decay)
            step = 0
            if done >= 0:  # resume from the latest finished checkpoint
                ck = paths[done]
                meta = _read_meta(ck)
                step = int(meta["global_step"])
                if lora:
                    from safetensors.torch import load_file

                    set_peft_model_state_dict(train_model, load_file(str(ck / "adapter_model.safetensors")))
                else:
                    _load_full_weights(train_model, ck)
                if done > 0:
                    _load_optimizer(optimizer, names, ck / _OPTIMIZER_FILE)
            else:
                _save_checkpoint(paths[0], model=train_model, lora=lora, tokenizer=tokenizer,
                                 meta={**base_meta, "epoch": 0, "global_step": 0, "train_loss": None},
                                 opt_tensors=None)
                done = 0

            train_model.train()
            for epoch in range(done + 1, epochs + 1):
                torch.manual_seed(_epoch_seed(seed, epoch))
                gen = torch.Generator().manual_seed(_epoch_seed(seed, -epoch))
                order = torch.randperm(len(examples), generator=gen).tolist()
                loss_sum, tok_sum = 0.0, 0
                for s in range(0, len(order), batch_size):
                    batch = collate([examples[i] for i in order[s:s + batch_size]], pad_id)
                    for g in optimizer.param_groups:
                        g["lr"] = lr * lr_factor(step, total_steps, warmup_steps, schedule)
                    loss, n = batch_loss(train_model, batch)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    loss_sum += float(loss.detach()) * n
                    tok_sum += n
                    if progress is not None:
                        progress(len(batch["input_ids"]))
                meta = {**base_meta, "epoch": epoch, "global_step": step,
                        "train_loss": loss_sum / tok_sum if tok_sum else None}
                _save_checkpoint(paths[epoch], model=train_model, lora=lora, tokenizer=tokenizer, meta=meta,
                                 opt_tensors=_optimizer_tensors(optimizer, names))
                stale = paths[epoch - 1] / _OPTIMIZER_FILE
                if not lora and stale.exists():
                    # Full-model AdamW state is twice the model; only the latest is
                    # needed to resume.  LoRA states are small and all kept.
                    stale.unlink()
    finally:
        if given and lora:
            if peft_model is not None:
                peft_model.unload()  # removes the injected LoRA layers, restoring the caller's modules
            restore()
    return paths


def _load_tokenizer(spec: str, cache_dir):
    from transformers import AutoTokenizer

    source, _ = _resolve_lm_source(spec, cache_dir)
    with hub_offline():
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_full_weights(model, folder: Path) -> None:
    from transformers import AutoModelForCausalLM
    import torch

    with hub_offline():
        saved = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                     **_dtype_kwarg(torch.float32))
    model.load_state_dict(saved.state_dict(), strict=True)


def load_checkpoint(path: str | os.PathLike, base_loader: Callable[[str], Any] | None = None, *,
                    dtype: Any = None, device: Any = None, merge: bool = True):
    """A usable model (``eval()`` mode) from a folder written by :func:`finetune`.

    Full checkpoints load directly.  LoRA checkpoints need the base model:
    ``base_loader(base_spec)`` must return a *fresh* model (or ``(model,
    tokenizer)``) that this function may modify — a model held by the
    ``load_causal_lm`` memo is copied first; default: ``load_causal_lm(base,
    memo=False)`` with the checkpoint's recorded ``cache_dir``.  With
    ``merge=True`` (default) the adapter is merged and a plain ``transformers``
    model is returned, so scoring runs the same code as for any other model;
    ``merge=False`` returns the ``PeftModel``.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    meta = _read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is not a finished datasel checkpoint (no {CHECKPOINT_META})")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if meta["kind"] == "full":
        with hub_offline():
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                         **_dtype_kwarg(dt))
        return model.to(dev).eval()

    from peft import PeftModel

    if base_loader is None:
        def base_loader(spec):
            return load_causal_lm(spec, dtype=dt, device=dev, cache_dir=meta.get("cache_dir"), memo=False)

    if not (folder / "adapter_model.safetensors").is_file():  # datasel writes safetensors; never unpickle
        raise ValueError(f"{folder} has no adapter_model.safetensors (a LoRA checkpoint datasel wrote has one)")
    base = base_loader(meta["base_model"])
    if isinstance(base, tuple):
        base = base[0]
    if any(base is m for m in memoised_models()):
        base = copy.deepcopy(base)  # never inject adapters into a shared instance
    with hub_offline(), _peft_quietly():
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    return model.eval()

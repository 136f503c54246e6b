"""Hugging Face ``Trainer`` LoRA checkpoints as a datasel fine-tuning run.

LESS (princeton-nlp/LESS @ 8abf962) trains its warmup with ``transformers``' ``Trainer`` and reads
each ``checkpoint-<step>/`` folder's ``optimizer.pt`` for the Adam moments.  That file keys the
optimiser state by *position* (``state[0]``, ``state[1]``, …), while LESS's
``collect_grad_reps.prepare_optimizer_state`` looks it up by parameter name: the ``KeyError:
'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'`` of LESS issues 4, 10
and 44.  Positions follow the optimiser's parameter groups: ``Trainer.create_optimizer`` puts the
trainable parameters that get weight decay first and the rest (biases, norms) second, each group in
``model.named_parameters()`` order.  :func:`name_optimizer_state` rebuilds that order from the
adapter's own PeftModel, checks every moment's shape against its parameter, and says what it
matched.

:func:`convert` writes each checkpoint in datasel's format (``epoch-<i>/``: the adapter as
safetensors, the moments in ``optimizer.safetensors`` keyed by name, ``datasel_checkpoint.json``
with the checkpoint's mean learning rate), so ``grad`` and ``influence`` read it exactly as they
read a run of datasel's own ``finetune``.  ``optimizer.pt`` and ``adapter_model.bin`` are Python
pickles: they are read only when the caller allows it, and then with ``torch.load(...,
weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# transformers' Trainer.get_decay_parameter_names: no weight decay for biases and norm layers.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)


def find_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(global step, folder)]`` of a Trainer output folder's ``checkpoint-<step>/`` folders, by step.

    A folder that is itself one checkpoint (it holds ``adapter_config.json``) is a series of one.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"checkpoints: {root} is not a folder")
    found = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name)))
    if not found and (root / "adapter_config.json").is_file():
        state = _trainer_state(root)
        found = [(int(state.get("global_step", 0)) if state else 0, root)]
    if not found:
        raise ValueError(f"checkpoints: {root} has no checkpoint-<step>/ folders (a Trainer output_dir) and is not "
                         f"a LoRA checkpoint itself (no adapter_config.json)")
    for _, p in found:
        if not (p / "adapter_config.json").is_file():
            raise ValueError(f"checkpoints: {p} has no adapter_config.json; only LoRA (peft) checkpoints are read")
    return found


def _trainer_state(folder: Path) -> dict | None:
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"checkpoints: {path} is not valid JSON ({e})") from None


def fingerprint(folder: str | os.PathLike) -> str:
    """Identity of a Trainer output folder for cache keys: small files' content, large files' sizes and ends."""
    from datasel.ops.algos.lm_loading import _sha256_ends

    h = hashlib.sha256(b"hf-checkpoints-v1\0")
    for step, ck in find_checkpoints(folder):
        h.update(f"{step}\0".encode())
        for p in sorted(ck.iterdir()):
            if not p.is_file():
                continue
            if p.suffix == ".json":
                h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
            elif p.name.startswith(("adapter_model", "optimizer")):
                size = p.stat().st_size
                h.update(f"{p.name}\0{size}\0{_sha256_ends(p, size)}\0".encode())
    return h.hexdigest()


def _pickle_load(path: Path, allow_pickle: bool, what: str):
    import torch

    if not allow_pickle:
        raise ValueError(f"checkpoints: {path} is a Python pickle ({what}); unpickling can run code, so it is read "
                         f"only with checkpoints(..., allow_pickle=true) (and then with torch.load(weights_only=True))")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _adapter_tensors(ck: Path, allow_pickle: bool) -> dict:
    from safetensors.torch import load_file

    st = ck / "adapter_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    binary = ck / "adapter_model.bin"
    if binary.is_file():
        return {k: v.contiguous() for k, v in _pickle_load(binary, allow_pickle, "the LoRA adapter").items()}
    raise ValueError(f"checkpoints: {ck} has neither adapter_model.safetensors nor adapter_model.bin")


def mean_learning_rates(steps: list[int], log_history: list[dict]) -> list[float | None]:
    """The mean logged learning rate over each checkpoint's steps ``(previous step, step]``.

    LESS weighs each checkpoint by this (its README lists the values of its warmup).  Where the
    Trainer logged no rate inside an interval (``logging_steps`` longer than it), the latest rate
    logged before the checkpoint stands in; None when nothing was logged before it.
    """
    logged = sorted((int(e["step"]), float(e["learning_rate"])) for e in log_history
                    if "learning_rate" in e and "step" in e)
    out: list[float | None] = []
    previous = 0
    for step in steps:
        inside = [lr for s, lr in logged if previous < s <= step]
        before = [lr for s, lr in logged if s <= step]
        out.append(sum(inside) / len(inside) if inside else (before[-1] if before else None))
        previous = step
    return out


def optimizer_order(named: list[tuple[str, tuple]], group_sizes: list[int]) -> tuple[list[str], str]:
    """Parameter names in the optimiser's index order, from the trainable ``(name, shape)`` list.

    ``Trainer.create_optimizer`` builds two groups (weight decay first, then biases and norms);
    a plain ``AdamW(model.parameters())`` has one.  Returns the names and a sentence on how they
    were matched; raises when the group sizes fit neither.
    """
    names = [n for n, _ in named]
    decay = [n for n in names if not _NO_DECAY.search(n)]
    rest = [n for n in names if _NO_DECAY.search(n)]
    if len(group_sizes) == 2 and group_sizes == [len(decay), len(rest)]:
        return decay + rest, (f"by the Trainer's parameter-group order ({len(decay)} with weight decay, "
                              f"{len(rest)} without)")
    if len(group_sizes) == 1 and group_sizes[0] == len(names):
        return names, "by model.named_parameters() order (one parameter group)"
    raise ValueError(f"checkpoints: the optimiser state has parameter groups of sizes {group_sizes}, but the adapter "
                     f"has {len(names)} trainable parameters ({len(decay)} with weight decay, {len(rest)} without); "
                     f"it was not saved by a Trainer over this adapter")


def name_optimizer_state(state_dict: dict, named: list[tuple[str, tuple]]) -> tuple[dict, str]:
    """``{name: {"exp_avg", "exp_avg_sq", "step"}}`` from an index-keyed ``optimizer.state_dict()``.

    Every name gets its moments, and every moment's shape equals its parameter's, or this raises.
    """
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("checkpoints: the optimiser file is not an optimizer.state_dict() (no state / param_groups)")
    indices = [i for g in groups for i in g.get("params", [])]
    order, how = optimizer_order(named, [len(g.get("params", [])) for g in groups])
    shapes = dict(named)
    out = {}
    for position, name in zip(indices, order):
        s = state.get(position)
        if s is None or "exp_avg" not in s or "exp_avg_sq" not in s:
            raise ValueError(f"checkpoints: the optimiser has no Adam moments for parameter {position} ({name}); "
                             f"was it trained with Adam(W)?")
        got = tuple(s["exp_avg"].shape)
        if got != tuple(shapes[name]):
            raise ValueError(f"checkpoints: optimiser state {position} has shape {got}, but the parameter it maps to "
                             f"by position, {name}, has shape {tuple(shapes[name])}; the order does not match")
        out[name] = s
    return out, f"matched {len(out)} optimiser states to LoRA parameters " + how


def convert(folder: str | os.PathLike, out: Path, build_peft: Callable[[Path], Any], *, base_spec: str,
            allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> tuple[list[Path], dict]:
    """Write a Trainer output folder's checkpoints as ``out/epoch-0 … epoch-<n>``; return the paths and a report.

    ``build_peft(adapter_folder)`` returns the adapter's PeftModel (its trainable parameters name
    the moments).  ``epoch-0`` is the adapter with its B factors zeroed (equal to the base model,
    as a fresh LoRA is).  The moments are read when the optimiser file may be unpickled
    (``allow_pickle``); otherwise, or when a checkpoint has none, the converted checkpoint has no
    optimiser state: SGD and sign features need none, and the Adam feature says what is missing.
    Each folder is written in a temporary place and renamed.
    """
    import torch
    from safetensors.torch import save_file

    from datasel.ops.algos.finetune import _OPTIMIZER_FILE, CHECKPOINT_META

    found = find_checkpoints(folder)
    steps = [s for s, _ in found]
    history = (_trainer_state(found[-1][1]) or {}).get("log_history", [])
    lrs = mean_learning_rates(steps, history)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"source": str(Path(folder).expanduser()), "steps": steps, "learning_rates": lrs,
                              "matched": []}
    paths: list[Path] = []

    def write(epoch: int, tensors: dict, config: Path, moments: dict | None, meta: dict) -> Path:
        final = out / f"epoch-{epoch}"
        if (final / CHECKPOINT_META).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out))
        try:
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
            shutil.copyfile(config, tmp / "adapter_config.json")
            if moments is not None:
                save_file(moments, str(tmp / _OPTIMIZER_FILE))
            (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    base_meta = {"kind": "lora", "base_model": base_spec, "source": report["source"], "epoch_lrs": lrs,
                 "steps": steps, "train_loss": None}
    first = _adapter_tensors(found[0][1], allow_pickle)
    zero = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in first.items()}
    paths.append(write(0, zero, found[0][1] / "adapter_config.json", None,
                       {**base_meta, "epoch": 0, "global_step": 0}))
    named = None
    for epoch, (step, ck) in enumerate(found, start=1):
        tensors = _adapter_tensors(ck, allow_pickle)
        opt_file = next((ck / f for f in OPTIMIZER_FILES if (ck / f).is_file()), None)
        moments = None
        if opt_file is None:
            report["matched"].append(f"{ck.name}: no optimizer.pt (saved with save_only_model=true?): no moments")
        elif not allow_pickle:
            report["matched"].append(f"{ck.name}: {opt_file.name} not read (a pickle; allow_pickle=false): no moments")
        else:
            if named is None:
                with tempfile.TemporaryDirectory(dir=out) as tmp:
                    shutil.copyfile(ck / "adapter_config.json", Path(tmp) / "adapter_config.json")
                    save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"))
                    peft_model = build_peft(Path(tmp))
                    named = [(n, tuple(p.shape)) for n, p in peft_model.named_parameters() if p.requires_grad]
                    del peft_model
            state, how = name_optimizer_state(_pickle_load(opt_file, allow_pickle, "the optimiser state"), named)
            report["matched"].append(f"{ck.name}: {how}")
            if log is not None:
                log(f"checkpoints: {ck.name}: {how}")
            moments = {}
            for name, s in state.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[f"{name}::{key}"] = s[key].detach().float().contiguous().clone()
                step_value = s.get("step", 0)
                moments[f"{name}::step"] = torch.as_tensor(step_value, dtype=torch.float32).reshape(())
        paths.append(write(epoch, tensors, ck / "adapter_config.json", moments,
                           {**base_meta, "epoch": epoch, "global_step": step}))
    return paths, report

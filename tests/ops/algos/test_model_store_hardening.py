"""The model store cannot be fooled and model folders cannot be abused (issue: hardening).

* a materialised SmolLM2 folder records every file's size and sha256 when it is written; the first
  load in each process compares them and rebuilds a damaged folder (a clear error when the store is
  read-only), so damaged weights are never used under the GGUF file's model key;
* weights load from safetensors only: a pickle-only folder is refused unless ``allow_pickle``;
* a path that is not a model folder (``hf("~")``) is refused before anything walks it.

Fake builds copy a tiny Llama (the ``tiny_folder`` idea of test_model_store.py) into a private store.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from datasel.ops.algos import lm_loading as lm

pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(autouse=True)
def fresh_memo():
    lm.clear_model_memo()
    yield
    lm.clear_model_memo()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "models"
    monkeypatch.setenv("DATASEL_MODELS", str(path))
    return path


def _tiny_model():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(lm.minilm_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return model, tok


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    model, tok = _tiny_model()
    folder = tmp_path_factory.mktemp("tiny-safetensors")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pickle_folder(tmp_path_factory) -> Path:
    """The same tiny model saved the old way: pytorch_model.bin, no safetensors."""
    model, tok = _tiny_model()
    folder = tmp_path_factory.mktemp("tiny-pickle")
    import torch

    model.config.save_pretrained(folder)  # save_pretrained writes safetensors only in recent versions
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture
def builds(monkeypatch, tiny_folder) -> list:
    calls: list = []

    def build(gguf, dest):
        calls.append(dest)
        shutil.copytree(tiny_folder, dest, dirs_exist_ok=True)

    monkeypatch.setattr(lm, "_build_smollm_folder", build)
    return calls


def _damage(path: Path, offset: int | None = None, length: int = 4096) -> None:
    """Zero ``length`` bytes in the middle of a file (its size and both ends unchanged)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    data[start:start + length] = b"\0" * min(length, len(data) - start)
    path.write_bytes(bytes(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ fingerprint at build, check at first use
def test_marker_records_size_and_sha256_of_every_file(store, builds):
    folder = lm.materialize_smollm()
    marker = json.loads((folder / lm._MATERIALIZED_MARKER).read_text())
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    del files[lm._MATERIALIZED_MARKER]
    assert set(marker["files"]) == set(files) and "model.safetensors" in files
    for name, path in files.items():
        assert marker["files"][name] == [path.stat().st_size, _sha(path)]


def test_damaged_weights_are_found_at_first_load_and_rebuilt(store, builds):
    folder = lm.materialize_smollm()
    weights = folder / "model.safetensors"
    good = _sha(weights)
    _damage(weights)  # same size, same first and last MB: the cache key's fingerprint cannot see it
    assert _sha(weights) != good
    lm.clear_model_memo()  # a new process
    logs: list[str] = []
    model, _ = lm.load_causal_lm("smollm", device="cpu", log=logs.append)
    assert len(builds) == 2 and _sha(weights) == good
    assert any("is damaged (model.safetensors differs" in m and "preparing it again" in m for m in logs), logs
    assert lm.materialize_smollm() == folder and len(builds) == 2


@pytest.mark.parametrize("change, reason", [
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: (f / "pytorch_model.bin").write_bytes(b"planted"), "pytorch_model.bin was added"),
    (lambda f: (f / "config.json").write_text("{}"), "config.json differs"),
    (lambda f: (f / lm._MATERIALIZED_MARKER).write_text("{}"), "is unreadable"),
])
def test_missing_added_or_changed_files_are_damage(store, builds, change, reason):
    folder = lm.materialize_smollm()
    change(folder)
    lm.clear_model_memo()
    logs: list[str] = []
    assert lm.materialize_smollm(log=logs.append) == folder
    assert len(builds) == 2 and any(reason in m for m in logs), logs
    assert not (folder / "pytorch_model.bin").exists()


def test_a_process_verifies_a_folder_once(store, builds, monkeypatch):
    lm.materialize_smollm()  # built, so known good in this process
    hashed = []
    real = lm._file_digests
    monkeypatch.setattr(lm, "_file_digests", lambda folder: hashed.append(folder) or real(folder))
    for _ in range(3):
        lm.materialize_smollm()
    assert hashed == []
    lm.clear_model_memo()
    for _ in range(3):
        lm.materialize_smollm()
    assert len(hashed) == 1 and len(builds) == 1


def test_damage_in_a_read_only_store_is_a_clear_error(store, builds, read_only):
    folder = lm.materialize_smollm()
    _damage(folder / "model.safetensors")
    lm.clear_model_memo()
    read_only(store)
    with pytest.raises(lm.ModelNotAvailable) as err:
        lm.load_causal_lm("smollm", device="cpu")
    message = str(err.value)
    assert "is damaged (model.safetensors differs" in message and "DATASEL_MODELS" in message
    assert len(builds) == 1


# ------------------------------------------------------------ safetensors only
def test_pickle_only_folder_is_refused(pickle_folder):
    with pytest.raises(lm.ModelNotAvailable, match=r"only as Python pickles \(pytorch_model.bin\).*allow_pickle=true"):
        lm.load_causal_lm(str(pickle_folder), device="cpu")


def test_pickle_only_folder_loads_when_allowed_and_matches_safetensors(pickle_folder, tiny_folder):
    import torch

    a, tok = lm.load_causal_lm(str(pickle_folder), device="cpu", allow_pickle=True)
    b, _ = lm.load_causal_lm(str(tiny_folder), device="cpu")
    ids = torch.tensor([tok("a test")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_a_planted_pickle_beside_safetensors_is_never_opened(tiny_folder, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    import torch

    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    model, _ = lm.load_causal_lm(str(folder), device="cpu")
    assert model is not None and opened == []


def test_recipe_hf_refuses_pickles_and_allow_pickle_lets_it_load(pickle_folder, run_recipe):
    from datasel.dsl.engine import OpError

    pool = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(4)]
    with pytest.raises(OpError, match="only as Python pickles"):
        run_recipe(f'select topk(loss(hf("{pickle_folder}")), 2)', pool)
    out = run_recipe(f'select topk(loss(hf("{pickle_folder}", allow_pickle=true)), 2)', pool)
    assert len(out.selected) == 2


def test_encoder_refuses_pickle_only_folder(tmp_path):
    from sentence_transformers import SentenceTransformer

    import torch

    folder = tmp_path / "enc"
    SentenceTransformer(str(lm.minilm_path()), device="cpu").save(str(folder))
    for weights in folder.rglob("*.safetensors"):  # the same weights as a pickle
        from safetensors.torch import load_file

        torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
        weights.unlink()
    with pytest.raises(lm.ModelNotAvailable, match="encoder folder .* only as Python pickles"):
        lm.load_encoder(str(folder), device="cpu")
    assert lm.load_encoder(str(folder), device="cpu", allow_pickle=True).encode(["x"]).shape == (1, 384)


# ------------------------------------------------------------ not a model folder
def test_a_folder_that_is_not_a_model_is_refused_before_it_is_walked(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for i in range(50):
        (home / f"d{i}").mkdir(parents=True)
        for j in range(100):
            (home / f"d{i}" / f"f{j}.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    walked = []
    real_walk = lm.os.walk
    monkeypatch.setattr(lm.os, "walk", lambda *a, **k: walked.append(a) or real_walk(*a, **k))
    started = time.perf_counter()
    with pytest.raises(lm.ModelNotAvailable, match="is not a model folder: it has no config.json"):
        lm.model_fingerprint("~")
    with pytest.raises(lm.ModelNotAvailable, match="'~' is not a model folder"):
        lm.load_causal_lm("~", device="cpu")
    assert walked == [] and time.perf_counter() - started < 5


def test_a_huge_folder_with_a_config_is_refused_by_a_bounded_walk(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in range(lm.MAX_MODEL_FILES + 10):
        (folder / f"f{i}").write_bytes(b"")
    with pytest.raises(lm.ModelNotAvailable, match=f"more than {lm.MAX_MODEL_FILES} files"):
        lm.model_fingerprint(folder)


def test_recipe_with_a_non_model_folder_fails_at_its_position(tmp_path, monkeypatch, write_pool):
    from datasel.dsl.engine import OpError
    from datasel.dsl.runner import run

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "r.sel"
    recipe.write_text('select topk(loss(hf("~")), 2)\n')
    with pytest.raises(OpError) as err:
        run(recipe, write_pool([{"instruction": "q", "output": "a"}] * 3), quiet=True)
    assert "is not a model folder" in str(err.value) and "r.sel:1:" in str(err.value)


def _reference_fingerprint(folder: Path) -> str:
    """The folder fingerprint as first written (rglob over everything), for the bundled folders."""
    h = hashlib.sha256(b"folder-v2\0")
    small = {"config.json", "adapter_config.json", lm._CHECKPOINT_META, "config_sentence_transformers.json",
             "modules.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "chat_template.json", "sentence_bert_config.json"}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name in small:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    for p in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(lm._WEIGHT_SUFFIXES)
                    and not p.name.startswith("optimizer")):
        size = p.stat().st_size
        with open(p, "rb") as f:
            ends = f.read() if size <= 2 << 20 else f.read(1 << 20) + (f.seek(size - (1 << 20)) and f.read(1 << 20))
        h.update(f"{p.relative_to(folder).as_posix()}\0{size}\0{hashlib.sha256(ends).hexdigest()}\0".encode())
    return h.hexdigest()


def test_bundled_fingerprints_are_unchanged_by_the_bounded_walk(tiny_folder):
    # Cache keys of every result computed with MiniLM (or a local folder) stay valid.
    assert lm.model_fingerprint("minilm") == _reference_fingerprint(lm.minilm_path())
    assert lm.model_fingerprint(tiny_folder) == _reference_fingerprint(tiny_folder)


# ------------------------------------------------------------ real SmolLM2 (slow)
@pytest.mark.slow
def test_real_smollm_weights_zeroed_in_the_store_are_rebuilt(tmp_path, monkeypatch):
    """The reported attack: 64 MB of SmolLM2's weights zeroed in the store changed every loss."""
    import torch

    good_folder = lm.materialize_smollm()  # the session's store, built once per test session
    store = tmp_path / "models"
    store.mkdir()
    shutil.copytree(good_folder, store / good_folder.name)
    weights = store / good_folder.name / "model.safetensors"
    _damage(weights, offset=100 << 20, length=64 << 20)
    monkeypatch.setenv("DATASEL_MODELS", str(store))
    lm.clear_model_memo()
    logs: list[str] = []
    model, tok = lm.load_causal_lm("smollm", device="cpu", log=logs.append)
    assert any("is damaged (model.safetensors differs" in m for m in logs), logs
    assert _sha(weights) == _sha(good_folder / "model.safetensors")
    monkeypatch.setenv("DATASEL_MODELS", str(good_folder.parent))
    lm.clear_model_memo()
    ref, _ = lm.load_causal_lm("smollm", device="cpu")
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)

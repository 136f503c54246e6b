"""The user-level model store: SmolLM2 is dequantised once per machine (per store), not once per
project cache; it says so when it happens; project-cache housekeeping never touches it.

Tests that fake the dequantisation (``_build_smollm_folder`` replaced by a copy of a tiny model)
use a private store (``store`` fixture), never the session's store that real tests fill.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasel.ops.algos import lm_loading as lm

PREPARING = "preparing SmolLM2-135M-Instruct for first use: dequantising the GGUF file into"


@pytest.fixture(autouse=True)
def fresh_memo():
    lm.clear_model_memo()
    yield
    lm.clear_model_memo()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A private, empty model store (``$DATASEL_MODELS``) for this test."""
    path = tmp_path / "models"
    monkeypatch.setenv("DATASEL_MODELS", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama with MiniLM's tokenizer: what the fake builder "dequantises"."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(lm.minilm_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    folder = tmp_path_factory.mktemp("fake-smollm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def fake_builder(monkeypatch, source: Path, calls: list, delay: float = 0.0) -> None:
    def build(gguf, dest):
        calls.append(dest)
        time.sleep(delay)
        shutil.copytree(source, dest, dirs_exist_ok=True)

    monkeypatch.setattr(lm, "_build_smollm_folder", build)


def fake_model(store: Path, name: str, *, complete: bool = True, size: int = 1000) -> Path:
    folder = store / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    if complete:
        (folder / lm._MATERIALIZED_MARKER).write_text("{}", encoding="utf-8")
    return folder


def _age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


# ----------------------------------------------------------------- location
def test_store_location(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATASEL_MODELS", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lm.model_store_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DATASEL_MODELS")
    assert lm.model_store_dir() == tmp_path / "xdg" / "datasel" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
    assert lm.model_store_dir() == tmp_path / "home" / ".cache" / "datasel" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert lm.model_store_dir() == tmp_path / "home" / ".cache" / "datasel" / "models"


# ------------------------------------------------------------ materialisation
def test_every_project_cache_shares_one_materialisation(store, monkeypatch, tmp_path, tiny_folder):
    calls = []
    fake_builder(monkeypatch, tiny_folder, calls)
    a, _ = lm.load_causal_lm("smollm", cache_dir=tmp_path / "project1" / ".datasel", device="cpu")
    lm.clear_model_memo()
    b, _ = lm.load_causal_lm("smollm", cache_dir=tmp_path / "project2" / ".datasel", device="cpu")
    assert len(calls) == 1 and a is not b
    (folder,) = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert folder.name.startswith("smollm2-135m-instruct-") and (folder / lm._MATERIALIZED_MARKER).is_file()
    assert not (tmp_path / "project1").exists() and not (tmp_path / "project2").exists()
    assert lm.materialize_smollm() == folder and len(calls) == 1


def test_first_use_is_announced_through_the_run_log(store, monkeypatch, tmp_path, tiny_folder, write_pool):
    from datasel.dsl.runner import run

    calls = []
    fake_builder(monkeypatch, tiny_folder, calls)
    pool = write_pool([{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"} for w in
                       ("one", "two", "three", "four")])
    recipe = 'select topk(loss(hf("smollm")), 2)\n'
    logs: list[str] = []
    run("r.sel", pool, cache_dir=tmp_path / "c1", quiet=False, log=logs.append, recipe_text=recipe)
    preparing = [m for m in logs if PREPARING in m]
    assert len(preparing) == 1, logs
    assert f"{PREPARING} {store} (once, " in preparing[0]
    assert len(calls) == 1
    lm.clear_model_memo()
    logs.clear()
    run("r.sel", pool, cache_dir=tmp_path / "c2", quiet=False, log=logs.append, recipe_text=recipe)
    assert not [m for m in logs if PREPARING in m] and len(calls) == 1
    assert not (tmp_path / "c1" / "models").exists() and not (tmp_path / "c2" / "models").exists()


def test_materialize_says_so_and_says_when_ready(store, monkeypatch, tiny_folder):
    calls, logs = [], []
    fake_builder(monkeypatch, tiny_folder, calls)
    folder = lm.materialize_smollm(log=logs.append)
    assert folder.parent == store
    assert logs[0].startswith(PREPARING) and str(folder) in logs[-1] and "ready" in logs[-1]
    logs.clear()
    assert lm.materialize_smollm(log=logs.append) == folder and logs == []


_TWO_PROCESSES = """
import sys, time
from pathlib import Path
from datasel.ops.algos import lm_loading as lm
counter = Path(sys.argv[1])

def build(gguf, dest):
    with open(counter, "a") as f:
        f.write("built\\n")
    time.sleep(2.0)
    (dest / "config.json").write_text("{}")

lm._build_smollm_folder = build
print("RESULT", lm.materialize_smollm(log=lambda m: print("LOG", m, flush=True)), flush=True)
"""


def test_two_processes_materialise_once(store, tmp_path):
    script = tmp_path / "mat.py"
    script.write_text(_TWO_PROCESSES, encoding="utf-8")
    counter = tmp_path / "builds.txt"
    procs = [subprocess.Popen([sys.executable, str(script), str(counter)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert counter.read_text().splitlines() == ["built"]
    results = {line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")}
    assert len(results) == 1 and str(store) in results.pop()
    assert sum(out.count(PREPARING) for out, _ in outs) == 1


def test_unwritable_store_says_how_to_fix(monkeypatch, tmp_path, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    monkeypatch.setenv("DATASEL_MODELS", str(parent / "models"))
    read_only(parent)
    with pytest.raises(lm.ModelNotAvailable, match="DATASEL_MODELS"):
        lm.materialize_smollm()


def test_read_only_store_with_the_model_is_used(store, monkeypatch, tiny_folder, read_only):
    calls = []
    fake_builder(monkeypatch, tiny_folder, calls)
    folder = lm.materialize_smollm()
    names = sorted(p.relative_to(store) for p in store.rglob("*"))
    read_only(store)
    model, tok = lm.load_causal_lm("smollm", device="cpu")
    assert model is not None and len(calls) == 1 and lm.materialize_smollm() == folder
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == names  # no lock file, nothing new


# ------------------------------------------------------------ housekeeping
def test_project_cache_gc_never_touches_the_model_store(store, cli, tmp_path, monkeypatch):
    import numpy as np

    from datasel.dsl.cache import Cache

    model = fake_model(store, "smollm2-135m-instruct-0123456789abcdef")
    project = tmp_path / "project"
    Cache(project).put("ab" + "0" * 30, {"v": np.arange(3)}, {"op": "topk"})
    legacy = fake_model(project / "models", "smollm2-135m-instruct-fedcba9876543210")  # an old version's copy
    ls = cli("cache", "ls", "--cache", project)
    assert any(line.split()[0] == "model" for line in ls.out.splitlines())  # listed: it is not used any more
    res = cli("cache", "gc", "--all", "--cache", project)
    assert res.code == 0, res.err
    assert (model / lm._MATERIALIZED_MARKER).is_file() and not legacy.exists()
    assert cli("cache", "ls", "--cache", project).out.strip() == ""
    # A store placed inside a project cache is still not a project-cache entry.
    monkeypatch.setenv("DATASEL_MODELS", str(project / "models"))
    inside = fake_model(project / "models", "smollm2-135m-instruct-0000000000000000")
    assert "model" not in [line.split()[0] for line in cli("cache", "ls", "--cache", project).out.splitlines()]
    assert cli("cache", "gc", "--all", "--cache", project).code == 0
    assert (inside / lm._MATERIALIZED_MARKER).is_file()


def test_cache_ls_and_gc_models(store, cli, tmp_path):
    import numpy as np

    from datasel.dsl.cache import Cache

    project = tmp_path / "project"
    Cache(project).put("ab" + "0" * 30, {"v": np.arange(3)}, {"op": "topk"})
    old = fake_model(store, "smollm2-135m-instruct-old0000000000000", size=3000)
    new = fake_model(store, "smollm2-135m-instruct-new0000000000000", size=2000)
    half = fake_model(store, "smollm2-135m-instruct-half000000000000", complete=False)
    (store / ".smollm2-135m-instruct-new0000000000000.lock").write_text("")
    stale = store / ".smollm2-135m-instruct-x.tmp-abc"  # left by a killed build
    stale.mkdir()
    _age(stale, 1)
    _age(old / lm._MATERIALIZED_MARKER, 10)

    ls = cli("cache", "ls", "--cache", project)
    assert ls.code == 0 and str(store) in ls.err and "--models" in ls.err
    listed = cli("cache", "ls", "--models")
    assert listed.code == 0 and str(store) in listed.err
    rows = {line.split()[1]: line for line in listed.out.splitlines()}
    assert set(rows) == {old.name, new.name, half.name}
    assert "incomplete" in rows[half.name] and "incomplete" not in rows[new.name]
    as_json = {e["key"]: e for e in map(json.loads, cli("cache", "ls", "--models", "--json").out.splitlines())}
    assert as_json[old.name]["bytes"] >= 3000 and as_json[new.name]["complete"] is True
    assert as_json[half.name]["complete"] is False
    older = cli("cache", "ls", "--models", "--older-than", "3")
    assert [line.split()[1] for line in older.out.splitlines()] == [old.name]

    plain = cli("cache", "gc", "--models")
    assert plain.code == 0 and not stale.exists() and old.exists()
    res = cli("cache", "gc", "--models", "--older-than", "3")
    assert res.code == 0 and "removed 1 model" in res.out
    assert not old.exists() and new.exists() and half.exists()
    res = cli("cache", "gc", "--models", "--all")
    assert res.code == 0 and "removed 2 models" in res.out
    assert cli("cache", "ls", "--models").out.strip() == ""
    assert len(cli("cache", "ls", "--cache", project).out.splitlines()) == 1  # the project cache is untouched


def test_gc_models_on_a_read_only_store_removes_nothing_and_says_so(store, cli, read_only):
    model = fake_model(store, "smollm2-135m-instruct-0123456789abcdef")
    (store / ".smollm2-135m-instruct-0123456789abcdef.lock").write_text("")  # as materialisation leaves it
    read_only(store)
    res = cli("cache", "gc", "--models", "--all")
    assert res.code == 1
    assert "removed 0 models" in res.out
    assert "could not remove 1 model; nothing was removed" in res.err and model.name in res.err
    assert (model / lm._MATERIALIZED_MARKER).is_file()


def test_other_data_in_the_store_is_not_a_model(store, cli):
    """Folders without model files (e.g. throughput calibrations kept next to the models) are left alone."""
    other = store / "throughput"
    other.mkdir(parents=True)
    (other / "smollm.json").write_text("{}", encoding="utf-8")
    model = fake_model(store, "smollm2-135m-instruct-0123456789abcdef")
    assert [line.split()[1] for line in cli("cache", "ls", "--models").out.splitlines()] == [model.name]
    assert cli("cache", "gc", "--models", "--all").code == 0
    assert (other / "smollm.json").is_file() and not model.exists()

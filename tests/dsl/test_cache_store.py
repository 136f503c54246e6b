"""Read-only caches (a team's shared cache on a read-only mount), the writable layer over
them, an honest ``cache gc`` and a ``cache ls`` that says what each entry is.

Read-only folders come from the ``read_only`` fixture (tests/conftest.py): ``chmod -R a-w``
plus, when the tests run as root, dropping CAP_DAC_OVERRIDE from the test's thread, so the
kernel itself refuses every write (EACCES) while ``os.access`` still says "writable".
``test_real_read_only_mount`` also runs the CLI on a real read-only bind mount (EROFS) in a
private mount namespace where the system allows one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from datasel.dsl import cache as cache_mod
from datasel.dsl.cache import HASH_BYTES, Cache
from datasel.dsl.runner import run

pytestmark = pytest.mark.usefixtures("cache_dir")

RECIPE = 'select length > 20 | topk(field("score"), 3)\n'
SET_MISS = 'select length > 20 | topk(field("score"), 4)\n'  # topk(…, 4) is not in the cache
MAP_MISS = 'select length(field="instruction") > 1 | topk(field("score"), 3)\n'  # a new per-record op


def records(n: int = 20) -> list[dict]:
    """Record i: output of 3*(i+1) characters, score i % 5."""
    return [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1)), "score": i % 5} for i in range(n)]


def hashes(*names: str) -> np.ndarray:
    raw = b"".join(hashlib.blake2b(n.encode(), digest_size=HASH_BYTES).digest() for n in names)
    return np.frombuffer(raw, dtype=f"S{HASH_BYTES}").copy()


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (and ``root``) with its type, size and mtime: any write changes it."""
    state = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        state[p.relative_to(root).as_posix()] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return state


def go(text: str, pool: Path, root: Path, **kw):
    return run("r.sel", pool, cache_dir=root, quiet=True, recipe_text=text, **kw)


@pytest.fixture
def populated(tmp_path, write_pool):
    """A cache filled by one run of RECIPE (two map ops, two whole-set results)."""
    pool = write_pool(records())
    root = tmp_path / "shared"
    first = go(RECIPE, pool, root)
    assert [int(i) for i in first.selected] == [9, 14, 19]
    return SimpleNamespace(root=root, pool=pool, selected=[9, 14, 19])


# ------------------------------------------------------------ read-only hits
def test_fully_cached_run_on_read_only_cache_writes_nothing(populated, read_only):
    """Hits are served without lock files, tmp folders or last-used (mtime) updates."""
    before = tree_state(populated.root)
    read_only(populated.root)
    result = go(RECIPE, populated.pool, populated.root)
    assert [int(i) for i in result.selected] == populated.selected
    assert {n["status"] for n in result.manifest["nodes"]} == {"cached"}
    assert tree_state(populated.root) == before


def test_read_only_detection_does_not_trust_os_access(populated, read_only, monkeypatch):
    """Some mounts (and root) get W_OK from access(2) and EROFS/EACCES on the write: probe by writing."""
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    before = tree_state(populated.root)
    read_only(populated.root)
    cache = Cache(populated.root)
    assert cache.write_root is None and cache.read_only
    assert cache.read_only_reason  # the errno text, for messages
    assert cache.get(next(iter(e["key"] for e in cache.entries() if e["kind"] == "object"))) is not None
    assert tree_state(populated.root) == before


@pytest.mark.parametrize("text", [SET_MISS, MAP_MISS], ids=["whole-set miss", "per-record miss"])
def test_miss_on_read_only_cache_fails_with_one_clear_message(populated, read_only, cli, tmp_path, text):
    before = tree_state(populated.root)
    read_only(populated.root)
    with pytest.raises(cache_mod.ReadOnlyCacheError) as info:
        go(text, populated.pool, populated.root)
    message = str(info.value)
    for part in ("read-only", str(populated.root), "--cache-write", "DATASEL_CACHE_WRITE"):
        assert part in message, message
    recipe = tmp_path / "miss.sel"
    recipe.write_text(text, encoding="utf-8")
    res = cli("run", recipe, "--pool", populated.pool, "--cache", populated.root)
    assert res.code == 1
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--cache-write" in lines[0], res.err
    assert tree_state(populated.root) == before


# ------------------------------------------------------ the writable layer
def test_write_layer_computes_only_misses_and_reads_both(populated, read_only, tmp_path, write_pool, monkeypatch):
    """$DATASEL_CACHE_WRITE: misses go there, everything else is read from the read-only cache."""
    before = tree_state(populated.root)
    read_only(populated.root)
    mine = tmp_path / "mine"
    monkeypatch.setenv("DATASEL_CACHE_WRITE", str(mine))
    # 5 new records: `length` and `field` compute only those, the other 20 come from the shared cache
    grown = write_pool(records(25), name="grown.jsonl")
    result = go(SET_MISS, grown, populated.root)
    nodes = {n["op"]: n for n in result.manifest["nodes"]}
    assert nodes["length"]["rows_computed"] == 5 and nodes["length"]["rows_cached"] == 20
    assert nodes["topk"]["status"] != "cached"
    assert tree_state(populated.root) == before
    assert any((mine / "maps").iterdir()) and any((mine / "objects").iterdir())
    again = go(SET_MISS, grown, populated.root)
    assert {n["status"] for n in again.manifest["nodes"]} == {"cached"}
    assert [int(i) for i in again.selected] == [int(i) for i in result.selected]
    assert tree_state(populated.root) == before


def test_layers_api(tmp_path, read_only):
    ro = tmp_path / "ro"
    base = Cache(ro)
    k1, k2 = "a1" + "0" * 30, "a2" + "0" * 30
    base.put(k1, {"v": np.arange(3)}, {"op": "t"})
    base.map_store("m" * 32).append(hashes("a", "b"), {"value": np.array([1.0, 2.0])}, {"op": "length"})
    work = base.work_dir("w" * 32)
    (work / "epoch-0").mkdir()
    before = tree_state(ro)
    read_only(ro)
    mine = tmp_path / "mine"

    layered = Cache(ro, write_root=mine)
    assert layered.root == ro and layered.write_root == mine and not layered.read_only
    assert layered.has(k1) and layered.get(k1).arrays["v"].tolist() == [0, 1, 2]
    assert layered.put(k1, {"v": np.arange(9)}).arrays["v"].tolist() == [0, 1, 2]  # existing entry wins
    layered.put(k2, {"v": np.arange(4)}, {"op": "t2"})
    assert (mine / "objects" / "a2" / k2 / "meta.json").is_file()
    store = layered.map_store("m" * 32)
    assert store.locate(hashes("a", "b", "c"))[0].tolist() == [True, True, False]
    store.append(hashes("c"), {"value": np.array([3.0])}, {"op": "length"})
    fresh = layered.map_store("m" * 32)
    found, where = fresh.locate(hashes("c", "a", "b"))
    assert found.all() and fresh.read("value", where).tolist() == [3.0, 1.0, 2.0]
    assert fresh.count(hashes("a", "b", "c", "d")) == 3
    with layered.lock("k"):
        assert (mine / "locks" / "k.lock").exists()
    assert layered.work_dir("w" * 32) == work  # a finished work dir is used where it is
    assert layered.work_dir("x" * 32).parent == mine / "work"
    kinds = sorted((e["kind"], e["writable"]) for e in layered.entries())
    assert ("object", False) in kinds and ("object", True) in kinds and ("map", True) in kinds

    alone = Cache(ro)
    assert alone.read_only and alone.write_root is None
    assert alone.get(k1) is not None and alone.map_store("m" * 32).count(hashes("a", "b")) == 2
    assert alone.work_dir("w" * 32) == work
    for attempt in (lambda: alone.put(k2, {"v": np.arange(4)}), lambda: alone.lock("k").__enter__(),
                    lambda: alone.map_store("m" * 32).append(hashes("z"), {"value": np.array([0.0])}, {}),
                    lambda: alone.work_dir("y" * 32), lambda: alone.tmp_dir()):
        with pytest.raises(cache_mod.ReadOnlyCacheError, match="--cache-write"):
            attempt()
    assert tree_state(ro) == before


def test_corrupt_entry_in_read_only_layer_is_a_miss_not_a_delete(tmp_path, read_only):
    ro = tmp_path / "ro"
    key = "b1" + "0" * 30
    Cache(ro).put(key, {"v": np.arange(5)})
    (ro / "objects" / "b1" / key / "v.npy").write_bytes(b"garbage")
    before = tree_state(ro)
    read_only(ro)
    reports = []
    layered = Cache(ro, write_root=tmp_path / "mine", on_corrupt=lambda k, why: reports.append(k))
    assert layered.get(key) is None and reports == [key]
    assert tree_state(ro) == before  # reported, never moved or deleted
    assert layered.put(key, {"v": np.arange(5)}).arrays["v"].tolist() == [0, 1, 2, 3, 4]
    assert layered.get(key) is not None and (tmp_path / "mine" / "objects" / "b1" / key).is_dir()
    assert tree_state(ro) == before


def test_finished_finetune_work_dir_is_used_read_only(tmp_path, read_only):
    """A completed fine-tuning run in a read-only cache: no lock file, no write, checkpoints load."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from datasel.ops.algos import finetune as F
    from datasel.ops.algos.lm_loading import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    base = tmp_path / "tiny"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    pairs = [("Say hello.", " Hello there."), ("Capital of Italy?", " Rome"), ("Count.", " one two")]
    root = tmp_path / "shared"
    kw = dict(epochs=1, lora=False, batch_size=2, device="cpu", max_length=32)
    paths = F.finetune(str(base), pairs, out_dir=Cache(root).work_dir("f" * 32), **kw)
    before = tree_state(root)
    read_only(root)
    again = F.finetune(str(base), pairs, out_dir=Cache(root).work_dir("f" * 32), **kw)
    assert again == paths
    loaded = F.load_checkpoint(again[-1], device="cpu")
    assert not loaded.training
    assert tree_state(root) == before


def _can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f'mount --bind -o ro "{probe}" "{probe}" && ! touch "{probe}/x" 2>/dev/null'
    done = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True)
    return done.returncode == 0 and not (probe / "x").exists()


_MOUNT_DRIVER = """
import json, os, subprocess, sys
root, pool, hit, miss, mine, out = sys.argv[1:]
cli = [sys.executable, "-m", "datasel.dsl.cli"]
res = {}
for name, recipe, extra in (("hit", hit, {}), ("miss", miss, {}), ("layered", miss, {"DATASEL_CACHE_WRITE": mine})):
    p = subprocess.run(cli + ["run", recipe, "--pool", pool, "--cache", root], capture_output=True, text=True,
                       env=dict(os.environ, **extra))
    res[name] = [p.returncode, p.stdout, p.stderr]
gc = subprocess.run(cli + ["cache", "gc", "--all", "--cache", root], capture_output=True, text=True)
res["gc"] = [gc.returncode, gc.stdout, gc.stderr]
json.dump(res, open(out, "w"))
"""


def test_real_read_only_mount(populated, tmp_path):
    """The CLI on a real read-only bind mount (EROFS from the kernel), in a private mount namespace."""
    if not _can_mount_read_only(tmp_path):
        pytest.skip("no private mount namespace here (unshare -m / mount --bind -o ro)")
    hit, miss = tmp_path / "hit.sel", tmp_path / "miss.sel"
    hit.write_text(RECIPE, encoding="utf-8")
    miss.write_text(SET_MISS, encoding="utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(_MOUNT_DRIVER, encoding="utf-8")
    mine, out = tmp_path / "mine", tmp_path / "out.json"
    before = tree_state(populated.root)
    root = populated.root
    script = (f'mount --bind -o ro "{root}" "{root}" && exec "{sys.executable}" "{driver}" "{root}" '
              f'"{populated.pool}" "{hit}" "{miss}" "{mine}" "{out}"')
    env = {k: v for k, v in os.environ.items() if k != "DATASEL_CACHE_WRITE"}
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    assert res["hit"][0] == 0 and "selected 3 of 20" in res["hit"][1], res["hit"]
    assert res["miss"][0] == 1 and "read-only" in res["miss"][2] and "--cache-write" in res["miss"][2], res["miss"]
    assert "Traceback" not in res["miss"][2]
    assert res["layered"][0] == 0 and "selected 4 of 20" in res["layered"][1], res["layered"]
    assert res["gc"][0] == 1 and "read-only" in res["gc"][2] and "removed" not in res["gc"][1], res["gc"]
    assert tree_state(root) == before
    assert any((mine / "objects").iterdir())


def test_cache_write_flag_is_accepted_by_every_command_that_runs():
    from datasel.dsl.cli import build_parser

    parser = build_parser()
    for argv in (["run", "r.sel", "--pool", "p.jsonl"], ["eval", "length", "--pool", "p.jsonl"],
                 ["compile", "r.sel"], ["measure", "s.jsonl", "--pool", "p.jsonl"], ["cache", "ls"]):
        assert parser.parse_args(argv + ["--cache-write", "/tmp/w"]).cache_write == "/tmp/w"
        assert parser.parse_args(argv).cache_write is None


# ------------------------------------------------------------------- gc
def test_gc_on_read_only_cache_removes_nothing_and_says_so(populated, read_only, cli):
    before = tree_state(populated.root)
    read_only(populated.root)
    with pytest.raises(cache_mod.ReadOnlyCacheError, match="read-only"):
        Cache(populated.root).gc(everything=True)
    res = cli("cache", "gc", "--all", "--cache", populated.root)
    assert res.code == 1
    assert "read-only" in res.err and "nothing was removed" in res.err
    assert "removed" not in res.out
    assert tree_state(populated.root) == before


def test_gc_counts_only_what_it_really_removed(populated, read_only, cli):
    cache = Cache(populated.root)
    entries = list(cache.entries())
    stuck_parent = Path(next(e for e in entries if e["kind"] == "object")["path"]).parent
    stuck = [e for e in entries if Path(e["path"]).parent == stuck_parent]
    read_only(stuck_parent)  # its entries cannot be unlinked; everything else can
    res = cli("cache", "gc", "--all", "--cache", populated.root)
    assert res.code == 1
    assert f"removed {len(entries) - len(stuck)} entries" in res.out
    assert f"could not remove {len(stuck)}" in res.err and stuck[0]["key"][:12] in res.err
    left = cli("cache", "ls", "--cache", populated.root).out.splitlines()
    assert len(left) == len(stuck) and all(line.split()[0] == "object" for line in left)


# ------------------------------------------------------------------- ls
def _age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_ls_older_than_filters(tmp_path, cli):
    root = tmp_path / "c"
    cache = Cache(root)
    old, new = "c1" + "0" * 30, "c2" + "0" * 30
    cache.put(old, {"v": np.arange(2)}, {"op": "kmeans"})
    cache.put(new, {"v": np.arange(2)}, {"op": "topk"})
    _age(cache.object_dir(old) / "meta.json", 10)
    res = cli("cache", "ls", "--older-than", "3", "--cache", root)
    assert res.code == 0
    assert [line.split()[1] for line in res.out.splitlines()] == [old[:12]]
    assert len(cli("cache", "ls", "--cache", root).out.splitlines()) == 2
    assert "unused for more than DAYS days" in " ".join(cli("cache", "--help").out.split())


def test_ls_says_what_each_entry_was_computed_for(tmp_path, cli):
    root = tmp_path / "c"
    cache = Cache(root)
    k_new, k_old = "d1" + "0" * 30, "d2" + "0" * 30
    label = 'topk(field("score"), 3)'
    cache.put(k_new, {"indices": np.arange(3)}, {"op": "topk", "node": "n1", "label": label, "version": "1",
                                                  "recipe": "cherry.sel", "pool_fingerprint": "f" * 64,
                                                  "pool_path": "/data/alpaca/pool.jsonl"})
    cache.put(k_old, {"indices": np.arange(2)}, {"op": "kmeans", "node": "n2", "label": "kmeans(embed(minilm), 5)"})
    cache.map_store("e" * 32).append(hashes("a", "b"), {"value": np.array([1.0, 2.0])},
                                     {"op": "length", "label": "length", "recipe": "cherry.sel",
                                      "pool_path": "/data/alpaca/pool.jsonl"})
    res = cli("cache", "ls", "--cache", root)
    assert res.code == 0
    by_key = {line.split()[1]: line for line in res.out.splitlines()}
    assert set(by_key) == {k_new[:12], k_old[:12], ("e" * 32)[:12]}
    assert label in by_key[k_new[:12]] and "cherry.sel" in by_key[k_new[:12]]
    assert "/data/alpaca/pool.jsonl" in by_key[k_new[:12]]
    assert "kmeans(embed(minilm), 5)" in by_key[k_old[:12]] and "cherry.sel" not in by_key[k_old[:12]]
    assert "2 rows" in by_key[("e" * 32)[:12]]
    header = res.err.splitlines()[0].split()
    assert header[:3] == ["KIND", "KEY", "OP"] and {"LABEL", "RECIPE", "POOL"} <= set(header)
    # the columns line up: every row's LABEL starts where the header's does
    col = res.err.splitlines()[0].index("LABEL")
    assert all(line[col:].startswith(("topk", "kmeans", "length")) for line in res.out.splitlines())
    as_json = [json.loads(line) for line in cli("cache", "ls", "--json", "--cache", root).out.splitlines()]
    got = {e["key"]: e for e in as_json}
    assert got[k_new]["label"] == label and got[k_new]["recipe"] == "cherry.sel"
    assert got[k_new]["pool_path"] == "/data/alpaca/pool.jsonl" and got[k_new]["pool_fingerprint"] == "f" * 64
    assert got[k_old]["recipe"] is None and got[k_old]["pool_path"] is None
    assert got["e" * 32]["kind"] == "map" and got["e" * 32]["rows"] == 2
    assert all({"kind", "key", "op", "bytes", "last_used", "path"} <= set(e) for e in as_json)


def test_a_per_group_selector_reads_the_map_index_once_per_run(run_recipe, monkeypatch):
    """facility under a partition asks for its features once per group; the map's index of record
    hashes (and each shard's checksum) must be read once, not once per group (a 1M-record pool with
    1,000 clusters spent 78 s per group rebuilding it)."""
    from datasel.dsl.cache import MapStore

    pool = [{"instruction": f"q{i}", "input": "", "output": "y" * (i % 17 + 1), "category": "abcd"[i % 4]}
            for i in range(40)]
    text = 'select groups("category") | facility(minhash(), 2)'
    run_recipe(text, pool)  # fills the maps
    loads = []
    real = MapStore._load
    monkeypatch.setattr(MapStore, "_load", lambda self, **kw: loads.append(self.key) or real(self, **kw))
    second = run_recipe('select groups("category") | facility(minhash(), 3)', pool)
    assert len(second.selected) == 12
    assert len(loads) == len(set(loads)), loads  # each map read once, whatever the number of groups

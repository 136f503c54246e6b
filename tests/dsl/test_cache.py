"""The content-addressed store: atomic writes, checksums, no pickle, map shards, gc."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from datasel.dsl import cache as cache_mod
from datasel.dsl.cache import HASH_BYTES, Cache, MapStore

pytestmark = pytest.mark.usefixtures("cache_dir")


def hashes(*names: str) -> np.ndarray:
    """Record-hash-like keys (S16) for readable names."""
    raw = b"".join(hashlib.blake2b(n.encode(), digest_size=HASH_BYTES).digest() for n in names)
    return np.frombuffer(raw, dtype=f"S{HASH_BYTES}").copy()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "store")


# ------------------------------------------------------------------ objects
def test_put_get_roundtrip(cache):
    key = "ab" + "0" * 30
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.array([0.5, np.nan], dtype=np.float32)
    assert not cache.has(key)
    assert cache.get(key) is None
    entry = cache.put(key, {"a": a, "b": b}, {"op": "test", "rows": 2})
    assert entry.key == key
    assert cache.has(key)
    got = cache.get(key)
    assert got is not None
    np.testing.assert_array_equal(got.arrays["a"], a)
    assert got.arrays["a"].dtype == np.int64
    np.testing.assert_array_equal(got.arrays["b"], b)
    assert got.info == {"op": "test", "rows": 2}
    assert cache.object_dir(key) == cache.root / "objects" / "ab" / key
    assert (cache.object_dir(key) / "meta.json").is_file()


def test_existing_entry_wins(cache):
    key = "cd" + "1" * 30
    cache.put(key, {"v": np.array([1, 2, 3])})
    entry = cache.put(key, {"v": np.array([9, 9, 9])})
    np.testing.assert_array_equal(entry.arrays["v"], [1, 2, 3])
    np.testing.assert_array_equal(cache.get(key).arrays["v"], [1, 2, 3])


def test_default_root_from_environment(cache_dir):
    c = Cache()
    assert c.root == cache_dir
    assert (cache_dir / "objects").is_dir()


def test_crash_midway_leaves_no_half_entry(cache, monkeypatch):
    key = "ef" + "2" * 30
    real_write = cache_mod._write_array
    calls = []

    def flaky(path, array):
        calls.append(path.name)
        if len(calls) == 2:
            # Half of the file is on disk when the "crash" happens.
            path.write_bytes(b"\x93NUMPY partial")
            raise OSError("disk on fire")
        return real_write(path, array)

    monkeypatch.setattr(cache_mod, "_write_array", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        cache.put(key, {"first": np.arange(3), "second": np.arange(4), "third": np.arange(5)})
    assert len(calls) == 2
    assert files_under(cache.root / "objects") == []
    assert not cache.object_dir(key).exists()
    assert not cache.has(key)
    assert cache.get(key) is None
    assert files_under(cache.root / "tmp") == []

    monkeypatch.setattr(cache_mod, "_write_array", real_write)
    entry = cache.put(key, {"first": np.arange(3), "second": np.arange(4), "third": np.arange(5)})
    np.testing.assert_array_equal(entry.arrays["third"], np.arange(5))
    np.testing.assert_array_equal(cache.get(key).arrays["second"], np.arange(4))


def test_crash_while_writing_meta_leaves_no_entry(cache, monkeypatch):
    key = "f0" + "3" * 30

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, {"v": np.arange(3)})
    monkeypatch.undo()
    assert not cache.object_dir(key).exists()
    assert files_under(cache.root / "objects") == []
    assert cache.get(key) is None
    np.testing.assert_array_equal(cache.put(key, {"v": np.arange(3)}).arrays["v"], np.arange(3))


def _flip_byte(path: Path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected_and_entry_removed(cache):
    key = "a1" + "4" * 30
    cache.put(key, {"v": np.arange(100, dtype=np.float64)})
    path = cache.object_dir(key) / "v.npy"
    _flip_byte(path, 8)
    seen = []
    cache.on_corrupt = lambda k, reason: seen.append((k, reason))
    assert cache.get(key) is None
    assert not cache.object_dir(key).exists()
    assert not cache.has(key)
    assert seen and seen[0][0] == key and "checksum" in seen[0][1]
    # It can be stored again.
    np.testing.assert_array_equal(cache.put(key, {"v": np.arange(3)}).arrays["v"], np.arange(3))


def test_truncated_and_missing_files_are_detected(cache):
    k1, k2 = "b1" + "5" * 30, "b2" + "6" * 30
    cache.put(k1, {"v": np.arange(50)})
    cache.put(k2, {"v": np.arange(50), "w": np.arange(5)})
    p = cache.object_dir(k1) / "v.npy"
    p.write_bytes(p.read_bytes()[:-10])
    (cache.object_dir(k2) / "w.npy").unlink()
    assert cache.get(k1) is None
    assert cache.get(k2) is None
    assert not cache.object_dir(k1).exists()
    assert not cache.object_dir(k2).exists()


def test_corrupt_meta_json_is_a_miss(cache):
    key = "b3" + "7" * 30
    cache.put(key, {"v": np.arange(5)})
    (cache.object_dir(key) / "meta.json").write_text("{not json", encoding="utf-8")
    assert cache.get(key) is None
    assert not cache.object_dir(key).exists()


def test_put_over_a_corrupt_entry_replaces_it(cache):
    key = "b4" + "9" * 30
    cache.put(key, {"v": np.arange(10)})
    _flip_byte(cache.object_dir(key) / "v.npy")
    entry = cache.put(key, {"v": np.arange(10) * 2})
    np.testing.assert_array_equal(entry.arrays["v"], np.arange(10) * 2)
    np.testing.assert_array_equal(cache.get(key).arrays["v"], np.arange(10) * 2)


def _hammer(root: str, worker: int, rounds: int) -> None:
    c = Cache(root)
    for r in range(rounds):
        c.put("9a" + "0" * 30, {"v": np.arange(100)}, {"op": "shared"})
        c.put(f"9b{worker}{r:03d}" + "0" * 26, {"v": np.full(10, worker)}, {"op": "own"})
        c.map_store("z" * 32).append(hashes(f"w{worker}-r{r}"), {"value": np.array([float(worker * 1000 + r)])},
                                     {"op": "t"})


def test_concurrent_writers_do_not_corrupt(cache):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(cache.root), w, 15)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    np.testing.assert_array_equal(cache.get("9a" + "0" * 30).arrays["v"], np.arange(100))
    for w in range(2):
        for r in range(15):
            np.testing.assert_array_equal(cache.get(f"9b{w}{r:03d}" + "0" * 26).arrays["v"], np.full(10, w))
    store = cache.map_store("z" * 32)
    names = [f"w{w}-r{r}" for w in range(2) for r in range(15)]
    found, where = store.locate(hashes(*names))
    assert found.all()
    assert store.read("value", where).tolist() == [float(w * 1000 + r) for w in range(2) for r in range(15)]
    assert files_under(cache.root / "tmp") == []


def test_object_arrays_are_refused(cache):
    key = "c1" + "8" * 30
    with pytest.raises(TypeError, match="pickle"):
        cache.put(key, {"v": np.array([{"a": 1}, None], dtype=object)})
    assert not cache.has(key)
    assert files_under(cache.root / "objects") == []
    assert files_under(cache.root / "tmp") == []


def test_every_stored_file_loads_without_pickle(cache, run_recipe, tmp_path):
    """Whole runs (objects and map shards) store only pickle-free .npy files and JSON."""
    records = [{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1), "s": i % 3, "cat": "ab"[i % 2]}
               for i in range(12)]
    run_recipe('select groups("cat") | (length > 3 | topk(field("s"), 2))', records, cache=cache.root)
    run_recipe("select dedup_exact | bottomk(length, 4)", records, cache=cache.root)
    npys = list(cache.root.rglob("*.npy"))
    assert len(list((cache.root / "objects").rglob("*.npy"))) >= 3
    assert len(list((cache.root / "maps").rglob("*.npy"))) >= 4
    for f in npys:
        arr = np.load(f, allow_pickle=False)
        assert arr.dtype != object
    for meta in cache.root.rglob("meta.json"):
        json.loads(meta.read_text(encoding="utf-8"))
    allowed = {".npy", ".json", ".lock", ""}
    stray = [p for p in files_under(cache.root) if p.suffix not in allowed and p.name != "CACHEDIR.TAG"]
    assert stray == []


# A second process trying ``Cache(root).lock(key)`` without waiting: prints "acquired" or "busy".
_TRY_LOCK = """
import sys
from filelock import Timeout
from datasel.dsl.cache import Cache
try:
    with Cache(sys.argv[1]).lock(sys.argv[2]).acquire(timeout=0):
        print("acquired")
except Timeout:
    print("busy")
"""

# A contender: waits until every contender is ready (a start barrier of files), then ``rounds``
# times takes the lock and appends "<tag> start" and "<tag> end" lines to the log while holding it.
_CONTEND = """
import os, sys, time
from pathlib import Path
from datasel.dsl.cache import Cache
root, key, log, tag, rounds, n = sys.argv[1:7]
barrier = Path(log + ".ready")
barrier.mkdir(exist_ok=True)
(barrier / tag).touch()
deadline = time.monotonic() + 60
while len(os.listdir(barrier)) < int(n):
    if time.monotonic() > deadline:
        sys.exit("the other contenders never started")
    time.sleep(0.001)
cache = Cache(root)
for _ in range(int(rounds)):
    with cache.lock(key):
        for mark in ("start", "end"):
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{tag} {mark}\\n")
"""


def _python(script: str, *args) -> list[str]:
    import sys

    return [sys.executable, "-c", script, *[str(a) for a in args]]


def test_lock_excludes_another_process(cache):
    import subprocess

    key = "k" * 32
    with cache.lock(key):
        held = subprocess.run(_python(_TRY_LOCK, cache.root, key), capture_output=True, text=True, timeout=120)
        other = subprocess.run(_python(_TRY_LOCK, cache.root, "o" * 32), capture_output=True, text=True,
                               timeout=120)
    assert (held.stdout.strip(), held.returncode) == ("busy", 0), held.stderr
    assert (other.stdout.strip(), other.returncode) == ("acquired", 0), other.stderr  # locks are per key
    released = subprocess.run(_python(_TRY_LOCK, cache.root, key), capture_output=True, text=True, timeout=120)
    assert (released.stdout.strip(), released.returncode) == ("acquired", 0), released.stderr


def test_lock_holders_in_two_processes_never_overlap(cache, tmp_path):
    """Two processes contend for one key; every start is followed by the same process's end."""
    import subprocess

    log = tmp_path / "holders.log"
    rounds = 1000
    procs = [subprocess.Popen(_python(_CONTEND, cache.root, "k" * 32, log, tag, rounds, 2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "AB"]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * 2 * rounds
    pairs = [tuple(lines[i:i + 2]) for i in range(0, len(lines), 2)]
    overlapping = [(i, pair) for i, pair in enumerate(pairs)
                   if pair not in ((f"{t} start", f"{t} end") for t in "AB")]
    assert overlapping == []
    assert sorted(pair[0] for pair in pairs) == ["A start"] * rounds + ["B start"] * rounds


# --------------------------------------------------------------- map shards
def test_map_store_append_locate_read(cache):
    store = cache.map_store("m" * 32)
    h = hashes("a", "b", "c", "d")
    found, where = store.locate(h)
    assert not found.any()
    assert where == [None] * 4
    store.append(h[:2], {"value": np.array([1.0, 2.0])}, {"op": "t"})
    store.append(h[2:], {"value": np.array([3.0, 4.0])}, {"op": "t"})
    shards = [d for d in store.dir.iterdir() if d.is_dir()]
    assert len(shards) == 2
    query = hashes("d", "x", "a", "c")
    found, where = store.locate(query)
    assert found.tolist() == [True, False, True, True]
    assert where[1] is None
    assert where[0][1] == 1 and where[2] == (where[2][0], 0) and where[3][1] == 0
    assert where[0][0] == where[3][0] != where[2][0]
    got = store.read("value", [w for w in where if w is not None])
    assert got.tolist() == [4.0, 1.0, 3.0]
    assert store.count(query) == 3


def test_map_store_multi_column_and_2d(cache):
    store = cache.map_store("n" * 32)
    h = hashes("a", "b", "c")
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.append(h, {"value": np.array([1.0, 2.0, 3.0]), "vec": feats}, {"op": "t"})
    found, where = store.locate(hashes("c", "a"))
    assert found.all()
    np.testing.assert_array_equal(store.read("vec", where), feats[[2, 0]])
    np.testing.assert_array_equal(store.read("value", where), [3.0, 1.0])


def test_map_store_duplicates_first_shard_wins(cache):
    store = cache.map_store("o" * 32)
    h = hashes("a", "b")
    store.append(h, {"value": np.array([1.0, 2.0])}, {"op": "t"})
    time.sleep(0.002)
    store.append(hashes("b", "c"), {"value": np.array([20.0, 3.0])}, {"op": "t"})
    found, where = store.locate(hashes("a", "b", "c"))
    assert found.all()
    assert store.read("value", where).tolist() == [1.0, 2.0, 3.0]
    assert store.count(hashes("a", "b", "c", "b")) == 4


def test_map_store_refresh_sees_other_writers(cache):
    key = "p" * 32
    reader = cache.map_store(key)
    writer = MapStore(Cache(cache.root), key)
    h = hashes("a", "b")
    assert reader.count(h) == 0  # loads (an empty) index
    writer.append(h, {"value": np.array([5.0, 6.0])}, {"op": "t"})
    assert writer.count(h) == 2
    reader.refresh()
    found, where = reader.locate(h)
    assert found.all()
    assert reader.read("value", where).tolist() == [5.0, 6.0]


def test_map_store_corrupt_shard_is_dropped(cache):
    store = cache.map_store("q" * 32)
    store.append(hashes("a"), {"value": np.array([1.0])}, {"op": "t"})
    time.sleep(0.002)
    store.append(hashes("b"), {"value": np.array([2.0])}, {"op": "t"})
    first = sorted(d for d in store.dir.iterdir() if d.is_dir())[0]
    _flip_byte(first / "value.npy")
    fresh = cache.map_store("q" * 32)
    found, _ = fresh.locate(hashes("a", "b"))
    assert found.tolist() == [False, True]
    assert not first.exists()


def test_map_store_append_nothing_is_noop(cache):
    store = cache.map_store("r" * 32)
    store.append(hashes()[:0], {"value": np.zeros(0)}, {"op": "t"})
    assert not store.dir.exists() or not any(store.dir.iterdir())


def test_compact_merges_shards_and_keeps_values(cache):
    store = cache.map_store("s" * 32)
    store.append(hashes("a", "b"), {"value": np.array([1.0, 2.0])}, {"op": "t"})
    time.sleep(0.002)
    store.append(hashes("b", "c"), {"value": np.array([2.0, 3.0])}, {"op": "t"})
    time.sleep(0.002)
    store.append(hashes("d"), {"value": np.array([4.0])}, {"op": "t"})
    store.compact()
    shards = [d for d in store.dir.iterdir() if d.is_dir()]
    assert len(shards) == 1
    keys = np.load(shards[0] / "keys.npy", allow_pickle=False)
    assert len(keys) == 4  # the duplicate of "b" is dropped
    fresh = cache.map_store("s" * 32)
    found, where = fresh.locate(hashes("d", "c", "b", "a"))
    assert found.all()
    assert fresh.read("value", where).tolist() == [4.0, 3.0, 2.0, 1.0]


# ---------------------------------------------------------------------- gc
def _age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_gc_cleans_stale_tmp_only(cache):
    old = cache.root / "tmp" / "123-old"
    old.mkdir()
    (old / "half.npy").write_bytes(b"xx")
    _age(old, 1)
    fresh = cache.tmp_dir()  # a writer in progress right now
    grave = cache.root / "tmp" / "corrupt-abc"
    grave.mkdir()
    removed = cache.gc()
    assert removed["tmp"] == 2
    assert not old.exists()
    assert not grave.exists()
    assert fresh.exists()
    assert removed["entries"] == 0


def test_gc_older_than_removes_only_unused_entries(cache):
    k_old, k_new = "d1" + "0" * 30, "d2" + "0" * 30
    cache.put(k_old, {"v": np.arange(3)}, {"op": "old"})
    cache.put(k_new, {"v": np.arange(4)}, {"op": "new"})
    _age(cache.object_dir(k_old) / "meta.json", 10)
    removed = cache.gc(older_than_days=5)
    assert removed["entries"] == 1
    assert removed["bytes"] > 0
    assert not cache.has(k_old)
    assert cache.get(k_new) is not None


def test_get_refreshes_last_used(cache):
    key = "d3" + "0" * 30
    cache.put(key, {"v": np.arange(3)})
    _age(cache.object_dir(key) / "meta.json", 10)
    assert cache.get(key) is not None  # used now
    cache.gc(older_than_days=5)
    assert cache.has(key)


def test_gc_all_removes_everything(cache):
    cache.put("e1" + "0" * 30, {"v": np.arange(3)})
    cache.map_store("t" * 32).append(hashes("a"), {"value": np.array([1.0])}, {"op": "t"})
    cache.work_dir("w" * 32)
    removed = cache.gc(everything=True)
    assert removed["entries"] == 3
    assert list(cache.entries()) == []
    assert files_under(cache.root / "objects") == []
    assert cache.map_store("t" * 32).count(hashes("a")) == 0


def test_gc_compacts_map_stores_and_keeps_values(cache):
    key = "u" * 32
    store = cache.map_store(key)
    store.append(hashes("a"), {"value": np.array([1.5])}, {"op": "length"})
    time.sleep(0.002)
    store.append(hashes("b"), {"value": np.array([2.5])}, {"op": "length"})
    removed = cache.gc()
    assert removed["compacted"] == 1
    assert removed["entries"] == 0
    assert len([d for d in store.dir.iterdir() if d.is_dir()]) == 1
    fresh = cache.map_store(key)
    found, where = fresh.locate(hashes("b", "a"))
    assert found.all()
    assert fresh.read("value", where).tolist() == [2.5, 1.5]


def test_gc_removes_unheld_lock_files(cache):
    with cache.lock("held"):
        cache.lock("litter").acquire()
        cache.lock("litter").release()
        cache.gc()
        assert (cache.root / "locks" / "held.lock").exists()
    assert not (cache.root / "locks" / "litter.lock").exists()


def test_entries_describe_objects_and_maps(cache):
    cache.put("f1" + "0" * 30, {"v": np.arange(3)}, {"op": "topk"})
    store = cache.map_store("v" * 32)
    store.append(hashes("a", "b"), {"value": np.array([1.0, 2.0])}, {"op": "length"})
    store.append(hashes("c"), {"value": np.array([3.0])}, {"op": "length"})
    entries = {e["kind"]: e for e in cache.entries()}
    assert entries["object"]["op"] == "topk"
    assert entries["object"]["bytes"] > 0
    assert entries["map"]["op"] == "length"
    assert entries["map"]["rows"] == 3
    assert entries["map"]["shards"] == 2


def test_entries_list_model_folders_not_their_lock_files(cache):
    models = cache.root / "models"
    (models / "tiny-model-abc").mkdir(parents=True)
    (models / "tiny-model-abc" / "config.json").write_text("{}", encoding="utf-8")
    (models / ".tiny-model-abc.lock").write_text("", encoding="utf-8")
    found = [e for e in cache.entries() if e["kind"] == "model"]
    assert [e["key"] for e in found] == ["tiny-model-abc"]
    assert found[0]["bytes"] == 2


# ------------------------------------------------------------------ descriptors and resource errors
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_many_small_shards_hold_no_file_descriptors(cache):
    store = cache.map_store("f" * 32)
    for i in range(300):  # a map filled in 300 small batches, as the Ray executor fills one
        store.append(hashes(f"r{i}"), {"value": np.array([float(i)])}, {"op": "t"})
    reader = cache.map_store("f" * 32)
    before = _open_fds()
    found, where = reader.locate(hashes(*[f"r{i}" for i in range(300)]))
    assert found.all()
    assert _open_fds() - before < 10  # memory-mapping each shard's two files would hold 600
    assert reader.read("value", where).tolist() == [float(i) for i in range(300)]


def test_large_arrays_are_still_memory_mapped(cache):
    key = "c1" + "7" * 30
    big = np.arange(cache_mod.MMAP_MIN_BYTES // 8 + 1, dtype=np.float64)
    cache.put(key, {"v": big, "small": np.arange(3)})
    entry = cache.get(key)
    assert isinstance(entry.arrays["v"], np.memmap) and not isinstance(entry.arrays["small"], np.memmap)
    with pytest.raises(ValueError):
        entry.arrays["small"][0] = 5  # read-only, as a memory map is


def test_running_out_of_descriptors_keeps_the_entry_and_says_so(cache, monkeypatch):
    import errno

    key = "d1" + "8" * 30
    cache.put(key, {"v": np.arange(10)})

    def no_fds(self):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Path, "read_bytes", no_fds)
    with pytest.raises(cache_mod.CacheResourceError, match="file descriptors.*intact"):
        cache.get(key)
    monkeypatch.undo()
    assert cache.object_dir(key).is_dir()  # not discarded as corrupt
    np.testing.assert_array_equal(cache.get(key).arrays["v"], np.arange(10))

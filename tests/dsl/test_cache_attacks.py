"""The cache cannot be fooled: every attack of the adversarial review is detected, the damaged result
is recomputed (the selection is the one a clean cache gives), a warning says so, and nothing outside
the cache is read or written.

Forged entries are written the way an attacker who knows the format would: with checksums and seals
recomputed (``_forge``), so only the key binding and the content checks can catch them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from datasel.dsl import cache as cache_mod
from datasel.dsl.cache import Cache

pytestmark = pytest.mark.usefixtures("cache_dir")

RECIPE = "select length > 10 | topk(length, 20%)"


def pool(n: int = 100) -> list[dict]:
    # output lengths 1..n (distinct, so the top 20% is well defined), ordered by a permutation
    order = np.random.default_rng(0).permutation(n)
    return [{"instruction": f"q{i}", "input": "", "output": "z" * (int(order[i]) + 1)} for i in range(n)]


@pytest.fixture
def records():
    return pool()


@pytest.fixture
def clean(run_recipe, records, tmp_path):
    """The selection RECIPE gives on a cache of its own (the reference every attacked run must match)."""
    return run_recipe(RECIPE, records, cache=tmp_path / "reference-cache").selected


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the cache; the test checks that nothing in it changes."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_text("untouched")
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def objects(root: Path) -> dict[str, Path]:
    """op -> entry folder of the whole-result entries in ``root``."""
    found = {}
    for meta in sorted((root / "objects").glob("*/*/meta.json")):
        found[json.loads(meta.read_text())["info"]["op"]] = meta.parent
    return found


def maps(root: Path) -> dict[str, Path]:
    found = {}
    for meta in sorted((root / "maps").glob("*/*/meta.json")):
        found.setdefault(json.loads(meta.read_text())["info"]["op"], meta.parent.parent)
    return found


def _forge(entry: Path, key: str | None = None, info: dict | None = None, **arrays) -> None:
    """Rewrite ``entry``'s arrays (and key, info) with valid checksums and seal."""
    meta = json.loads((entry / "meta.json").read_text())
    key = key or meta["key"]
    if info is not None:
        meta["info"] = dict(meta["info"], **info)
    for name, array in arrays.items():
        meta["files"][name] = cache_mod._write_array(entry / f"{name}.npy", np.asarray(array))
    meta["key"] = key
    meta["seal"] = cache_mod._seal(key, meta["files"], meta.get("info"))
    (entry / "meta.json").write_text(json.dumps(meta))


def rerun(run_recipe, records, cache_dir, expected, *, recomputed: str):
    out = run_recipe(RECIPE, records)
    assert out.selected == expected
    status = {n["op"]: n["status"] for n in out.manifest["nodes"]}
    assert status[recomputed] != "cached", status
    return out, out.manifest["warnings"]


# ------------------------------------------------------------------ entries bound to their key
def test_swapped_whole_result_folders_are_detected(run_recipe, records, cache_dir, clean):
    run_recipe(RECIPE, records)
    entries = objects(cache_dir)
    a, b = entries["topk"], entries["compare"]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="topk")
    assert len(out.selected) == 18  # 20% of the 90 records longer than 10
    assert any("another key" in w for w in warnings), warnings


def test_entry_copied_from_another_recipe_is_detected(run_recipe, records, cache_dir, clean):
    run_recipe("select topk(length, 97)", records)
    donor = objects(cache_dir)["topk"]
    donor_copy = cache_dir.parent / "donor"
    shutil.copytree(donor, donor_copy)
    shutil.rmtree(donor)
    run_recipe(RECIPE, records)
    target = objects(cache_dir)["topk"]
    shutil.rmtree(target)
    shutil.copytree(donor_copy, target)  # its 97 rows, its own (valid) checksums and seal
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="topk")
    assert len(out.selected) == 18
    assert any("another key" in w for w in warnings), warnings


@pytest.mark.parametrize("forged, message", [
    (np.array([-1, 2, 3]), "outside 0..99"),
    (np.array([5, 100, 7]), "outside 0..99"),
    (np.array([4, 4, 4]), "a record twice"),
    (np.array([[1, 2], [3, 4]]), "not a list of record numbers"),
    (np.array([1.5, 2.0]), "not a list of record numbers"),
])
def test_forged_indices_with_recomputed_checksums_are_rejected(run_recipe, records, cache_dir, clean, forged,
                                                               message):
    run_recipe(RECIPE, records)
    _forge(objects(cache_dir)["topk"], indices=forged)
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="topk")
    assert any("wrong result" in w and message in w for w in warnings), warnings
    # the rejected entry was replaced: a third run is fully cached and quiet
    again = run_recipe(RECIPE, records)
    assert again.selected == clean and all(n["status"] == "cached" for n in again.manifest["nodes"])


def test_forged_exclusions_are_rejected(run_recipe, records, cache_dir, clean):
    run_recipe(RECIPE, records)
    shutil.rmtree(objects(cache_dir)["topk"])  # so that the filter's stored result is read
    _forge(objects(cache_dir)["compare"], info={"exclusions": [{"reason": "false", "detail": None, "values": []}]},
           x0_indices=np.array([1000]))
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="compare")
    assert any("exclusion 0 holds record numbers outside" in w for w in warnings), warnings
    assert out.manifest["exclusions"]["stage 1 (length > 10): length > 10 is false"] == 10


def drop_objects(cache_dir: Path) -> None:
    """Remove the whole-result entries, so the next run reads the per-record (map) results."""
    shutil.rmtree(cache_dir / "objects")


def test_swapped_map_folders_are_detected(run_recipe, records, cache_dir, tmp_path):
    recipe = 'select length > 10 | topk(field("score"), 5)'
    recs = [dict(r, score=float(i)) for i, r in enumerate(records)]
    expected = run_recipe(recipe, recs, cache=tmp_path / "ref").selected
    run_recipe(recipe, recs)
    by_op = maps(cache_dir)
    a, b = by_op["length"], by_op["field"]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    drop_objects(cache_dir)
    out = run_recipe(recipe, recs)
    assert out.selected == expected
    assert any("another key" in w for w in out.manifest["warnings"])
    assert {n["op"]: n["rows_computed"] for n in out.manifest["nodes"] if n["op"] in ("length", "field")} == \
        {"length": 100, "field": 90}


@pytest.mark.parametrize("damage", ["short column", "ragged offsets", "2-d keys"])
def test_inconsistent_map_shard_is_discarded(run_recipe, records, cache_dir, clean, damage):
    run_recipe(RECIPE, records)
    shard = next(maps(cache_dir)["length"].iterdir())
    meta = json.loads((shard / "meta.json").read_text())
    column = next(n for n in meta["files"] if n != "keys")
    values = np.load(shard / f"{column}.npy")
    if damage == "short column":
        _forge(shard, **{column: values[:-3]})
    elif damage == "ragged offsets":
        _forge(shard, **{"tags__values": np.array(["a"]), "tags__offsets": np.array([0, 5, 2])})
    else:
        _forge(shard, keys=np.load(shard / "keys.npy").reshape(-1, 1))
    drop_objects(cache_dir)
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="length")
    assert any("failed verification" in w and ("rows for" in w or "offsets" in w or "record hashes" in w)
               for w in warnings), warnings


# ------------------------------------------------------------------ damaged metadata
@pytest.mark.parametrize("meta_text", [
    lambda m: json.dumps(dict(m, files=list(m["files"]))),
    lambda m: "[" * 100000 + "]" * 100000,
    lambda m: json.dumps(dict(m, seal="0" * 40)),
    lambda m: json.dumps(dict(m, format=1)),
    lambda m: "not json",
    lambda m: json.dumps(["a", "list"]),
    lambda m: json.dumps(dict(m, files={k: "digest" for k in m["files"]})),
], ids=["files-as-list", "deeply-nested", "bad-seal", "old-format", "not-json", "list", "files-not-dicts"])
def test_damaged_meta_json_is_recomputed(run_recipe, records, cache_dir, clean, meta_text):
    run_recipe(RECIPE, records)
    entry = objects(cache_dir)["topk"]
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(meta_text(meta))
    rerun(run_recipe, records, cache_dir, clean, recomputed="topk")


# ------------------------------------------------------------------ paths that leave the cache
@pytest.mark.parametrize("name", ["../../../outside/planted", "/{outside}/planted", "sub/dir", ".hidden"])
def test_file_names_that_leave_the_entry_are_refused(run_recipe, records, cache_dir, clean, outside, name):
    run_recipe(RECIPE, records)
    entry = objects(cache_dir)["topk"]
    planted = outside / "planted.npy"
    np.save(planted, np.arange(97))  # a "result" an attacker wants read
    name = name.format(outside=str(outside).lstrip("/"))
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"] = {name: {"digest": cache_mod._file_digest(planted), "bytes": planted.stat().st_size,
                            "dtype": "int64", "shape": [97]}}
    meta["seal"] = cache_mod._seal(meta["key"], meta["files"], meta["info"])
    (entry / "meta.json").write_text(json.dumps(meta))
    before = snapshot(outside)
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="topk")
    assert any("is not allowed" in w for w in warnings), warnings
    assert snapshot(outside) == before


def test_entry_folder_that_is_a_symlink_is_not_followed(run_recipe, records, cache_dir, clean, outside):
    run_recipe(RECIPE, records)
    entry = objects(cache_dir)["topk"]
    shutil.move(str(entry), outside / "moved")  # a valid entry, now outside the cache
    entry.symlink_to(outside / "moved", target_is_directory=True)
    before = snapshot(outside)
    out, warnings = rerun(run_recipe, records, cache_dir, clean, recomputed="topk")
    assert any("symbolic link" in w for w in warnings), warnings
    assert snapshot(outside) == before
    assert entry.is_dir() and not entry.is_symlink()  # the link was replaced by a real entry


@pytest.mark.parametrize("linked", ["objects-shard", "tmp", "objects"])
def test_linked_cache_folders_never_receive_new_entries(run_recipe, records, cache_dir, clean, outside, linked):
    run_recipe("select length > 3", records)  # creates the cache layout
    if linked == "objects-shard":
        for sub in (cache_dir / "objects").iterdir():
            shutil.rmtree(sub)
        for prefix in (f"{i:02x}" for i in range(256)):
            (cache_dir / "objects" / prefix).symlink_to(outside, target_is_directory=True)
    else:
        shutil.rmtree(cache_dir / linked)
        (cache_dir / linked).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    out = run_recipe(RECIPE, records)
    assert out.selected == clean
    assert snapshot(outside) == before
    assert any("symbolic link" in w for w in out.manifest["warnings"])
    again = run_recipe(RECIPE, records)
    assert all(n["status"] == "cached" for n in again.manifest["nodes"])


# ------------------------------------------------------------------ folders and lock files in the way
@pytest.mark.parametrize("where", ["locks", "tmp", "maps-key", "claims"])
def test_plain_file_in_place_of_a_cache_folder_is_repaired(run_recipe, records, cache_dir, tmp_path, where):
    second = 'select length(field="instruction") > 1 | length > 10 | kcenter(minhash(), 5)'
    expected = run_recipe(second, records, cache=tmp_path / "ref").selected
    run_recipe("select length > 3 | kcenter(minhash(), 2)", records)  # creates every folder, claims too
    if where == "maps-key":
        folder = maps(cache_dir)["length"]
        shutil.rmtree(folder)
    else:
        folder = cache_dir / where
        shutil.rmtree(folder)
    folder.write_text("in the way")
    out = run_recipe(second, records)
    assert out.selected == expected
    assert folder.is_dir()
    assert any(f"{folder} was not a folder" in w for w in out.manifest["warnings"]), out.manifest["warnings"]


def test_lock_file_that_is_a_symlink_is_removed_not_written_through(run_recipe, records, cache_dir, clean,
                                                                   outside, monkeypatch):
    from datasel.dsl import engine as engine_mod

    target = outside / "victim.txt"
    target.write_text("do not touch")
    planted = []
    real_lock = Cache.lock

    def plant_then_lock(self, key):
        path = self._writable() / "locks" / f"{key}.lock"
        if not os.path.lexists(path):
            path.symlink_to(target)
            planted.append(path)
        return real_lock(self, key)

    monkeypatch.setattr(engine_mod.Cache, "lock", plant_then_lock)
    out = run_recipe("select topk(length, 50) | kcenter(minhash(), 3)", records)
    assert planted, "the recipe took no lock"
    assert target.read_text() == "do not touch"
    assert all(not p.is_symlink() for p in planted)
    assert any("lock file" in w and "symbolic link" in w for w in out.manifest["warnings"])


def test_claim_file_that_is_a_symlink_is_not_read(tmp_path, outside):
    cache = Cache(tmp_path / "c")
    board = cache.claims("m" * 32)
    secret = outside / "secret"
    secret.write_bytes(b"\x01" * 16)
    (board.dir / "planted.claim").symlink_to(secret)
    assert board.claimed_by_others() == set()
    assert not (board.dir / "planted.claim").exists() and secret.read_bytes() == b"\x01" * 16


# ------------------------------------------------------------------ gc does not trust links
def test_gc_all_removes_links_as_links_and_counts_only_real_entries(run_recipe, records, cache_dir, outside):
    run_recipe(RECIPE, records)
    # an outside folder holding a copy of a real entry, linked in as an entry and as a shard folder
    entry = objects(cache_dir)["topk"]
    shutil.copytree(entry, outside / "copy")
    (cache_dir / "objects" / "zz").symlink_to(outside, target_is_directory=True)
    (entry.parent / ("f" * 32)).symlink_to(outside / "copy", target_is_directory=True)
    real = sum(1 for e in Cache(cache_dir).entries())
    before = snapshot(outside)
    removed = Cache(cache_dir).gc(everything=True)
    assert removed["entries"] == real and removed["failed"] == 0
    assert removed["links"] == 2
    assert snapshot(outside) == before
    assert list(Cache(cache_dir).entries()) == []


def test_ls_does_not_list_entries_reached_through_links(run_recipe, records, cache_dir, outside):
    run_recipe(RECIPE, records)
    listed = len(list(Cache(cache_dir).entries()))
    entry = objects(cache_dir)["topk"]
    shutil.copytree(entry, outside / "e" / ("0" * 32))
    (cache_dir / "objects" / "ff").symlink_to(outside / "e", target_is_directory=True)
    assert len(list(Cache(cache_dir).entries())) == listed

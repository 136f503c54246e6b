"""The engine through the library API: caching across runs, incremental pools, recovery,
laziness, concurrency and the manifest."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from datasel.dsl.cache import Cache
from datasel.dsl.engine import OpError
from datasel.dsl.runner import cache_state, evaluate, load_inputs, run
from datasel.ops import registry

pytestmark = pytest.mark.usefixtures("cache_dir")

RECIPE = 'select length > 20 | topk(field("score"), 3)'


def pool_records(n: int, start: int = 0) -> list[dict]:
    """Record i has an output of 3*(i+1) characters and score i % 5."""
    return [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1)), "score": i % 5}
            for i in range(start, start + n)]


def expected_pick(records: list[dict], k: int = 3) -> list[int]:
    """Hand rule for RECIPE: survivors of len(output) > 20, by score descending, ties by pool order."""
    survivors = [i for i, r in enumerate(records) if len(r["output"]) > 20]
    return sorted(survivors, key=lambda i: (-records[i]["score"], i))[:k]


def statuses(outcome) -> dict[str, str]:
    return {n["op"]: n["status"] for n in outcome.manifest["nodes"]}


@pytest.fixture
def no_op_work(monkeypatch):
    """Make every operator used by RECIPE fail if it is called."""

    def install(*names):
        for name in names:
            def boom(*args, _name=name, **kwargs):
                raise AssertionError(f"op {_name} ran although everything is cached")
            monkeypatch.setattr(registry.get(name), "fn", boom)

    return install


# ------------------------------------------------------------------ laziness
@pytest.mark.executors
def test_map_op_computes_only_survivors(run_recipe):
    records = pool_records(20)
    out = run_recipe(RECIPE, records)
    # len = 3(i+1) > 20  <=>  i >= 6: 14 survivors of 20.
    assert out.node("length")["rows_computed"] == 20
    assert out.node("field")["rows_computed"] == 14
    # scores i % 5 == 4 at i = 9, 14, 19.
    assert out.selected == [9, 14, 19] == expected_pick(records)


@pytest.mark.executors
def test_identical_records_are_computed_once(run_recipe):
    records = pool_records(5) + pool_records(5)  # every record twice
    out = run_recipe("select topk(length, 3)", records)
    assert out.node("length")["rows_computed"] == 5
    assert out.selected == [4, 9, 3]


# ------------------------------------------------------------------ rerun
def test_second_run_is_fully_cached_and_does_no_op_work(run_recipe, write_pool, no_op_work):
    records = pool_records(20)
    first = run_recipe(RECIPE, records)
    assert statuses(first)["length"] == "computed"
    assert statuses(first)["topk"] == "computed"
    no_op_work("length", "field", "topk")
    second = run_recipe(RECIPE, records)
    assert second.selected == first.selected
    for node in second.manifest["nodes"]:
        assert node["status"] == "cached", node
        assert node["rows_computed"] == 0, node


def test_editing_only_the_final_selector_recomputes_nothing_upstream(run_recipe, no_op_work):
    records = pool_records(20)
    run_recipe(RECIPE, records)
    no_op_work("length", "field")
    out = run_recipe('select length > 20 | bottomk(field("score"), 2)', records)
    assert out.node("length")["rows_computed"] == 0
    assert out.node("field")["rows_computed"] == 0
    assert out.node("compare")["status"] == "cached"
    assert out.node("bottomk")["status"] == "computed"
    # score 0 at i = 10, 15 among survivors i >= 6
    assert out.selected == [10, 15]


@pytest.mark.executors
def test_appending_ten_percent_computes_only_new_rows(run_recipe, write_pool):
    old = pool_records(20)
    run_recipe(RECIPE, old)
    grown = old + pool_records(2, start=20)  # two new records: i = 20, 21 (both survive the filter)
    out = run_recipe(RECIPE, write_pool(grown, "grown.jsonl"))
    length, field = out.node("length"), out.node("field")
    assert length["rows_computed"] == 2
    assert length["rows_cached"] == 20
    assert length["status"] == "partial"
    assert field["rows_computed"] == 2
    assert field["status"] == "partial"
    assert out.selected == expected_pick(grown) == [9, 14, 19]
    # Third run on the grown pool: nothing left to compute.
    again = run_recipe(RECIPE, write_pool(grown, "grown.jsonl"))
    assert all(n["status"] == "cached" and n["rows_computed"] == 0 for n in again.manifest["nodes"])


def test_new_records_that_do_not_survive_are_not_scored(run_recipe, write_pool):
    old = pool_records(20)
    run_recipe(RECIPE, old)
    short = [{"instruction": "new short", "input": "", "output": "tiny", "score": 99},
             {"instruction": "new long", "input": "", "output": "y" * 40, "score": 4}]
    out = run_recipe(RECIPE, write_pool(old + short, "grown.jsonl"))
    assert out.node("length")["rows_computed"] == 2
    assert out.node("field")["rows_computed"] == 1
    assert out.selected == [9, 14, 19]  # the new long one (score 4) comes after the earlier ties


# --------------------------------------------------------------- recovery
def _entry_dirs(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "objects").glob("*/*/meta.json"))


def test_deleted_object_entry_is_recomputed(run_recipe, cache_dir):
    records = pool_records(20)
    first = run_recipe(RECIPE, records)
    dirs = _entry_dirs(cache_dir)
    assert dirs, "a run stores its selections"
    for d in dirs:
        shutil.rmtree(d)
    second = run_recipe(RECIPE, records)
    assert second.selected == first.selected
    assert second.node("topk")["status"] == "computed"
    assert second.node("length")["rows_computed"] == 0  # map rows were not touched


def test_deleted_map_shard_is_recomputed(run_recipe, cache_dir):
    records = pool_records(20)
    first = run_recipe(RECIPE, records)
    for d in _entry_dirs(cache_dir):
        shutil.rmtree(d)
    # Remove one file of the length shard(s).
    length_id = first.node("length")["id"]
    shards = [m.parent for m in (cache_dir / "maps").glob("*/*/meta.json")
              if json.loads(m.read_text())["info"]["node"] == length_id]
    assert shards
    for s in shards:
        (s / "value.npy").unlink()
    second = run_recipe(RECIPE, records)
    assert second.selected == first.selected
    assert second.node("length")["rows_computed"] == 20
    assert second.node("field")["rows_computed"] == 0


def test_corrupt_npy_is_recomputed_with_a_warning(run_recipe, cache_dir):
    records = pool_records(20)
    first = run_recipe(RECIPE, records)
    npys = sorted((cache_dir / "objects").rglob("*.npy")) + sorted((cache_dir / "maps").rglob("*.npy"))
    assert len(npys) >= 4
    for f in npys:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x55
        f.write_bytes(bytes(data))
    second = run_recipe(RECIPE, records)
    assert second.selected == first.selected
    assert second.node("topk")["status"] == "computed"
    assert second.node("length")["rows_computed"] == 20
    assert second.node("field")["rows_computed"] == 14
    assert any("failed verification" in w for w in second.manifest["warnings"])
    # And the cache is healthy afterwards.
    third = run_recipe(RECIPE, records)
    assert all(n["status"] == "cached" for n in third.manifest["nodes"])
    assert third.manifest["warnings"] == []


def test_interrupted_map_op_keeps_finished_chunks(run_recipe, monkeypatch):
    """Long map ops persist finished chunks: a crash after chunk 1 keeps chunk 1."""
    spec = registry.get("length")
    real = spec.fn
    monkeypatch.setattr(spec, "chunk_rows", 4)
    calls = []

    def flaky(state, batch, **kw):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(state, batch, **kw)

    monkeypatch.setattr(spec, "fn", flaky)
    records = pool_records(10)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("select topk(length, 2)", records)
    monkeypatch.setattr(spec, "fn", real)
    out = run_recipe("select topk(length, 2)", records)
    assert out.node("length")["rows_computed"] == 6
    assert out.selected == [9, 8]


def test_lazily_pulled_input_time_is_charged_to_the_input(run_recipe, monkeypatch):
    """topk pulls `length` lazily inside its own call; the manifest charges that time to `length`.

    The engine's clock is replaced by one that stands still except inside `length`'s function,
    where it jumps 5 s, so the seconds charged to each node are exact (no real waiting).
    """
    import time as real_time

    from datasel.dsl import engine as engine_module

    class Clock:
        def __init__(self):
            self.now = 1000.0

        def perf_counter(self) -> float:
            return self.now

        def __getattr__(self, name):  # everything else is the real time module
            return getattr(real_time, name)

    clock = Clock()
    monkeypatch.setattr(engine_module, "time", clock)
    spec = registry.get("length")
    real = spec.fn
    calls = []

    def slow(state, batch, **kw):
        calls.append(len(batch))
        clock.now += 5.0
        return real(state, batch, **kw)

    monkeypatch.setattr(spec, "fn", slow)
    out = run_recipe("select topk(length, 2)", pool_records(10))
    assert out.selected == [9, 8]
    assert sum(calls) == 10  # in chunks: a small first one, then sized by the measured rate
    assert out.node("length")["seconds"] == 5.0 * len(calls)
    assert out.node("topk")["seconds"] == 0.0


def test_runtime_error_names_op_and_recipe_position(run_recipe, monkeypatch):
    def broken(ctx, idx, **kw):
        raise ValueError("cannot read the field")

    monkeypatch.setattr(registry.get("field"), "fn", broken)
    with pytest.raises(OpError) as err:
        run_recipe('select length > 20 | topk(field("score"), 3)', pool_records(20))
    msg = str(err.value)
    assert "recipe.sel:1:" in msg
    assert 'field(name="score")' in msg
    assert "cannot read the field" in msg


# --------------------------------------------------------------- concurrency
def test_two_concurrent_processes_share_one_cache(write_pool, cli_subprocess, tmp_path, cache_dir):
    records = [{"instruction": f"q{i}", "input": "", "output": "w " * (i % 37 + 1), "score": (i * 7) % 11,
                "cat": "abc"[i % 3]} for i in range(300)]
    pool = write_pool(records)
    recipe = tmp_path / "r.sel"
    recipe.write_text('select groups("cat") | (length > 10 | topk(field("score") + length, 5))\n',
                      encoding="utf-8")
    procs = [cli_subprocess("run", recipe, "--pool", pool, "-o", tmp_path / f"out{i}.jsonl", "-q", wait=False)
             for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    a = (tmp_path / "out0.jsonl").read_bytes()
    b = (tmp_path / "out1.jsonl").read_bytes()
    assert a == b
    assert len(a.splitlines()) == 15
    m0 = json.loads((tmp_path / "out0.jsonl.manifest.json").read_text())
    m1 = json.loads((tmp_path / "out1.jsonl.manifest.json").read_text())
    assert m0["selected"] == m1["selected"]
    # The shared cache is consistent: a third run finds everything cached.
    third = run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text=recipe.read_text())
    assert [int(i) for i in third.selected] == m0["selected"]
    assert all(n["status"] == "cached" for n in third.manifest["nodes"])
    assert third.manifest["warnings"] == []


# ------------------------------------------------------------------ manifest
def test_manifest_contents(run_recipe, write_pool, tmp_path):
    records = pool_records(20)
    records.insert(3, {"instruction": "bad", "input": "", "output": ""})  # line 4, skipped
    out_file = tmp_path / "sel.jsonl"
    res = run_recipe(RECIPE, records, output=out_file, on_bad_record="skip")
    m = json.loads(Path(str(out_file) + ".manifest.json").read_text(encoding="utf-8"))
    assert m["recipe"]["text"] == RECIPE
    assert m["recipe"]["sha256"] == hashlib.sha256(RECIPE.encode("utf-8")).hexdigest()
    assert m["pool_size"] == 20
    # Indices into the pool file (the skipped line shifts later records by one), in selection order.
    assert m["selected"] == [10, 15, 20]
    assert res.selected == m["selected"]
    assert m["exclusions"] == {"pool: bad record: empty response": 1,
                               "stage 1 (length > 20): length > 20 is false": 6, "stage 2 (topk(field(\"score\"), 3)): not in the top 3": 11}
    assert {n["id"] for n in m["plan"]["nodes"]} == {n["id"] for n in m["nodes"]}
    assert m["plan"]["output"] == res.node("topk")["id"]
    for n in m["nodes"]:
        assert {"id", "op", "status", "seconds", "rows_computed"} <= set(n)
        assert n["status"] in ("computed", "cached", "partial")
        assert isinstance(n["seconds"], (int, float)) and n["seconds"] >= 0
    lines = out_file.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l)["instruction"] for l in lines] == ["q9", "q14", "q19"]


def test_manifest_counts_nan_exclusions(run_recipe):
    records = pool_records(6)
    del records[1]["score"]
    records[2]["score"] = "n/a"
    out = run_recipe('select topk(field("score"), 10)', records)
    assert out.selected == [4, 3, 0, 5]
    assert out.manifest["exclusions"] == {'stage 1 (topk(field("score"), 10)): no score': 2}


# ------------------------------------------------------------- cache_state
def test_cache_state_before_and_after(write_pool, cache_dir):
    from datasel.dsl.compiler import compile_recipe, recipe_source
    from datasel.dsl.runner import fingerprints

    records = pool_records(20)
    pool = write_pool(records)
    datasets = load_inputs(pool)
    compiled = compile_recipe(recipe_source(RECIPE, name="r.sel"), None, fingerprints(datasets))
    cache = Cache(cache_dir)
    before = cache_state(compiled.plan, datasets, cache)
    by_op = {compiled.plan.nodes[k].op: v["state"] for k, v in before.items()}
    assert by_op == {"length": "miss", "compare": "miss", "field": "miss", "topk": "miss"}
    run("r.sel", pool, cache_dir=cache_dir, quiet=True, recipe_text=RECIPE)
    after = cache_state(compiled.plan, datasets, cache)
    by_op = {compiled.plan.nodes[k].op: v for k, v in after.items()}
    assert by_op["length"]["state"] == "hit"
    assert by_op["topk"]["state"] == "hit"
    assert by_op["compare"]["state"] == "hit"
    # field only ever sees the 14 survivors of the length filter: all of them are cached
    assert by_op["field"]["state"] == "hit"
    assert by_op["field"]["fraction"] == 1.0 and by_op["field"]["rows"] == 0


def test_evaluate_scores_for_every_record(write_pool, cache_dir):
    records = pool_records(4)
    res = evaluate("length", write_pool(records), cache_dir=cache_dir, quiet=True)
    assert res.values.tolist() == [3.0, 6.0, 9.0, 12.0]
    assert res.positions.tolist() == [0, 1, 2, 3]
    sel = evaluate("length > 7", write_pool(records), cache_dir=cache_dir, quiet=True)
    assert sel.values.tolist() == [False, False, True, True]

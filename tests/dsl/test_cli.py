"""The `datasel` command: exit codes, messages, run/compile/eval/ops/cache."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")

RECIPE = 'select length > 20 | topk(field("score"), 3)\n'


def records(n: int = 20) -> list[dict]:
    """Record i: output of 3*(i+1) characters, score i % 5."""
    return [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1)), "score": i % 5} for i in range(n)]


@pytest.fixture
def recipe(tmp_path):
    def write(text: str = RECIPE, name: str = "r.sel") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def pool(write_pool):
    return write_pool(records())


def manifest_of(out: Path) -> dict:
    return json.loads(Path(str(out) + ".manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------- run
def test_run_writes_output_and_manifest(cli, recipe, pool, tmp_path):
    out = tmp_path / "sel.jsonl"
    r = cli("run", recipe(), "--pool", pool, "-o", out)
    assert r.code == 0, r.err
    assert "selected 3 of 20 records" in r.out
    src = pool.read_bytes().splitlines(keepends=True)
    assert out.read_bytes() == src[9] + src[14] + src[19]
    m = manifest_of(out)
    assert m["recipe"]["text"] == RECIPE
    assert m["selected"] == [9, 14, 19]
    assert m["pool_size"] == 20
    # Every record that was not selected is accounted for: 6 too short, 11 below the top 3.
    assert m["exclusions"] == {"stage 1 (length > 20): length > 20 is false": 6, "stage 2 (topk(field(\"score\"), 3)): not in the top 3": 11}
    assert {n["op"] for n in m["nodes"]} >= {"length", "compare", "field", "topk"}
    assert all(set(n) >= {"id", "op", "status", "seconds", "rows_computed"} for n in m["nodes"])
    assert "plan" in m and m["plan"]["output"]


def test_second_cli_run_reports_every_node_cached(cli, recipe, pool, tmp_path):
    out = tmp_path / "sel.jsonl"
    assert cli("run", recipe(), "--pool", pool, "-o", out).code == 0
    first = manifest_of(out)
    assert any(n["status"] == "computed" for n in first["nodes"])
    r = cli("run", recipe(), "--pool", pool, "-o", out)
    assert r.code == 0
    m = manifest_of(out)
    assert [n["status"] for n in m["nodes"]] == ["cached"] * len(m["nodes"])
    assert all(n["rows_computed"] == 0 for n in m["nodes"])
    assert m["selected"] == first["selected"]
    assert f"(0 of {len(m['nodes'])} nodes computed" in r.out


def test_run_without_output_writes_next_to_the_pool_and_says_where(cli, recipe, pool, tmp_path):
    r = cli("run", recipe(), "--pool", pool)
    assert r.code == 0
    assert "selected 3 of 20 records" in r.out
    written = pool.parent / f"{pool.stem}.selected.jsonl"
    assert f"wrote {written} and {written}.manifest.json" in r.out
    assert [json.loads(line)["instruction"] for line in written.read_text().splitlines()] == ["q9", "q14", "q19"]
    assert manifest_of(written)["selected"] == [9, 14, 19]


def test_cache_flag_overrides_environment(cli, recipe, pool, tmp_path, cache_dir):
    other = tmp_path / "elsewhere"
    assert cli("run", recipe(), "--pool", pool, "--cache", other).code == 0
    assert list((other / "maps").iterdir())
    assert not (cache_dir / "maps").exists() or not list((cache_dir / "maps").iterdir())


def test_on_bad_record_skip_counts_exclusions(cli, recipe, tmp_path):
    lines = [json.dumps(r) for r in records()]
    lines.insert(5, '{"instruction": "broken"')
    lines.insert(8, json.dumps({"instruction": "empty", "output": " "}))
    pool = tmp_path / "bad.jsonl"
    pool.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fail = cli("run", recipe(), "--pool", pool)
    assert fail.code == 1
    assert f"{pool}:6:" in fail.err
    assert "Traceback" not in fail.err
    out = tmp_path / "sel.jsonl"
    ok = cli("run", recipe(), "--pool", pool, "--on-bad-record", "skip", "-o", out)
    assert ok.code == 0, ok.err
    m = manifest_of(out)
    assert m["exclusions"] == {"pool: bad record: malformed JSON": 1, "pool: bad record: empty response": 1,
                               "stage 1 (length > 20): length > 20 is false": 6, "stage 2 (topk(field(\"score\"), 3)): not in the top 3": 11}
    assert m["pool_size"] == 20
    # positions in the file: records 9, 14, 19 sit behind both bad lines
    assert m["selected"] == [11, 16, 21]
    assert "skipped 1 record of --pool when reading: malformed JSON" in ok.out
    # The funnel: 20 usable records, 14 longer than 20 characters, then the top 3.
    assert "  20  pool\n  14  length > 20" in ok.out
    assert "   3  topk(field(\"score\"), 3)" in ok.out


def test_set_overrides_a_binding(cli, recipe, pool, tmp_path):
    r = recipe('n = 3\nselect topk(length, n)\n')
    out = tmp_path / "a.jsonl"
    assert cli("run", r, "--pool", pool, "-o", out).code == 0
    assert manifest_of(out)["selected"] == [19, 18, 17]
    assert cli("run", r, "--pool", pool, "-o", out, "--set", "n=1").code == 0
    assert manifest_of(out)["selected"] == [19]
    # overriding a prelude name used by the recipe
    r2 = recipe('select topk(response_chars, 2)\n', "p.sel")
    assert cli("run", r2, "--pool", pool, "-o", out, "--set", 'response_chars=-length').code == 0
    assert manifest_of(out)["selected"] == [0, 1]


def test_bad_set_is_an_error(cli, recipe, pool):
    r = cli("run", recipe(), "--pool", pool, "--set", "no equals sign")
    assert r.code == 1
    assert "--set" in r.err
    assert "Traceback" not in r.err


def test_pool_format_override(cli, recipe, tmp_path):
    path = tmp_path / "it.jsonl"
    path.write_text("".join(json.dumps({"instruction": "x", "input": f"in{i}", "target": "t" * (i + 1)}) + "\n"
                            for i in range(5)), encoding="utf-8")
    r = recipe("select topk(length, 2)\n")
    assert cli("run", r, "--pool", path).code == 1
    out = tmp_path / "sel.jsonl"
    ok = cli("run", r, "--pool", path, "--pool-format", "input_target", "-o", out)
    assert ok.code == 0, ok.err
    assert manifest_of(out)["selected"] == [4, 3]


# ---------------------------------------------------------------- errors
def test_recipe_error_exit_1_with_location_and_no_traceback(cli, recipe, pool):
    r = recipe("x = topk(lenght, 5)\nselect x\n", "bad.sel")
    for argv in (("run", r, "--pool", pool), ("compile", r)):
        res = cli(*argv)
        assert res.code == 1
        assert re.search(r"bad\.sel:1:10: error: unknown name 'lenght'; did you mean 'length'\?", res.err)
        assert "Traceback" not in res.err


def test_all_static_errors_reported_together(cli, recipe):
    r = recipe("a = topk(lenght, 5)\nb = topk(random(3), 2)\nselect a + b\n", "two.sel")
    res = cli("compile", r)
    assert res.code == 1
    assert "two.sel:1:" in res.err and "two.sel:2:" in res.err


def test_data_error_exit_1(cli, recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    res = cli("run", recipe(), "--pool", bad)
    assert res.code == 1
    assert f"{bad}:2:" in res.err
    assert "Traceback" not in res.err


def test_missing_files_exit_1(cli, recipe, pool, tmp_path):
    res = cli("run", recipe(), "--pool", tmp_path / "nope.jsonl")
    assert res.code == 1
    assert "nope.jsonl" in res.err and "Traceback" not in res.err
    res = cli("run", tmp_path / "nope.sel", "--pool", pool)
    assert res.code == 1
    assert "nope.sel" in res.err and "Traceback" not in res.err
    res = cli("compile", tmp_path / "nope.sel")
    assert res.code == 1


def test_unknown_recipe_name_suggests_a_shipped_one(cli, pool):
    res = cli("run", "superfilter", "--pool", pool)
    assert res.code == 1
    assert "did you mean 'superfiltering'?" in res.err
    assert "shipped recipes: cherry, " in res.err and "prelude" not in res.err
    res = cli("compile", "zzzz")
    assert res.code == 1 and "did you mean" not in res.err and "shipped recipes:" in res.err


def test_usage_errors_exit_2(cli, recipe, pool):
    assert cli("run", recipe(), "--pool", pool, "--bogus").code == 2
    assert cli("run", recipe()).code == 2  # --pool is required
    assert cli("compile", recipe(), "--format", "svg").code == 2
    assert cli("frobnicate").code == 2
    assert cli().code == 2


def test_debug_prints_traceback(cli, recipe, tmp_path):
    res = cli("--debug", "run", recipe(), "--pool", tmp_path / "nope.jsonl")
    assert res.code == 1
    assert "Traceback (most recent call last)" in res.err
    assert "nope.jsonl" in res.err


def test_version(cli):
    res = cli("--version")
    assert res.code == 0
    assert res.out.startswith("datasel ")


# --------------------------------------------------------------- compile
def test_compile_text_json_dot(cli, recipe):
    r = recipe()
    text = cli("compile", r)
    assert text.code == 0
    assert "topk" in text.out and "length" in text.out
    js = cli("compile", r, "--format", "json")
    assert js.code == 0
    plan = json.loads(js.out)
    ops = [n["op"] for n in plan["nodes"]]
    assert {"length", "compare", "field", "topk"} <= set(ops)
    assert plan["output"] == next(n["id"] for n in plan["nodes"] if n["op"] == "topk")
    assert all(n["cache"] is None for n in plan["nodes"])
    dot = cli("compile", r, "--format", "dot")
    assert dot.code == 0
    assert dot.out.lstrip().startswith("digraph")
    assert dot.out.rstrip().endswith("}")
    assert dot.out.count("->") == sum(len(n["inputs"]) for n in plan["nodes"])


def test_compile_pool_fills_cache_column(cli, recipe, pool, write_pool):
    r = recipe()

    def states(pool_path):
        res = cli("compile", r, "--pool", pool_path, "--format", "json")
        assert res.code == 0, res.err
        return {n["op"]: n["cache"] for n in json.loads(res.out)["nodes"] if n["op"] != "dataset"}

    assert states(pool) == {"length": "miss", "compare": "miss", "field": "miss", "topk": "miss"}
    assert cli("run", r, "--pool", pool).code == 0
    # field ran on the 14 survivors only, and only those will ever reach it: fully cached, as a rerun is
    assert states(pool) == {"length": "hit", "compare": "hit", "field": "hit", "topk": "hit"}
    grown = write_pool(records(22), "grown.jsonl")
    assert states(grown) == {"length": "partial", "compare": "miss", "field": "partial", "topk": "miss"}
    text = cli("compile", r, "--pool", grown)
    assert "partly cached 91%" in text.out  # length: 20 of 22
    assert "model work left on this pool: none" in text.out  # length and field have no model work


# ------------------------------------------------------------------ eval
def test_eval_stdout_jsonl(cli, pool):
    res = cli("eval", "length", "--pool", pool)
    assert res.code == 0
    rows = [json.loads(l) for l in res.out.splitlines()]
    assert rows[:3] == [{"index": 0, "value": 3.0}, {"index": 1, "value": 6.0}, {"index": 2, "value": 9.0}]
    assert len(rows) == 20


def test_eval_missing_values_are_null(cli, write_pool):
    p = write_pool([{"instruction": "a", "output": "b", "s": 1.5}, {"instruction": "c", "output": "d"}])
    res = cli("eval", 'field("s")', "--pool", p)
    assert res.code == 0
    assert [json.loads(l) for l in res.out.splitlines()] == [{"index": 0, "value": 1.5}, {"index": 1, "value": None}]


@pytest.mark.parametrize("suffix", ["jsonl", "npy", "parquet"])
def test_eval_output_files(cli, pool, tmp_path, suffix):
    out = tmp_path / f"x.{suffix}"
    res = cli("eval", 'field("score")', "--pool", pool, "-o", out)
    assert res.code == 0, res.err
    expected = [float(i % 5) for i in range(20)]
    if suffix == "npy":
        assert np.load(out, allow_pickle=False).tolist() == expected
    elif suffix == "parquet":
        table = pq.read_table(out).to_pydict()
        assert table["value"] == expected and table["index"] == list(range(20))
    else:
        assert [json.loads(l)["value"] for l in out.read_text().splitlines()] == expected
    assert res.out == ""


def test_eval_arithmetic_expression(cli, pool):
    """Scores arithmetic is a Scores expression like any other (`0.7*ifd + 0.3*rank(reward)`)."""
    res = cli("eval", 'field("score") * 2 + 1', "--pool", pool)
    assert res.code == 0, res.err
    assert [json.loads(l)["value"] for l in res.out.splitlines()] == [2.0 * (i % 5) + 1 for i in range(20)]


def test_eval_selector_and_recipe_names(cli, pool, recipe):
    r = recipe('long = length > 50\nselect topk(length, 1)\n')
    res = cli("eval", "long", "--pool", pool, "--recipe", r)
    assert res.code == 0, res.err
    assert [json.loads(l)["value"] for l in res.out.splitlines()] == [3 * (i + 1) > 50 for i in range(20)]


def test_eval_errors(cli, pool):
    res = cli("eval", "lenght", "--pool", pool)
    assert res.code == 1
    assert "did you mean 'length'" in res.err
    assert cli("eval", "length").code == 2


# ------------------------------------------------------------------- ops
def test_ops_list_and_one(cli):
    res = cli("ops")
    assert res.code == 0
    for name in ("topk(", "bottomk(", "random(", "sample(", "length(", "field(", "dedup_exact(", "groups("):
        assert name in res.out
    one = cli("ops", "topk")
    assert one.code == 0
    assert one.out.startswith("topk(scores: Scores, k: Budget")
    assert "Selector" in one.out and "parameters:" in one.out
    bad = cli("ops", "topkk")
    assert bad.code == 1
    assert "topkk" in bad.err


# ----------------------------------------------------------------- cache
def test_cache_ls_du_gc(cli, recipe, pool, cache_dir):
    assert cli("run", recipe(), "--pool", pool).code == 0
    ls = cli("cache", "ls")
    assert ls.code == 0
    kinds = [line.split()[0] for line in ls.out.splitlines()]
    assert kinds.count("map") == 2 and kinds.count("object") >= 2
    assert "length" in ls.out and "field" in ls.out
    du = cli("cache", "du")
    assert du.code == 0
    assert "map:length" in du.out and f"total in {cache_dir}" in du.out
    gc = cli("cache", "gc")
    assert gc.code == 0 and "removed 0 entries" in gc.out
    # Age every entry, then gc --older-than removes them; the next run recomputes.
    old = time.time() - 30 * 86400
    for meta in cache_dir.rglob("meta.json"):
        os.utime(meta, (old, old))
    gc = cli("cache", "gc", "--older-than", "7")
    assert gc.code == 0
    n = int(re.search(r"removed (\d+) entries", gc.out).group(1))
    assert n == len(ls.out.splitlines())
    assert cli("cache", "ls").out.strip() == ""


def test_cache_gc_all(cli, recipe, pool, cache_dir):
    assert cli("run", recipe(), "--pool", pool).code == 0
    assert cli("cache", "ls").out.strip()
    gc = cli("cache", "gc", "--all")
    assert gc.code == 0
    assert cli("cache", "ls").out.strip() == ""
    out = cache_dir.parent / "after.jsonl"
    assert cli("run", recipe(), "--pool", pool, "-o", out).code == 0
    assert manifest_of(out)["selected"] == [9, 14, 19]
    assert next(n for n in manifest_of(out)["nodes"] if n["op"] == "length")["rows_computed"] == 20


def test_cli_entry_point_as_subprocess(cli_subprocess, recipe, pool, tmp_path):
    out = tmp_path / "s.jsonl"
    res = cli_subprocess("run", recipe(), "--pool", pool, "-o", out, "-q")
    assert res.code == 0, res.err
    assert manifest_of(out)["selected"] == [9, 14, 19]
    bad = cli_subprocess("run", recipe(), "--pool", pool, "--nope")
    assert bad.code == 2

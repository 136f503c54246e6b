"""Every pool record accounted for: the funnel, per-record reasons, `datasel why`, identical on a cached rerun."""
from __future__ import annotations

import json

import pytest

from datasel.dsl.accounting import find_record, why
from datasel.ops import registry

pytestmark = pytest.mark.usefixtures("cache_dir")


def records(n: int) -> list[dict]:
    """Record i: output of 3*(i+1) characters, score i % 5; records 7 and 8 repeat records 1 and 2."""
    out = [{"instruction": f"q{i}", "input": "", "output": "x" * (3 * (i + 1)), "score": i % 5} for i in range(n)]
    out[7] = dict(out[1])
    out[8] = dict(out[2])
    return out


def reasons_by_record(manifest) -> dict[int, str | None]:
    table = manifest["records"]
    return dict(zip(table["position"], table["reason"]))


def test_every_record_is_accounted_for_at_the_stage_that_dropped_it(run_recipe):
    pool = records(20)
    out = run_recipe('select dedup_exact | length > 20 | topk(field("score"), 3)', pool)
    funnel = out.manifest["funnel"]
    assert [(s["in"], s["out"]) for s in funnel[1:]] == [(20, 18), (18, 12), (12, 3)]
    assert funnel[0] == {"stage": 0, "label": "pool", "out": 20}
    assert funnel[1]["dropped"] == {"exact duplicate": 2}
    assert funnel[2]["dropped"] == {"length > 20 is false": 6}
    assert funnel[3]["dropped"] == {"not in the top 3": 9}
    table = out.manifest["records"]
    stage = dict(zip(table["position"], table["stage"]))
    # Exactly the selected records have no dropping stage; every other record has one.
    assert sorted(p for p, s in stage.items() if s is None) == sorted(out.selected)
    assert sum(1 for s in stage.values() if s is not None) == 20 - 3
    assert stage[7] == stage[8] == 1
    assert {p for p, s in stage.items() if s == 2} == {0, 1, 2, 3, 4, 5}  # lengths 3..18
    reasons = reasons_by_record(out.manifest)
    assert reasons[7] == "duplicate of record 1 (line 2) (all)"
    assert reasons[8] == "duplicate of record 2 (line 3) (all)"
    assert reasons[0] == "length > 20 is false: length = 3"
    # survivors with length > 20: i >= 6 minus the duplicates 7, 8; scores i % 5; top 3 = 9, 14, 19 (score 4)
    assert out.selected == [9, 14, 19]
    assert reasons[13] == ('not among the top 3 by field(name="score"): 3, rank 4 of 12, cut-off 4')
    assert out.manifest["exclusions"] == {
        "stage 1 (dedup_exact): exact duplicate": 2,
        "stage 2 (length > 20): length > 20 is false": 6,
        'stage 3 (topk(field("score"), 3)): not in the top 3': 9,
    }


def test_cached_rerun_accounts_identically_and_does_no_op_work(run_recipe, monkeypatch):
    pool = records(20)
    recipe = 'select dedup_exact | groups("score") | topk(length, 50%)'
    first = run_recipe(recipe, pool)
    for name in ("dedup_exact", "length", "groups"):
        monkeypatch.setattr(registry.get(name), "fn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    second = run_recipe(recipe, pool)
    assert second.selected == first.selected
    assert all(n["status"] == "cached" for n in second.manifest["nodes"])
    assert second.manifest["funnel"] == first.manifest["funnel"]
    assert second.manifest["records"] == first.manifest["records"]
    assert reasons_by_record(second.manifest)[7] == "duplicate of record 1 (line 2) (all)"


def test_per_group_reasons_name_the_group_and_the_rank(run_recipe):
    pool = [{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1), "g": i % 2} for i in range(8)]
    out = run_recipe('select groups("g") | topk(length, 50%)', pool)
    # group 0: records 0, 2, 4, 6 (lengths 1, 3, 5, 7); group 1: 1, 3, 5, 7; 50% = 2 each
    assert sorted(out.selected) == [4, 5, 6, 7]
    stage = out.manifest["funnel"][1]
    assert stage["dropped"] == {"not in the top 2": 4}
    reasons = reasons_by_record(out.manifest)
    assert reasons[0] == "in group 0 (4 records): not among the top 2 by length: 1, rank 4 of 4, cut-off 5"
    assert reasons[3] == "in group 1 (4 records): not among the top 2 by length: 4, rank 3 of 4, cut-off 6"


@pytest.mark.parametrize("recipe, record, expected", [
    # union: dropped only when neither side keeps it, with both sides' reasons
    ("select topk(length, 2) + bottomk(length, 1)", 3,
     "kept by neither topk(length, 2) (not among the top 2 by length: 4, rank 3 of 6, cut-off 5) "
     "nor bottomk(length, 1) (not among the bottom 1 by length: 4, rank 4 of 6, cut-off 1)"),
    # intersection: the side that dropped it
    ("select length > 2 & length < 5", 5, "length < 5: length < 5 is false: length = 6"),
    # difference: removed because the right side keeps it
    ("select (length > 1) - topk(length, 1)", 5,
     "removed because topk(length, 1) keeps it (rank 1 of 6 by length: 6)"),
])
def test_set_algebra_reasons(run_recipe, recipe, record, expected):
    pool = [{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1)} for i in range(6)]
    out = run_recipe(recipe, pool)
    assert reasons_by_record(out.manifest)[record] == expected


def test_why_prints_the_path_of_a_record(write_pool, cli, tmp_path):
    recipe = tmp_path / "r.sel"
    recipe.write_text('long = length > 20\nselect dedup_exact | long | topk(field("score"), 3)\n')
    pool_file = write_pool(records(20))
    out = tmp_path / "sel.jsonl"
    assert cli("run", recipe, "--pool", pool_file, "-o", out, "--quiet").code == 0
    manifest = tmp_path / "sel.jsonl.manifest.json"
    shown = cli("why", manifest, "13")
    assert shown.code == 0, shown.err
    assert shown.out.splitlines() == [
        f"record 13 (line 14) of {pool_file}",
        '  "q13" → "' + "x" * 39 + '…"',  # the record itself, shortened
        "  1. dedup_exact              kept     no earlier copy of this text",
        "  2. long = length > 20       kept     length = 42",
        '  3. topk(field("score"), 3)  DROPPED  not among the top 3 by field(name="score"): 3, '
        "rank 4 of 12, cut-off 4",
        "not selected: dropped at stage 3 of 3",
    ]
    # The same record by its line, and by the text of its line.
    assert cli("why", manifest, "14", "--line").out == shown.out
    line = pool_file.read_text().splitlines()[13]
    assert cli("why", manifest, line).out == shown.out
    selected = cli("why", manifest, "14")
    assert selected.out.splitlines()[-1] == "selected: pick 2 of 3 (in selection order)"
    missing = cli("why", manifest, "20")
    assert missing.code == 1 and "the pool has no record 20 (records 0–19)" in missing.err


def test_why_names_records_skipped_when_reading(run_recipe, write_pool, tmp_path):
    path = write_pool(records(10))
    text = path.read_text().splitlines()
    text.insert(2, '{"instruction": "broken"')
    path.write_text("\n".join(text) + "\n")
    out = run_recipe("select topk(length, 2)", path, on_bad_record="skip")
    with pytest.raises(LookupError, match="skipped when the pool was read \\(malformed JSON"):
        find_record(out.manifest, "2")
    # record 3 of the file is the third usable record
    index = find_record(out.manifest, "3")
    assert why(out.manifest, index).splitlines()[0] == f"record 3 (line 4) of {path}"


def test_manifest_from_an_older_datasel_is_refused_clearly(cli, tmp_path):
    old = tmp_path / "old.manifest.json"
    old.write_text(json.dumps({"selected": [1], "pool": {"path": "x"}}))
    res = cli("why", old, "1")
    assert res.code == 1 and "no per-record accounting" in res.err

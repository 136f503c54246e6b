"""Input files that used to crash a run or drop records silently: byte-order marks, files mixing
record formats, unreadable JSON lines, and paths that are not regular files."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from datasel.dsl.data import DataError, load_dataset

pytestmark = pytest.mark.usefixtures("cache_dir")


def alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}"}


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}"}]}


def write(path: Path, lines: list[str], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "\n".join(lines).encode("utf-8") + b"\n")
    return path


# ------------------------------------------------------------------ byte-order marks
def test_jsonl_with_a_bom_keeps_its_first_record(tmp_path):
    path = write(tmp_path / "p.jsonl", [json.dumps(alpaca(i)) for i in range(3)], prefix=b"\xef\xbb\xbf")
    ds = load_dataset(path, on_bad_record="skip")
    assert len(ds) == 3 and not ds.excluded
    assert ds.records[0]["instruction"] == "question 0"
    assert ds.lines == [1, 2, 3]


def test_json_array_with_a_bom_is_read(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([alpaca(i) for i in range(2)]).encode())
    assert [r["output"] for r in load_dataset(path).records] == ["answer 0", "answer 1"]


def test_bom_does_not_change_record_identity(tmp_path):
    lines = [json.dumps(alpaca(i)) for i in range(3)]
    plain = load_dataset(write(tmp_path / "a.jsonl", lines))
    marked = load_dataset(write(tmp_path / "b.jsonl", lines, prefix=b"\xef\xbb\xbf"))
    assert plain.fingerprint == marked.fingerprint


# ------------------------------------------------------------------ files mixing formats
def test_file_mixing_alpaca_and_chat_is_read_whole(tmp_path):
    lines = [json.dumps(chat(i) if i % 2 == 0 else alpaca(i)) for i in range(6)]
    for policy in ("fail", "skip"):
        ds = load_dataset(write(tmp_path / "mixed.jsonl", lines), on_bad_record=policy)
        assert len(ds) == 6 and not ds.excluded
        assert ds.schema == "mixed" and dict(ds.formats) == {"messages": 3, "alpaca": 3}
        assert [r["output"] for r in ds.records] == ["hi 0", "answer 1", "hi 2", "answer 3", "hi 4", "answer 5"]


def test_chat_first_then_alpaca_is_not_an_empty_conversation(tmp_path):
    ds = load_dataset(write(tmp_path / "p.jsonl", [json.dumps(chat(0)), json.dumps(alpaca(1))]))
    assert ds.records[1]["instruction"] == "question 1"


def test_given_format_still_applies_to_every_record(tmp_path):
    lines = [json.dumps(alpaca(0)), json.dumps(chat(1))]
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'instruction'"):
        load_dataset(write(tmp_path / "p.jsonl", lines), schema="alpaca")


def test_unknown_shape_on_the_first_line_can_be_skipped(tmp_path):
    lines = [json.dumps({"foo": 1})] + [json.dumps(alpaca(i)) for i in range(3)]
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=r"p.jsonl:1: cannot tell the record format from its fields \(foo\)"):
        load_dataset(path)
    ds = load_dataset(path, on_bad_record="skip")
    assert len(ds) == 3 and ds.schema == "alpaca"
    assert dict(ds.excluded) == {"unknown format": 1} and ds.excluded_details[0]["line"] == 1


def test_run_reports_the_mix_in_the_manifest_and_output(tmp_path, run_recipe, capsys):
    from datasel.dsl.cli import main

    lines = [json.dumps(chat(i) if i < 2 else alpaca(i)) for i in range(5)]
    pool = write(tmp_path / "mixed.jsonl", lines)
    out = run_recipe("select length > 0", pool)
    assert out.manifest["pool"]["formats"] == {"messages": 2, "alpaca": 3}
    recipe = tmp_path / "r.sel"
    recipe.write_text("select length > 0\n")
    assert main(["run", str(recipe), "--pool", str(pool), "-o", str(tmp_path / "o.jsonl")]) == 0
    assert "--pool mixes record formats: 3 alpaca, 2 messages" in capsys.readouterr().out


# ------------------------------------------------------------------ lines that cannot be read
@pytest.mark.parametrize("bad_line, reason, detail", [
    ("[" * 100000 + "]" * 100000, "malformed JSON", "JSON nested too deeply to read"),
    ('{"instruction": "x\\ud800", "output": "y"}', "not UTF-8", "lone surrogate escape"),
    ('{"instruction": "x", "output": "\\udfff"}', "not UTF-8", "lone surrogate escape"),
    ("[1, 2]", "not an object", "expected a JSON object, got list"),
])
def test_unreadable_line_names_its_line_and_can_be_skipped(tmp_path, bad_line, reason, detail):
    path = write(tmp_path / "p.jsonl", [json.dumps(alpaca(0)), bad_line, json.dumps(alpaca(2))])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert f"p.jsonl:2: " in str(info.value) and detail in str(info.value)
    ds = load_dataset(path, on_bad_record="skip")
    assert [r["output"] for r in ds.records] == ["answer 0", "answer 2"]
    assert dict(ds.excluded) == {reason: 1}


def test_deeply_nested_line_is_skipped_inside_a_run(tmp_path, run_recipe):
    # A run raises the recursion limit for deep recipes; a deep JSON line must still be one bad record.
    path = write(tmp_path / "p.jsonl", [json.dumps(alpaca(0)), '{"output": ' + "[" * 13000 + "]" * 13000 + "}",
                                        json.dumps(alpaca(2))])
    out = run_recipe("select length > 0", path, on_bad_record="skip")
    assert out.manifest["pool_size"] == 2 and len(out.manifest["bad_records"]) == 1


def test_json_array_nested_too_deeply_is_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("[" + "[" * 100000 + "]" * 100000 + "]")
    with pytest.raises(DataError, match="nested too deeply"):
        load_dataset(path)


# ------------------------------------------------------------------ paths that are not files
def test_fifo_as_pool_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pool.jsonl"
    os.mkfifo(fifo)
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_load_error(fifo)), daemon=True)
    reader.start()
    reader.join(20)  # a read that waits for a writer never returns; the daemon thread is then left behind
    assert outcome, "reading a FIFO hung"
    assert "not a regular file or folder" in outcome[0]


def _load_error(path) -> str:
    try:
        load_dataset(path)
    except DataError as exc:
        return str(exc)
    return "no error"


def test_symlink_loop_is_named_as_a_loop(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match=r"a.jsonl: a loop of symbolic links"):
        load_dataset(tmp_path / "a.jsonl")


def test_dangling_symlink_names_its_target(tmp_path):
    (tmp_path / "p.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match=r"p.jsonl: a symbolic link to .*gone.jsonl, which does not exist"):
        load_dataset(tmp_path / "p.jsonl")


def test_symlink_to_a_file_is_read(tmp_path):
    real = write(tmp_path / "real.jsonl", [json.dumps(alpaca(0))])
    (tmp_path / "link.jsonl").symlink_to(real)
    assert len(load_dataset(tmp_path / "link.jsonl")) == 1

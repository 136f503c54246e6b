"""Reading pools (containers, schemas, bad records), record identity, writing selections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from datasel.dsl.data import DataError, detect_schema, load_dataset, record_hash, write_selection

pytestmark = pytest.mark.usefixtures("cache_dir")

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    data = b"".join((l.encode("utf-8") if isinstance(l, str) else l) + b"\n" for l in lines)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


def write_hf_folder(folder: Path, records: list[dict]) -> Path:
    """A `datasets.save_to_disk` folder: an Arrow IPC *stream* file plus state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink:
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": name}], "_fingerprint": "0123456789abcdef", "_format_type": None,
             "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    return folder


# ------------------------------------------------------------------ containers
def test_jsonl_alpaca_normalised(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", ALPACA))
    assert ds.container == "jsonl"
    assert ds.schema == "alpaca"
    assert len(ds) == 3 and ds.total == 3
    r0, r1, r2 = ds.records
    assert r0["instruction"] == "Add the numbers." and r0["input"] == "2 and 3" and r0["output"] == "5"
    assert r0["has_input"] is True
    assert r1["input"] == "" and r1["has_input"] is False
    assert r2["has_input"] is True  # the key is there, even if empty
    assert r0["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                              {"role": "assistant", "content": "5"}]
    assert r1["messages"] == [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]
    assert ds.raw == ALPACA
    assert ds.lines == [1, 2, 3]
    assert ds.positions.tolist() == [0, 1, 2]
    assert ds.hashes.dtype == np.dtype("S16") and len(set(ds.hashes.tolist())) == 3


def test_blank_lines_are_ignored_but_line_numbers_kept(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(ALPACA[0]), "", "   ", json.dumps(ALPACA[1])])
    ds = load_dataset(path)
    assert len(ds) == 2
    assert ds.lines == [1, 4]
    assert ds.where(1) == f"{path}:4"


def test_json_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    ds = load_dataset(path)
    assert ds.container == "json"
    assert [r["output"] for r in ds.records] == ["5", "Blue.", "Hi!"]
    assert ds.lines == [None, None, None]
    assert ds.where(2) == f"{path}, record 2"


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"data": ALPACA}), encoding="utf-8")
    ds = load_dataset(path)
    assert ds.container == "json"
    assert len(ds) == 3


def test_dot_json_file_with_json_lines_inside(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "p.json", ALPACA))
    assert ds.container == "jsonl"
    assert len(ds) == 3


def test_pretty_printed_json_object_with_nested_objects(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"data": ALPACA}, indent=0), encoding="utf-8")  # lines start with "{"
    ds = load_dataset(path)
    assert ds.container == "json" and len(ds) == 3


def test_dot_json_lines_with_a_broken_first_line_names_the_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"instruction": "q", "output": \n' + json.dumps(ALPACA[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.json:1"):
        load_dataset(path)


def test_parquet(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "score": float(i)} for i in range(4)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    ds = load_dataset(path)
    assert ds.container == "parquet"
    assert ds.schema == "alpaca"
    assert [r["output"] for r in ds.records] == ["a0", "a1", "a2", "a3"]
    assert ds.raw[2]["score"] == 2.0
    # Same content as a JSONL pool -> same record identities.
    jl = load_dataset(write_jsonl(tmp_path / "p.jsonl", records))
    assert ds.hashes.tolist() == jl.hashes.tolist()


def test_hf_datasets_folder(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(3)]
    folder = write_hf_folder(tmp_path / "hf", records)
    ds = load_dataset(folder)
    assert ds.container == "hf"
    assert ds.schema == "messages"
    assert [r["output"] for r in ds.records] == ["a0", "a1", "a2"]
    assert [r["instruction"] for r in ds.records] == ["u0", "u1", "u2"]


def test_hf_dataset_dict_folder_uses_train_split(tmp_path):
    root = tmp_path / "dd"
    write_hf_folder(root / "test", [{"prompt": "t", "completion": "test split"}])
    write_hf_folder(root / "train", [{"prompt": "p", "completion": "train split"}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}), encoding="utf-8")
    ds = load_dataset(root)
    assert [r["output"] for r in ds.records] == ["train split"]


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "p.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown file type"):
        load_dataset(tmp_path / "p.csv")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------- schemas
def test_prompt_completion(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert ds.schema == "prompt_completion"
    r = ds.records[0]
    assert (r["instruction"], r["input"], r["output"], r["has_input"]) == ("2+2=", "", "4", False)


def test_messages_multi_turn_scored_on_last_assistant_turn(tmp_path):
    rec = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},  # trailing user turn: nothing to score
    ]}
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert ds.schema == "messages"
    r = ds.records[0]
    assert r["output"] == "4"
    assert r["instruction"] == "What is 2+2?"
    assert r["messages"] == rec["messages"][:5]
    assert r["has_input"] is False


def test_sharegpt_conversations(tmp_path):
    rec = {"id": "x", "conversations": [
        {"from": "human", "value": "Name a fruit."},
        {"from": "gpt", "value": "Apple."},
        {"from": "human", "value": "Another?"},
        {"from": "gpt", "value": "Pear."},
    ]}
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert ds.schema == "sharegpt"
    r = ds.records[0]
    assert r["output"] == "Pear."
    assert r["instruction"] == "Another?"
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
    assert r["messages"][1] == {"role": "assistant", "content": "Apple."}


def test_qa_and_input_target(tmp_path):
    qa = load_dataset(write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}]))
    assert qa.schema == "qa"
    assert (qa.records[0]["instruction"], qa.records[0]["output"]) == ("1+1?", "2")
    it = load_dataset(write_jsonl(tmp_path / "it.jsonl", [{"input": "3*3", "target": "9"}]))
    assert it.schema == "input_target"
    assert (it.records[0]["instruction"], it.records[0]["output"]) == ("3*3", "9")


@pytest.mark.parametrize("record, schema", [
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"messages": []}, "messages"),
    ({"dialogs": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"question": "a", "answer": "b"}, "qa"),
    ({"input": "a", "target": "b"}, "input_target"),
    ({"text": "a"}, None),
])
def test_detect_schema(record, schema):
    assert detect_schema(record) == schema


def test_schema_override(tmp_path):
    # Detected as alpaca (it has "instruction"), which has no "output": only the override loads it.
    recs = [{"instruction": "ignored", "input": "7-2", "target": "5"}]
    path = write_jsonl(tmp_path / "p.jsonl", recs)
    with pytest.raises(DataError, match="missing field 'output'"):
        load_dataset(path)
    ds = load_dataset(path, schema="input_target")
    assert ds.schema == "input_target"
    assert ds.records[0]["instruction"] == "7-2" and ds.records[0]["output"] == "5"
    with pytest.raises(DataError, match="unknown record format"):
        load_dataset(path, schema="csv")


def test_undetectable_schema_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:1" in str(err.value)
    assert "text" in str(err.value)


# ---------------------------------------------------------------------- identity
def test_record_hash_stable_and_key_order_irrelevant(tmp_path):
    a = {"instruction": "x", "input": "", "output": "y", "meta": {"k": 1, "j": [1, 2]}}
    b = {"meta": {"j": [1, 2], "k": 1}, "output": "y", "input": "", "instruction": "x"}
    assert record_hash(a) == record_hash(b)
    assert len(record_hash(a)) == 16
    assert record_hash(a) != record_hash(dict(a, output="z"))
    assert record_hash(a) != record_hash(dict(a, meta={"k": 2, "j": [1, 2]}))
    p1 = write_lines(tmp_path / "a.jsonl", ['{"instruction": "x", "output": "y"}', '{"instruction":"q","output":"r"}'])
    p2 = write_lines(tmp_path / "b.jsonl", ['{"output":"r",  "instruction":"q"}', '{"output": "y", "instruction": "x"}'])
    d1, d2 = load_dataset(p1), load_dataset(p2)
    assert d1.hashes[0] == d2.hashes[1] and d1.hashes[1] == d2.hashes[0]
    assert d1.hashes[0] != d1.hashes[1]
    # Same records in another order are another pool.
    assert d1.fingerprint != d2.fingerprint
    assert load_dataset(p1).fingerprint == d1.fingerprint


# --------------------------------------------------------------------- bad input
def _bad_pool(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"instruction": "ok 1", "output": "fine"}),
        '{"instruction": "broken", "output": ',  # line 2: malformed JSON
        json.dumps({"instruction": "empty", "output": ""}),  # line 3: empty response
        json.dumps({"instruction": "blank", "output": "  \n "}),  # line 4: whitespace only
        json.dumps({"instruction": "no output"}),  # line 5: missing field
        b'{"instruction": "latin-1 \xe9", "output": "x"}',  # line 6: not UTF-8
        json.dumps({"instruction": "ok 2", "output": "also fine"}),
        json.dumps({"instruction": 3, "output": "typed"}),  # line 8: wrong type
        "[1, 2]",  # line 9: not an object
    ])


def test_malformed_line_fails_with_file_and_line(tmp_path):
    path = _bad_pool(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert f"{path}:2:" in msg
    assert "malformed JSON" in msg
    assert "--on-bad-record skip" in msg


@pytest.mark.parametrize("line, reason, line_no", [
    (json.dumps({"instruction": "i", "output": ""}), "empty", 2),
    (json.dumps({"instruction": "i"}), "missing field 'output'", 2),
    (b'{"instruction": "\xff\xfe", "output": "x"}', "UTF-8", 2),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant turn", 2),
])
def test_each_problem_names_file_line_and_problem(tmp_path, line, reason, line_no):
    first = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} \
        if b"messages" in (line if isinstance(line, bytes) else line.encode()) else {"instruction": "ok", "output": "ok"}
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(first), line])
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:{line_no}:" in str(err.value)
    assert reason in str(err.value)


def test_skip_bad_records_counts_reasons(tmp_path):
    ds = load_dataset(_bad_pool(tmp_path), on_bad_record="skip")
    assert [r["instruction"] for r in ds.records] == ["ok 1", "ok 2"]
    assert ds.total == 9
    assert dict(ds.excluded) == {"malformed JSON": 1, "empty response": 2, "missing field": 1, "not UTF-8": 1,
                                 "wrong type": 1, "not an object": 1}
    assert sum(ds.excluded.values()) + len(ds) == ds.total
    assert [d["line"] for d in ds.excluded_details] == [2, 3, 4, 5, 6, 8, 9]
    assert ds.lines == [1, 7]
    assert ds.positions.tolist() == [0, 6]


def test_all_records_bad_is_an_error(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"instruction": "x", "output": ""}'])
    with pytest.raises(DataError, match="no usable records"):
        load_dataset(path, on_bad_record="skip")


def test_malformed_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:3:" in str(err.value)


def test_bad_record_in_json_array_names_record(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]),
                    encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}, record 1" in str(err.value)
    ds = load_dataset(path, on_bad_record="skip")
    assert len(ds) == 1 and ds.excluded["empty response"] == 1


# ---------------------------------------------------------------- write_selection
def test_write_selection_jsonl_is_byte_identical_in_selection_order(tmp_path):
    lines = [
        '{"instruction":"a","output":"1"}',
        '{ "output" : "2",   "instruction" : "b", "extra": [1, 2.50] }',
        '{"instruction": "caf\u00e9 \\u00e9", "input": "", "output": "3"}',
        '{"instruction": "d", "output": "4", "nested": {"z": 1, "a": null}}',
    ]
    path = write_lines(tmp_path / "p.jsonl", lines)
    ds = load_dataset(path)
    out = write_selection(ds, np.array([3, 0, 2]), tmp_path / "out" / "sel.jsonl")
    assert out.read_bytes() == (lines[3] + "\n" + lines[0] + "\n" + lines[2] + "\n").encode("utf-8")


def test_write_selection_with_skipped_lines_uses_record_indices(tmp_path):
    path = _bad_pool(tmp_path)
    ds = load_dataset(path, on_bad_record="skip")
    out = write_selection(ds, [1, 0], tmp_path / "sel.jsonl")
    src = path.read_bytes().split(b"\n")
    assert out.read_bytes() == src[6] + b"\n" + src[0] + b"\n"


def test_write_selection_json_roundtrip(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ALPACA), encoding="utf-8")
    ds = load_dataset(path)
    out = write_selection(ds, [2, 0], tmp_path / "sel.json")
    assert json.loads(out.read_text(encoding="utf-8")) == [ALPACA[2], ALPACA[0]]
    again = load_dataset(out)
    assert again.container == "json"
    assert again.hashes.tolist() == [ds.hashes[2], ds.hashes[0]]


def test_write_selection_parquet_roundtrip(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "score": i * 1.5} for i in range(5)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    ds = load_dataset(path)
    out = write_selection(ds, [4, 1, 3], tmp_path / "sel.parquet")
    assert pq.read_table(out).to_pylist() == [records[4], records[1], records[3]]
    assert load_dataset(out).hashes.tolist() == [ds.hashes[4], ds.hashes[1], ds.hashes[3]]


def test_write_selection_from_hf_folder(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    ds = load_dataset(write_hf_folder(tmp_path / "hf", records))
    jl = write_selection(ds, [2, 0], tmp_path / "sel.jsonl")
    assert [json.loads(l) for l in jl.read_text(encoding="utf-8").splitlines()] == [records[2], records[0]]
    pqo = write_selection(ds, [1], tmp_path / "sel.parquet")
    assert pq.read_table(pqo).to_pylist() == [records[1]]
    assert not (tmp_path / "sel.jsonl.tmp").exists()

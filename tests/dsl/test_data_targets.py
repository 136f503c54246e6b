"""Target-set formats: multiple-choice records (MMLU) rendered as LESS renders them; the shared
target files (../shared/data/targets) read directly, each record in its own format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasel.dsl.data import DataError, detect_schema, load_dataset, normalize

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "targets"
MC = {"subject": "abstract_algebra", "question": "Find all c in Z_3.", "choices": ["0", "1", "2", "3"],
      "answer": "B"}


def test_multiple_choice_is_rendered_as_less_renders_mmlu():
    assert detect_schema(MC) == "multiple_choice"  # not "qa": the choices would be lost
    record = normalize(MC, "multiple_choice")
    assert record["instruction"] == ("The following are multiple choice questions (with answers) about abstract "
                                     "algebra.\n\nFind all c in Z_3.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert record["output"] == "B"
    no_subject = normalize({"question": "Q", "choices": ["x", "y"], "answer": 1}, "multiple_choice")
    assert no_subject["instruction"] == "Q\nA. x\nB. y\nAnswer:" and no_subject["output"] == "B"


@pytest.mark.parametrize("bad, reason", [
    ({"question": "Q", "choices": ["x", "y"], "answer": "C"}, "should be one of A, B"),
    ({"question": "Q", "choices": ["x", "y"], "answer": 2}, "should be one of A, B"),
    ({"question": "Q", "choices": "x y", "answer": "A"}, "should be a list"),
    ({"question": "Q", "choices": ["x"], "answer": "A"}, "should be a list of 2"),
])
def test_bad_multiple_choice_records_name_the_problem(write_pool, bad, reason):
    path = write_pool([MC, bad])
    with pytest.raises(DataError, match=f"pool.jsonl:2: .*{reason}"):
        load_dataset(path)
    assert len(load_dataset(path, on_bad_record="skip")) == 1


def test_a_file_mixing_multiple_choice_and_qa(write_pool):
    ds = load_dataset(write_pool([MC, {"question": "2+2?", "answer": "4"}]))
    assert ds.formats == {"multiple_choice": 1, "qa": 1}
    assert [r["output"] for r in ds.records] == ["B", "4"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")
@pytest.mark.parametrize("name, fmt, n", [("mmlu_dev.jsonl", "multiple_choice", 285), ("gsm8k_test.jsonl", "qa", None),
                                         ("bbh/boolean_expressions.jsonl", "input_target", 250)])
def test_shared_target_files_are_read_directly(name, fmt, n):
    ds = load_dataset(SHARED / name)
    assert ds.formats == {fmt: len(ds)}
    if n is not None:
        assert len(ds) == n
    first = json.loads((SHARED / name).read_text(encoding="utf-8").splitlines()[0])
    if fmt == "multiple_choice":
        assert ds.records[0]["output"] == first["answer"] and first["question"] in ds.records[0]["instruction"]

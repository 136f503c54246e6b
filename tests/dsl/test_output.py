"""The selection's file format follows the output's extension; bad outputs fail before any work."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasel.dsl.data import DataError
from datasel.dsl.runner import run
from datasel.ops import registry

pytestmark = pytest.mark.usefixtures("cache_dir")

RECORDS = [{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1)} for i in range(6)]
RECIPE = "select topk(length, 2)"


@pytest.fixture
def parquet_pool(tmp_path):
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


def test_parquet_pool_to_jsonl_output_writes_json_lines(parquet_pool, tmp_path):
    out = tmp_path / "sel.jsonl"
    run("r.sel", parquet_pool, output=out, recipe_text=RECIPE, quiet=True)
    assert not out.read_bytes().startswith(b"PAR1")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [RECORDS[5], RECORDS[4]]


def test_jsonl_pool_to_parquet_and_json_outputs(write_pool, tmp_path):
    pool = write_pool(RECORDS)
    run("r.sel", pool, output=tmp_path / "sel.parquet", recipe_text=RECIPE, quiet=True)
    assert pq.read_table(tmp_path / "sel.parquet").to_pylist() == [RECORDS[5], RECORDS[4]]
    run("r.sel", pool, output=tmp_path / "sel.json", recipe_text=RECIPE, quiet=True)
    assert json.loads((tmp_path / "sel.json").read_text()) == [RECORDS[5], RECORDS[4]]


def test_no_extension_keeps_the_input_format(parquet_pool, tmp_path):
    out = tmp_path / "selection"
    run("r.sel", parquet_pool, output=out, recipe_text=RECIPE, quiet=True)
    assert out.read_bytes().startswith(b"PAR1")
    assert pq.read_table(out).to_pylist() == [RECORDS[5], RECORDS[4]]


def test_default_output_next_to_the_pool(parquet_pool):
    result = run("r.sel", parquet_pool, default_output=True, recipe_text=RECIPE, quiet=True)
    assert result.output == parquet_pool.parent / "pool.selected.parquet"
    assert pq.read_table(result.output).to_pylist() == [RECORDS[5], RECORDS[4]]


def test_unknown_extension_or_unwritable_folder_fails_before_any_work(write_pool, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the recipe ran although the output cannot be written")

    monkeypatch.setattr(registry.get("length"), "fn", boom)
    pool = write_pool(RECORDS)
    with pytest.raises(DataError, match=r"cannot tell the output format from '\.txt'; use one of .json, .jsonl"):
        run("r.sel", pool, output=tmp_path / "sel.txt", recipe_text=RECIPE, quiet=True)
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot write the selection there"):
        run("r.sel", pool, output=blocker / "sel.jsonl", recipe_text=RECIPE, quiet=True)

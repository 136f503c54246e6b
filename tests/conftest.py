"""Shared fixtures for the datasel test suite.

* ``cache_dir``: a fresh cache folder exported as ``$DATASEL_CACHE``, with the
  working directory moved to a scratch folder, so nothing leaks into
  ``./.datasel`` or between tests (modules opt in with
  ``pytestmark = pytest.mark.usefixtures("cache_dir")``);
* ``write_pool`` writes a small JSON Lines pool;
* ``run_recipe`` runs recipe text on a list of records through the library API;
* ``cli`` runs ``datasel`` in-process (``datasel.dsl.cli.main``), capturing output;
* ``cli_subprocess`` runs it as a separate process (for the concurrency tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder for the test, exported as ``$DATASEL_CACHE``; cwd is a scratch folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DATASEL_CACHE", str(root))
    monkeypatch.delenv("DATASEL_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def dump_jsonl(path: Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def write_pool(tmp_path):
    """``write_pool(records, name="pool.jsonl") -> Path``: a JSON Lines file in the test's folder."""

    def write(records: list[dict], name: str = "pool.jsonl") -> Path:
        return dump_jsonl(tmp_path / name, records)

    return write


@dataclass
class Outcome:
    selected: list[int]
    manifest: dict
    result: object

    def node(self, op: str) -> dict:
        nodes = [n for n in self.manifest["nodes"] if n["op"] == op]
        assert len(nodes) == 1, f"expected one {op} node, got {[n['op'] for n in self.manifest['nodes']]}"
        return nodes[0]

    def nodes(self, op: str) -> list[dict]:
        return [n for n in self.manifest["nodes"] if n["op"] == op]


@pytest.fixture
def run_recipe(write_pool, cache_dir):
    """``run_recipe(text, records_or_path, **kw) -> Outcome`` via ``datasel.dsl.runner.run``."""
    from datasel.dsl.runner import run

    def go(text: str, pool, *, output=None, cache=None, **kwargs) -> Outcome:
        path = pool if isinstance(pool, (str, Path)) else write_pool(pool)
        result = run("recipe.sel", path, output=output, cache_dir=cache or cache_dir, quiet=True,
                     recipe_text=text, **kwargs)
        return Outcome([int(i) for i in result.selected], result.manifest, result)

    return go


@pytest.fixture
def eval_expr(write_pool, cache_dir):
    """``eval_expr(expression, records_or_path) -> ndarray`` of per-record values via ``evaluate``."""
    from datasel.dsl.runner import evaluate

    def go(expression: str, pool, **kwargs) -> np.ndarray:
        path = pool if isinstance(pool, (str, Path)) else write_pool(pool)
        return np.asarray(evaluate(expression, path, cache_dir=cache_dir, quiet=True, **kwargs).values)

    return go


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli(*args) -> CliResult`` running ``datasel.dsl.cli.main`` in-process.

    argparse usage errors raise SystemExit; they are turned into the exit code.
    """
    from datasel.dsl.cli import main

    def go(*args) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return go


def datasel_command() -> list[str]:
    return [sys.executable, "-m", "datasel.dsl.cli"]


@pytest.fixture
def cli_subprocess(cache_dir):
    """``cli_subprocess(*args, wait=True)``: run ``datasel`` as its own process.

    With ``wait=False`` the :class:`subprocess.Popen` is returned (stdout/stderr piped).
    """

    def go(*args, wait: bool = True, timeout: float = 120):
        env = dict(os.environ, DATASEL_CACHE=str(cache_dir))
        proc = subprocess.Popen(datasel_command() + [str(a) for a in args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        if not wait:
            return proc
        out, err = proc.communicate(timeout=timeout)
        return CliResult(proc.returncode, out, err)

    return go

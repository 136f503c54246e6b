"""Processes sharing a cache fill one map op together: each batch is claimed first, so no row is computed
twice, and a claim left by a killed process is taken over.

The per-record op below is declared by a launcher script that then runs the real `datasel` command line.
Each process holds its first batch at a barrier (it touches ``ready-<pid>`` and waits for ``go``), so the
test can start two processes and release them together.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("cache_dir")

N = 60
LAUNCHER = '''
import os, signal, sys, time
from pathlib import Path
import numpy as np
signal.signal(signal.SIGINT, signal.default_int_handler)
from datasel.ops.registry import Kind, Param, op

FOLDER = Path({folder!r})
WAITED = []

@op("claimed_length", [Param("tag", Kind.STRING, "")], Kind.SCORES, role="map", version="1", chunk_rows=512)
def claimed_length(state, batch, tag=""):
    if not WAITED:
        WAITED.append(1)
        (FOLDER / f"ready-{{os.getpid()}}").touch()
        while not (FOLDER / "go").exists():
            time.sleep(0.02)
    time.sleep(0.02 * len(batch))
    with open(FOLDER / "computed.log", "a") as f:
        f.write("".join(f"{{os.getpid()}} {{int(i)}}\\n" for i in batch.rows))
        f.flush()
    return np.asarray([len(r["output"]) for r in batch.records], dtype=np.float64)

from datasel.dsl.cli import main
sys.exit(main())
'''


@pytest.fixture
def board(tmp_path, cache_dir, write_pool):
    pool = write_pool([{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1)} for i in range(N)])
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(folder=str(tmp_path)))
    recipe = tmp_path / "r.sel"
    recipe.write_text("select topk(claimed_length, 5)\n")
    env = dict(os.environ, DATASEL_CACHE=str(cache_dir), DATASEL_PERSIST_SECONDS="0.2")

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(launcher), "run", str(recipe), "--pool", str(pool), "-o",
                                 str(tmp_path / f"{name}.jsonl"), "--quiet"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ready(count: int, timeout: float = 60) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("ready-*"))
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"only {len(list(tmp_path.glob('ready-*')))} processes reached the barrier")

    def computed() -> list[tuple[int, int]]:
        log = tmp_path / "computed.log"
        if not log.exists():
            return []
        return [tuple(map(int, line.split())) for line in log.read_text().split("\n") if line]

    return start, ready, computed, tmp_path


def test_two_processes_fill_one_map_without_computing_a_row_twice(board):
    start, ready, computed, folder = board
    a, b = start("a"), start("b")
    pids = ready(2)
    assert sorted(pids) == sorted([a.pid, b.pid])
    (folder / "go").touch()
    for proc in (a, b):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rows = computed()
    records = [r for _, r in rows]
    assert sorted(records) == list(range(N))  # every record once: none twice, none missing
    by_process = {pid for pid, _ in rows}
    assert by_process == {a.pid, b.pid}  # both did part of the work
    first = [json.loads(x) for x in (folder / "a.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (folder / "b.jsonl").read_text().splitlines()]
    assert first == second and [r["instruction"] for r in first] == ["q59", "q58", "q57", "q56", "q55"]


def test_a_claim_left_by_a_killed_process_is_taken_over(board):
    start, ready, computed, folder = board
    victim = start("victim")
    ready(1)  # it holds a claim on its first batch, waiting at the barrier
    claims = list(Path(os.environ["DATASEL_CACHE"]).glob("claims/*/*.claim"))
    assert len(claims) == 1
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    (folder / "go").touch()
    survivor = start("survivor")
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    rows = computed()
    assert sorted(r for _, r in rows) == list(range(N))
    assert {pid for pid, _ in rows} == {survivor.pid}
    assert not list(Path(os.environ["DATASEL_CACHE"]).glob("claims/*/*.claim"))  # the stale claim is gone

"""No lost work on any pool size: map rows are saved by count and by time, and survive SIGINT and SIGKILL.

A slow per-record op (0.1 s a record) is declared by a small launcher script that then runs the real
`datasel` command line, so the run is a separate process that can be interrupted or killed.  The op
appends each record it finishes to a side file, which tells the test how much work was done before the
signal; the cache tells how much of it was saved; the rerun's manifest tells how much was recomputed.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datasel.dsl.cache import Cache
from datasel.dsl.progress import Progress

pytestmark = pytest.mark.usefixtures("cache_dir")

DELAY = 0.1
PERSIST = 1.0  # seconds of work between saves, for the test (60 by default)

LAUNCHER = '''
import signal, sys, time
import numpy as np
# A process started from a background job inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt; the test sends SIGINT on purpose, so restore Python's handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
from datasel.ops.registry import Kind, Param, op

@op("slow_length", [Param("log", Kind.STRING)], Kind.SCORES, role="map", version="1", chunk_rows=512)
def slow_length(state, batch, log):
    out = []
    with open(log, "a") as f:
        for i, r in zip(batch.rows, batch.records):
            time.sleep({delay})
            out.append(len(r["output"]))
            f.write(f"{{int(i)}}\\n")
            f.flush()
    return np.asarray(out, dtype=np.float64)

from datasel.dsl.cli import main
sys.exit(main())
'''


@pytest.fixture
def slow_run(tmp_path, cache_dir, write_pool):
    """Start ``select topk(slow_length(...), 5)`` on 100 records in a subprocess; returns helpers."""
    pool = write_pool([{"instruction": f"q{i}", "input": "", "output": "x" * (i + 1)} for i in range(100)])
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(delay=DELAY))
    done_log = tmp_path / "done.log"
    recipe = tmp_path / "slow.sel"
    recipe.write_text(f'select topk(slow_length(log="{done_log}"), 5)\n')
    env = dict(os.environ, DATASEL_CACHE=str(cache_dir), DATASEL_PERSIST_SECONDS=str(PERSIST))

    def start(output: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(launcher), "run", str(recipe), "--pool", str(pool),
                                 "-o", str(output), "--quiet"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def done() -> int:
        return len(done_log.read_text().split()) if done_log.exists() else 0

    def saved() -> int:
        stores = list((cache_dir / "maps").iterdir()) if (cache_dir / "maps").exists() else []
        cache = Cache(cache_dir)
        hashes = np.unique(_hashes(pool))
        return max((cache.map_store(s.name).count(hashes) for s in stores), default=0)

    return start, done, saved, tmp_path


def _hashes(pool: Path) -> np.ndarray:
    from datasel.dsl.data import load_dataset

    return load_dataset(pool).hashes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_loses_at_most_about_persist_seconds_of_work(slow_run, sig):
    start, done, saved, tmp = slow_run
    proc = start(tmp / "first.jsonl")
    deadline = time.monotonic() + 60
    while done() < 35 and time.monotonic() < deadline:  # about 3.5 s of work, far less than the 512-row chunk
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
    else:
        assert proc.returncode == -signal.SIGKILL
    finished, kept = done(), saved()
    assert 0 < kept <= finished < 100
    # Saved at least every PERSIST seconds of work (+ one record of slack for the timing of the signal).
    assert finished - kept <= PERSIST / DELAY + 2, (finished, kept)

    rerun = start(tmp / "second.jsonl")
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    manifest = json.loads((tmp / "second.jsonl.manifest.json").read_text())
    node = next(n for n in manifest["nodes"] if n["op"] == "slow_length")
    # Only what was not saved is computed again.
    assert node["rows_computed"] == 100 - kept
    assert node["rows_cached"] == kept
    assert manifest["selected"] == [99, 98, 97, 96, 95]


# ------------------------------------------------------------------ progress lines
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_progress_off_a_terminal_prints_start_periodic_and_end_lines(monkeypatch):
    from datasel.dsl import progress as progress_module

    clock = FakeClock()
    monkeypatch.setattr(progress_module, "time", clock)
    stream = io.StringIO()
    progress = Progress(True, stream, interval=30.0, tty=False)
    with progress.bar(100, "ifd") as bar:
        clock.now += 40  # loading the model and the first batch
        bar.update(10)   # first batch: the rate starts counting here
        clock.now += 10
        bar.update(10)   # 10 s after the last line: too early for another
        clock.now += 25
        bar.update(10)   # 35 s after the first line: a progress line; 20 rows in 35 s since the first batch
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ifd: 100 rows to compute"
    assert lines[1] == "ifd: 10/100 rows, ETA after the first batch"
    assert lines[2] == "ifd: 30/100 rows, 0.571 rows/s, ETA 2m02s"
    assert lines[3] == "ifd: 30 rows in 1m15s (0.4 rows/s)"
    assert len(lines) == 4


def test_progress_is_silent_when_quiet():
    stream = io.StringIO()
    with Progress(False, stream, tty=False).bar(10, "x") as bar:
        bar.update(10)
    assert stream.getvalue() == ""

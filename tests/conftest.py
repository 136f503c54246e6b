"""Shared fixtures for the datasel test suite.

* ``cache_dir``: a fresh cache folder exported as ``$DATASEL_CACHE``, with the
  working directory moved to a scratch folder, so nothing leaks into
  ``./.datasel`` or between tests (modules opt in with
  ``pytestmark = pytest.mark.usefixtures("cache_dir")``);
* ``write_pool`` writes a small JSON Lines pool;
* ``run_recipe`` runs recipe text on a list of records through the library API;
* ``cli`` runs ``datasel`` in-process (``datasel.dsl.cli.main``), capturing output;
* ``cli_subprocess`` runs it as a separate process (for the concurrency tests);
* ``model_store``: the session's model store (``$DATASEL_MODELS``, set for every test), so
  SmolLM2 is dequantised at most once per session and never into ``~/.cache``;
* ``read_only(path)`` makes a folder tree read-only for the rest of the test.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """The model store shared by the whole session (dequantising SmolLM2 costs ~30 s: once, not per test).

    Tests that fake or break materialisation must point ``$DATASEL_MODELS`` at their own folder.
    """
    return tmp_path_factory.mktemp("models", numbered=False)


@pytest.fixture(scope="session", autouse=True)
def _session_model_store(model_store):
    """``$DATASEL_MODELS`` = the session store for every test (nothing is written to ~/.cache);
    a developer's ``$DATASEL_CACHE_WRITE`` never reaches the tests."""
    saved = {name: os.environ.get(name) for name in ("DATASEL_MODELS", "DATASEL_CACHE_WRITE")}
    os.environ["DATASEL_MODELS"] = str(model_store)
    os.environ.pop("DATASEL_CACHE_WRITE", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def cache_dir(tmp_path, monkeypatch, model_store) -> Path:
    """A fresh cache folder for the test, exported as ``$DATASEL_CACHE``; cwd is a scratch folder.

    ``$DATASEL_MODELS`` is the session's model store (see ``model_store``).
    """
    root = tmp_path / "cache"
    monkeypatch.setenv("DATASEL_CACHE", str(root))
    monkeypatch.setenv("DATASEL_MODELS", str(model_store))
    monkeypatch.delenv("DATASEL_CACHE_WRITE", raising=False)
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

    def dropped(self, stage: int = -1) -> dict[str, int]:
        """Records a pipe stage dropped, by reason (the manifest's funnel; -1 = the last stage)."""
        return self.manifest["funnel"][1:][stage]["dropped"]


def pytest_generate_tests(metafunc):
    """Tests marked ``executors`` run once per executor: in this process and on Ray."""
    if metafunc.definition.get_closest_marker("executors") and "executor" in metafunc.fixturenames:
        metafunc.parametrize("executor", ["local", "ray"], indirect=True)


@pytest.fixture(scope="session")
def ray_executor():
    """One local Ray cluster for the session (skips when Ray is not installed)."""
    pytest.importorskip("ray")
    import ray

    from datasel.dsl.executor import RayExecutor

    ex = RayExecutor(actors=1)
    yield ex
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def executor(request):
    """The executor of the test (None = the engine's in-process default; see ``pytest_generate_tests``)."""
    if getattr(request, "param", "local") == "ray":
        return request.getfixturevalue("ray_executor")
    return None


@pytest.fixture
def run_recipe(write_pool, cache_dir, executor):
    """``run_recipe(text, records_or_path, **kw) -> Outcome`` via ``datasel.dsl.runner.run``."""
    from datasel.dsl.runner import run

    def go(text: str, pool, *, output=None, cache=None, **kwargs) -> Outcome:
        path = pool if isinstance(pool, (str, Path)) else write_pool(pool)
        kwargs.setdefault("executor", executor)
        result = run("recipe.sel", path, output=output, cache_dir=cache or cache_dir, quiet=True,
                     recipe_text=text, **kwargs)
        return Outcome([int(i) for i in result.selected], result.manifest, result)

    return go


@pytest.fixture
def eval_expr(write_pool, cache_dir, executor):
    """``eval_expr(expression, records_or_path) -> ndarray`` of per-record values via ``evaluate``."""
    from datasel.dsl.runner import evaluate

    def go(expression: str, pool, **kwargs) -> np.ndarray:
        path = pool if isinstance(pool, (str, Path)) else write_pool(pool)
        kwargs.setdefault("executor", executor)
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


# ------------------------------------------------------------------ read-only folders
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_CAPABILITY_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities():
    """(libc, header, data) of the calling thread's capability sets (capget(2)), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = _CapHeader(_CAPABILITY_V3, 0), (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return libc, header, data


@pytest.fixture
def read_only():
    """``read_only(path)``: from now on until the test ends, nothing under ``path`` can be written.

    How it is simulated: the tree is ``chmod -R a-w``, so the kernel itself refuses every
    create, rename, unlink and write under it (EACCES), as a read-only mount does (EROFS).
    Root bypasses permission bits through CAP_DAC_OVERRIDE, so when the tests run as root
    that capability and CAP_DAC_READ_SEARCH are dropped from the calling thread's *effective*
    set with capset(2) (they stay permitted and are restored at teardown).  Then
    ``os.access(path, os.W_OK)`` still says True — access(2) checks root against its
    permitted set — which is the "os.access lies" case the cache must survive.  Only code in
    this thread is affected (child processes get the capabilities back at exec).  The owner
    may still set a file's times, so a test can see an mtime update the cache should not make.
    """
    modes: list[tuple[Path, int]] = []
    restore_caps = []

    def make(path) -> Path:
        path = Path(path)
        for p in [path, *path.rglob("*")]:
            if p.is_symlink():
                continue
            mode = stat.S_IMODE(p.lstat().st_mode)
            modes.append((p, mode))
            os.chmod(p, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        if os.geteuid() == 0 and not restore_caps:
            caps = _capabilities()
            if caps is None:
                pytest.skip("running as root without capset(2): cannot make a folder read-only for root")
            libc, header, data = caps
            saved = [(d.effective, d.permitted, d.inheritable) for d in data]
            data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
            if libc.capset(ctypes.byref(header), data) != 0:
                pytest.skip(f"capset failed ({errno.errorcode.get(ctypes.get_errno(), '?')})")

            def restore(libc=libc, header=header, data=data, saved=saved):
                for d, (eff, perm, inh) in zip(data, saved):
                    d.effective, d.permitted, d.inheritable = eff, perm, inh
                libc.capset(ctypes.byref(header), data)

            restore_caps.append(restore)
        return path

    yield make
    for restore in restore_caps:
        restore()
    for p, mode in reversed(modes):
        try:
            os.chmod(p, mode)
        except OSError:
            pass

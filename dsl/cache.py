"""The content-addressed result store.

Layout under the cache root (``.datasel/`` by default)::

    objects/ab/<key>/        one result: .npy arrays + meta.json (checksums, op, info)
    maps/<map key>/<shard>/  per-record results of one map op: keys.npy (record
                             hashes) + one .npy per column + meta.json
    work/<key>/              scratch space an op owns (fine-tuning checkpoints)
    models/                  dequantised model folders
    locks/                   lock files (one per key being computed)
    tmp/                     half-written entries; renamed into place when complete

Every entry is written to ``tmp/`` first, fsynced and renamed into place, so a
reader never sees half an entry.  Every array file carries a checksum in
``meta.json`` that is verified on read; an entry that fails verification is
deleted and reported as missing, so the engine recomputes it.  Arrays are
stored as ``.npy`` (loaded with ``allow_pickle=False``, memory-mapped) and
metadata as JSON: nothing in the cache can execute code when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

CACHE_FORMAT = 1
HASH_BYTES = 16  # record hashes are 128-bit BLAKE2b digests


def default_cache_dir() -> Path:
    """``$DATASEL_CACHE`` if set, else ``.datasel`` in the working directory."""
    return Path(os.environ.get("DATASEL_CACHE") or ".datasel")


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_array(path: Path, array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to cache an object array ({path.name}): the cache never pickles")
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"digest": _file_digest(path), "bytes": path.stat().st_size, "dtype": str(array.dtype), "shape": list(array.shape)}


@dataclass
class Entry:
    """A verified cache entry: its arrays (memory-mapped) and its metadata."""

    key: str
    arrays: dict[str, np.ndarray]
    meta: dict

    @property
    def info(self) -> dict:
        return self.meta.get("info", {})


class Cache:
    """A cache directory; safe to share between concurrent processes."""

    def __init__(self, root: Path | str | None = None, *, on_corrupt: Callable[[str, str], None] | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.on_corrupt = on_corrupt
        for sub in ("objects", "maps", "work", "locks", "tmp", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        marker = self.root / "CACHEDIR.TAG"
        if not marker.exists():
            # Tells backup tools the folder can be skipped; harmless otherwise.
            marker.write_text("Signature: 8a477f597d28d172789f06886806bc55\n# datasel cache\n")

    # ----------------------------------------------------------------- objects
    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.object_dir(key) / "meta.json").exists()

    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` after verifying its checksums, or None."""
        return self._read_entry(self.object_dir(key), key)

    def put(self, key: str, arrays: dict[str, np.ndarray], info: dict | None = None) -> Entry:
        """Store ``arrays`` under ``key`` atomically; an existing entry wins."""
        final = self.object_dir(key)
        if not self.has(key):
            final.parent.mkdir(parents=True, exist_ok=True)
            self._write_entry(final, key, arrays, info or {})
        entry = self.get(key)
        if entry is None:  # lost a race with a corrupt writer: retry once
            self._write_entry(final, key, arrays, info or {})
            entry = self.get(key)
        return entry

    def lock(self, key: str) -> FileLock:
        """An inter-process lock for computing ``key``."""
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def work_dir(self, key: str) -> Path:
        """A persistent folder an op may fill (e.g. checkpoints), keyed like a result."""
        path = self.root / "work" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tmp_dir(self) -> Path:
        path = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    # -------------------------------------------------------------- internals
    def _write_entry(self, final: Path, key: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        tmp = self.tmp_dir()
        try:
            files = {}
            for name, array in arrays.items():
                files[name] = _write_array(tmp / f"{name}.npy", np.asarray(array))
            meta = {"format": CACHE_FORMAT, "key": key, "created": time.time(), "files": files, "info": info}
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process stored the same key first; its content is equivalent.
                if not (final / "meta.json").exists():
                    raise
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _read_entry(self, path: Path, key: str) -> Entry | None:
        meta_path = path / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            arrays = {}
            for name, desc in meta["files"].items():
                file = path / f"{name}.npy"
                if file.stat().st_size != desc["bytes"] or _file_digest(file) != desc["digest"]:
                    raise ValueError(f"checksum mismatch in {file.name}")
                arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._discard(path, key, str(exc))
            return None
        try:
            os.utime(meta_path)  # last-used time, for `datasel cache gc --older-than`
        except OSError:
            pass
        return Entry(key, arrays, meta)

    def _discard(self, path: Path, key: str, reason: str) -> None:
        if self.on_corrupt is not None:
            self.on_corrupt(key, reason)
        grave = self.root / "tmp" / f"corrupt-{uuid.uuid4().hex}"
        try:
            os.rename(path, grave)
        except OSError:
            return
        shutil.rmtree(grave, ignore_errors=True)

    # -------------------------------------------------------------- map shards
    def map_store(self, map_key: str) -> "MapStore":
        return MapStore(self, map_key)

    # --------------------------------------------------------- housekeeping
    def entries(self):
        """Yield a dict per stored entry (objects, map ops) for ``cache ls`` / ``du``."""
        for meta_path in sorted((self.root / "objects").glob("*/*/meta.json")):
            yield self._describe(meta_path, "object")
        for map_dir in sorted((self.root / "maps").iterdir()):
            shards = sorted(map_dir.glob("*/meta.json"))
            if not shards:
                continue
            descs = [self._describe(s, "map") for s in shards]
            yield {
                "kind": "map",
                "key": map_dir.name,
                "op": descs[0]["op"],
                "rows": sum(d.get("rows", 0) for d in descs),
                "shards": len(descs),
                "bytes": sum(d["bytes"] for d in descs),
                "last_used": max(d["last_used"] for d in descs),
                "path": str(map_dir),
            }
        for work in sorted((self.root / "work").iterdir()):
            size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
            yield {"kind": "work", "key": work.name, "op": "work", "bytes": size,
                   "last_used": work.stat().st_mtime, "path": str(work)}
        for model in sorted((self.root / "models").iterdir()):
            if model.name.startswith("."):
                continue  # the lock file guarding a model's materialisation, not an entry
            size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
            yield {"kind": "model", "key": model.name, "op": "model", "bytes": size,
                   "last_used": model.stat().st_mtime, "path": str(model)}

    def _describe(self, meta_path: Path, kind: str) -> dict:
        entry_dir = meta_path.parent
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        size = sum(p.stat().st_size for p in entry_dir.iterdir() if p.is_file())
        info = meta.get("info", {})
        return {
            "kind": kind,
            "key": meta.get("key", entry_dir.name),
            "op": info.get("op", "?"),
            "rows": info.get("rows", 0),
            "bytes": size,
            "last_used": meta_path.stat().st_mtime,
            "path": str(entry_dir),
        }

    def gc(self, older_than_days: float | None = None, everything: bool = False) -> dict:
        """Remove stale temporary files and, optionally, entries not used recently.

        Map shards of one op are also compacted into a single shard.  Returns
        counts of what was removed.
        """
        removed = {"entries": 0, "bytes": 0, "tmp": 0, "compacted": 0}
        now = time.time()
        for tmp in (self.root / "tmp").iterdir():
            if now - tmp.stat().st_mtime > 3600 or tmp.name.startswith("corrupt-"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                removed["tmp"] += 1
        for entry in list(self.entries()):
            stale = everything or (
                older_than_days is not None and now - entry["last_used"] > older_than_days * 86400
            )
            if stale:
                shutil.rmtree(entry["path"], ignore_errors=True)
                removed["entries"] += 1
                removed["bytes"] += entry["bytes"]
            elif entry["kind"] == "map" and entry["shards"] > 1:
                MapStore(self, entry["key"]).compact()
                removed["compacted"] += 1
        for lock in (self.root / "locks").glob("*.lock"):
            # A lock file nobody holds is just litter; FileLock recreates it on demand.
            lk = FileLock(str(lock))
            try:
                lk.acquire(timeout=0)
            except Exception:
                continue
            try:
                lock.unlink(missing_ok=True)
            finally:
                lk.release()
        return removed


class MapStore:
    """Per-record results of one map op (one ``map key``), in append-only shards."""

    def __init__(self, cache: Cache, map_key: str):
        self.cache = cache
        self.key = map_key
        self.dir = cache.root / "maps" / map_key
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._shards: list[Entry] = []

    def _load(self) -> None:
        self._index = {}
        self._shards = []
        if not self.dir.exists():
            return
        for shard_dir in sorted(p for p in self.dir.iterdir() if p.is_dir()):
            entry = self.cache._read_entry(shard_dir, f"{self.key}/{shard_dir.name}")
            if entry is None or "keys" not in entry.arrays:
                continue
            number = len(self._shards)
            self._shards.append(entry)
            keys = entry.arrays["keys"]
            for row, h in enumerate(keys.tobytes()[i : i + HASH_BYTES] for i in range(0, keys.nbytes, HASH_BYTES)):
                self._index.setdefault(h, (number, row))

    def refresh(self) -> None:
        """Re-read the shards on disk (another process may have added some)."""
        self._load()

    def locate(self, hashes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int] | None]]:
        """For each record hash: whether it is stored, and where."""
        if self._index is None:
            self._load()
        raw = np.ascontiguousarray(hashes).tobytes()
        where = [self._index.get(raw[i : i + HASH_BYTES]) for i in range(0, len(raw), HASH_BYTES)]
        found = np.fromiter((w is not None for w in where), dtype=bool, count=len(where))
        return found, where

    def read(self, column: str, where: list[tuple[int, int]]) -> np.ndarray:
        """Values of ``column`` at the given (shard, row) locations, in order."""
        if not where:
            return None
        by_shard: dict[int, list[int]] = {}
        for pos, (shard, row) in enumerate(where):
            by_shard.setdefault(shard, []).append(pos)
        sample = self._shards[where[0][0]].arrays[column]
        out = np.empty((len(where),) + sample.shape[1:], dtype=sample.dtype)
        for shard, positions in by_shard.items():
            rows = np.fromiter((where[p][1] for p in positions), dtype=np.int64, count=len(positions))
            out[np.asarray(positions)] = np.asarray(self._shards[shard].arrays[column][rows])
        return out

    def append(self, hashes: np.ndarray, columns: dict[str, np.ndarray], info: dict) -> None:
        """Persist results for ``hashes`` as a new shard (atomic)."""
        if len(hashes) == 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        arrays = {"keys": np.asarray(hashes)}
        arrays.update(columns)
        self.cache._write_entry(self.dir / name, f"{self.key}/{name}", arrays, dict(info, rows=len(hashes)))
        self._index = None  # re-read lazily, including our own shard

    def count(self, hashes: np.ndarray) -> int:
        found, _ = self.locate(hashes)
        return int(found.sum())

    def compact(self) -> None:
        """Merge all shards into one (duplicates dropped); used by ``cache gc``."""
        with self.cache.lock(f"map-{self.key}"):
            self._load()
            if len(self._shards) < 2:
                return
            keys = list(self._index.keys())
            where = [self._index[k] for k in keys]
            columns = {c: self.read(c, where) for c in self._shards[0].arrays if c != "keys"}
            info = dict(self._shards[0].meta.get("info", {}))
            old = [Path(p) for p in sorted(str(d) for d in self.dir.iterdir() if d.is_dir())]
            hashes = np.frombuffer(b"".join(keys), dtype=f"S{HASH_BYTES}")
            self.append(hashes, columns, info)
            for d in old:
                shutil.rmtree(d, ignore_errors=True)
            self._index = None

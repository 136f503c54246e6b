"""The content-addressed result store.

Layout under the cache root (``.datasel/`` by default)::

    objects/ab/<key>/        one result: .npy arrays + meta.json (checksums, op, info)
    maps/<map key>/<shard>/  per-record results of one map op: keys.npy (record
                             hashes) + one .npy per column + meta.json
    work/<key>/              scratch space an op owns (fine-tuning checkpoints)
    locks/                   lock files (one per key being computed)
    tmp/                     half-written entries; renamed into place when complete

Model files prepared on first use (SmolLM2 dequantised from its GGUF file) are not
here: they live in the user-level model store shared by every cache
(:func:`datasel.ops.algos.lm_loading.model_store_dir`; :class:`ModelStore`
lists and cleans it).  A ``models/`` folder left in a cache by older versions
is listed as unused and removed by ``gc --all``.

Every entry is written to ``tmp/`` first, fsynced and renamed into place, so a
reader never sees half an entry.  Every array file carries a checksum in
``meta.json``, and a seal (a hash of the entry's key, file list, checksums and
info) binds the entry to the folder it must sit in: an entry copied or moved
under another key, a file swapped in or left out, a ``meta.json`` that is not
the one written, all fail verification.  An entry that fails is deleted (in the
writable layer) and reported as missing, so the engine recomputes it; the
engine also checks what a verified entry holds against what its node must
produce (index ranges, lengths, dtypes).  Arrays are stored as ``.npy``
(loaded with ``allow_pickle=False``, memory-mapped) and metadata as JSON:
nothing in the cache can execute code when read.

The cache never follows a symbolic link inside its folder, and never reads or
writes outside it: an entry, shard or file that is a link, a file name that
leaves its folder, is treated as damage; a subfolder (``objects/ab``,
``tmp``, ``locks`` ...) or lock file that is a link or a plain file is
replaced by a real one, with a warning.  The cache root itself may be a link.

Read-only caches: a cache folder that cannot be written (a team's shared cache
on a read-only mount) serves hits without writing anything, not even a lock
file or a last-used time.  New results go to a second, writable folder
(``Cache(root, write_root=...)``, ``--cache-write DIR``, ``$DATASEL_CACHE_WRITE``)
that is read first; the read-only folder is read after it and never written.
Whether a folder is writable is found out by creating a file in it: root, ACLs
and some network file systems make ``os.access`` answer "writable" for a folder
whose writes fail.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

CACHE_FORMAT = 2  # 2: entries carry a seal binding them to their key (format 1 entries are recomputed)
HASH_BYTES = 16  # record hashes are 128-bit BLAKE2b digests


def default_cache_dir() -> Path:
    """``$DATASEL_CACHE`` if set, else ``.datasel`` in the working directory."""
    return Path(os.environ.get("DATASEL_CACHE") or ".datasel")


def default_write_dir() -> Path | None:
    """``$DATASEL_CACHE_WRITE`` if set: a writable cache for new results, read before the main one."""
    value = os.environ.get("DATASEL_CACHE_WRITE")
    return Path(value) if value else None


class ReadOnlyCacheError(RuntimeError):
    """Something needs to be written (a result not in the cache, ``gc``) and the cache is read-only."""


#: What a write into a read-only mount, or a folder we may not write, fails with.
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_SUBFOLDERS = ("objects", "maps", "work", "locks", "tmp")


def _probe_writable(root: Path) -> str | None:
    """None if files can be created in ``root`` (created if missing), else why not.

    Asks by doing it: a uniquely named file is created and removed.  ``os.access``
    is not consulted, because it answers "writable" where writes still fail (root
    ignores permission bits in access(2); NFS with root squashing, ACLs, some FUSE
    mounts), and EROFS/EACCES/EPERM all mean "read-only" here.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".datasel-write-probe-", dir=root)
    except OSError as exc:
        if exc.errno in _READ_ONLY_ERRNOS:
            return exc.strerror or str(exc)
        raise
    os.close(fd)
    os.unlink(name)
    return None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _tree_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _rmtree(path: Path) -> list[BaseException]:
    """``shutil.rmtree`` that collects the errors instead of raising or hiding them."""
    errors: list[BaseException] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, exc: errors.append(exc))
    else:  # pragma: no cover - Python 3.11
        shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(info[1]))
    return errors


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _remove_tree(path: Path, graveyard: Path) -> str | None:
    """Remove the folder ``path``; None once it is really gone, else why it is not.

    The folder is first renamed into ``graveyard`` (same file system), so an entry
    is either whole or gone, never half deleted; then the renamed copy is deleted.
    """
    grave = graveyard / f".gc-{uuid.uuid4().hex}"
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return None  # removed meanwhile (another gc)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            return _why(exc)
        grave = path  # graveyard on another file system: delete in place
    errors = _rmtree(grave)
    if grave.exists():
        why = _why(errors[0]) if errors else "still there after deleting"
        return why if grave == path else f"moved to {grave} but not deleted: {why}"
    return None


#: Array files smaller than this are read into memory; larger ones are memory-mapped.  A memory map
#: holds a file descriptor for its lifetime (Python's mmap keeps a duplicate), so mapping every
#: small shard of a map filled in many batches (15,625 shards for 1,000,000 rows in Ray's batches
#: of 64) runs a process out of descriptors.
MMAP_MIN_BYTES = 4 << 20

#: Errors that say the process lacks a resource, not that an entry is damaged: never a reason to
#: discard the entry.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


class CacheResourceError(RuntimeError):
    """Reading the cache failed for want of a resource (file descriptors, memory), not a damaged entry."""


def _load_array(file: Path, size: int, digest: str) -> np.ndarray:
    """The verified array in ``file``: read whole when small, memory-mapped when large."""
    import io

    if file.stat().st_size != size:
        raise ValueError(f"checksum mismatch in {file.name}")
    if size < MMAP_MIN_BYTES:
        data = file.read_bytes()
        if hashlib.blake2b(data, digest_size=20).hexdigest() != digest:
            raise ValueError(f"checksum mismatch in {file.name}")
        array = np.load(io.BytesIO(data), allow_pickle=False)
        array.flags.writeable = False  # as a read-only memory map is: an entry is never changed in place
        return array
    if _file_digest(file) != digest:
        raise ValueError(f"checksum mismatch in {file.name}")
    return np.load(file, mmap_mode="r", allow_pickle=False)


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


#: Names of the files of an entry (``<name>.npy``): no separators, nothing hidden, nothing that leaves the folder.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def _seal(key: str, files: dict, info) -> str:
    """The hash that binds an entry's content (file checksums, info) to its key."""
    text = json.dumps({"format": CACHE_FORMAT, "key": key, "files": files, "info": info},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=20).hexdigest()


def _check_meta(meta, key: str) -> None:
    """Raise ValueError unless ``meta`` is a well-formed, sealed description of ``key``'s entry."""
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise ValueError("meta.json is not an entry description")
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"written in cache format {meta.get('format')!r}, this version reads {CACHE_FORMAT}")
    if meta.get("key") != key:
        raise ValueError("the entry belongs to another key (moved or copied here)")
    for name, desc in meta["files"].items():
        if not (isinstance(name, str) and _FILE_NAME.fullmatch(name) and ".." not in name):
            raise ValueError(f"file name {str(name)[:40]!r} is not allowed")
        if not (isinstance(desc, dict) and isinstance(desc.get("digest"), str)
                and isinstance(desc.get("bytes"), int) and not isinstance(desc.get("bytes"), bool)):
            raise ValueError(f"file {name!r} has no valid checksum")
    if meta.get("seal") != _seal(key, meta["files"], meta.get("info")):
        raise ValueError("seal mismatch (meta.json was changed)")


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _link_free(layer: Path, path: Path) -> bool:
    """Whether ``path`` lies inside ``layer`` with no symbolic link between them (the layer itself may be one)."""
    try:
        parts = Path(os.path.relpath(path, layer)).parts
    except ValueError:
        return False
    if not parts or parts[0] == ".." or os.path.isabs(parts[0]):
        return False
    current = layer
    for part in parts:
        if part in ("..", "."):
            return False
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
        except FileNotFoundError:
            return True  # nothing below exists yet
        except OSError:
            return False
    return True


def _real_children(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` that are real folders (links are never entered), sorted."""
    if _is_link(folder) or not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        try:
            if stat.S_ISDIR(os.lstat(child).st_mode):
                out.append(child)
        except OSError:
            continue
    return sorted(out)


def _links_below(layer: Path) -> list[Path]:
    """Symbolic links where the cache keeps its own folders and files (``gc`` removes them, never their targets)."""
    found = []
    for sub in (*_SUBFOLDERS, "claims"):
        top = layer / sub
        if _is_link(top):
            found.append(top)
            continue
        for child in (top.iterdir() if top.is_dir() else ()):
            if _is_link(child):
                found.append(child)
            elif sub in ("objects", "maps") and stat.S_ISDIR(os.lstat(child).st_mode):
                found.extend(g for g in child.iterdir() if _is_link(g))
    return found


def _default_repair_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    """A cache directory, optionally under a writable layer; safe to share between concurrent processes.

    ``root`` (default ``$DATASEL_CACHE`` or ``./.datasel``) is read, and written
    when it can be.  ``write_root`` (default ``$DATASEL_CACHE_WRITE``) names a
    second folder that takes every write instead: lookups read it first and
    ``root`` second, and ``root`` is then never written (no lock files, tmp
    folders or last-used times) whether or not it could be.  Without a
    writable layer (``root`` read-only, no ``write_root``) hits are served and
    anything that needs a write — ``put``, ``lock``, a map-store ``append``, a
    new ``work_dir``, ``gc`` — raises :class:`ReadOnlyCacheError` naming
    ``--cache-write``.

    Attributes: ``root``; ``write_root`` (the layer written, ``None`` when
    read-only); ``layers`` (the folders read, in order); ``read_only``;
    ``read_only_reason`` (why ``root`` cannot be written, when probed).
    """

    def __init__(self, root: Path | str | None = None, *, write_root: Path | str | None = None,
                 on_corrupt: Callable[[str, str], None] | None = None,
                 on_repair: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.on_corrupt = on_corrupt
        self.on_repair = on_repair
        self.repairs: list[str] = []  # every repair made (also told to on_repair, else printed)
        self.read_only_reason: str | None = None
        write = Path(write_root) if write_root is not None else default_write_dir()
        if write is not None and not _same_folder(write, self.root):
            problem = _probe_writable(write)
            if problem is not None:
                raise ReadOnlyCacheError(f"the cache for new results {write} (--cache-write / DATASEL_CACHE_WRITE) "
                                         f"cannot be written: {problem}")
            self.write_root: Path | None = write
            self.layers = [write, self.root]
        else:
            self.read_only_reason = _probe_writable(self.root)
            self.write_root = None if self.read_only_reason else self.root
            self.layers = [self.root]
        if self.write_root is not None:
            for sub in _SUBFOLDERS:
                self._real_dir(self.write_root, sub)
            marker = self.write_root / "CACHEDIR.TAG"
            if not marker.exists():
                # Tells backup tools the folder can be skipped; harmless otherwise.
                marker.write_text("Signature: 8a477f597d28d172789f06886806bc55\n# datasel cache\n")

    def _repaired(self, message: str) -> None:
        self.repairs.append(message)
        (self.on_repair or _default_repair_warning)(message)

    def _real_dir(self, layer: Path, *parts: str) -> Path:
        """``layer/parts...`` as real folders: a link or plain file in the way is removed (never followed)."""
        current = layer
        for part in parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and not stat.S_ISDIR(mode):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
                os.unlink(current)
                self._repaired(f"cache folder {current} was {what}; replaced it with an empty folder")
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
        return current

    @property
    def read_only(self) -> bool:
        """True when nothing can be written (no writable layer)."""
        return self.write_root is None

    def _writable(self, what: str = "this run needs results that are not in the cache") -> Path:
        """The layer to write to; raises :class:`ReadOnlyCacheError` (saying ``what`` needed it) when there is none."""
        if self.write_root is None:
            raise ReadOnlyCacheError(
                f"{what}, but the cache {self.root} is read-only ({self.read_only_reason}); pass --cache-write DIR "
                f"or set DATASEL_CACHE_WRITE=DIR to keep new results in a writable folder ({self.root} is still read)"
            )
        return self.write_root

    # ----------------------------------------------------------------- objects
    @staticmethod
    def _object_path(layer: Path, key: str) -> Path:
        return layer / "objects" / key[:2] / key

    def object_dir(self, key: str) -> Path:
        """The folder of ``key``'s entry in the first layer holding one, else where it would be written."""
        for layer in self.layers:
            path = self._object_path(layer, key)
            if (path / "meta.json").exists():
                return path
        return self._object_path(self.write_root or self.root, key)

    def has(self, key: str) -> bool:
        """Whether an entry for ``key`` seems to be there (not verified: :meth:`get` verifies)."""
        return any((self._object_path(layer, key) / "meta.json").exists()
                   and _link_free(layer, self._object_path(layer, key) / "meta.json") for layer in self.layers)

    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` (writable layer first) after verifying its checksums, or None."""
        for layer in self.layers:
            entry = self._read_entry(self._object_path(layer, key), key, writable=layer == self.write_root)
            if entry is not None:
                return entry
        return None

    def put(self, key: str, arrays: dict[str, np.ndarray], info: dict | None = None, *,
            replace: bool = False) -> Entry:
        """Store ``arrays`` under ``key`` atomically in the writable layer; an existing entry wins
        unless ``replace`` (the caller found the existing one wrong: see :meth:`discard`)."""
        if replace:
            self.discard(key, None)
        entry = None if replace else self.get(key)
        if entry is None:
            layer = self._writable()
            final = self._object_path(layer, key)
            self._real_dir(layer, "objects", key[:2])
            self._write_entry(final, key, arrays, info or {})
            entry = self.get(key)
        if entry is None:  # lost a race with a corrupt writer: write ours again
            final = self._object_path(self._writable(), key)
            self._write_entry(final, key, arrays, info or {})
            entry = self.get(key)
        return entry

    def discard(self, key: str, reason: str | None) -> None:
        """Remove ``key``'s entry from the writable layer (reported through ``on_corrupt`` when ``reason``
        is given): its checksums hold but its content is not what its node must produce."""
        if self.write_root is None:
            return
        path = self._object_path(self.write_root, key)
        if os.path.lexists(path):
            if reason is not None and self.on_corrupt is not None:
                self.on_corrupt(key, reason)
            self._discard(path, key, reason or "replaced", writable=True, report=False)

    def lock(self, key: str) -> FileLock:
        """An inter-process lock for computing ``key`` (in the writable layer).

        Only taken to compute something, so without a writable layer it raises
        :class:`ReadOnlyCacheError` before any work is done.
        """
        return FileLock(str(self._lock_path(self._writable(), "locks", f"{key}.lock")))

    def _lock_path(self, layer: Path, *parts: str) -> Path:
        """Where a lock file goes: its folder real, and a link or folder in its place removed (with a warning)."""
        path = self._real_dir(layer, *parts[:-1]) / parts[-1]
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path
        if not stat.S_ISREG(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a file"
            if stat.S_ISDIR(mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            self._repaired(f"lock file {path} was {what}; removed it")
        return path

    def work_dir(self, key: str) -> Path:
        """A persistent folder an op may fill (e.g. checkpoints), keyed like a result.

        An existing folder is returned where it is, in the writable layer or the
        read-only one (a finished fine-tuning run is used without writing); a new
        one is created in the writable layer.
        """
        found = self.find_work_dir(key)
        if found is not None:
            return found
        return self._real_dir(self._writable("this run needs a work folder that is not in the cache"), "work", key)

    def find_work_dir(self, key: str) -> Path | None:
        """The work folder of ``key`` if one exists in any layer; never creates one."""
        for layer in self.layers:
            path = layer / "work" / key
            if path.is_dir() and _link_free(layer, path):
                return path
        return None

    def tmp_dir(self) -> Path:
        path = self._real_dir(self._writable(), "tmp") / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    # -------------------------------------------------------------- internals
    def _write_entry(self, final: Path, key: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        tmp = self.tmp_dir()
        try:
            files = {}
            for name, array in arrays.items():
                files[name] = _write_array(tmp / f"{name}.npy", np.asarray(array))
            meta = {"format": CACHE_FORMAT, "key": key, "created": time.time(), "files": files, "info": info,
                    "seal": _seal(key, files, info)}
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

    def _read_entry(self, path: Path, key: str, *, writable: bool = True) -> Entry | None:
        """The verified entry at ``path``, or None.  ``writable``: ``path`` is in the writable
        layer, so a corrupt entry is removed and the last-used time refreshed (never elsewhere)."""
        meta_path = path / "meta.json"
        if not os.path.lexists(meta_path) and not _is_link(path):
            return None
        try:
            layer = self._layer_of(path)
            if layer is None or not _link_free(layer, meta_path):
                raise ValueError("the entry is reached through a symbolic link")
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            _check_meta(meta, key)
            arrays = {}
            for name, desc in meta["files"].items():
                file = path / f"{name}.npy"
                if not stat.S_ISREG(os.lstat(file).st_mode):
                    raise ValueError(f"{file.name} is not a plain file")
                arrays[name] = _load_array(file, desc["bytes"], desc["digest"])
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise CacheResourceError(
                    f"could not read cache entry {key} ({exc.strerror}): the process ran out of "
                    f"{'memory' if exc.errno == errno.ENOMEM else 'file descriptors'}; the entry is intact "
                    f"(raise the limit, e.g. `ulimit -n`, and rerun)") from exc
            self._discard(path, key, str(exc) or type(exc).__name__, writable=writable)
            return None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            self._discard(path, key, str(exc) or type(exc).__name__, writable=writable)
            return None
        if writable and self.write_root is not None:
            try:
                os.utime(meta_path)  # last-used time, for `datasel cache gc --older-than`
            except OSError:
                pass
        return Entry(key, arrays, meta)

    def _discard(self, path: Path, key: str, reason: str, *, writable: bool = True, report: bool = True) -> None:
        if report and self.on_corrupt is not None:
            self.on_corrupt(key, reason)
        if not writable or self.write_root is None:
            return  # a read-only layer: reported and treated as missing, never touched
        if not _link_free(self.write_root, path.parent):
            return  # reached through a linked folder: that folder is replaced when next written to
        if _is_link(path):
            os.unlink(path)  # the link itself, never what it points to
            return
        grave = self._real_dir(self.write_root, "tmp") / f"corrupt-{uuid.uuid4().hex}"
        try:
            os.rename(path, grave)
        except OSError:
            return
        shutil.rmtree(grave, ignore_errors=True)

    def _layer_of(self, path: Path) -> Path | None:
        """The layer ``path`` was built from (by prefix, without resolving links)."""
        for layer in self.layers:
            try:
                path.relative_to(layer)
                return layer
            except ValueError:
                continue
        return None

    # -------------------------------------------------------------- map shards
    def claims(self, map_key: str) -> "ClaimBoard":
        """The board of rows of map ``map_key`` that processes are computing right now."""
        return ClaimBoard(self, map_key)

    def map_store(self, map_key: str) -> "MapStore":
        return MapStore(self, map_key)

    # --------------------------------------------------------- housekeeping
    def entries(self):
        """Yield a dict per stored entry (objects, map ops, work folders), every layer, for ``cache ls`` / ``du``.

        Keys: kind, key, op, label, recipe, pool_path, pool_fingerprint, node, version
        (from the info stored with the entry; None when an older entry lacks them),
        rows, bytes, last_used, path, layer, writable; map entries add shards.
        """
        for layer in self.layers:
            yield from self._layer_entries(layer, writable=layer == self.write_root)

    def _layer_entries(self, layer: Path, writable: bool):
        for folder in _real_children(layer / "objects"):
            for entry_dir in _real_children(folder):
                if (entry_dir / "meta.json").is_file() and not _is_link(entry_dir / "meta.json"):
                    yield self._describe(entry_dir / "meta.json", "object", layer, writable)
        for map_dir in _real_children(layer / "maps"):
            shards = [d / "meta.json" for d in _real_children(map_dir)
                      if (d / "meta.json").is_file() and not _is_link(d / "meta.json")]
            if not shards:
                continue
            descs = [self._describe(s, "map", layer, writable) for s in shards]
            yield dict(descs[0], key=map_dir.name, rows=sum(d.get("rows", 0) for d in descs), shards=len(descs),
                       bytes=sum(d["bytes"] for d in descs), last_used=max(d["last_used"] for d in descs),
                       path=str(map_dir))
        for work in _real_children(layer / "work"):
            yield _entry("work", work.name, "work", _work_label(work), bytes=_tree_size(work),
                         last_used=work.stat().st_mtime, path=str(work), layer=str(layer), writable=writable)
        models = layer / "models"
        if models.is_dir() and not _is_model_store(models):
            # Left by versions that kept model files in each cache; models now live in the shared store.
            for model in sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")):
                yield _entry("model", model.name, "model", "not used any more: models live in the shared store",
                             bytes=_tree_size(model), last_used=model.stat().st_mtime, path=str(model),
                             layer=str(layer), writable=writable)

    def _describe(self, meta_path: Path, kind: str, layer: Path | None = None, writable: bool = True) -> dict:
        entry_dir = meta_path.parent
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        size = sum(p.lstat().st_size for p in entry_dir.iterdir() if stat.S_ISREG(p.lstat().st_mode))
        info = meta.get("info", {}) if isinstance(meta.get("info"), dict) else {}
        return _entry(kind, meta.get("key", entry_dir.name), info.get("op", "?"), info.get("label"),
                      recipe=info.get("recipe"), pool_path=info.get("pool_path"),
                      pool_fingerprint=info.get("pool_fingerprint"), node=info.get("node"),
                      version=info.get("version"), rows=info.get("rows", 0), bytes=size,
                      last_used=meta_path.stat().st_mtime, path=str(entry_dir),
                      layer=str(layer if layer is not None else self.root), writable=writable)

    def _single_layer(self, root: Path) -> "Cache":
        """This cache restricted to its layer ``root`` (which must be the writable one)."""
        view = object.__new__(Cache)
        view.root, view.write_root, view.layers = root, root, [root]
        view.on_corrupt, view.on_repair, view.read_only_reason = self.on_corrupt, self.on_repair, None
        view.repairs = self.repairs
        return view

    def gc(self, older_than_days: float | None = None, everything: bool = False) -> dict:
        """Clean the writable layer: stale temporary files, unheld lock files and, optionally, entries.

        ``older_than_days``: remove entries unused for that long; ``everything``:
        remove every entry.  Map shards of one op are also compacted into a single
        shard.  A read-only layer is never touched.  Returns what was *really*
        removed (each removal is checked): ``entries``, ``bytes``, ``tmp``,
        ``compacted``, plus ``root`` (the folder cleaned), ``failed`` and
        ``errors`` (one line per entry that could not be removed, with the reason).
        Raises :class:`ReadOnlyCacheError`, having removed nothing, when the cache
        has no writable layer.
        """
        if self.write_root is None:
            raise ReadOnlyCacheError(f"cannot clean the cache {self.root}: it is read-only "
                                     f"({self.read_only_reason}); nothing was removed")
        root = self.write_root
        view = self._single_layer(root)
        removed = {"entries": 0, "bytes": 0, "tmp": 0, "compacted": 0, "links": 0, "failed": 0, "errors": [],
                   "root": str(root)}
        now = time.time()
        for link in _links_below(root):  # planted or left links: removed as links, their targets untouched
            try:
                os.unlink(link)
                removed["links"] += 1
            except OSError as exc:
                removed["errors"].append(f"link {link}: {_why(exc)}")
        graveyard = self._real_dir(root, "tmp")
        for tmp in list(graveyard.iterdir()):
            try:
                stale = now - tmp.lstat().st_mtime > 3600 or tmp.name.startswith(("corrupt-", ".gc-"))
            except FileNotFoundError:
                continue
            if not stale:
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                gone = not _rmtree(tmp) or not tmp.exists()
            else:
                try:
                    tmp.unlink(missing_ok=True)
                    gone = True
                except OSError:
                    gone = False
            removed["tmp"] += gone
        for probe in root.glob(".datasel-write-probe-*"):  # left by a process killed while probing
            try:
                if now - probe.lstat().st_mtime > 3600:
                    probe.unlink()
                    removed["tmp"] += 1
            except OSError:
                pass
        for entry in list(view.entries()):
            if everything or unused_for(entry, older_than_days, now):
                why = _remove_tree(Path(entry["path"]), graveyard)
                if why is None:
                    removed["entries"] += 1
                    removed["bytes"] += entry["bytes"]
                else:
                    removed["failed"] += 1
                    removed["errors"].append(f"{entry['kind']} {entry['key'][:12]} ({entry['op']}): {why}")
            elif entry["kind"] == "map" and entry["shards"] > 1:
                try:
                    MapStore(view, entry["key"]).compact()
                    removed["compacted"] += 1
                except OSError as exc:
                    removed["errors"].append(f"map {entry['key'][:12]} ({entry['op']}): not compacted: {_why(exc)}")
        for lock in self._real_dir(root, "locks").glob("*.lock"):
            # A lock file nobody holds is just litter; FileLock recreates it on demand.
            lk = FileLock(str(lock))
            try:
                lk.acquire(timeout=0)
            except Exception:
                continue
            try:
                lock.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                lk.release()
        return removed


def _entry(kind: str, key: str, op: str, label: str | None = None, **fields) -> dict:
    """One ``entries()`` row, with every field present (None when unknown)."""
    row = {"kind": kind, "key": key, "op": op, "label": label, "recipe": None, "pool_path": None,
           "pool_fingerprint": None, "node": None, "version": None, "rows": 0}
    row.update(fields)
    return row


def _work_label(folder: Path) -> str | None:
    """What a work folder holds, when it says (a fine-tuning run's checkpoints do)."""
    epochs = sorted(folder.glob("epoch-*/datasel_checkpoint.json"))
    if not epochs:
        return None
    try:
        meta = json.loads(epochs[0].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return f"fine-tuning checkpoints ({len(epochs)}) of {meta.get('base_model', '?')}"


def _is_model_store(folder: Path) -> bool:
    from datasel.ops.algos.lm_loading import model_store_dir

    return _same_folder(folder, model_store_dir())


class ModelStore:
    """The user-level folder of model files prepared on first use, shared by every cache.

    Located by :func:`datasel.ops.algos.lm_loading.model_store_dir`
    (``$DATASEL_MODELS``, else ``$XDG_CACHE_HOME/datasel/models``, else
    ``~/.cache/datasel/models``).  A model folder is complete once it holds its
    marker file; its last-used time is the marker's mtime (refreshed on use).
    """

    def __init__(self, root: Path | str | None = None):
        from datasel.ops.algos.lm_loading import model_store_dir

        self.root = Path(root) if root is not None else model_store_dir()

    def entries(self):
        """A dict per model folder (not lock files, half-built temporaries or folders holding no model):
        kind "model", key (the folder name), op, label, complete, bytes, last_used, path."""
        from datasel.ops.algos.lm_loading import _MATERIALIZED_MARKER

        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            marker = folder / _MATERIALIZED_MARKER
            complete = marker.is_file()
            if not complete and not ((folder / "config.json").is_file() or any(folder.glob("*.safetensors"))):
                continue  # not a model folder (other data kept next to the models): never listed or removed
            label = None
            if complete:
                try:
                    label = f"prepared from {Path(json.loads(marker.read_text(encoding='utf-8'))['source']).name}"
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            yield _entry("model", folder.name, "model", label, complete=complete, bytes=_tree_size(folder),
                         last_used=(marker if complete else folder).stat().st_mtime, path=str(folder),
                         layer=str(self.root), writable=None)

    def gc(self, older_than_days: float | None = None, everything: bool = False) -> dict:
        """Remove half-built folders of killed builds and, optionally, models.

        A model (or half-built folder) whose preparation lock is held by another
        process is left alone.  Returns what was really removed: ``models``,
        ``bytes``, ``tmp``, ``failed``, ``errors``, ``root``.
        """
        removed = {"models": 0, "bytes": 0, "tmp": 0, "failed": 0, "errors": [], "root": str(self.root)}
        if not self.root.is_dir():
            return removed
        now = time.time()
        for grave in self.root.glob(".gc-*"):  # a removal that was interrupted
            if not _rmtree(grave) or not grave.exists():
                removed["tmp"] += 1
        for stale in sorted(self.root.glob(".*.tmp-*")):
            name = stale.name[1:].split(".tmp-")[0]
            with self._hold(name) as busy:
                if busy is None and stale.is_dir() and _remove_tree(stale, self.root) is None:
                    removed["tmp"] += 1
        for entry in list(self.entries()):
            if not (everything or unused_for(entry, older_than_days, now)):
                continue
            with self._hold(entry["key"]) as busy:
                why = busy or _remove_tree(Path(entry["path"]), self.root)
            if why is None:
                removed["models"] += 1
                removed["bytes"] += entry["bytes"]
            else:
                removed["failed"] += 1
                removed["errors"].append(f"model {entry['key']}: {why}")
        return removed

    @contextlib.contextmanager
    def _hold(self, name: str):
        """``with self._hold(name) as busy``: hold ``name``'s preparation lock, or say why not (``busy``).

        The lock file is left in place: removing it could let a waiting process and a
        new one both believe they hold the lock.
        """
        from filelock import Timeout

        lock = FileLock(str(self.root / f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield "being prepared by another process"
            return
        except OSError as exc:  # the store cannot be written
            yield _why(exc)
            return
        try:
            yield None
        finally:
            lock.release()


def unused_for(entry: dict, days: float | None, now: float | None = None) -> bool:
    """Whether a listed entry has not been used for more than ``days`` days (False when ``days`` is None)."""
    if days is None:
        return False
    return (time.time() if now is None else now) - entry["last_used"] > days * 86400


class ClaimBoard:
    """Which rows of one map op are being computed right now, and by whom: so that several processes (or
    workers) fill one map at once without computing a row twice.

    A claim is a file ``claims/<map key>/<id>.claim`` listing record hashes,
    held under an exclusive ``flock`` by its owner while it computes them.  A
    claim whose lock can be taken belongs to a process that died (a crash, a
    SIGKILL): it is stale and removed.  Reading the board and adding a claim
    happen under one short lock, so two processes never claim the same row.
    """

    def __init__(self, cache: "Cache", map_key: str):
        self.cache = cache
        self.layer = cache._writable("this run needs results that are not in the cache")
        self.map_key = map_key
        self.dir = cache._real_dir(self.layer, "claims", map_key)
        self._held: dict[str, tuple[int, Path]] = {}

    def _board_lock(self) -> FileLock:
        return FileLock(str(self.cache._lock_path(self.layer, "claims", self.map_key, ".board.lock")))

    def claimed_by_others(self) -> set[bytes]:
        """Hashes claimed by other live processes (stale claims are removed on the way)."""
        import fcntl

        out: set[bytes] = set()
        for path in self.dir.glob("*.claim"):
            if path.name in self._held:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a planted link is not read through
            except OSError:
                if _is_link(path):
                    path.unlink(missing_ok=True)
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:  # held: a live owner
                    data = os.read(fd, 1 << 30)
                    out.update(data[i : i + HASH_BYTES] for i in range(0, len(data), HASH_BYTES))
                    continue
                path.unlink(missing_ok=True)  # nobody holds it: its owner died
            finally:
                os.close(fd)
        return out

    def claim(self, hashes: np.ndarray, choose) -> tuple[np.ndarray, str | None]:
        """Claim what ``choose(taken)`` picks of ``hashes``, ``taken`` being the hashes others hold.

        ``choose(set of claimed hashes) -> positions into hashes``.  Returns the
        picked positions and the claim's name (None when nothing was picked).
        """
        import fcntl

        with self._board_lock():
            taken = self.claimed_by_others()
            picked = np.asarray(choose(taken), dtype=np.int64)
            if len(picked) == 0:
                return picked, None
            name = f"{os.getpid()}-{uuid.uuid4().hex}.claim"
            path = self.dir / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"".join(bytes(h) for h in np.asarray(hashes)[picked]))
            os.fsync(fd)
            self._held[name] = (fd, path)
        return picked, name

    def release(self, name: str | None) -> None:
        """Give up one claim (its rows are stored)."""
        if name in self._held:
            fd, path = self._held.pop(name)
            path.unlink(missing_ok=True)
            os.close(fd)

    def release_all(self) -> None:
        """Give up every claim this board holds (the fill finished or stopped)."""
        for name in list(self._held):
            self.release(name)


RAGGED_VALUES, RAGGED_OFFSETS = "__values", "__offsets"


def _layout(arrays: dict) -> dict:
    """Each column's type (its kind only for text, whose width varies by shard) and per-row shape."""
    return {name: (a.dtype.kind if a.dtype.kind in "US" else a.dtype.str,
                   () if name.endswith(RAGGED_VALUES) else a.shape[1:])
            for name, a in arrays.items() if name != "keys" and not name.endswith(RAGGED_OFFSETS)}


def _shard_problem(arrays: dict, layout: dict | None) -> str | None:
    """Why a (checksum-verified) map shard cannot be what it claims, or None.

    Every column has one row per record hash, ragged offsets run from 0 to the
    length of their values, and every shard of a map has the same columns.
    """
    keys = arrays.get("keys")
    if keys is None or keys.ndim != 1 or keys.dtype != np.dtype(f"S{HASH_BYTES}"):
        return "the shard has no record hashes"
    rows = len(keys)
    for name, a in arrays.items():
        if name.endswith(RAGGED_OFFSETS):
            values = arrays.get(name[: -len(RAGGED_OFFSETS)] + RAGGED_VALUES)
            if (values is None or a.ndim != 1 or a.dtype.kind not in "iu" or len(a) != rows + 1 or a[0] != 0
                    or a[-1] != len(values) or np.any(np.diff(a) < 0)):
                return f"ragged column {name[: -len(RAGGED_OFFSETS)]!r} has inconsistent offsets"
        elif not name.endswith(RAGGED_VALUES) and (a.ndim == 0 or len(a) != rows):
            return f"column {name!r} has {0 if a.ndim == 0 else len(a)} rows for {rows} records"
    if layout is not None and _layout(arrays) != layout:
        return "the shard's columns differ from the other shards of this map"
    return None


class MapStore:
    """Per-record results of one map op (one ``map key``), in append-only shards.

    Shards are read from every layer of the cache (the writable one first) and
    appended to the writable layer only.
    """

    def __init__(self, cache: Cache, map_key: str):
        self.cache = cache
        self.key = map_key
        #: where new shards go (the writable layer; the root when there is none)
        self.dir = (cache.write_root or cache.root) / "maps" / map_key
        self._dirs = [(layer / "maps" / map_key, layer == cache.write_root) for layer in cache.layers]
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._shards: list[Entry] = []
        self._layout: dict | None = None
        self._seen: set[str] = set()

    def _load(self, *, only_writable: bool = False) -> None:
        self._index = {}
        self._shards = []
        self._seen = self._on_disk()
        layout = None  # the columns (name -> dtype, shape per row) of the first good shard
        for folder, writable in self._dirs:
            if (only_writable and not writable) or _is_link(folder) or not folder.is_dir():
                continue
            for shard_dir in sorted(folder.iterdir()):
                name = f"{self.key}/{shard_dir.name}"
                if not _is_link(shard_dir) and not shard_dir.is_dir():
                    continue
                entry = self.cache._read_entry(shard_dir, name, writable=writable)
                if entry is None:
                    continue
                problem = _shard_problem(entry.arrays, layout)
                if problem is not None:
                    self.cache._discard(shard_dir, name, problem, writable=writable)
                    continue
                layout = layout or _layout(entry.arrays)
                self._add_shard(entry)
        self._layout = layout

    def _add_shard(self, entry: Entry) -> None:
        number = len(self._shards)
        self._shards.append(entry)
        # Full 16-byte hashes as dict keys (a "V" view keeps trailing zero bytes that "S" would strip).
        keys = np.ascontiguousarray(entry.arrays["keys"]).view(f"V{HASH_BYTES}").tolist()
        index = self._index
        for row, h in enumerate(keys):
            if h not in index:
                index[h] = (number, row)

    def _on_disk(self) -> set[str]:
        """The shard folder names in every layer now (a cheap listing, no reading)."""
        names: set[str] = set()
        for folder, _ in self._dirs:
            if not _is_link(folder) and folder.is_dir():
                names.update(f"{folder}/{p.name}" for p in folder.iterdir())
        return names

    def refresh(self) -> None:
        """Re-read the shards on disk (another process may have added some)."""
        self._load()

    def refresh_if_changed(self) -> bool:
        """Re-read the shards only when the folders list shards this store has not read; whether it did."""
        if self._index is not None and not (self._on_disk() - self._seen):
            return False
        self._load()
        return True

    def locate(self, hashes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int] | None]]:
        """For each record hash: whether it is stored, and where."""
        if self._index is None:
            self._load()
        raw = np.ascontiguousarray(hashes).tobytes()
        where = [self._index.get(raw[i : i + HASH_BYTES]) for i in range(0, len(raw), HASH_BYTES)]
        found = np.fromiter((w is not None for w in where), dtype=bool, count=len(where))
        return found, where

    def read(self, column: str, where: list[tuple[int, int]]) -> np.ndarray:
        """Values of ``column`` at the given (shard, row) locations, in order.

        A ragged column (stored as ``<column>__values`` + ``<column>__offsets``)
        comes back as an object array holding one list per row.
        """
        if not where:
            return None
        by_shard: dict[int, list[int]] = {}
        for pos, (shard, row) in enumerate(where):
            by_shard.setdefault(shard, []).append(pos)
        if column + RAGGED_OFFSETS in self._shards[where[0][0]].arrays:
            out = np.empty(len(where), dtype=object)
            for shard, positions in by_shard.items():
                arrays = self._shards[shard].arrays
                values, offsets = arrays[column + RAGGED_VALUES], arrays[column + RAGGED_OFFSETS]
                for p in positions:
                    row = where[p][1]
                    out[p] = values[offsets[row]:offsets[row + 1]].tolist()
            return out
        sample = self._shards[where[0][0]].arrays[column]
        out = np.empty((len(where),) + sample.shape[1:], dtype=sample.dtype)
        for shard, positions in by_shard.items():
            rows = np.fromiter((where[p][1] for p in positions), dtype=np.int64, count=len(positions))
            out[np.asarray(positions)] = np.asarray(self._shards[shard].arrays[column][rows])
        return out

    def append(self, hashes: np.ndarray, columns: dict[str, np.ndarray], info: dict) -> None:
        """Persist results for ``hashes`` as a new shard (atomic) in the writable layer."""
        if len(hashes) == 0:
            return
        self.cache._real_dir(self.cache._writable(), "maps", self.key)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        arrays = {"keys": np.asarray(hashes)}
        for column, values in columns.items():
            if isinstance(values, np.ndarray) and values.dtype != object:
                arrays[column] = values
                continue
            # A list per record (tags, ids): CSR, flat values + offsets, never pickled.
            lists = [list(v) for v in values]
            flat = [x for row in lists for x in row]
            arrays[column + RAGGED_VALUES] = np.asarray(flat) if flat else np.zeros(0, dtype="<U1")
            arrays[column + RAGGED_OFFSETS] = np.cumsum([0] + [len(row) for row in lists], dtype=np.int64)
        self.cache._write_entry(self.dir / name, f"{self.key}/{name}", arrays, dict(info, rows=len(hashes)))
        if self._index is None:
            return  # read lazily, with our own shard
        # Add our own shard to the index instead of re-reading (and re-verifying) every shard: a map
        # filled group by group would otherwise re-read the whole map after each group.
        entry = self.cache._read_entry(self.dir / name, f"{self.key}/{name}", writable=True)
        if entry is None or _shard_problem(entry.arrays, self._layout) is not None:
            self._index = None
            return
        self._layout = self._layout or _layout(entry.arrays)
        self._add_shard(entry)
        self._seen.add(f"{self.dir}/{name}")

    def count(self, hashes: np.ndarray) -> int:
        found, _ = self.locate(hashes)
        return int(found.sum())

    def compact(self) -> None:
        """Merge the writable layer's shards into one (duplicates dropped); used by ``cache gc``."""
        with self.cache.lock(f"map-{self.key}"):
            self._load(only_writable=True)
            if len(self._shards) < 2:
                return
            keys = list(self._index.keys())
            where = [self._index[k] for k in keys]
            names = {c[: -len(RAGGED_VALUES)] if c.endswith(RAGGED_VALUES) else c
                     for c in self._shards[0].arrays if c != "keys" and not c.endswith(RAGGED_OFFSETS)}
            columns = {c: self.read(c, where) for c in sorted(names)}
            info = dict(self._shards[0].meta.get("info", {}))
            old = [Path(p) for p in sorted(str(d) for d in self.dir.iterdir() if d.is_dir())]
            hashes = np.frombuffer(b"".join(keys), dtype=f"S{HASH_BYTES}")
            self.append(hashes, columns, info)
            for d in old:
                _rmtree(d)
            self._index = None

"""Reading pools and target sets, normalising records, writing selections.

Containers: JSON Lines, a JSON array, Parquet, and a folder written by Hugging
Face ``datasets.save_to_disk`` (read with pyarrow; ``datasets`` itself is not
needed).  Record schemas, auto-detected per record and overridable:

=================== ======================================================
``alpaca``          ``instruction``, optional ``input``, ``output``
                    (optional ``history``: earlier ``[user, assistant]`` turns)
``prompt_completion`` ``prompt``, ``completion``
``messages``        ``messages`` (or ``dialogs``): ``[{role, content}, ...]``
``sharegpt``        ``conversations``: ``[{from, value}, ...]``
``qa``              ``question``, ``answer`` (GSM8K style)
``input_target``    ``input``, ``target`` (BIG-Bench style)
``multiple_choice`` ``question``, ``choices`` (a list), ``answer`` (a letter
                    or an index), optional ``subject`` (MMLU style)
=================== ======================================================

A multiple-choice record is rendered as LESS renders MMLU (Xia et al., ICML
2024; princeton-nlp/LESS ``less/data_selection/get_validation_dataset.py``):
the instruction is "The following are multiple choice questions (with
answers) about {subject}." (when there is a subject), the question, the
lettered choices ("A. …") and "Answer:"; the response is the answer's letter.

Every record is normalised to ``{"instruction", "input", "output",
"has_input", "messages"}``.  Without a format given, each record's format is
detected from its own fields, so a file mixing formats is read whole (the
manifest counts the formats; a record of no known format is a bad record).  Multi-turn records are scored on their **last
assistant turn**: ``output`` is that turn, ``messages`` holds every turn up to
and including it, and ``instruction`` is the user turn just before it.

A record's identity is the BLAKE2b hash of its canonical JSON, so results
cached for a record are found again in any pool that contains it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasel.dsl.cache import HASH_BYTES

SCHEMAS = ("alpaca", "prompt_completion", "messages", "sharegpt", "qa", "input_target", "multiple_choice")
BAD_RECORD_POLICIES = ("fail", "skip")

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


class DataError(Exception):
    """A problem with an input file, naming the file and, where known, the line."""


class BadRecord(Exception):
    """One record cannot be used; ``reason`` is a short category for the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Dataset:
    """The usable records of one input file, with their identities."""

    name: str
    path: Path
    container: str
    schema: str
    raw: list[dict]
    records: list[dict]
    positions: np.ndarray  # each record's position among the records of the file
    lines: list[int | None]
    raw_lines: list[bytes | None]
    hashes: np.ndarray  # (n,) S16
    fingerprint: str
    total: int  # records in the file, including skipped ones
    excluded: Counter = field(default_factory=Counter)
    excluded_details: list[dict] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)  # usable records per record format

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sizes(self) -> np.ndarray:
        """Bytes of each record's JSON (its line, for JSON Lines): a cheap proxy of its token count."""
        if getattr(self, "_sizes", None) is None:
            self._sizes = np.fromiter(
                (len(line) if line is not None else len(json.dumps(r, ensure_ascii=False).encode("utf-8"))
                 for line, r in zip(self.raw_lines, self.raw)), dtype=np.int64, count=len(self.raw))
        return self._sizes

    def where(self, i: int) -> str:
        """``file:line`` (or ``file, record N``) of record ``i``, for messages."""
        line = self.lines[i]
        return f"{self.path}:{line}" if line else f"{self.path}, record {int(self.positions[i])}"


def record_hash(raw: dict) -> bytes:
    """The content identity of a raw record (128-bit BLAKE2b of canonical JSON)."""
    canonical = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=HASH_BYTES).digest()


def fingerprint_of(hashes: np.ndarray, schema: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(schema.encode())
    h.update(np.ascontiguousarray(hashes).tobytes())
    return h.hexdigest()


def detect_schema(obj: dict) -> str | None:
    """The schema a record's keys suggest, or None."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "messages" in keys or "dialogs" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "instruction" in keys:
        return "alpaca"
    if {"question", "choices", "answer"} <= keys:
        return "multiple_choice"
    if {"question", "answer"} <= keys:
        return "qa"
    if {"input", "target"} <= keys:
        return "input_target"
    return None


def _text(obj: dict, key: str, *, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise BadRecord("missing field", f"missing field {key!r}")
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"field {key!r} should be a string, got {type(value).__name__}")
    return value


def _turns(items, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise BadRecord("missing field", "conversation is empty or not a list")
    turns = []
    for t in items:
        if not isinstance(t, dict) or role_key not in t or content_key not in t:
            raise BadRecord("malformed turn", f"each turn needs {role_key!r} and {content_key!r}")
        role = t[role_key]
        if role_map is not None:
            if role not in role_map:
                raise BadRecord("malformed turn", f"unknown speaker {role!r}")
            role = role_map[role]
        content = t[content_key]
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False) if content is not None else ""
        turns.append({"role": role, "content": content})
    return turns


def _from_turns(turns: list[dict]) -> dict:
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecord("missing field", "conversation has no assistant turn")
    kept = turns[: last + 1]
    instruction = next((t["content"] for t in reversed(kept[:last]) if t["role"] == "user"), "")
    return {"instruction": instruction, "input": "", "output": kept[last]["content"],
            "has_input": False, "messages": kept}


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _multiple_choice(obj: dict) -> tuple[str, str]:
    """(prompt, answer letter) of a multiple-choice record, rendered as LESS renders MMLU."""
    question = _text(obj, "question")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(_LETTERS) or not all(
            isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
        raise BadRecord("wrong type", f"field 'choices' should be a list of 2 to {len(_LETTERS)} strings")
    answer = obj.get("answer")
    letters = _LETTERS[: len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        letter = letters[answer]
    elif isinstance(answer, str) and answer.strip().upper() in letters and answer.strip():
        letter = answer.strip().upper()
    else:
        raise BadRecord("bad answer", f"field 'answer' should be one of {', '.join(letters)} or an index "
                                      f"0..{len(choices) - 1}, got {answer!r}")
    subject = obj.get("subject")
    head = (f"The following are multiple choice questions (with answers) about "
            f"{str(subject).replace('_', ' ')}.\n\n" if isinstance(subject, str) and subject else "")
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    return f"{head}{question}\n{options}\nAnswer:", letter


def normalize(obj, schema: str) -> dict:
    """The normalised form of one raw record (raises :class:`BadRecord`)."""
    if not isinstance(obj, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(obj).__name__}")
    if schema == "alpaca":
        instruction = _text(obj, "instruction")
        has_input = obj.get("input") is not None  # Parquet fills missing columns with null
        inp = _text(obj, "input", required=False)
        output = _text(obj, "output")
        messages = []
        history = obj.get("history") or []
        if history:
            if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
                raise BadRecord("malformed turn", "history must be a list of [user, assistant] pairs")
            for user, assistant in history:
                messages += [{"role": "user", "content": str(user)}, {"role": "assistant", "content": str(assistant)}]
        user = instruction + ("\n\n" + inp if inp else "")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        record = {"instruction": instruction, "input": inp, "output": output, "has_input": has_input,
                  "messages": messages}
    elif schema == "prompt_completion":
        prompt, completion = _text(obj, "prompt"), _text(obj, "completion")
        record = {"instruction": prompt, "input": "", "output": completion, "has_input": False,
                  "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    elif schema == "messages":
        items = obj.get("messages", obj.get("dialogs"))
        record = _from_turns(_turns(items, "role", "content", None))
    elif schema == "sharegpt":
        record = _from_turns(_turns(obj.get("conversations"), "from", "value", _SHAREGPT_ROLES))
    elif schema == "qa":
        q, a = _text(obj, "question"), _text(obj, "answer")
        record = {"instruction": q, "input": "", "output": a, "has_input": False,
                  "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    elif schema == "input_target":
        q, a = _text(obj, "input"), _text(obj, "target")
        record = {"instruction": q, "input": "", "output": a, "has_input": False,
                  "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    elif schema == "multiple_choice":
        q, a = _multiple_choice(obj)
        record = {"instruction": q, "input": "", "output": a, "has_input": False,
                  "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    else:
        raise ValueError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    if not record["output"].strip():
        raise BadRecord("empty response", "the response is empty")
    return record


# ------------------------------------------------------------------ readers
_BOM = b"\xef\xbb\xbf"


def _parse_json(text: str):
    """``json.loads`` with the failures of one record as :class:`BadRecord` (not crashes)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord("malformed JSON", f"malformed JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return BadRecord("malformed JSON", "JSON nested too deeply to read")


def _read_jsonl(path: Path):
    """Yield (position, line number, raw bytes, parsed object or BadRecord)."""
    data = path.read_bytes()
    if data.startswith(_BOM):  # a byte-order mark is not part of the first record
        data = data[len(_BOM):]
    position = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield position, number, raw, BadRecord(
                "not UTF-8", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            )
            position += 1
            continue
        yield position, number, raw, _parse_json(text)
        position += 1


def _read_json_array(path: Path):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {exc.start})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(items, dict):
        # A single object holding one list (e.g. {"data": [...]}) is accepted.
        lists = [v for v in items.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records")
        items = lists[0]
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records")
    for position, obj in enumerate(items):
        yield position, None, None, obj


def _read_arrow_table(table):
    for position, obj in enumerate(table.to_pylist()):
        yield position, None, None, obj


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    yield from _read_arrow_table(table)


def _read_hf_folder(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = "train" if "train" in splits else (splits[0] if splits else None)
        if split is None:
            raise DataError(f"{path}: dataset_dict.json lists no splits")
        path = path / split
    state_file = path / "state.json"
    if state_file.exists():
        files = [path / f["filename"] for f in json.loads(state_file.read_text()).get("_data_files", [])]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: no .arrow files (is this a `datasets.save_to_disk` folder?)")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                try:
                    tables.append(ipc.open_stream(source).read_all())
                except pa.ArrowInvalid:
                    tables.append(ipc.open_file(source).read_all())
        except Exception as exc:
            raise DataError(f"{f}: cannot read Arrow data: {exc}") from None
    yield from _read_arrow_table(pa.concat_tables(tables))


def container_of(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        # Many ".json" files are really JSON Lines: a JSON array, or one object spanning
        # the whole file, is a JSON document; anything else is read line by line.
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(_BOM).lstrip()
        if head.startswith(b"[") or (head.startswith(b"{") and _single_object(path)):
            return "json"
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json, .parquet or a datasets folder)")


def _single_object(path: Path) -> bool:
    """Whether a ``.json`` file starting with ``{`` is one JSON document rather than JSON Lines.

    A first line that is a whole object means JSON Lines as soon as anything follows it, so a
    large JSON Lines file is decided from its first line; only a first line that is not a whole
    object (a pretty-printed document, or a broken record) makes us parse the whole file.
    """
    with open(path, "rb") as f:
        first = f.readline().removeprefix(_BOM)
        try:
            json.loads(first)
        except (ValueError, UnicodeDecodeError, RecursionError):
            try:
                json.loads(first + f.read())
                return True
            except (ValueError, UnicodeDecodeError, RecursionError):
                return False  # read line by line, so the error names the bad line
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def load_dataset(path: str | Path, *, name: str = "pool", schema: str | None = None,
                 on_bad_record: str = "fail") -> Dataset:
    """Read and normalise a dataset.

    ``on_bad_record="fail"`` raises :class:`DataError` at the first unusable
    record (naming the file, line and problem); ``"skip"`` leaves it out and
    counts it by reason in ``Dataset.excluded``.
    """
    path = Path(path)
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}")
    if schema is not None and schema not in SCHEMAS:
        raise DataError(f"unknown record format {schema!r}; known: {', '.join(SCHEMAS)}")
    _check_readable(path)
    container = container_of(path)
    reader = {"jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet, "hf": _read_hf_folder}[container]

    raw, records, positions, lines, raw_lines, hashes = [], [], [], [], [], []
    excluded: Counter = Counter()
    formats: Counter = Counter()
    details: list[dict] = []
    total = 0
    for position, line, raw_bytes, obj in reader(path):
        total += 1
        where = f"{path}:{line}" if line else f"{path}, record {position}"
        try:
            record_format, record, identity = _usable(obj, schema)
        except BadRecord as bad:
            if on_bad_record == "fail":
                raise DataError(f"{where}: {bad.detail} (use --on-bad-record skip to skip such records)") from None
            excluded[bad.reason] += 1
            details.append({"position": position, "line": line, "reason": bad.reason, "detail": bad.detail})
            continue
        formats[record_format] += 1
        raw.append(obj)
        records.append(record)
        positions.append(position)
        lines.append(line)
        raw_lines.append(raw_bytes)
        hashes.append(identity)
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({sum(excluded.values())} skipped)" if excluded else ""))
    schema = schema or (next(iter(formats)) if len(formats) == 1 else "mixed")
    hash_array = np.frombuffer(b"".join(hashes), dtype=f"S{HASH_BYTES}").copy()
    return Dataset(
        name=name, path=path, container=container, schema=schema, raw=raw, records=records,
        positions=np.asarray(positions, dtype=np.int64), lines=lines, raw_lines=raw_lines,
        hashes=hash_array, fingerprint=fingerprint_of(hash_array, schema), total=total,
        excluded=excluded, excluded_details=details, formats=formats,
    )


def _usable(obj, schema: str | None) -> tuple[str, dict, bytes]:
    """A read record's format, normalised form and identity, or :class:`BadRecord` saying why not."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(obj).__name__}")
    record_format = schema or detect_schema(obj)
    if record_format is None:
        keys = ", ".join(sorted(map(str, obj))[:12]) or "none"
        raise BadRecord("unknown format", f"cannot tell the record format from its fields ({keys}); "
                        f"expected one of {', '.join(SCHEMAS)} (see --pool-format)")
    record = normalize(obj, record_format)
    try:
        identity = record_hash(obj)
    except UnicodeEncodeError:  # JSON allows a lone surrogate escape ("\ud800"); UTF-8 text cannot hold one
        raise BadRecord("not UTF-8", "contains a lone surrogate escape (such as \\ud800), which is not text") from None
    return record_format, record, identity


def _check_readable(path: Path) -> None:
    """Refuse what cannot be read as a dataset before reading hangs or fails obscurely."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: a loop of symbolic links") from None
        if os.path.islink(path):
            raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        if exc.errno == errno.EACCES:
            raise DataError(f"{path}: permission denied") from None
        raise DataError(f"{path}: no such file or folder") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise DataError(f"{path}: not a regular file or folder (a pipe, socket or device cannot be read "
                        "twice; save it to a file first)")


OUTPUT_CONTAINERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def output_container(dataset: Dataset, out: str | Path) -> str:
    """The container to write ``out`` in: its extension's, else the input's (a datasets folder: JSON Lines)."""
    suffix = Path(out).suffix.lower()
    if suffix in OUTPUT_CONTAINERS:
        return OUTPUT_CONTAINERS[suffix]
    if suffix:
        known = ", ".join(sorted(OUTPUT_CONTAINERS))
        raise DataError(f"{out}: cannot tell the output format from {suffix!r}; use one of {known} "
                        "(or no extension for the input's format)")
    return "jsonl" if dataset.container == "hf" else dataset.container


def default_output(pool: str | Path, container: str) -> Path:
    """Where a selection goes when no output is given: ``<pool stem>.selected.<ext>`` next to the pool."""
    pool = Path(pool)
    ext = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "hf": ".jsonl"}[container]
    stem = pool.name if pool.is_dir() else pool.stem
    return pool.parent / f"{stem}.selected{ext}"


def write_selection(dataset: Dataset, indices, out: str | Path) -> Path:
    """Write the records at ``indices`` (in that order) in the format ``out``'s extension names.

    ``.jsonl`` from a JSON Lines input copies the lines (byte-identical records);
    other combinations re-serialise the raw records (``.json``: one JSON array,
    ``.parquet``: a Parquet table).  Without an extension the input's format is
    used (JSON Lines for a ``datasets`` folder).
    """
    out = Path(out)
    container = output_container(dataset, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    indices = [int(i) for i in indices]
    tmp = out.with_name(out.name + ".tmp")
    if container == "jsonl":
        with open(tmp, "wb") as f:
            for i in indices:
                line = dataset.raw_lines[i]
                if line is None:
                    line = json.dumps(dataset.raw[i], ensure_ascii=False).encode("utf-8")
                f.write(line + b"\n")
    elif container == "json":
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([dataset.raw[i] for i in indices], f, ensure_ascii=False, indent=2)
            f.write("\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dataset.raw[i] for i in indices]), tmp)
    tmp.replace(out)
    return out

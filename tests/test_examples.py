"""Tests for the bundled example data in ``examples/``.

The data files are committed, and ``examples/make_examples.py`` must reproduce
them byte for byte.  The remaining tests check that the documented defects in
``examples/defects.json`` are real (and that there are no undocumented ones),
and spot-check that clean answers are actually correct.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GENERATED = ["pool.jsonl", "defects.json", "pool_bad.jsonl", "target_arithmetic.jsonl", "chat_pool.jsonl"]
KEYS = ["instruction", "input", "output"]
TERMINAL = tuple(".!?\"')\u201d")


# ----------------------------------------------------------------- helpers

def norm_tokens(text: str) -> list[str]:
    """Lowercase, strip punctuation, collapse whitespace (independent of the generator)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def rec_tokens(rec: dict) -> list[str]:
    return norm_tokens(" ".join(rec[k] for k in KEYS))


def close(a: list[str], b: list[str]) -> bool:
    """Equal, or same length with exactly one differing token."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 1


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gen():
    """Import examples/make_examples.py as a module (it is a script, not a package)."""
    name = "datasel_examples_generator"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "make_examples.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def pool() -> list[dict]:
    return load_jsonl(EXAMPLES / "pool.jsonl")


@pytest.fixture(scope="module")
def defects() -> dict:
    return json.loads((EXAMPLES / "defects.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(gen) -> list:
    """What a clean generator would have produced for each final pool index."""
    return gen.build_pool().reference


@pytest.fixture(scope="module")
def defective(defects) -> set[int]:
    return (set(defects["mismatch"]) | set(defects["truncated"])
            | {d for _, d in defects["exact_duplicate"]} | {d for _, d in defects["near_duplicate"]})


# ----------------------------------------------------------- reproducible

def test_regeneration_is_byte_identical(gen, tmp_path, capsys):
    assert gen.main(["--out", str(tmp_path)]) == 0
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENERATED)


# ------------------------------------------------------------------ pool

def test_pool_shape(pool, defects):
    raw = (EXAMPLES / "pool.jsonl").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert len(raw) < 300_000
    assert len(pool) >= 500
    assert len(pool) == defects["record_count"] == len(defects["families"]) == len(defects["tasks"])
    for rec in pool:
        assert list(rec) == KEYS
        assert all(isinstance(rec[k], str) for k in KEYS)
        assert rec["instruction"].strip() and rec["output"].strip()
    share_input = sum(1 for r in pool if r["input"]) / len(pool)
    assert 0.25 <= share_input <= 0.45
    counts = {f: defects["families"].count(f) for f in defects["family_counts"]}
    assert counts == defects["family_counts"]
    assert len(counts) >= 8 and min(counts.values()) >= 40
    assert all(t.split("/")[0] == f for t, f in zip(defects["tasks"], defects["families"]))


def test_defect_bookkeeping(pool, defects, defective):
    n = len(pool)
    exact, near = defects["exact_duplicate"], defects["near_duplicate"]
    assert 12 <= len(defects["mismatch"]) <= 18
    assert 8 <= len(defects["truncated"]) <= 12
    assert 6 <= len(exact) <= 10 and 6 <= len(near) <= 10
    assert len(defects["near_duplicate_edit"]) == len(near)
    groups = [defects["mismatch"], defects["truncated"], [d for _, d in exact], [d for _, d in near]]
    assert sum(len(g) for g in groups) == len(defective)          # no index has two defects
    assert all(0 <= i < n for g in groups for i in g)
    assert defects["clean_count"] == n - len(defective)
    originals = {o for o, _ in exact} | {o for o, _ in near} | {j for _, j in defects["mismatch_source"]}
    assert not originals & defective                               # originals and donors are clean


def test_exact_duplicates(pool, defects):
    for o, d in defects["exact_duplicate"]:
        assert o < d
        assert pool[o] == pool[d]
        assert defects["families"][o] == defects["families"][d]


def test_near_duplicates(pool, defects):
    for o, d in defects["near_duplicate"]:
        assert o < d
        assert pool[o] != pool[d]
        assert close(rec_tokens(pool[o]), rec_tokens(pool[d])), (pool[o], pool[d])
        assert defects["families"][o] == defects["families"][d]


def test_no_undocumented_duplicates(pool, defects):
    """Every (near) duplicate pair in the pool is one of the documented ones."""
    listed = {tuple(p) for p in defects["exact_duplicate"]} | {tuple(p) for p in defects["near_duplicate"]}
    toks = [rec_tokens(r) for r in pool]
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(toks):
        by_len.setdefault(len(t), []).append(i)
    found = set()
    for idxs in by_len.values():
        for k, a in enumerate(idxs):
            for b in idxs[k + 1:]:
                if close(toks[a], toks[b]):
                    found.add((a, b))
    assert found == listed


def test_truncated(pool, defects, reference):
    for i in defects["truncated"]:
        cut, full = pool[i]["output"], reference[i].output
        assert cut.strip(), i
        assert not cut.endswith(TERMINAL), cut
        assert full.endswith(TERMINAL)
        assert len(cut) < len(full) and full.startswith(cut), (cut, full)
        assert pool[i]["instruction"] == reference[i].instruction


def test_mismatch(pool, defects, reference, defective):
    fams = defects["families"]
    assert [i for i, _ in defects["mismatch_source"]] == defects["mismatch"]
    for i, j in defects["mismatch_source"]:
        assert fams[i] != fams[j]
        assert pool[i]["output"] == pool[j]["output"]
        assert pool[i]["output"] != reference[i].output
        assert j not in defective


def test_clean_records_match_reference(pool, reference, defective):
    for i, rec in enumerate(pool):
        if i not in defective:
            r = reference[i]
            assert (rec["instruction"], rec["input"], rec["output"]) == (r.instruction, r.input, r.output)


# ---------------------------------------------------- answers are correct

EXPR = re.compile(r"^(-?\d+) ([-+×*÷/]) (\d+) = (-?\d+)\.$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "*": lambda a, b: a * b,
       "÷": lambda a, b: a / b, "/": lambda a, b: a / b}
# unit name -> (dimension, size in a base unit); temperatures are handled separately
UNITS = {"kilometre": ("len", 1000), "mile": ("len", 1609.344), "metre": ("len", 1), "foot": ("len", 0.3048),
         "feet": ("len", 0.3048), "centimetre": ("len", 0.01), "inch": ("len", 0.0254), "inche": ("len", 0.0254),
         "kilogram": ("mass", 1000), "pound": ("mass", 453.59237), "gram": ("mass", 1),
         "ounce": ("mass", 28.349523125), "litre": ("vol", 1), "US gallon": ("vol", 3.785411784),
         "hour": ("time", 3600), "minute": ("time", 60),
         "kilometre per hour": ("speed", 1 / 3.6), "metre per second": ("speed", 1)}
CONV = re.compile(r"^(?:Using [^:]+: )?(-?[\d.]+) (.+?) (?:is about|is|≈|=) (-?[\d.]+) (.+?)"
                  r"(?:, since .*| \(rounded to two decimal places\))?\.$")


def unit_key(name: str) -> str:
    name = name.replace("kilometres per", "kilometre per").replace("metres per", "metre per")
    return name if name in UNITS else name[:-1] if name.endswith("s") and name[:-1] in UNITS else name


WORDED = [(re.compile(r"^Add (\d+) and (\d+)\.$"), "{0} + {1}"),
          (re.compile(r"^What is the sum of (\d+) and (\d+)\?$"), "{0} + {1}"),
          (re.compile(r"^Subtract (\d+) from (\d+)\.$"), "{1} - {0}"),
          (re.compile(r"^Calculate (\d+) minus (\d+)\.$"), "{0} - {1}"),
          (re.compile(r"^Multiply (\d+) by (\d+)\.$"), "{0} * {1}"),
          (re.compile(r"^What is (\d+) times (\d+)\?$"), "{0} * {1}"),
          (re.compile(r"^Divide (\d+) by (\d+)\.$"), "{0} / {1}"),
          (re.compile(r"^What is (\d+) divided by (\d+)\?$"), "{0} / {1}"),
          (re.compile(r"^(?:What is|Calculate) (\d+)(?:%| percent) of (\d+)[.?]$"), "{0} * {1} / 100"),
          (re.compile(r"^What is (?:the square of )?(\d+)(?: squared)?\?$"), "{0} * {0}"),
          (re.compile(r"^(?:What is|Calculate|Evaluate) ([-+×*÷/() \d]+)[.?]$"), "{0}")]


def expression_of(rec: dict) -> str:
    """The arithmetic a record asks for, as a Python expression over integers."""
    if rec["input"]:
        expr = rec["input"]
    else:
        for pattern, template in WORDED:
            m = pattern.match(rec["instruction"])
            if m:
                expr = template.format(*m.groups())
                break
        else:
            raise AssertionError(f"unrecognised arithmetic question: {rec['instruction']}")
    expr = expr.replace("×", "*").replace("÷", "/")
    assert re.fullmatch(r"[-+*/() \d]+", expr), expr     # digits and operators only: safe to eval
    return expr


def test_arithmetic_and_conversion_answers(pool, defects, defective):
    checked_expr = checked_conv = 0
    for i, rec in enumerate(pool):
        if i in defective:
            continue
        task = defects["tasks"][i]
        m = EXPR.match(rec["output"])
        if task == "arithmetic/expression" and m:
            a, op, b, res = m.groups()
            assert OPS[op](int(a), int(b)) == int(res), rec
        if task == "arithmetic/expression":
            want = eval(expression_of(rec), {"__builtins__": {}})   # noqa: S307 - validated above
            got = re.findall(r"-?\d+(?:\.\d+)?", rec["output"])[-1]
            assert float(got) == want, rec
            checked_expr += 1
        if task.startswith("unit_conversion/"):
            m = CONV.match(rec["output"])
            assert m, rec["output"]
            x, u1, y, u2 = float(m[1]), m[2], float(m[3]), m[4]
            if u1 == "°C":
                want = x * 9 / 5 + 32
            elif u1 == "°F":
                want = (x - 32) * 5 / 9
            else:
                (d1, f1), (d2, f2) = UNITS[unit_key(u1)], UNITS[unit_key(u2)]
                assert d1 == d2, rec
                want = x * f1 / f2
            assert abs(want - y) <= 0.0051, rec
            assert ("about" in rec["output"] or "≈" in rec["output"]) == (abs(want - y) > 1e-9), rec
            checked_conv += 1
    assert checked_expr >= 15 and checked_conv >= 50


def test_classification_and_list_answers(pool, defects, defective):
    def is_prime(n: int) -> bool:
        return n > 1 and all(n % f for f in range(2, int(n ** 0.5) + 1))

    seen = {"prime": 0, "parity": 0, "asc": 0}
    for i, rec in enumerate(pool):
        if i in defective:
            continue
        task, text = defects["tasks"][i], rec["instruction"] + " " + rec["input"]
        if task == "classification/prime":
            n = int(re.search(r"\d+", text)[0])
            assert rec["output"].startswith("Yes") == is_prime(n), rec
            seen["prime"] += 1
        elif task == "classification/parity":
            n = int(re.search(r"\d+", text)[0])
            assert ("even" in rec["output"].lower()) == (n % 2 == 0), rec
            seen["parity"] += 1
        elif task == "list_ops/asc":
            nums = [int(x) for x in re.findall(r"-?\d+", text)]
            assert rec["output"] == ", ".join(str(x) for x in sorted(nums)), rec
            seen["asc"] += 1
    assert all(v >= 3 for v in seen.values()), seen


def test_readme_defect_table_is_current(defects):
    """examples/README.md repeats the defect indices; keep it in sync with defects.json."""
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for key in ("mismatch", "truncated"):
        assert ", ".join(map(str, defects[key])) in readme, key
    for key in ("exact_duplicate", "near_duplicate"):
        assert ", ".join(f"[{a}, {b}]" for a, b in defects[key]) in readme, key
    assert f"`clean_count` is {defects['clean_count']}" in readme
    for kind in ("malformed_json", "empty_output", "missing_output", "invalid_utf8"):
        assert f"\n| {defects['pool_bad'][kind]} |" in readme, kind


# ------------------------------------------------------------- pool_bad

def test_pool_bad(defects):
    info = defects["pool_bad"]
    raw = (EXAMPLES / "pool_bad.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == info["line_count"] >= 20
    bad = {info[k] for k in ("malformed_json", "empty_output", "missing_output", "invalid_utf8")}
    assert len(bad) == 4 and sorted(set(range(1, len(lines) + 1)) - bad) == info["valid_lines"]

    def line(no: int) -> bytes:
        return lines[no - 1]

    with pytest.raises(UnicodeDecodeError):
        line(info["invalid_utf8"]).decode("utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line(info["malformed_json"]).decode("utf-8"))
    empty = json.loads(line(info["empty_output"]).decode("utf-8"))
    assert list(empty) == KEYS and empty["output"] == ""
    missing = json.loads(line(info["missing_output"]).decode("utf-8"))
    assert "output" not in missing and missing["instruction"]
    for no in info["valid_lines"]:
        rec = json.loads(line(no).decode("utf-8"))
        assert list(rec) == KEYS and rec["output"], no


# --------------------------------------------------------------- target

def test_target_does_not_overlap_pool(pool, defects):
    target = load_jsonl(EXAMPLES / "target_arithmetic.jsonl")
    assert len(target) == defects["target"]["record_count"] == 30
    pool_texts = {" ".join(norm_tokens(t)) for r in pool for t in (r["instruction"], r["input"]) if t}
    pool_pairs = {(r["instruction"], r["input"]) for r in pool}
    problems = set()
    for rec in target:
        assert list(rec) == KEYS and rec["output"]
        problem = rec["input"] or rec["instruction"]
        key = " ".join(norm_tokens(problem))
        assert key not in pool_texts, problem
        assert (rec["instruction"], rec["input"]) not in pool_pairs
        assert re.search(r"\d", problem) and "?" in problem       # a word problem with numbers
        problems.add(key)
    assert len(problems) == len(target)


# ----------------------------------------------------------------- chat

def test_chat_pool(defects):
    chats = load_jsonl(EXAMPLES / "chat_pool.jsonl")
    info = defects["chat_pool"]
    assert len(chats) == info["record_count"] == 40
    multi, system = [], []
    for k, chat in enumerate(chats):
        assert list(chat) == ["messages"]
        msgs = chat["messages"]
        if msgs[0]["role"] == "system":
            system.append(k)
            msgs = msgs[1:]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and len(msgs) % 2 == 0
        assert all(list(m) == ["role", "content"] and m["content"].strip() for m in chat["messages"])
        if len(msgs) > 2:
            multi.append(k)
    assert multi == info["multi_turn"] and len(multi) >= 5
    assert system == info["with_system"] and len(system) >= 5
    assert len(set(info["families"])) >= 8

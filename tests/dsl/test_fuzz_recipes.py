"""Property-based fuzzing of recipes: the compiler and the engine never fail with a traceback.

Recipes are generated with hypothesis in five families (see :func:`recipes`):

* **typed**: bindings and a ``select`` built from the operator declarations in the registry
  (``datasel.ops.registry.registry()``: names, parameter kinds, choices, bounds, function
  parameters), from the operators of the language (``|``, ``&``, ``not``, ``+``, ``-``, ``*``,
  ``/``, comparisons, ``in``, ``not in``) and from the names bound earlier, aiming at the kind
  each place expects, so that a good share passes the checker and reaches the planner;
* **cheap typed**: the same with only operators that need no model (no Model-kind parameter,
  no Model result, no GPU in their resources) and small numbers, so that they can also be run;
* **arbitrary**: grammar-shaped text with any names (op names, prelude names, planned and
  unknown ones, reserved words), huge / fractional / many-digit numbers, percentages, strings
  with escapes and odd characters (U+2028, U+0085, form feed, vertical tab, BOM), lambdas
  anywhere, chained comparisons and odd whitespace;
* **deep**: pipes, calls, parentheses, minus signs, ``not``, lists, lambdas and chains of names
  nested up to and past :data:`datasel.dsl.depth.MAX_DEPTH`;
* **mutated**: the shipped recipes (``recipes/*.sel``) with characters and tokens deleted,
  duplicated, inserted or swapped, to exercise the parser's error recovery.

Properties (the issue: "no traceback, no unpositioned error, no hang over 10 s"):

* ``compile_recipe`` returns or raises :class:`RecipeError`; every diagnostic has a span
  (except the file-level messages in :data:`UNPOSITIONED`) that lies inside its source, and
  ``RecipeError.format()`` works; each compile takes under :data:`TIME_LIMIT` seconds;
* a compiled recipe that uses only cheap operators runs on a tiny pool: it returns distinct
  valid pool indices, or raises :class:`OpError` / :class:`DataError` whose message names a
  position (``file:line:col``); each run takes under :data:`TIME_LIMIT` seconds.

The default tests are small and derandomized (deterministic in CI); the ``slow``-marked ones
compile 2,000 recipes and run 300 (``pytest -m slow tests/dsl/test_fuzz_recipes.py``; add
``DATASEL_FUZZ_RANDOM=1`` to draw new recipes instead of the fixed derandomized ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.data import DataError
from datasel.dsl.depth import MAX_DEPTH
from datasel.dsl.diagnostics import RecipeError
from datasel.dsl.engine import OpError
from datasel.dsl.runner import run
from datasel.ops import registry
from datasel.ops.contract import Kind

pytestmark = pytest.mark.usefixtures("cache_dir")

#: Each compile and each run must finish within this many seconds (the issue's bound).
TIME_LIMIT = 10.0

#: Diagnostics that may legitimately have no position: they are about the whole file or about
#: command-line input that has no source text to point into.  Matched with ``re.search``.
UNPOSITIONED = (
    # The recipe as a whole lacks its select; there is no statement to point at.
    r"has no 'select' statement",
    # --set items that are not NAME=EXPR, or a name given twice: command-line text, no source.
    r"^--set expects NAME=EXPRESSION",
    r"^--set \S+ is given twice",
)

#: A position in a run-time message: ``t.sel:3:14`` (or the prelude's).
POSITION = re.compile(r"\S+:\d+:\d+")
#: A data error names the file and the line of the record (``pool.jsonl:7``).
DATA_POSITION = re.compile(r"\S+:\d+")

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"

FAST = settings(max_examples=120, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
FAST_RUN = settings(FAST, max_examples=30)
#: The slow set is derandomized too, so that CI is reproducible; DATASEL_FUZZ_RANDOM=1 draws new
#: recipes each time (what to run when hunting bugs: a failure prints its reproduction blob).
SLOW = settings(max_examples=2000, deadline=None, derandomize=os.environ.get("DATASEL_FUZZ_RANDOM") != "1",
                database=None, print_blob=True, suppress_health_check=list(HealthCheck))
SLOW_RUN = settings(SLOW, max_examples=300)

# Precedence levels of docs/language.md (loosest first): an operand of a level-L operator is
# written bare when its own level is at least L (L + 1 on the right of a left-associative one).
PIPE, INTER, NOT, CMP, SUM, PROD, UNARY, ATOM = range(1, 9)


# ------------------------------------------------------------------ what the registry declares
def _specs():
    return registry.registry()


def _kinds(kind) -> tuple[Kind, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def is_model_op(spec) -> bool:
    """An op that needs a model: a Model-kind parameter or result, or a GPU among its resources."""
    if spec.result is Kind.MODEL or spec.resources.gpus > 0:
        return True
    return any(Kind.MODEL in _kinds(p.kind) for p in spec.params)


def _prelude_text() -> str:
    return (RECIPES_DIR / "prelude.sel").read_text(encoding="utf-8")


def _prelude_bindings() -> dict[str, str]:
    """Name -> expression text of the prelude's bindings (comments removed)."""
    out = {}
    for line in _prelude_text().splitlines():
        m = re.match(r"([A-Za-z_]\w*)\s*=\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).split("#")[0].strip()
    return out


def _prelude_kinds() -> dict[str, Kind]:
    """The kind of each prelude binding, as the checker sees it."""
    checked = compile_recipe(recipe_source("select random(1)", name="kinds.sel")).checked
    return {name: checked.type_of(b.expr).kind for name, b in checked.bindings.items()
            if b.span.source.name.startswith("<prelude>")}


def _cheap_prelude_names(bindings: dict[str, str]) -> set[str]:
    """Prelude names whose expression uses no model op, directly or through other names."""
    specs = _specs()
    cheap: dict[str, bool] = {}

    def ok(name: str, seen=()) -> bool:
        if name in cheap:
            return cheap[name]
        if name in seen:
            return False
        text = re.sub(r'"([^"\\]|\\.)*"', '""', bindings[name])
        good = True
        for word in re.findall(r"[A-Za-z_]\w*", text):
            if word in bindings:
                good = good and ok(word, seen + (name,))
            elif word in specs:
                good = good and not is_model_op(specs[word])
        # a bare op name whose defaults name a model (embed's encoder=minilm) is caught above
        cheap[name] = good
        return good

    return {n for n in bindings if ok(n)}


SPECS = _specs()
PRELUDE = _prelude_bindings()
PRELUDE_KINDS = _prelude_kinds()
CHEAP_PRELUDE = _cheap_prelude_names(PRELUDE)
OP_NAMES = sorted(SPECS)
CHEAP_OPS = sorted(n for n, s in SPECS.items() if not is_model_op(s))
PLANNED = sorted(registry.planned_names())
RESERVED = ["select", "true", "false", "none", "of", "not", "in", "pool", "val"]
SHIPPED = {p.name: p.read_text(encoding="utf-8") for p in sorted(RECIPES_DIR.glob("*.sel"))}


def ops_returning(kind: Kind, cheap: bool) -> list[str]:
    names = CHEAP_OPS if cheap else OP_NAMES
    return [n for n in names if SPECS[n].result is kind]


def plan_needs_model(compiled) -> bool:
    """Whether a compiled plan would run a model op (the run property skips those)."""
    return any(is_model_op(node.spec) for node in compiled.plan.reachable())


# ------------------------------------------------------------------ the time bound
class Hang(BaseException):
    """Raised by the alarm when a compile or run passes the time limit (not an Exception: the code
    under test must not be able to swallow it)."""


@contextlib.contextmanager
def time_limit(what: str, seconds: float = TIME_LIMIT):
    """Interrupt the block after ``seconds`` (SIGALRM, main thread only) and fail if it took longer."""
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    started = time.perf_counter()
    if use_alarm:
        def on_alarm(signum, frame):
            raise Hang(f"{what} did not finish within {seconds:g} s")

        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:  # someone else's timer (pytest-timeout): give it back what is left
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - elapsed, 0.001), old_interval)
    assert elapsed < seconds, f"{what} took {elapsed:.1f} s (limit {seconds:g} s)"


# ------------------------------------------------------------------ the properties
def allowed_unpositioned(message: str) -> bool:
    return any(re.search(p, message) for p in UNPOSITIONED)


def check_compile(text: str, sets=None):
    """Compile ``text``: return the Compiled, or None after checking the RecipeError's diagnostics.

    Any exception other than RecipeError propagates (and fails the property).
    """
    with time_limit("compile"):
        try:
            return compile_recipe(recipe_source(text, name="t.sel"), sets)
        except RecipeError as exc:
            error = exc
    formatted = error.format()  # must not raise
    assert isinstance(formatted, str) and formatted
    assert error.diagnostics, "a RecipeError without diagnostics"
    for d in error.diagnostics:
        if d.span is None:
            assert allowed_unpositioned(d.message), f"diagnostic without a position: {d.message!r}"
            continue
        src = d.span.source.text
        assert 0 <= d.span.start <= d.span.end <= len(src) + 1, f"span outside its source: {d.span!r} {d.message!r}"
        assert d.span.line >= 1 and d.span.column >= 1, f"span before the start: {d.span!r} {d.message!r}"
        assert d.span.line <= src.count("\n") + 1, f"span past the last line: {d.span!r} {d.message!r}"
    return None


def check_run(text: str, pool: list[dict], val: list[dict] | None) -> str:
    """Run ``text`` on ``pool`` (and ``val``) in fresh temporary files; 'ran' or 'op error'."""
    with tempfile.TemporaryDirectory(prefix="datasel-fuzz-") as tmp:
        pool_path = _write_jsonl(Path(tmp) / "pool.jsonl", pool)
        val_path = _write_jsonl(Path(tmp) / "val.jsonl", val) if val is not None else None
        with time_limit("run"):
            try:
                result = run("t.sel", pool_path, val=val_path, recipe_text=text, cache_dir=Path(tmp) / "cache",
                             quiet=True)
            except (OpError, DataError) as exc:
                message = str(exc)
                where = POSITION if isinstance(exc, OpError) else DATA_POSITION
                assert where.search(message), f"{type(exc).__name__} without a position: {message!r}"
                return "op error"
    selected = [int(i) for i in result.selected]
    assert len(set(selected)) == len(selected), f"duplicated indices: {selected}"
    assert all(0 <= i < len(pool) for i in selected), f"indices outside the pool of {len(pool)}: {selected}"
    return "ran"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------ lexical strategies
ODD_CHARS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\ufeff", "\x00", "\x1b", "\u200b", "\u202e",
             "\t", "é", "ß", "𝔘", "😀", "中", "\ufffd"]

special_numbers = st.sampled_from([
    "0", "1", "2", "3", "00012", "0.5", "1.0", "0.000001", "3.14159", "1e3", "1E+3", "2e-2", "1e999",
    "1e-999", "1e0000000000000001", "9e15", "1e15", "1000000000000000", "1000000000000001",
    "9007199254740993", "10000000000000000", "9" * 40, "1" + "0" * 300, "0." + "0" * 150 + "1",
    "1" * 101, "4294967295", "4294967296", "10000", "10001", "4096", "4097", "100", "101",
])
regex_numbers = st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?\Z")
numbers = st.one_of(special_numbers, regex_numbers, st.integers(0, 50).map(str))
percents = st.one_of(
    st.sampled_from(["0%", "1%", "5%", "10%", "12.5%", "50%", "100%", "100.0%", "101%", "1000%",
                     "0.0001%", "99999999999999999999%", "1" + "0" * 120 + "%"]),
    st.from_regex(r"\A[0-9]{1,4}(\.[0-9]{1,3})?%\Z"),
).flatmap(lambda p: st.sampled_from([p, p + " of pool", p + " of  pool", p + " of\n  pool"]))

_string_body_chars = st.one_of(
    st.characters(codec="utf-8", exclude_characters='"\\\n\r'),
    st.sampled_from(["\\n", "\\t", '\\"', "\\\\", "\\x", "\\u2028", "\\", "\\q"] + ODD_CHARS),
)
strings = st.one_of(
    st.lists(_string_body_chars, max_size=12).map(lambda cs: '"' + "".join(cs) + '"'),
    st.sampled_from(['""', '"a"', '"category"', '"output"', '"unterminated', '"a\nb"', '"\\"', "'single'",
                     '"' + "x" * 500 + '"', '"\u2028"', '"\ufeff"']),
)
fresh_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}\Z")
names = st.one_of(
    st.sampled_from(OP_NAMES),
    st.sampled_from(sorted(PRELUDE)),
    st.sampled_from(PLANNED),
    st.sampled_from(RESERVED + ["x", "c", "cur", "g", "lenght", "topK", "_", "__", "select_", "in_", "Pool"]),
    fresh_names,
)
whitespace = st.sampled_from([" ", " ", " ", "", "  ", "\t", "\n  ", "\r\n\t", "\n\n    ", " # c\n  ",
                              "\n# c\n ", "\x0c", "\x0b", "\u2028", "\u0085", "\ufeff", "\r"])


def _join(parts: list[str], seps: list[str]) -> str:
    out = [parts[0]]
    for part, sep in zip(parts[1:], seps):
        out.append(sep)
        out.append(part)
    return "".join(out)


# ------------------------------------------------------------------ well-typed generation
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _literal(value) -> str:
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Fraction):
        value = float(value)
    if isinstance(value, float):
        return repr(value) if value.is_integer() else f"{value:.6f}".rstrip("0")
    return str(value)


class Typed:
    """Builds expressions of a wanted kind; ``cheap`` keeps to ops that need no model and small sizes."""

    FIELDS = ["category", "score", "lang", "missing", "instruction", "output"]

    def __init__(self, draw, cheap: bool):
        self.draw = draw
        self.cheap = cheap
        # names visible to the recipe: prelude names (cheap ones only in cheap mode), then bindings
        prelude = CHEAP_PRELUDE if cheap else set(PRELUDE)
        self.scope: dict[str, Kind] = {n: PRELUDE_KINDS[n] for n in prelude if n in PRELUDE_KINDS}
        self.calls = 0

    # small helpers over draw
    def pick(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) < percent

    def int_(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def sep(self) -> str:
        """Space around an operator, sometimes a line break that continues the statement."""
        return self.pick([" ", " ", " ", " ", "\n    ", " # note\n  "])

    @staticmethod
    def wrap(item: tuple[str, int], level: int) -> str:
        text, prec = item
        return text if prec >= level else f"({text})"

    def binary(self, left, op: str, right, level: int, assoc: bool = True) -> tuple[str, int]:
        right_level = level + 1 if assoc else level
        if level == CMP:
            left_text, right_text = self.wrap(left, SUM), self.wrap(right, SUM)
        else:
            left_text, right_text = self.wrap(left, level), self.wrap(right, right_level)
        return f"{left_text}{self.sep()}{op} {right_text}", level

    def names_of(self, kind: Kind) -> list[str]:
        return sorted(n for n, k in self.scope.items() if k is kind)

    # the kinds
    def expr(self, kind: Kind, depth: int) -> tuple[str, int]:
        if kind in (Kind.ANY,):
            kind = self.pick([Kind.NUMBER, Kind.STRING, Kind.SCORES])
        method = getattr(self, "k_" + kind.name.lower())
        text, prec = method(max(depth, 0))
        if prec == ATOM and self.chance(3):
            return f"({text})", ATOM
        return text, prec

    def call(self, name: str, depth: int) -> tuple[str, int]:
        """A call of a registered op with its required arguments and some optional ones."""
        self.calls += 1
        spec = SPECS[name]
        positional: list[str] = []
        keywords: list[str] = []
        keyword_mode = False  # once a parameter is skipped or named, the later ones are named too
        for p in spec.params:
            if not p.required and not self.chance(25):
                keyword_mode = True
                continue
            if keyword_mode or self.chance(10 if p.required else 60):
                keyword_mode = True
            value = self.value_for(spec, p, depth - 1)
            if keyword_mode:
                keywords.append(f"{p.name}={value}")
            else:
                positional.append(value)
        if keywords and self.chance(30):
            keywords = self.draw(st.permutations(keywords))
        args = positional + keywords
        if self.chance(4):
            args = list(reversed(args))  # usually a positional after a keyword: an error
        joined = ", ".join(args)
        if args and self.chance(5):
            joined += ","
        if not args and spec.all_optional and self.chance(40):
            return name, ATOM  # a bare op name means a call with defaults
        return f"{name}({joined})", ATOM

    def value_for(self, spec, p, depth: int) -> str:
        if p.binds is not None:
            var = self.pick(["c", "cur", "g", "x", "sel"])
            saved = self.scope.get(var)
            self.scope[var] = p.binds
            try:
                body = self.expr(p.returns or Kind.SELECTOR, min(depth, 2))[0]
            finally:
                if saved is None:
                    del self.scope[var]
                else:
                    self.scope[var] = saved
            return f"{var} -> {body}"
        if p.choices and self.chance(92):
            return _literal(self.pick(p.choices))
        if p.column_of:
            return _quote(self.pick(["value", "text_hash", "sum", "count", "nope"]))
        kinds = _kinds(p.kind)
        kind = self.pick(kinds)
        if self.cheap and kind is Kind.MODEL:
            kind = Kind.NONE
        if kind is Kind.NUMBER and (p.integer or p.low is not None or p.high is not None) and self.chance(90):
            return self.bounded_number(spec.name, p)
        if kind is Kind.DATASET:
            return self.pick(["pool", "pool", "pool", "val"])
        if kind is Kind.FUNCTION:
            return f"c -> {self.expr(Kind.SELECTOR, 1)[0]}"
        if kind is Kind.STRING and p.name in ("name", "field"):
            return _quote(self.pick(self.FIELDS))
        return self.expr(kind, depth)[0]

    def bounded_number(self, op: str, p) -> str:
        lo = int(p.low) if p.low is not None else (0 if p.integer else 0)
        hi = int(p.high) if p.high is not None else lo + 1000
        if self.cheap:
            # keep runs short: few rounds, clusters, neighbours and iterations
            small = {"rounds": 3, "k": 4, "iters": 30, "n_init": 2, "knn": 5, "num_perm": 64, "shingle": 6}
            hi = min(hi, lo + small.get(p.name, 50))
        if p.integer:
            value = self.int_(lo, max(lo, hi))
            text = str(abs(value))
            return f"-{text}" if value < 0 else text
        lo_f = float(p.low) if p.low is not None else 0.0
        hi_f = float(p.high) if p.high is not None else lo_f + 10.0
        value = self.draw(st.floats(lo_f, hi_f, allow_nan=False, allow_infinity=False))
        text = _literal(abs(value))
        return f"-{text}" if value < 0 else text

    def from_names(self, kind: Kind):
        options = self.names_of(kind)
        return (self.pick(options), ATOM) if options else None

    # one method per kind: returns (text, precedence)
    def k_selector(self, depth: int):
        named = self.from_names(Kind.SELECTOR)
        if depth <= 0:
            if named and self.chance(50):
                return named
            return self.pick([("random(2)", ATOM), ("dedup_exact", ATOM), ("sample(50%)", ATOM),
                              ("length > 3", CMP), ("topk(length, 3)", ATOM)])
        choice = self.int_(0, 11)
        if choice <= 3:
            return self.call(self.pick(ops_returning(Kind.SELECTOR, self.cheap)), depth)
        if choice == 4:
            left = self.expr(Kind.SCORES, depth - 1)
            right = self.expr(Kind.NUMBER, 0) if self.chance(70) else self.expr(Kind.SCORES, depth - 1)
            op = self.pick(["<", "<=", ">", ">=", "==", "!="])
            if self.chance(15):
                left, right = right, left
            return self.binary(left, op, right, CMP, assoc=False)
        if choice == 5:
            f = f'field({_quote(self.pick(self.FIELDS))})'
            how = self.int_(0, 3)
            if how == 0:
                return f"{f} {self.pick(['==', '!='])} {_quote(self.pick(['a', 'b', 'en', '']))}", CMP
            items = ", ".join(_quote(self.pick(["a", "b", "en", "de"])) if self.chance(60) else str(self.int_(0, 3))
                              for _ in range(self.int_(1, 3)))
            return f"{f} {self.pick(['in', 'not in'])} [{items}]", CMP
        if choice == 6:
            return f"not {self.wrap(self.expr(Kind.SELECTOR, depth - 1), NOT)}", NOT
        if choice == 7:
            left_kind = Kind.PARTITION if self.chance(40) else Kind.SELECTOR
            return self.binary(self.expr(left_kind, depth - 1), "|", self.expr(Kind.SELECTOR, depth - 1), PIPE)
        if choice == 8:
            op = self.pick(["&", "+", "-"])
            level = INTER if op == "&" else SUM
            left = ("pool", ATOM) if op == "-" and self.chance(25) else self.expr(Kind.SELECTOR, depth - 1)
            return self.binary(left, op, self.expr(Kind.SELECTOR, depth - 1), level)
        if choice == 9 and named:
            return named
        if choice == 10:
            inner = self.expr(Kind.SELECTOR, depth - 1)
            return f"iterate({inner[0]}, {self.int_(0, 3)}, c -> c + {self.expr(Kind.SELECTOR, depth - 1)[0]})", ATOM
        return self.call(self.pick(["topk", "bottomk", "random", "sample", "band"]), depth)

    def k_scores(self, depth: int):
        named = self.from_names(Kind.SCORES)
        if depth <= 0:
            if named and self.chance(50):
                return named
            return self.pick([("length", ATOM), ('field("score")', ATOM), ("length(unit=\"words\")", ATOM)])
        choice = self.int_(0, 7)
        if choice <= 2:
            return self.call(self.pick(ops_returning(Kind.SCORES, self.cheap)), depth)
        if choice == 3 and named:
            return named
        if choice == 4:
            return f"-{self.wrap(self.expr(Kind.SCORES, depth - 1), UNARY)}", UNARY
        if choice == 5:
            op = self.pick(["+", "-"])
            other = self.expr(Kind.NUMBER if self.chance(50) else Kind.SCORES, depth - 1)
            left, right = (self.expr(Kind.SCORES, depth - 1), other)
            if self.chance(30):
                left, right = right, left
            return self.binary(left, op, right, SUM)
        if choice == 6:
            op = self.pick(["*", "/"])
            other = self.expr(Kind.NUMBER if self.chance(60) else Kind.SCORES, depth - 1)
            left, right = (self.expr(Kind.SCORES, depth - 1), other)
            if self.chance(30):
                left, right = right, left
            return self.binary(left, op, right, PROD)
        return self.call("column", depth) if self.chance(30) else self.call("field", depth)

    def k_features(self, depth: int):
        named = self.from_names(Kind.FEATURES)
        if named and self.chance(30):
            return named
        return self.call(self.pick(ops_returning(Kind.FEATURES, self.cheap)), depth)

    def k_partition(self, depth: int):
        named = self.from_names(Kind.PARTITION)
        if named and self.chance(30):
            return named
        if self.chance(50):
            return f'groups({_quote(self.pick(["category", "lang", "missing"]))})', ATOM
        features = self.expr(Kind.FEATURES, depth - 1)[0]
        return f"kmeans({features}, {self.int_(1, 4)})", ATOM

    def k_components(self, depth: int):
        named = self.from_names(Kind.COMPONENTS)
        if named and self.chance(30):
            return named
        features = self.expr(Kind.FEATURES, depth - 1)[0]
        return f"pca({features}, {self.pick(['0.5', '0.9', '1'])})", ATOM

    def k_labels(self, depth: int):
        named = self.from_names(Kind.LABELS)
        if named and self.chance(30):
            return named
        return f'tags(field={_quote(self.pick(["tags", "missing"]))})', ATOM

    def k_graph(self, depth: int):
        named = self.from_names(Kind.GRAPH)
        if named and self.chance(30):
            return named
        features = self.expr(Kind.FEATURES, depth - 1)[0]
        return f"knn_graph({features}, {self.int_(1, 4)})", ATOM

    def k_budget(self, depth: int):
        choice = self.int_(0, 9)
        if choice <= 3:
            return str(self.int_(0, 20)), ATOM
        if choice <= 6:
            pct = self.pick(["0", "1", "10", "25", "50", "100", "12.5"])
            return f"{pct}%" + (" of pool" if self.chance(40) else ""), ATOM
        if choice == 7 and depth > 0:
            parts = [self.k_budget(depth - 1)[0] for _ in range(self.int_(2, 3))]
            return f"{self.pick(['min', 'max'])}({', '.join(parts)})", ATOM
        if choice == 8 and depth > 0:
            return f"count({self.expr(Kind.SELECTOR, depth - 1)[0]})", ATOM
        return f"{self.int_(1, 5)} {self.pick(['+', '*'])} {self.int_(0, 5)}", SUM

    def k_number(self, depth: int):
        choice = self.int_(0, 9)
        if choice <= 5:
            return str(self.int_(0, 10)), ATOM
        if choice == 6:
            return self.pick(["0.5", "1.5", "0.25", "2.0", "100"]), ATOM
        if choice == 7:
            return f"-{self.int_(1, 5)}", UNARY
        if choice == 8 and depth > 0:
            return f"count({self.expr(Kind.SELECTOR, depth - 1)[0]})", ATOM
        return f"{self.int_(0, 5)} {self.pick(['+', '-', '*', '/'])} {self.int_(1, 5)}", SUM

    def k_string(self, depth: int):
        return _quote(self.pick(["a", "category", "output", "x y", "é", "\u2028"])), ATOM

    def k_bool(self, depth: int):
        return self.pick(["true", "false"]), ATOM

    def k_none(self, depth: int):
        return "none", ATOM

    def k_list(self, depth: int):
        items = [self.k_number(0)[0] if self.chance(50) else self.k_string(0)[0] for _ in range(self.int_(0, 3))]
        return "[" + ", ".join(items) + "]", ATOM

    def k_dataset(self, depth: int):
        return self.pick(["pool", "val"]), ATOM

    def k_model(self, depth: int):
        if self.cheap:
            return "none", ATOM
        named = self.from_names(Kind.MODEL)
        if named and self.chance(60):
            return named
        if depth > 0 and self.chance(30):
            return self.call(self.pick(ops_returning(Kind.MODEL, False)), depth)
        return self.pick(['hf("smollm")', 'encoder("minilm")', "minilm", "model"]), ATOM

    def k_function(self, depth: int):
        return f"c -> {self.expr(Kind.SELECTOR, depth - 1)[0]}", ATOM

    def recipe(self) -> str:
        lines = []
        for i in range(self.int_(0, 4)):
            kind = self.pick([Kind.SELECTOR, Kind.SELECTOR, Kind.SCORES, Kind.SCORES, Kind.FEATURES,
                              Kind.PARTITION, Kind.BUDGET, Kind.NUMBER])
            if self.cheap or not self.chance(8):
                name = f"{self.pick(['b', 's', 'v', 'sel', 'score'])}{i}"
            else:
                name = self.pick(["model", "emb", "response_chars", "ifd_loss"])  # rebinds a prelude name
            text, _ = self.expr(kind, self.int_(0, 3))
            self.scope[name] = kind
            lines.append(f"{name} = {text}")
            if self.chance(15):
                lines.append(self.pick(["", "# a comment", "   # indented comment"]))
        target, _ = self.expr(Kind.SELECTOR, self.int_(1, 4))
        lines.append(f"select {target}")
        text = "\n".join(lines)
        if self.chance(5):
            text = "\ufeff" + text
        if self.chance(5):
            text = text.replace("\n", "\r\n")
        return text + ("\n" if self.chance(70) else "")


@st.composite
def typed_recipes(draw, cheap: bool = False) -> str:
    return Typed(draw, cheap).recipe()


# ------------------------------------------------------------------ arbitrary generation
atoms = st.one_of(numbers, percents, strings, names, st.sampled_from(["true", "false", "none", "pool", "val"]))


def _extend(children):
    arg = st.one_of(
        children,
        st.tuples(names, children).map(lambda t: f"{t[0]}={t[1]}"),
        st.tuples(names, children).map(lambda t: f"{t[0]} -> {t[1]}"),
        st.tuples(names, names, children).map(lambda t: f"{t[0]}={t[1]} -> {t[2]}"),
    )
    binops = st.sampled_from(["|", "&", "+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=", "in", "not in",
                              "->", "=", "||", "%", ","])
    return st.one_of(
        st.tuples(names, st.lists(arg, max_size=4), st.booleans(), whitespace).map(
            lambda t: f"{t[0]}({', '.join(t[1])}{',' if t[2] and t[1] else ''}{t[3]})"),
        st.tuples(st.lists(children, max_size=4), st.booleans()).map(
            lambda t: "[" + ", ".join(t[0]) + ("," if t[1] and t[0] else "") + "]"),
        st.tuples(children, whitespace, binops, whitespace, children).map(lambda t: "".join(t)),
        st.tuples(children, st.sampled_from(["<", "<=", "=="]), children, st.sampled_from([">", "!=", "<"]),
                  children).map(lambda t: f"{t[0]} {t[1]} {t[2]} {t[3]} {t[4]}"),
        st.tuples(st.sampled_from(["not ", "-", "- ", "not not ", "--"]), children).map("".join),
        children.map(lambda c: f"({c})"),
    )


arbitrary_exprs = st.recursive(atoms, _extend, max_leaves=25)


@st.composite
def arbitrary_recipes(draw) -> str:
    statements = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(names, st.sampled_from(["b0", "b1", "x"])))
        statements.append(f"{name}{draw(whitespace)}={draw(whitespace)}{draw(arbitrary_exprs)}")
    selects = draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2]))
    statements += [f"select{draw(st.sampled_from([' ', '  ', '(', '']))}{draw(arbitrary_exprs)}"
                   for _ in range(selects)]
    order = draw(st.permutations(statements)) if statements and draw(st.booleans()) else statements
    seps = [draw(st.sampled_from(["\n", "\n", "\n\n", "\r\n", "\r", "\n# comment\n", "\n  ", " ", "\u2028",
                                  "\x0c", "\n\x0c\n"])) for _ in order]
    text = "".join(s + sep for s, sep in zip(order, seps))
    if draw(st.integers(0, 19)) == 0:
        text = draw(st.sampled_from(["\ufeff", "   ", "\n", "#!"])) + text
    return text


# ------------------------------------------------------------------ deep nesting
DEPTHS = [1, 2, 50, MAX_DEPTH // 3, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2,
          2 * MAX_DEPTH, 3 * MAX_DEPTH + 10, 10 * MAX_DEPTH]


def _deep(shape: str, n: int) -> str:
    if shape == "pipe":
        return "select " + " | ".join(["random(1000)"] * n)
    if shape == "calls":
        return "select topk(" + "abs(" * n + "length" + ")" * n + ", 3)"
    if shape == "parens":
        return "select topk(" + "(" * n + "length" + ")" * n + ", 3)"
    if shape == "minus":
        return "select topk(" + "-" * n + "length, 3)"
    if shape == "spaced_minus":
        return "select topk(" + "- " * n + "length, 3)"
    if shape == "not":
        return "select " + "not " * n + "random(1)"
    if shape == "plus":
        return "select topk(" + " + ".join(["length"] * n) + ", 3)"
    if shape == "times":
        return "select topk(length" + " * 1" * n + ", 3)"
    if shape == "union":
        return "select " + " + ".join(["random(1)"] * n)
    if shape == "list":
        return 'select field("lang") in ' + "[" * n + '"a"' + "]" * n
    if shape == "names":
        return "\n".join(["v0 = length"] + [f"v{i} = v{i - 1}" for i in range(1, n)]) + f"\nselect topk(v{n - 1}, 3)"
    if shape == "names_plus":
        return "\n".join(["v0 = length"] + [f"v{i} = v{i - 1} + 1" for i in range(1, n)]) + f"\nselect topk(v{n - 1}, 3)"
    if shape == "names_reversed":
        lines = [f"v{i} = v{i - 1}" for i in range(n - 1, 0, -1)] + ["v0 = length"]
        return "\n".join(lines) + f"\nselect topk(v{n - 1}, 3)"
    if shape == "iterate":
        body = "c"
        for _ in range(n):
            body = f"iterate(random(1), 1, c -> {body})"
        return "select " + body
    if shape == "per_group":
        body = "random(1)"
        for _ in range(n):
            body = f'per_group(groups("category"), g -> {body})'
        return "select " + body
    if shape == "budget":
        return "select topk(length, " + "min(1, " * n + "1" + ")" * n + ")"
    if shape == "count":
        return "select topk(length, " + "count(" * n + "random(1)" + ")" * n + ")"
    if shape == "unclosed":
        return "select topk(" + "(" * n + "length"
    if shape == "unclosed_list":
        return "select x in " + "[" * n
    if shape == "closers":
        return "select random(1)" + ")" * n
    if shape == "continued":
        return "select random(1)" + "\n  | random(1)" * n
    if shape == "wide":
        return "select random(" + ", ".join(["1"] * n) + ")"
    if shape == "long_name":
        return "x" * (n * 50) + " = length\nselect topk(" + "x" * (n * 50) + ", 1)"
    raise AssertionError(shape)


DEEP_SHAPES = ["pipe", "calls", "parens", "minus", "spaced_minus", "not", "plus", "times", "union", "list",
               "names", "names_plus", "names_reversed", "iterate", "per_group", "budget", "count", "unclosed",
               "unclosed_list", "closers", "continued", "wide", "long_name"]


@st.composite
def deep_recipes(draw) -> str:
    shape = draw(st.sampled_from(DEEP_SHAPES))
    n = draw(st.one_of(st.sampled_from(DEPTHS), st.integers(1, 3 * MAX_DEPTH)))
    if shape in ("iterate", "per_group", "names", "names_plus", "names_reversed", "long_name", "wide"):
        n = min(n, 3 * MAX_DEPTH)  # the text (and Python's work to build it) grows fast
    text = _deep(shape, n)
    if draw(st.integers(0, 3)) == 0:  # hide it in a binding of a longer recipe
        text = text.replace("select ", "deep = ", 1) + "\nselect random(1)"
    return text


# ------------------------------------------------------------------ mutations of shipped recipes
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?%?|[A-Za-z_]\w*|->|<=|>=|==|!='
                    r'|#[^\n]*|\s+|.', re.S)
VOCAB = ["(", ")", "[", "]", ",", "=", "|", "&", "+", "-", "*", "/", "<", ">", "<=", "==", "!=", "->", "not",
         "in", "of", "pool", "select", "none", "true", '"', "'", "#", "%", "\n", "\n  ", "\\", "5%", "1e999",
         "topk", "iterate", "c ->", "x", "\u2028", "\x0c", "\ufeff", "\r"]
MUTATION_CHARS = list("()[],=|&+-*/<>!\"'#%.\\ \t\n\r_0123456789aZ") + ODD_CHARS


@st.composite
def mutated_recipes(draw) -> str:
    base_name = draw(st.sampled_from(sorted(SHIPPED)))
    text = draw(st.sampled_from([SHIPPED[base_name], "\n".join(line for line in SHIPPED[base_name].splitlines()
                                                                  if not line.startswith("#"))]))
    for _ in range(draw(st.integers(1, 6))):
        tokens = _TOKEN.findall(text) or [""]
        how = draw(st.integers(0, 8))
        if how == 0 and text:  # delete a character
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + text[i + 1:]
        elif how == 1:  # insert a character
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.sampled_from(MUTATION_CHARS)) + text[i:]
        elif how == 2 and text:  # duplicate a range
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i, min(len(text), i + 40)))
            text = text[:j] + text[i:j] + text[j:]
        elif how == 3 and text:  # delete a range
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i, min(len(text), i + 30)))
            text = text[:i] + text[j:]
        elif how == 4:  # delete a token
            k = draw(st.integers(0, len(tokens) - 1))
            text = "".join(tokens[:k] + tokens[k + 1:])
        elif how == 5:  # duplicate a token
            k = draw(st.integers(0, len(tokens) - 1))
            text = "".join(tokens[:k + 1] + tokens[k:])
        elif how == 6:  # insert a token
            k = draw(st.integers(0, len(tokens)))
            text = "".join(tokens[:k] + [draw(st.one_of(st.sampled_from(VOCAB), numbers, names))] + tokens[k:])
        elif how == 7 and len(tokens) > 1:  # swap two tokens
            a = draw(st.integers(0, len(tokens) - 1))
            b = draw(st.integers(0, len(tokens) - 1))
            tokens[a], tokens[b] = tokens[b], tokens[a]
            text = "".join(tokens)
        else:  # replace a token
            k = draw(st.integers(0, len(tokens) - 1))
            tokens[k] = draw(st.one_of(st.sampled_from(VOCAB), names, numbers, percents, strings))
            text = "".join(tokens)
    return text


# ------------------------------------------------------------------ everything together
@st.composite
def overrides(draw):
    """``--set`` values now and then (a dict, as the API takes them, or NAME=EXPR strings)."""
    if draw(st.integers(0, 99)) >= 8:
        return None
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(sorted(PRELUDE) + ["modle", "pool", "select", "b0"]),
                                              names),
                                    st.one_of(st.sampled_from(['hf("smollm")', "minilm", "3", "length", "",
                                                              "hf(smollm)", "random(1)", "-" * 1200 + "1"]),
                                              arbitrary_exprs)),
                          min_size=1, max_size=3))
    if draw(st.booleans()):
        return dict(pairs)
    return [draw(st.sampled_from([f"{n}={e}", f"{n} = {e}", f"{n}", f"={e}", f"{n}=={e}"])) for n, e in pairs]


@st.composite
def recipes(draw) -> tuple[str, str, object]:
    """(family, recipe text, --set overrides or None)."""
    roll = draw(st.integers(0, 99))
    if roll < 45:
        family, text = "typed", draw(typed_recipes(cheap=False))
    elif roll < 60:
        family, text = "cheap", draw(typed_recipes(cheap=True))
    elif roll < 78:
        family, text = "arbitrary", draw(arbitrary_recipes())
    elif roll < 90:
        family, text = "mutated", draw(mutated_recipes())
    else:
        family, text = "deep", draw(deep_recipes())
    return family, text, draw(overrides())


_POOL_RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!", "category": "a", "score": 3, "lang": "en"},
    {"instruction": "Say hi", "input": "", "output": "Hi!", "category": "a", "score": 3, "lang": "en"},
    {"instruction": "Add 2 and 3", "input": "2, 3", "output": "5", "category": "b", "score": 1.5, "lang": "de"},
    {"instruction": "Écris un poème", "input": "", "output": "Les roses sont rouges\nles violettes bleues",
     "category": "c", "score": -2, "lang": "fr"},
    {"instruction": "Empty answer", "input": "", "output": "", "category": "a", "score": 0},
    {"instruction": "Long", "input": "x " * 50, "output": "word " * 200, "category": "b", "score": 100},
    {"instruction": "No fields", "input": "", "output": "plain"},
    {"instruction": "Unicode", "input": "\u2028\u0085", "output": "😀 中文 ß", "category": "😀", "score": 0.25,
     "lang": "zh"},
    {"instruction": "List a few", "input": "", "output": "1. a\n2. b\n3. c", "category": "c", "score": 2,
     "lang": "en"},
    {"instruction": "say hi", "input": "", "output": "hi!", "category": "a", "score": 3, "lang": "en"},
    {"instruction": "Numbers", "input": "1 2 3", "output": "6", "category": 7, "score": "high", "lang": "en"},
    {"instruction": "Whitespace", "input": "   ", "output": "  spaced  out  ", "category": "b", "score": None},
]


@st.composite
def pools(draw):
    """(pool records, val records or None): a handful of the records above, duplicates allowed."""
    pool = draw(st.lists(st.sampled_from(_POOL_RECORDS), min_size=1, max_size=12))
    val = draw(st.one_of(st.none(), st.lists(st.sampled_from(_POOL_RECORDS), min_size=1, max_size=4)))
    return pool, val


# ------------------------------------------------------------------ the tests
def compile_property(config: settings) -> Counter:
    stats: Counter = Counter()

    @config
    @given(recipes())
    def prop(case):
        family, text, sets = case
        note(f"family={family} sets={sets!r}")
        stats["generated"] += 1
        stats[family] += 1
        compiled = check_compile(text, sets)
        if compiled is not None:
            stats["compiled"] += 1
            stats[f"{family} compiled"] += 1

    prop()
    return stats


def run_property(config: settings) -> Counter:
    stats: Counter = Counter()

    @config
    @given(typed_recipes(cheap=True), pools())
    def prop(text, data):
        pool, val = data
        stats["generated"] += 1
        compiled = check_compile(text)
        if compiled is None:
            return
        stats["compiled"] += 1
        if plan_needs_model(compiled):
            stats["needs a model"] += 1
            return
        stats[check_run(text, pool, val)] += 1

    prop()
    return stats


def _report(stats: Counter) -> None:
    print("fuzz:", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))


@pytest.fixture(scope="module")
def warm_engine():
    """Run each cheap op family once before the timed runs: first imports and numba compilation are
    not what the time bound is about."""
    warm = ["select random(2)", "select topk(length, 2) | dedup_exact", "select kmeans(minhash(), 2) | random(1)",
            "select facility(minhash(), 2)", "select kcenter(minhash(), 2)", "select novelsum(minhash(), 2)",
            "select dedup_minhash(minhash())", "select nearest(minhash())", 'select groups("category") | random(1)',
            "select dedup_near", "select dedup_cosine(minhash())", "select iterate(random(1), 1, c -> c)"]
    with tempfile.TemporaryDirectory(prefix="datasel-fuzz-warm-") as tmp:
        pool = _write_jsonl(Path(tmp) / "pool.jsonl", _POOL_RECORDS)
        for text in warm:
            try:
                run("warm.sel", pool, recipe_text=text, cache_dir=Path(tmp) / "cache", quiet=True)
            except Exception:  # noqa: BLE001 - the properties report failures, warming only warms
                pass


def test_typed_generation_reaches_the_checker_and_the_planner():
    """The typed families are not all rejected early: most of them compile (the fuzz tests the planner)."""
    stats: Counter = Counter()

    @settings(FAST, max_examples=60, phases=[Phase.generate])
    @given(st.one_of(typed_recipes(cheap=False), typed_recipes(cheap=True)))
    def prop(text):
        stats["generated"] += 1
        try:
            compile_recipe(recipe_source(text, name="t.sel"))
            stats["compiled"] += 1
        except RecipeError:
            pass

    prop()
    assert stats["compiled"] >= 0.4 * stats["generated"], stats


def test_fuzz_compile():
    stats = compile_property(FAST)
    _report(stats)
    assert stats["compiled"] >= 0.2 * stats["generated"], stats


def test_fuzz_run(warm_engine):
    stats = run_property(FAST_RUN)
    _report(stats)
    assert stats["ran"] + stats["op error"] >= 0.3 * stats["generated"], stats


@pytest.mark.slow
def test_fuzz_compile_many():
    stats = compile_property(SLOW)
    _report(stats)
    assert stats["generated"] >= SLOW.max_examples, stats
    assert stats["compiled"] >= 0.2 * stats["generated"], stats


@pytest.mark.slow
def test_fuzz_run_many(warm_engine):
    stats = run_property(SLOW_RUN)
    _report(stats)
    assert stats["ran"] + stats["op error"] >= 0.3 * stats["generated"], stats

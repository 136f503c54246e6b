#!/usr/bin/env python3
"""Deterministic generator for datasel's bundled example data.

Run ``python examples/make_examples.py [--out DIR]`` (default: the folder this
script lives in).  It writes, byte-identically on every run:

* ``pool.jsonl``              main Alpaca-form pool with deliberate defects
* ``defects.json``            machine-readable ground truth for those defects
* ``pool_bad.jsonl``          small pool with malformed / empty / missing / non-UTF-8 lines
* ``target_arithmetic.jsonl`` 30 arithmetic word problems not present in the pool
* ``chat_pool.jsonl``         40 records in chat ``messages`` form

All text (sentences, passages, explanations, tables) was written for this
project; no third-party dataset is used.  Only the standard library is needed.

Determinism rules followed throughout:
* every random choice goes through a ``random.Random`` with a fixed integer
  seed (one per output file, so editing one artefact does not reshuffle the
  others);
* no iteration over sets or anything hash-ordered ends up in the output;
* numbers that need rounding are computed with ``decimal.Decimal`` so the
  printed value never depends on binary floating point;
* JSON is written with ``ensure_ascii=False``, a fixed key order and ``\\n``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Iterable

# One seed per artefact.
POOL_SEED = 20240611
DEFECT_SEED = 7919
TARGET_SEED = 4242
CHAT_SEED = 31337
BAD_SEED = 2718

# How many clean records each family contributes to pool.jsonl (before the
# duplicate copies are inserted).
FAMILY_COUNTS = {
    "arithmetic": 80,
    "unit_conversion": 70,
    "string_edit": 70,
    "classification": 70,
    "explanation": 65,
    "list_ops": 60,
    "facts": 60,
    "grammar": 45,
    "rewriting": 50,
}

# Defect budget for pool.jsonl.
N_MISMATCH = 15
N_TRUNCATED = 10
N_EXACT_DUP = 8
N_NEAR_DUP = 8

# pool_bad.jsonl: 1-based line numbers of the deliberately broken lines.
BAD_LINES = {"malformed_json": 4, "empty_output": 9, "missing_output": 15, "invalid_utf8": 21}
BAD_TOTAL_LINES = 24

PROBLEM_INSTRUCTIONS = ("Solve this word problem.", "Answer the following maths question.",
                        "Work out the answer to this problem.")


# --------------------------------------------------------------------------
# Records and helpers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One Alpaca-form example plus the bookkeeping the defects file needs."""

    instruction: str
    input: str
    output: str
    family: str
    task: str

    def to_json(self) -> str:
        # Fixed key order: instruction, input, output.
        return json.dumps({"instruction": self.instruction, "input": self.input,
                           "output": self.output}, ensure_ascii=False)

    def replace(self, **kw) -> "Record":
        d = {"instruction": self.instruction, "input": self.input, "output": self.output,
             "family": self.family, "task": self.task}
        d.update(kw)
        return Record(**d)


def normalise(text: str) -> str:
    """Lowercase, turn punctuation into spaces and collapse whitespace.

    This is the normalisation the near-duplicate defects are defined against.
    """
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def record_tokens(rec: Record) -> tuple[str, ...]:
    """Normalised tokens of the whole record (instruction, input and output)."""
    return tuple(normalise(" ".join((rec.instruction, rec.input, rec.output))).split())


def within_one_substitution(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when two token sequences are equal or differ in exactly one position."""
    if len(a) != len(b):
        return False
    diffs = 0
    for x, y in zip(a, b):
        if x != y:
            diffs += 1
            if diffs > 1:
                return False
    return True


class Registry:
    """Rejects candidates that would be (near) duplicates of accepted records.

    Random templates can collide (``What is 3 + 4?`` twice) or land one word
    apart; the deliberate duplicates must be the *only* ones in the pool, so
    every clean record is checked on the way in.
    """

    def __init__(self) -> None:
        self._exact: set[str] = set()
        self._by_len: dict[int, list[tuple[str, ...]]] = {}

    def add(self, rec: Record) -> bool:
        toks = record_tokens(rec)
        key = normalise(rec.instruction + " " + rec.input)
        if key in self._exact:
            return False
        bucket = self._by_len.setdefault(len(toks), [])
        if any(within_one_substitution(toks, other) for other in bucket):
            return False
        self._exact.add(key)
        bucket.append(toks)
        return True


def fmt_dec(d: Decimal, places: int = 2) -> str:
    """Round half-up to ``places`` decimals and drop trailing zeros (3.10 -> 3.1)."""
    q = d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    s = format(q, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def plural(n, singular: str, plural_form: str) -> str:
    return singular if str(n) == "1" else plural_form


def maybe_input(rng: random.Random, p: float = 0.25) -> bool:
    """Roughly a third of the pool uses the ``input`` field; most families use 0.25."""
    return rng.random() < p


def collect(reg: Registry, n: int, make: Callable[[], Record], max_tries: int = 20000) -> list[Record]:
    """Call ``make`` until ``n`` records were accepted by the registry."""
    out: list[Record] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError("could not generate enough unique records")
        rec = make()
        if reg.add(rec):
            out.append(rec)
    return out


# --------------------------------------------------------------------------
# Family: arithmetic (plain expressions and word problems)
# --------------------------------------------------------------------------

NAMES = [("Maria", "she", "her"), ("Tom", "he", "his"), ("Aisha", "she", "her"), ("Ken", "he", "his"),
         ("Lena", "she", "her"), ("Omar", "he", "his"), ("Priya", "she", "her"), ("Diego", "he", "his"),
         ("Sofia", "she", "her"), ("Jonas", "he", "his"), ("Mei", "she", "her"), ("Ravi", "he", "his"),
         ("Hana", "she", "her"), ("Felix", "he", "his"), ("Nadia", "she", "her"), ("Luca", "he", "his")]
ITEMS = [("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"),
         ("book", "books"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"),
         ("card", "cards"), ("balloon", "balloons")]
GOODS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("pen", "pens"),
         ("coffee", "coffees"), ("loaf of bread", "loaves of bread"), ("bus pass", "bus passes")]


def _plain_expression(rng: random.Random) -> tuple[str, str, str]:
    """Return (question, expression, answer sentence) for a plain calculation."""
    kind = rng.choice(["add", "sub", "mul", "div", "prec", "paren", "pct", "square"])
    times = rng.choice(["×", "*"])
    if kind == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        expr = f"{a} + {b}"
        q = rng.choice([f"What is {a} + {b}?", f"Calculate {a} + {b}.", f"Add {a} and {b}.",
                        f"What is the sum of {a} and {b}?"])
        ans = rng.choice([f"{expr} = {a + b}.", f"The sum is {a + b}.", f"{a + b}"])
    elif kind == "sub":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        expr = f"{a} - {b}"
        q = rng.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Calculate {a} minus {b}."])
        ans = rng.choice([f"{expr} = {a - b}.", f"The difference is {a - b}.", f"{a - b}"])
    elif kind == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 30)
        expr = f"{a} {times} {b}"
        q = rng.choice([f"What is {expr}?", f"Multiply {a} by {b}.", f"What is {a} times {b}?",
                        f"Calculate {expr}."])
        ans = rng.choice([f"{expr} = {a * b}.", f"The product is {a * b}.", f"{a * b}"])
    elif kind == "div":
        b, quo = rng.randint(2, 20), rng.randint(2, 60)
        a = b * quo
        div = rng.choice(["÷", "/"])
        expr = f"{a} {div} {b}"
        q = rng.choice([f"What is {expr}?", f"Divide {a} by {b}.", f"What is {a} divided by {b}?"])
        ans = rng.choice([f"{expr} = {quo}.", f"{a} divided by {b} is {quo}.", f"{quo}"])
    elif kind == "prec":
        a, b, c = rng.randint(2, 50), rng.randint(2, 12), rng.randint(2, 12)
        expr = f"{a} + {b} {times} {c}"
        q = rng.choice([f"Evaluate {expr}.", f"What is {expr}?"])
        # Why spell it out: the order of operations is the whole point here.
        ans = (f"Multiplication comes first: {b} {times} {c} = {b * c}, "
               f"then {a} + {b * c} = {a + b * c}.")
    elif kind == "paren":
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        expr = f"({a} + {b}) {times} {c}"
        q = rng.choice([f"Evaluate {expr}.", f"What is {expr}?"])
        ans = (f"Work inside the brackets first: {a} + {b} = {a + b}, "
               f"then {a + b} {times} {c} = {(a + b) * c}.")
    elif kind == "pct":
        p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        n = 20 * rng.randint(1, 40)
        r = fmt_dec(Decimal(p) * Decimal(n) / Decimal(100))
        expr = f"{p}% of {n}"
        q = rng.choice([f"What is {p}% of {n}?", f"Calculate {p} percent of {n}."])
        ans = rng.choice([f"{p}% of {n} is {r}.", f"{p}/100 × {n} = {r}."])
    else:  # square
        n = rng.randint(2, 40)
        expr = f"{n}²"
        q = rng.choice([f"What is {n} squared?", f"What is the square of {n}?"])
        ans = rng.choice([f"{n} × {n} = {n * n}.", f"{n} squared is {n * n}."])
    return q, expr, ans


def task_plain_arithmetic(rng: random.Random) -> Record:
    q, expr, ans = _plain_expression(rng)
    if maybe_input(rng) and "%" not in expr and "²" not in expr:
        instr = rng.choice(["Evaluate the following expression.", "Compute the value of this expression.",
                            "Work out the result."])
        return Record(instr, expr, ans, "arithmetic", "arithmetic/expression")
    return Record(q, "", ans, "arithmetic", "arithmetic/expression")


def word_problem(rng: random.Random) -> tuple[str, str]:
    """Return (problem text, worked answer) for one short word problem."""
    name, pron, poss = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    Pron = pron.capitalize()
    kind = rng.choice(["add", "add2", "sub", "sub2", "mul", "mul2", "div", "div2", "price", "change",
                       "speed", "speed2", "time", "area", "perimeter", "avg", "age"])
    if kind == "add":
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        return (f"{name} has {a} {items}. {Pron} buys {b} more. How many {items} does {pron} have now?",
                f"{name} now has {a} + {b} = {a + b} {items}.")
    if kind == "add2":
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        return (f"{name} collected {a} {items} on Monday and {b} on Tuesday. "
                f"How many {items} did {pron} collect in total?",
                f"In total {name} collected {a} + {b} = {a + b} {items}.")
    if kind == "sub":
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 2)
        return (f"{name} had {a} {items} and gave {b} of them to a friend. "
                f"How many {items} does {pron} have left?",
                f"{a} - {b} = {a - b}, so {name} has {a - b} {items} left.")
    if kind == "sub2":
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 2)
        return (f"A shop had {a} {items} in stock and sold {b}. How many {items} are left?",
                f"{a} - {b} = {a - b}, so {a - b} {items} are left.")
    if kind == "mul":
        a, b = rng.randint(3, 24), rng.randint(2, 15)
        return (f"A box holds {a} {items}. How many {items} are in {b} boxes?",
                f"{b} × {a} = {a * b}, so there are {a * b} {items} in {b} boxes.")
    if kind == "mul2":
        a, b = rng.randint(4, 20), rng.randint(3, 25)
        return (f"A hall has {b} rows of chairs with {a} chairs in each row. How many chairs are there?",
                f"{b} × {a} = {a * b}, so there are {a * b} chairs.")
    if kind == "div":
        b, quo = rng.randint(2, 9), rng.randint(2, 15)
        return (f"{name} shares {b * quo} {items} equally among {b} friends. "
                f"How many {items} does each friend get?",
                f"{b * quo} ÷ {b} = {quo}, so each friend gets {quo} {items}.")
    if kind == "div2":
        b, quo = rng.randint(2, 8), rng.randint(3, 12)
        return (f"{b * quo} students are split into teams of {b}. How many teams are there?",
                f"{b * quo} ÷ {b} = {quo}, so there are {quo} teams.")
    if kind == "price":
        good, goods = rng.choice(GOODS)
        price = 5 * rng.randint(15, 250)
        n = rng.randint(2, 9)
        return (f"One {good} costs {money(price)}. How much do {n} {goods} cost?",
                f"{n} × {money(price)} = {money(n * price)}.")
    if kind == "change":
        good, goods = rng.choice(GOODS)
        price = 5 * rng.randint(24, 120)
        n = rng.randint(2, 6)
        total = n * price
        bill = next(b for b in (10, 20, 50, 100) if b * 100 > total)
        return (f"{name} buys {n} {goods} at {money(price)} each and pays with a ${bill} note. "
                f"How much change does {pron} get?",
                f"The {goods} cost {n} × {money(price)} = {money(total)}, so the change is "
                f"${bill}.00 - {money(total)} = {money(bill * 100 - total)}.")
    if kind == "speed":
        v = 5 * rng.randint(8, 24)
        t = Decimal(rng.choice(["1.5", "2", "2.5", "3", "4", "5", "6"]))
        d = fmt_dec(v * t)
        return (f"A car travels at {v} km/h for {fmt_dec(t)} hours. How far does it go?",
                f"Distance = speed × time = {v} × {fmt_dec(t)} = {d} km.")
    if kind == "speed2":
        v = rng.choice([10, 12, 15, 18, 20, 24, 25])
        t = rng.randint(2, 5)
        return (f"{name} cycles {v * t} km at a steady {v} km/h. How long does the ride take?",
                f"Time = distance ÷ speed = {v * t} ÷ {v} = {t} hours.")
    if kind == "time":
        h, m = rng.randint(1, 8), 5 * rng.randint(0, 11)
        dur = 5 * rng.randint(8, 34)
        dh, dm = divmod(dur, 60)
        end = h * 60 + m + dur
        eh, em = divmod(end, 60)  # never reaches 12 p.m.: 8:55 + 2 h 50 min = 11:45
        parts = []
        if dh:
            parts.append(f"{dh} {plural(dh, 'hour', 'hours')}")
        if dm:
            parts.append(f"{dm} minutes")
        return (f"A film starts at {h}:{m:02d} p.m. and lasts {' '.join(parts)}. What time does it end?",
                f"{h}:{m:02d} p.m. plus {' '.join(parts)} is {eh}:{em:02d} p.m., so the film ends at "
                f"{eh}:{em:02d} p.m.")
    if kind in ("area", "perimeter"):
        length = rng.randint(4, 30)
        width = rng.randint(2, length - 1)
        if kind == "area":
            return (f"A rectangle is {length} cm long and {width} cm wide. What is its area?",
                    f"Area = length × width = {length} × {width} = {length * width} square centimetres.")
        return (f"A rectangular garden is {length} m long and {width} m wide. What is its perimeter?",
                f"Perimeter = 2 × ({length} + {width}) = {2 * (length + width)} m.")
    if kind == "avg":
        while True:
            a, b, c = rng.randint(60, 100), rng.randint(60, 100), rng.randint(60, 100)
            if (a + b + c) % 3 == 0:
                break
        return (f"{name} scored {a}, {b} and {c} on three tests. What is {poss} average score?",
                f"The average is ({a} + {b} + {c}) ÷ 3 = {a + b + c} ÷ 3 = {(a + b + c) // 3}.")
    # age: two steps
    a, d, k = rng.randint(6, 15), rng.randint(2, 9), rng.randint(2, 10)
    return (f"{name} is {a} years old. {poss.capitalize()} brother is {d} years older. "
            f"How old will the brother be in {k} years?",
            f"The brother is {a} + {d} = {a + d} now, so in {k} years he will be "
            f"{a + d} + {k} = {a + d + k}.")


def task_word_problem(rng: random.Random) -> Record:
    problem, answer = word_problem(rng)
    if maybe_input(rng):
        return Record(rng.choice(PROBLEM_INSTRUCTIONS), problem, answer, "arithmetic",
                      "arithmetic/word_problem")
    return Record(problem, "", answer, "arithmetic", "arithmetic/word_problem")


def family_arithmetic(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    """Half plain expressions, half word problems."""
    plain = collect(reg, n // 2, lambda: task_plain_arithmetic(rng))
    words = collect(reg, n - n // 2, lambda: task_word_problem(rng))
    return plain + words


# --------------------------------------------------------------------------
# Family: unit conversions
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Conversion:
    key: str
    src: tuple[str, str]        # singular, plural
    dst: tuple[str, str]
    op: str                     # "mul", "div", "c2f", "f2c"
    factor: str                 # exact conversion factor as a string
    rule: str                   # what the answer cites
    values: tuple[int, int]     # integer range of inputs


CONVERSIONS = [
    Conversion("km_mi", ("kilometre", "kilometres"), ("mile", "miles"), "div", "1.609344",
               "1 mile = 1.609344 kilometres", (1, 300)),
    Conversion("mi_km", ("mile", "miles"), ("kilometre", "kilometres"), "mul", "1.609344",
               "1 mile = 1.609344 kilometres", (1, 300)),
    Conversion("kg_lb", ("kilogram", "kilograms"), ("pound", "pounds"), "div", "0.45359237",
               "1 pound = 0.45359237 kilograms", (1, 200)),
    Conversion("lb_kg", ("pound", "pounds"), ("kilogram", "kilograms"), "mul", "0.45359237",
               "1 pound = 0.45359237 kilograms", (1, 300)),
    Conversion("m_ft", ("metre", "metres"), ("foot", "feet"), "div", "0.3048",
               "1 foot = 0.3048 metres", (1, 500)),
    Conversion("ft_m", ("foot", "feet"), ("metre", "metres"), "mul", "0.3048",
               "1 foot = 0.3048 metres", (1, 1000)),
    Conversion("l_gal", ("litre", "litres"), ("US gallon", "US gallons"), "div", "3.785411784",
               "1 US gallon = 3.785411784 litres", (1, 100)),
    Conversion("gal_l", ("US gallon", "US gallons"), ("litre", "litres"), "mul", "3.785411784",
               "1 US gallon = 3.785411784 litres", (1, 60)),
    Conversion("cm_in", ("centimetre", "centimetres"), ("inch", "inches"), "div", "2.54",
               "1 inch = 2.54 centimetres", (1, 200)),
    Conversion("in_cm", ("inch", "inches"), ("centimetre", "centimetres"), "mul", "2.54",
               "1 inch = 2.54 centimetres", (1, 100)),
    Conversion("h_min", ("hour", "hours"), ("minute", "minutes"), "mul", "60",
               "1 hour = 60 minutes", (1, 48)),
    Conversion("min_h", ("minute", "minutes"), ("hour", "hours"), "div", "60",
               "1 hour = 60 minutes", (15, 600)),
    Conversion("g_oz", ("gram", "grams"), ("ounce", "ounces"), "div", "28.349523125",
               "1 ounce = 28.349523125 grams", (1, 1000)),
    Conversion("kmh_ms", ("kilometre per hour", "kilometres per hour"), ("metre per second", "metres per second"),
               "div", "3.6", "1 metre per second = 3.6 kilometres per hour", (5, 200)),
    Conversion("c_f", ("°C", "°C"), ("°F", "°F"), "c2f", "", "°F = °C × 9/5 + 32", (-30, 45)),
    Conversion("f_c", ("°F", "°F"), ("°C", "°C"), "f2c", "", "°C = (°F − 32) × 5/9", (-20, 110)),
]


def convert(conv: Conversion, x: Decimal) -> Decimal:
    if conv.op == "mul":
        return x * Decimal(conv.factor)
    if conv.op == "div":
        return x / Decimal(conv.factor)
    if conv.op == "c2f":
        return x * 9 / 5 + 32
    return (x - 32) * 5 / 9


def task_conversion(rng: random.Random) -> Record:
    conv = rng.choice(CONVERSIONS)
    lo, hi = conv.values
    x = Decimal(rng.randint(lo, hi))
    if conv.key == "min_h":
        x = Decimal(15 * rng.randint(1, 40))          # quarter hours read naturally
    elif conv.key not in ("c_f", "f_c", "h_min") and rng.random() < 0.2:
        x = x + Decimal("0.5")                        # a few non-integer quantities
    y = convert(conv, x)
    ys = fmt_dec(y)
    exact = Decimal(ys) == y
    xs = fmt_dec(x)
    temp = conv.op in ("c2f", "f2c")
    src = f"{xs} {conv.src[0]}" if temp else f"{xs} {plural(xs, *conv.src)}"
    dst = f"{ys} {conv.dst[0]}" if temp else f"{ys} {plural(ys, *conv.dst)}"
    if temp:
        scale = "Fahrenheit" if conv.op == "c2f" else "Celsius"
        src_scale = "Celsius" if conv.op == "c2f" else "Fahrenheit"
        instrs = [f"Convert {src} to {scale}.", f"What is {xs} degrees {src_scale} in degrees {scale}?",
                  f"If it is {src} outside, what is the temperature in {conv.dst[0]}?"]
        in_instr = f"Convert this temperature to {scale}."
    else:
        to = conv.dst[1]
        instrs = [f"Convert {src} to {to}.", f"How many {to} are there in {src}?",
                  f"What is {src} in {to}?", f"Express {src} in {to}."]
        in_instr = rng.choice([f"Convert the following quantity to {to}.", f"Express this amount in {to}."])
    approx = "≈" if not exact else "="
    outs = [f"{src} is {'about ' if not exact else ''}{dst}.",
            f"{src} {approx} {dst}, since {conv.rule}.",
            f"Using {conv.rule}: {src} {approx} {dst}"
            + (" (rounded to two decimal places)." if not exact else ".")]
    output = rng.choice(outs)
    if maybe_input(rng):
        return Record(in_instr, src, output, "unit_conversion", f"unit_conversion/{conv.key}")
    return Record(rng.choice(instrs), "", output, "unit_conversion", f"unit_conversion/{conv.key}")


def family_unit_conversion(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    return collect(reg, n, lambda: task_conversion(rng))


# --------------------------------------------------------------------------
# Family: string edits
# --------------------------------------------------------------------------

WORDS = ["planet", "garden", "window", "library", "pencil", "orange", "thunder", "blanket", "mountain",
         "river", "candle", "basket", "kitchen", "ladder", "pumpkin", "rocket", "silver", "tomato",
         "umbrella", "violin", "whisper", "yellow", "zebra", "anchor", "bicycle", "castle", "dolphin",
         "engine", "forest", "guitar", "harbour", "island", "jacket", "kettle", "lemon", "marble", "needle",
         "ocean", "parrot", "quilt", "rabbit", "saddle", "teacup", "valley", "walnut", "biscuit", "compass",
         "dragon", "eagle", "feather", "giraffe", "helmet", "iceberg", "jigsaw", "koala", "lantern",
         "meadow", "notebook", "octopus", "pepper", "raincoat", "sandwich", "tunnel", "universe",
         "volcano", "waffle", "yoghurt", "balloon", "cabbage", "diamond", "elephant", "festival",
         "glacier", "hammock", "insect", "journey", "keyboard", "lighthouse", "magnet", "napkin",
         "orchard", "puzzle", "question", "rainbow", "spider", "turtle", "velvet", "wizard", "mirror",
         "breakfast", "chocolate", "alphabet", "education", "adventure", "banana", "strawberry"]
PALINDROMES = ["level", "radar", "civic", "kayak", "rotor", "refer", "madam", "noon", "stats",
               "racecar", "deed", "solos", "tenet", "minim"]
PHRASES = ["open the window", "rain on the roof", "coffee and toast", "a quiet morning",
           "the red kite flew high", "walk the dog", "seven silver spoons", "summer by the sea",
           "learn something new", "the garden gate is open", "bake a lemon cake", "read before bed",
           "the last train home", "fresh bread every day", "stars over the valley", "a cup of mint tea",
           "paint the fence blue", "the library opens at nine", "pack a warm jacket", "birds sing at dawn",
           "clean the kitchen table", "a map of the old town", "wait for the green light",
           "the river runs fast", "plant tomatoes in spring", "bring an umbrella", "the cat sleeps all day",
           "call me after lunch", "a long walk in the park", "the clock struck twelve",
           "snow fell overnight", "turn left at the bridge", "water the plants",
           "a box of coloured pencils", "music fills the hall", "the bus is running late",
           "practice makes progress", "share the good news", "the kettle is boiling",
           "meet me by the fountain"]
VOWELS = "aeiou"


def task_string_edit(rng: random.Random) -> Record:
    kind = rng.choice(["reverse", "upper", "lower", "vowels", "nospace", "letters", "title",
                       "wordorder", "palindrome", "wordcount", "lastletter"])
    fam, task = "string_edit", f"string_edit/{kind}"
    use_input = maybe_input(rng)
    if kind == "reverse":
        w = rng.choice(WORDS)
        out = rng.choice([f'The word "{w}" reversed is "{w[::-1]}".', w[::-1]])
        if use_input:
            return Record("Reverse the letters of the following word.", w, out, fam, task)
        return Record(rng.choice([f'Reverse the word "{w}".', f'Spell "{w}" backwards.',
                                  f'Write the word "{w}" in reverse order.']), "", out, fam, task)
    if kind in ("upper", "lower", "title", "nospace", "wordorder"):
        # Upper- and lower-casing use disjoint halves of the phrase list: the
        # same phrase in both would be a one-word near duplicate.
        half = PHRASES[::2] if kind in ("upper", "title") else PHRASES[1::2]
        p = rng.choice(half)
        if kind == "upper":
            res, what = p.upper(), rng.choice(["Convert this text to uppercase.", "Rewrite the text in capital letters."])
            inline = f'Write "{p}" in uppercase.'
        elif kind == "lower":
            p = p.title()
            res, what = p.lower(), rng.choice(["Convert this text to lowercase.", "Rewrite the text in lowercase letters."])
            inline = f'Write "{p}" in lowercase.'
        elif kind == "title":
            res = " ".join(x.capitalize() for x in p.split())
            what = "Capitalise the first letter of every word in this text."
            inline = f'Capitalise each word in "{p}".'
        elif kind == "nospace":
            res, what = p.replace(" ", ""), "Remove all spaces from the following text."
            inline = f'Remove the spaces from "{p}".'
        else:
            res, what = " ".join(reversed(p.split())), "Reverse the order of the words in this phrase."
            inline = f'Reverse the word order of "{p}".'
        if use_input:
            return Record(what, p, res, fam, task)
        return Record(inline, "", res, fam, task)
    if kind == "vowels":
        w = rng.choice(WORDS)
        found = [c for c in w if c in VOWELS]
        n = len(found)
        out = (f'The word "{w}" has {n} {plural(n, "vowel", "vowels")} '
               f'({", ".join(found)}), counting a, e, i, o and u.')
        if use_input:
            return Record("Count the vowels in the following word.", w, out, fam, task)
        return Record(rng.choice([f'How many vowels are in the word "{w}"?',
                                  f'Count the vowels in "{w}".']), "", out, fam, task)
    if kind == "letters":
        w = rng.choice(WORDS)
        out = rng.choice([f'"{w}" has {len(w)} letters.', f"{len(w)}"])
        if use_input:
            return Record("How many letters does this word have?", w, out, fam, task)
        return Record(rng.choice([f'How many letters are in the word "{w}"?',
                                  f'Count the letters in "{w}".']), "", out, fam, task)
    if kind == "palindrome":
        w = rng.choice(PALINDROMES) if rng.random() < 0.5 else rng.choice(WORDS)
        if w == w[::-1]:
            out = f'Yes. "{w}" reads the same forwards and backwards, so it is a palindrome.'
        else:
            out = f'No. "{w}" backwards is "{w[::-1]}", so it is not a palindrome.'
        if use_input:
            return Record("Is the following word a palindrome?", w, out, fam, task)
        return Record(f'Is "{w}" a palindrome?', "", out, fam, task)
    if kind == "wordcount":
        p = rng.choice(PHRASES)
        n = len(p.split())
        out = rng.choice([f"The phrase has {n} words.", f"{n}"])
        if use_input:
            return Record("Count the words in this phrase.", p, out, fam, task)
        return Record(f'How many words are in "{p}"?', "", out, fam, task)
    w = rng.choice(WORDS)
    out = f'The last letter of "{w}" is "{w[-1]}".'
    return Record(rng.choice([f'What is the last letter of the word "{w}"?',
                              f'Which letter does "{w}" end with?']), "", out, fam, task)


def family_string_edit(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    return collect(reg, n, lambda: task_string_edit(rng))


# --------------------------------------------------------------------------
# Family: classification
# --------------------------------------------------------------------------

POSITIVE = ["The soup was warm, fresh and full of flavour.", "I loved every minute of the concert.",
            "The staff were friendly and helped us right away.",
            "This backpack is light, sturdy and worth every penny.", "What a beautiful morning for a walk!",
            "The new update made the app much faster.", "My package arrived two days early.",
            "The hotel room was spotless and quiet.", "She gave a clear and inspiring talk.",
            "These headphones sound amazing for the price.", "The kids had a wonderful time at the zoo.",
            "The instructions were simple and easy to follow.", "I'm thrilled with how the garden turned out.",
            "Our guide was funny and knew a lot about the city.",
            "The bread from this bakery is always delicious.", "The film's ending made me smile.",
            "Customer support solved my problem in five minutes.",
            "This is the most comfortable chair I have ever owned.", "The team worked together brilliantly.",
            "I would happily stay here again."]
NEGATIVE = ["The train was late again and nobody told us why.", "My new phone stopped working after a week.",
            "The food was cold and far too salty.", "I waited forty minutes and never got a reply.",
            "The room smelled of smoke and the sheets were stained.",
            "This jacket ripped the first time I wore it.", "The lecture was confusing and far too long.",
            "The app crashes every time I open the camera.", "Our order was wrong and the waiter was rude.",
            "I regret buying these shoes; they hurt my feet.", "The park was full of litter this weekend.",
            "The sequel was a dull copy of the first film.", "Shipping took a month and the box was crushed.",
            "The printer jams on almost every page.", "I'm disappointed with how the repairs were done.",
            "The music was so loud we couldn't talk.", "Nothing on the menu was worth the price.",
            "The update deleted all of my saved notes.", "Traffic made the trip miserable.",
            "The tap still leaks after two repair visits."]
ANIMALS = [("dolphin", "mammal"), ("penguin", "bird"), ("shark", "fish"), ("crocodile", "reptile"),
           ("frog", "amphibian"), ("salmon", "fish"), ("bat", "mammal"), ("eagle", "bird"),
           ("tortoise", "reptile"), ("whale", "mammal"), ("owl", "bird"), ("lizard", "reptile"),
           ("salamander", "amphibian"), ("tuna", "fish"), ("kangaroo", "mammal"), ("ostrich", "bird"),
           ("snake", "reptile"), ("toad", "amphibian"), ("trout", "fish"), ("elephant", "mammal"),
           ("newt", "amphibian"), ("sparrow", "bird")]


def smallest_factor(n: int) -> int:
    f = 2
    while f * f <= n:
        if n % f == 0:
            return f
        f += 1
    return n


def make_sentiment(rng: random.Random, sentence: str, label: str) -> Record:
    out = rng.choice([label.capitalize(), f"The sentiment is {label}.", f"{label.capitalize()}."])
    if maybe_input(rng, 0.5):
        instr = rng.choice(["Classify the sentiment of this sentence as positive or negative.",
                            "Is the following review positive or negative?",
                            "Label the sentiment of the text below."])
        return Record(instr, sentence, out, "classification", "classification/sentiment")
    return Record(f'Is this sentence positive or negative? "{sentence}"', "", out, "classification",
                  "classification/sentiment")


def task_parity(rng: random.Random) -> Record:
    n = rng.randint(1, 9999)
    even = n % 2 == 0
    task = "classification/parity"
    if maybe_input(rng):
        return Record("Classify the number as even or odd.", str(n),
                      f"{n} is {'even' if even else 'odd'}.", "classification", task)
    out = rng.choice([f"{n} is {'even' if even else 'odd'}.",
                      f"Even. {n} is divisible by 2." if even else
                      f"Odd. {n} leaves a remainder of 1 when divided by 2."])
    return Record(rng.choice([f"Is {n} even or odd?", f"Is the number {n} odd or even?"]), "", out,
                  "classification", task)


def task_prime(rng: random.Random) -> Record:
    n = rng.randint(2, 400)
    f = smallest_factor(n)
    if f == n:
        out = f"Yes. {n} is prime because its only divisors are 1 and {n}."
    else:
        out = f"No. {n} = {f} × {n // f}, so it is not prime."
    task = "classification/prime"
    if maybe_input(rng):
        return Record("Decide whether the number below is prime.", str(n), out, "classification", task)
    return Record(rng.choice([f"Is {n} a prime number?", f"Is {n} prime?"]), "", out,
                  "classification", task)


def make_animal(rng: random.Random, animal: str, cls: str) -> Record:
    task = "classification/animal"
    out = f"{article(animal).capitalize()} {animal} is {article(cls)} {cls}."
    if maybe_input(rng):
        # The bare label alone ("Amphibian") would make newt/toad one-word near duplicates.
        return Record("Classify the animal as a mammal, bird, fish, reptile or amphibian.", animal,
                      out, "classification", task)
    return Record(f"Is {article(animal)} {animal} a mammal, bird, fish, reptile or amphibian?", "", out,
                  "classification", task)


def family_classification(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    """Sentiment (hand-written sentences), parity, primality and animal classes."""
    n_sent, n_animal = round(n * 0.37), round(n * 0.17)
    n_prime = round(n * 0.26)
    n_parity = n - n_sent - n_animal - n_prime
    labelled = [(s, "positive") for s in POSITIVE] + [(s, "negative") for s in NEGATIVE]
    sentences = rng.sample(labelled, n_sent)
    out = [make_sentiment(rng, s, lab) for s, lab in sentences]
    out += [make_animal(rng, a, c) for a, c in rng.sample(ANIMALS, n_animal)]
    for rec in out:
        if not reg.add(rec):
            raise RuntimeError(f"table record collides: {rec}")
    # Make primes and non-primes roughly equally likely.
    def prime_or_not() -> Record:
        while True:
            rec = task_prime(rng)
            if (rec.output.startswith("Yes")) == (rng.random() < 0.5):
                return rec
    out += collect(reg, n_prime, prime_or_not)
    out += collect(reg, n_parity, lambda: task_parity(rng))
    return out


# --------------------------------------------------------------------------
# Family: explanations of everyday / science concepts
# --------------------------------------------------------------------------

CONCEPTS = [
    ("photosynthesis", "Photosynthesis is the process plants, algae and some bacteria use to turn sunlight, water and carbon dioxide into sugar. Oxygen is released as a by-product."),
    ("gravity", "Gravity is the force by which objects with mass attract one another. On Earth it pulls everything toward the planet's centre, which is why dropped objects fall."),
    ("evaporation", "Evaporation is when a liquid turns into a gas at its surface, usually because it has absorbed heat. Puddles drying in the sun are a common example."),
    ("condensation", "Condensation is the change of a gas into a liquid when it cools. The droplets that form on a cold glass come from water vapour in the air condensing."),
    ("the water cycle", "The water cycle is the continuous movement of water between the oceans, the air and the land. Water evaporates, condenses into clouds, falls as rain or snow and flows back to the sea."),
    ("a solar eclipse", "A solar eclipse happens when the Moon passes between the Sun and Earth and blocks some or all of the Sun's light for people in the Moon's shadow."),
    ("a lunar eclipse", "A lunar eclipse happens when Earth passes between the Sun and the Moon, so Earth's shadow falls on the Moon. It can only happen at full moon."),
    ("friction", "Friction is the force that resists two surfaces sliding past each other. It is why a rolling ball slows down and why shoes grip the ground."),
    ("an atom", "An atom is the smallest unit of a chemical element. It has a tiny nucleus of protons and neutrons surrounded by electrons."),
    ("a molecule", "A molecule is a group of two or more atoms held together by chemical bonds. A water molecule, for example, is two hydrogen atoms bonded to one oxygen atom."),
    ("DNA", "DNA is the molecule that carries the genetic instructions of living things. Its sequence of chemical bases works like a code for building and running cells."),
    ("a vaccine", "A vaccine trains the immune system to recognise a germ without causing the disease. If the real germ appears later, the body can fight it off faster."),
    ("inflation", "Inflation is the general rise in prices over time. It means the same amount of money buys less than it did before."),
    ("compound interest", "Compound interest is interest calculated on both the original amount and the interest already added. Over time it makes savings or debts grow faster and faster."),
    ("a budget", "A budget is a plan for how much money you expect to earn and spend over a period. It helps you see where your money goes and avoid spending more than you have."),
    ("a magnet", "A magnet is an object that produces a magnetic field, which attracts iron and some other metals. Every magnet has a north and a south pole; opposite poles attract and like poles repel."),
    ("static electricity", "Static electricity is a build-up of electric charge on the surface of an object. Rubbing a balloon on your hair moves electrons and makes the balloon cling to a wall."),
    ("a rainbow", "A rainbow appears when sunlight enters raindrops, bends and reflects inside them, and splits into its colours. You see one when the Sun is behind you and rain is in front of you."),
    ("the greenhouse effect", "The greenhouse effect is the warming of Earth's surface because gases such as carbon dioxide and water vapour trap some of the heat the planet gives off. Without it Earth would be far colder, and adding more of these gases makes it warmer."),
    ("erosion", "Erosion is the wearing away and carrying off of rock and soil by water, wind or ice. Over long periods it can carve valleys and canyons."),
    ("a volcano", "A volcano is an opening in Earth's crust where molten rock, ash and gases escape from below the surface. Repeated eruptions can build it into a mountain."),
    ("an earthquake", "An earthquake is a sudden shaking of the ground caused by rocks slipping along a fault in Earth's crust. The released energy travels outward as seismic waves."),
    ("the tide", "The tide is the regular rise and fall of sea level, caused mainly by the Moon's gravity pulling on Earth's oceans. Many coasts have two high tides and two low tides each day."),
    ("a leap year", "A leap year has 366 days instead of 365, with the extra day added on 29 February. It keeps the calendar in step with Earth's orbit, which takes about 365.25 days."),
    ("a time zone", "A time zone is a region that uses the same standard clock time. Time zones exist because the Sun rises at different moments in different parts of the world."),
    ("a calorie", "A calorie is a unit of energy. The Calorie on food labels is a kilocalorie, roughly the energy needed to warm one kilogram of water by one degree Celsius."),
    ("metabolism", "Metabolism is the set of chemical reactions in the body that turn food into energy and building materials. It keeps your cells working even while you sleep."),
    ("an ecosystem", "An ecosystem is a community of living things together with their surroundings, such as soil, water and climate. Its parts depend on one another, so a change to one affects the others."),
    ("a food chain", "A food chain shows what eats what in an ecosystem, passing energy from one living thing to the next. For example, grass is eaten by a rabbit, which is eaten by a fox."),
    ("pollination", "Pollination is the transfer of pollen from the male part of a flower to the female part, which lets the plant make seeds. Bees, other insects, birds and the wind all carry pollen."),
    ("fermentation", "Fermentation is a process in which microbes such as yeast or bacteria break down sugars without needing oxygen. It is used to make bread, yoghurt, cheese and many drinks."),
    ("rust", "Rust is the reddish-brown, flaky coating that forms when iron or steel reacts with oxygen and water. Paint or oil slows rusting by keeping air and moisture away."),
    ("a battery", "A battery stores chemical energy and releases it as electricity. Reactions inside it push electrons through a circuit connected to its two terminals."),
    ("an electric circuit", "An electric circuit is a closed loop that electric current can flow around. It needs a power source, such as a battery, and conductors such as wires; breaking the loop stops the current."),
    ("a lever", "A lever is a simple machine made of a rigid bar that turns around a fixed point called a fulcrum. It lets a small force move a heavy load, as with a seesaw or a crowbar."),
    ("an echo", "An echo is a sound you hear again because it bounced off a surface such as a cliff or a wall. It arrives a moment later because the sound had to travel there and back."),
    ("refraction", "Refraction is the bending of light as it passes from one material into another, such as from air into water. It is why a straw in a glass of water looks bent."),
    ("a shadow", "A shadow forms when an object blocks light, leaving a darker area behind it. Its shape and length change as the light source moves."),
    ("density", "Density is how much mass is packed into a given volume. An object less dense than water, like a piece of wood, floats, while a denser one, like a stone, sinks."),
    ("a habitat", "A habitat is the natural home of a plant or animal, providing the food, water and shelter it needs. A pond, a forest floor and a coral reef are all habitats."),
    ("the immune system", "The immune system is the body's defence network of cells and organs that finds and destroys germs. It also remembers past infections so it can respond faster next time."),
    ("blood circulation", "Blood circulation is the movement of blood around the body, pumped by the heart. It carries oxygen and nutrients to the cells and takes waste products away."),
    ("a fossil", "A fossil is the preserved remains or trace of a plant or animal that lived long ago, usually found in rock. Fossils help scientists learn how life on Earth has changed."),
    ("a light-year", "A light-year is the distance light travels in one year, about 9.46 trillion kilometres. Despite its name, it measures distance, not time."),
    ("a black hole", "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape. Many form when very massive stars collapse at the end of their lives."),
    ("an orbit", "An orbit is the curved path an object follows around a star, planet or moon because of gravity. Earth completes one orbit of the Sun each year."),
    ("recycling", "Recycling is collecting used materials such as paper, glass and metal and turning them into new products. It saves raw materials and energy and reduces the waste sent to landfill."),
    ("a password manager", "A password manager is an app that stores your passwords in an encrypted vault and can create strong new ones. You only have to remember a single master password."),
    ("a search engine", "A search engine is a program that finds web pages matching the words you type. It builds an index of pages in advance so it can answer in a fraction of a second."),
    ("a spreadsheet", "A spreadsheet is a grid of rows and columns for organising numbers and text. Cells can hold formulas that recalculate automatically when other cells change."),
    ("a credit score", "A credit score is a number that estimates how likely a person is to repay borrowed money, based on their borrowing history. Lenders use it to decide whether to lend and at what interest rate."),
    ("supply and demand", "Supply and demand describes how prices are set in a market. When more people want something than is available, its price tends to rise; when there is more than people want, the price tends to fall."),
    ("a thermostat", "A thermostat is a device that keeps a room or machine at a set temperature. It switches heating or cooling on and off as the temperature drifts away from the target."),
    ("humidity", "Humidity is the amount of water vapour in the air. High humidity makes hot days feel stickier because sweat evaporates more slowly."),
    ("dew", "Dew is the water droplets that form on grass and other surfaces on cool nights. The surfaces cool below the dew point, so water vapour in the air condenses on them."),
    ("a hurricane", "A hurricane is a large, powerful storm whose strong winds spin around a calm centre called the eye. It forms over warm ocean water and can bring heavy rain and flooding."),
    ("the ozone layer", "The ozone layer is a region of the upper atmosphere rich in ozone gas. It absorbs much of the Sun's harmful ultraviolet radiation before it reaches the ground."),
    ("an antibiotic", "An antibiotic is a medicine that kills bacteria or stops them from growing. Antibiotics do not work against viruses, such as those that cause colds."),
    ("a nutrient", "A nutrient is a substance in food that the body needs to grow, repair itself and stay healthy. Proteins, carbohydrates, fats, vitamins and minerals are all nutrients."),
    ("a habit", "A habit is a behaviour repeated so often that it becomes almost automatic. Habits form when an action is regularly linked to the same cue and reward."),
    ("procrastination", "Procrastination is putting off a task you intend to do, even though you expect the delay to make things worse. Breaking the task into small steps often makes it easier to start."),
    ("mitosis", "Mitosis is the way a cell divides to make two identical copies of itself. It lets living things grow and replace worn-out cells."),
    ("a solar panel", "A solar panel turns sunlight directly into electricity using cells made of materials such as silicon. The electricity can be used straight away or stored in batteries."),
    ("a compass", "A compass is a tool for finding direction. Its magnetised needle lines up with Earth's magnetic field and points roughly north."),
    ("boiling point", "The boiling point is the temperature at which a liquid turns into vapour throughout, not just at its surface. Pure water boils at 100 °C at sea level, and at a lower temperature high in the mountains."),
]


def bare(term: str) -> str:
    """Drop a leading article: "a rainbow" -> "rainbow" (used in the input field)."""
    for art in ("a ", "an ", "the "):
        if term.startswith(art):
            return term[len(art):]
    return term


def make_explanation(rng: random.Random, term: str, text: str) -> Record:
    task = "explanation/concept"
    if maybe_input(rng):
        instr = rng.choice(["Explain the following concept in simple terms.",
                            "Give a short explanation of the term below.",
                            "Define this term in one or two sentences."])
        return Record(instr, bare(term), text, "explanation", task)
    instr = rng.choice([f"What is {term}?", f"Explain {term} in simple terms.",
                        f"Describe {term} in one or two sentences.", f"Give a short explanation of {term}.",
                        f"Can you briefly explain what {term} is?"])
    return Record(instr, "", text, "explanation", task)


def family_explanation(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    out = [make_explanation(rng, t, x) for t, x in rng.sample(CONCEPTS, n)]
    for rec in out:
        if not reg.add(rec):
            raise RuntimeError(f"table record collides: {rec}")
    return out


# --------------------------------------------------------------------------
# Family: list sorting / min / max
# --------------------------------------------------------------------------

def _nums(rng: random.Random) -> list[int]:
    k = rng.randint(5, 8)
    lo = -50 if rng.random() < 0.2 else 1
    return rng.sample(range(lo, 200), k)


def task_list(rng: random.Random) -> Record:
    kind = rng.choice(["asc", "desc", "min", "max", "alpha", "second", "range", "median"])
    fam, task = "list_ops", f"list_ops/{kind}"
    use_input = maybe_input(rng)
    if kind == "alpha":
        words = rng.sample(WORDS, rng.randint(4, 7))
        shown, res = ", ".join(words), ", ".join(sorted(words))
        if use_input:
            return Record("Sort these words alphabetically.", shown, res, fam, task)
        return Record(f"Put these words in alphabetical order: {shown}.", "", res, fam, task)
    nums = _nums(rng)
    if kind == "median" and len(nums) % 2 == 0:
        nums = nums[:-1]       # odd length so the median is a single list element
    shown = ", ".join(str(x) for x in nums)
    s = sorted(nums)
    if kind == "asc":
        res = ", ".join(str(x) for x in s)
        what, inline = "Sort the following numbers in ascending order.", f"Sort these numbers from smallest to largest: {shown}."
    elif kind == "desc":
        res = ", ".join(str(x) for x in reversed(s))
        what, inline = "Sort the following numbers in descending order.", f"Sort these numbers from largest to smallest: {shown}."
    elif kind == "min":
        res = rng.choice([f"The smallest number is {s[0]}.", str(s[0])])
        what, inline = "Find the smallest number in the list.", f"What is the smallest number in this list: {shown}?"
    elif kind == "max":
        res = rng.choice([f"The largest number is {s[-1]}.", str(s[-1])])
        what, inline = "Find the largest number in the list.", f"What is the largest number in this list: {shown}?"
    elif kind == "second":
        res = f"The second largest number is {s[-2]}."
        what, inline = "Find the second largest number in the list.", f"Which is the second largest number among {shown}?"
    elif kind == "range":
        res = f"The largest is {s[-1]} and the smallest is {s[0]}, so the range is {s[-1]} - ({s[0]}) = {s[-1] - s[0]}." \
            if s[0] < 0 else \
            f"The largest is {s[-1]} and the smallest is {s[0]}, so the range is {s[-1]} - {s[0]} = {s[-1] - s[0]}."
        what, inline = "Find the range (largest minus smallest) of these numbers.", f"What is the range of {shown}?"
    else:
        res = f"In order the numbers are {', '.join(str(x) for x in s)}, so the median is {s[len(s) // 2]}."
        what, inline = "Find the median of these numbers.", f"What is the median of {shown}?"
    if use_input:
        return Record(what, shown, res, fam, task)
    return Record(inline, "", res, fam, task)


def family_list_ops(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    return collect(reg, n, lambda: task_list(rng))


# --------------------------------------------------------------------------
# Family: small facts tables (capitals, chemical symbols, planets)
# --------------------------------------------------------------------------

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"),
            ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
            ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Belgium", "Brussels"),
            ("Ireland", "Dublin"), ("Iceland", "Reykjavík"), ("Hungary", "Budapest"),
            ("Romania", "Bucharest"), ("Ukraine", "Kyiv"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
            ("South Korea", "Seoul"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogotá"),
            ("Cuba", "Havana"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
            ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
            ("New Zealand", "Wellington"), ("Nepal", "Kathmandu"), ("Croatia", "Zagreb"),
            ("Serbia", "Belgrade"), ("Bulgaria", "Sofia"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"),
            ("Venezuela", "Caracas"), ("Iran", "Tehran"), ("Jamaica", "Kingston"), ("Senegal", "Dakar"),
            ("Mongolia", "Ulaanbaatar")]
ELEMENTS = [("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
            ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"),
            ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("potassium", "K"), ("calcium", "Ca"),
            ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("gold", "Au"),
            ("mercury", "Hg"), ("lead", "Pb"), ("tin", "Sn"), ("neon", "Ne"), ("uranium", "U"),
            ("nickel", "Ni")]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]


def make_capital(rng: random.Random, country: str, capital: str) -> Record:
    task = "facts/capital"
    if rng.random() < 0.2:   # the reverse question
        return Record(f"{capital} is the capital of which country?", "",
                      f"{capital} is the capital of {country}.", "facts", task)
    out = rng.choice([f"The capital of {country} is {capital}.", f"{capital}.",
                      f"{capital} is the capital of {country}."])
    if maybe_input(rng):
        return Record("Name the capital city of the country below.", country, out, "facts", task)
    return Record(rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
                  "", out, "facts", task)


def make_element(rng: random.Random, element: str, symbol: str) -> Record:
    task = "facts/element"
    if rng.random() < 0.4:
        return Record(f"Which element has the chemical symbol {symbol}?", "",
                      f"{symbol} is the symbol for {element}.", "facts", task)
    out = rng.choice([f"The chemical symbol for {element} is {symbol}.", symbol])
    if maybe_input(rng):
        return Record("Give the chemical symbol of this element.", element, out, "facts", task)
    return Record(f"What is the chemical symbol for {element}?", "", out, "facts", task)


def make_planet(rng: random.Random, pos: int) -> Record:
    planet, ordinal = PLANETS[pos], ORDINALS[pos]
    task = "facts/planet"
    if rng.random() < 0.5:
        return Record(f"Which planet is {ordinal} from the Sun?", "",
                      f"{planet} is the {ordinal} planet from the Sun.", "facts", task)
    return Record(f"Counting from the Sun, what position is {planet} in the Solar System?", "",
                  f"{planet} is the {ordinal} planet from the Sun.", "facts", task)


def family_facts(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    # 60 records -> 38 capitals, 16 elements, 6 planets; scales down for small n.
    n_planet, n_elem = min(6, n // 10), round(n * 0.27)
    n_cap = n - n_planet - n_elem
    out = [make_capital(rng, c, k) for c, k in rng.sample(CAPITALS, n_cap)]
    out += [make_element(rng, e, s) for e, s in rng.sample(ELEMENTS, n_elem)]
    out += [make_planet(rng, p) for p in rng.sample(range(8), n_planet)]
    for rec in out:
        if not reg.add(rec):
            raise RuntimeError(f"table record collides: {rec}")
    return out


# --------------------------------------------------------------------------
# Family: grammar and spelling fixes
# --------------------------------------------------------------------------

GRAMMAR = [
    ("She dont like coffee in the morning.", "She doesn't like coffee in the morning."),
    ("I recieved your letter yesterday.", "I received your letter yesterday."),
    ("Their going to the park after school.", "They're going to the park after school."),
    ("The dog wagged it's tail.", "The dog wagged its tail."),
    ("We was late for the train.", "We were late for the train."),
    ("He definately knows the answer.", "He definitely knows the answer."),
    ("Me and him went to the shop.", "He and I went to the shop."),
    ("The childrens are playing outside.", "The children are playing outside."),
    ("I seen that film last week.", "I saw that film last week."),
    ("Your the best teacher I have had.", "You're the best teacher I have had."),
    ("There is three apples on the table.", "There are three apples on the table."),
    ("She has went home already.", "She has gone home already."),
    ("The weather is more colder today.", "The weather is colder today."),
    ("I could of helped you.", "I could have helped you."),
    ("We need to seperate the whites from the colours.", "We need to separate the whites from the colours."),
    ("The goverment announced a new plan.", "The government announced a new plan."),
    ("He don't have no money.", "He doesn't have any money."),
    ("Each of the students have a book.", "Each of the students has a book."),
    ("I am looking foward to the weekend.", "I am looking forward to the weekend."),
    ("Less people came than we expected.", "Fewer people came than we expected."),
    ("The meeting was occured at noon.", "The meeting occurred at noon."),
    ("She is more taller than her brother.", "She is taller than her brother."),
    ("I have alot of homework tonight.", "I have a lot of homework tonight."),
    ("The book is laying on the desk.", "The book is lying on the desk."),
    ("Between you and I, the plan is risky.", "Between you and me, the plan is risky."),
    ("The resturant was closed on Monday.", "The restaurant was closed on Monday."),
    ("He runned to the bus stop.", "He ran to the bus stop."),
    ("My freind lives next door.", "My friend lives next door."),
    ("The news are very surprising.", "The news is very surprising."),
    ("I goes to school by bus.", "I go to school by bus."),
    ("They was happy with the results.", "They were happy with the results."),
    ("Tomorow we will visit the zoo.", "Tomorrow we will visit the zoo."),
    ("She writed a long letter.", "She wrote a long letter."),
    ("The cat sleeped all afternoon.", "The cat slept all afternoon."),
    ("I beleive you are right.", "I believe you are right."),
    ("He is a honest man.", "He is an honest man."),
    ("She bought a umbrella.", "She bought an umbrella."),
    ("The players won there first match.", "The players won their first match."),
    ("Its raining outside.", "It's raining outside."),
    ("I didn't knew the answer.", "I didn't know the answer."),
    ("The accomodation was comfortable.", "The accommodation was comfortable."),
    ("Please send me the adress.", "Please send me the address."),
    ("He can sings very well.", "He can sing very well."),
    ("Whose coming to dinner tonight?", "Who's coming to dinner tonight?"),
    ("The begining of the film was slow.", "The beginning of the film was slow."),
    ("She walk to work every day.", "She walks to work every day."),
    ("Neither of my brothers like fish.", "Neither of my brothers likes fish."),
    ("The shop was closed, we went home.", "The shop was closed, so we went home."),
]


def make_grammar(rng: random.Random, wrong: str, right: str) -> Record:
    task = "grammar/fix"
    out = rng.choice([right, right, f"Corrected sentence: {right}"])
    if maybe_input(rng, 0.5):
        instr = rng.choice(["Correct the spelling and grammar in this sentence.",
                            "Fix the mistakes in the following sentence.",
                            "Proofread the sentence below and return the corrected version."])
        return Record(instr, wrong, out, "grammar", task)
    instr = rng.choice([f"Rewrite this sentence correctly: {wrong}", f'Fix the grammar: "{wrong}"',
                        f"Please correct this sentence: {wrong}"])
    return Record(instr, "", out, "grammar", task)


def family_grammar(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    out = [make_grammar(rng, w, r) for w, r in rng.sample(GRAMMAR, n)]
    for rec in out:
        if not reg.add(rec):
            raise RuntimeError(f"table record collides: {rec}")
    return out


# --------------------------------------------------------------------------
# Family: rewriting / summarisation of short passages
# --------------------------------------------------------------------------

# (passage, one-sentence summary, title)
PASSAGES = [
    ("The town library will close for two weeks in March while workers replace the roof. During that time, books can be returned to the drop box by the community centre. Online borrowing of e-books will continue as normal.",
     "The library closes for two weeks in March for roof repairs, but returns can go to the community centre drop box and e-book lending continues.",
     "Library Closes in March for Roof Repairs"),
    ("Maya started running three years ago to deal with stress at work. At first she could barely finish a kilometre, but she went a little further each week. Last month she completed her first marathon.",
     "Maya took up running to cope with stress and built up steadily until she finished her first marathon.",
     "From One Kilometre to a Marathon"),
    ("Our office coffee machine broke on Monday, and the replacement part will not arrive until Friday. Until then, the kitchen on the second floor has a kettle and instant coffee. We apologise for the inconvenience.",
     "The coffee machine is broken until Friday, so staff should use the kettle in the second-floor kitchen.",
     "Coffee Machine Out of Order Until Friday"),
    ("Honeybees share the location of food with a movement called the waggle dance. The angle of the dance shows the direction relative to the sun, and its length signals the distance. Other bees watch and then fly straight to the flowers.",
     "Honeybees use the waggle dance to tell other bees the direction and distance of food.",
     "How Bees Give Directions"),
    ("The city plans to add protected bike lanes along Main Street next spring. Supporters say the lanes will make cycling safer, while some shop owners worry about losing parking spaces. A public meeting is scheduled for the end of the month.",
     "A plan for protected bike lanes on Main Street has both supporters and worried shop owners, and a public meeting is coming up.",
     "Bike Lanes Planned for Main Street"),
    ("Leaving a phone charging overnight is usually safe because modern chargers stop when the battery is full. However, keeping a battery full and warm for long periods can slowly reduce its capacity. Charging on a hard surface away from bedding helps it stay cool.",
     "Overnight charging is generally safe, but heat and a constant full charge wear the battery, so charge on a cool, hard surface.",
     "Is Overnight Charging Safe?"),
    ("The school's science fair drew more than eighty projects this year. Students built water filters, tested paper aeroplane designs and measured how music affects plant growth. The winning project used cheap sensors to track air quality in classrooms.",
     "This year's science fair had over eighty varied projects and was won by a low-cost classroom air-quality monitor.",
     "Air Quality Project Wins Science Fair"),
    ("Sourdough bread rises because of wild yeast and bacteria living in a starter made of flour and water. The bacteria produce acids that give the bread its tangy flavour. A starter must be fed regularly to stay active.",
     "Sourdough relies on a regularly fed starter of wild yeast and bacteria, which make it rise and give it a tangy taste.",
     "The Secret Behind Sourdough"),
    ("Heavy rain overnight flooded several roads on the east side of town. Police closed two underpasses and advised drivers to avoid the area until the water drains. No injuries were reported.",
     "Overnight rain flooded roads on the east side of town and closed two underpasses, but nobody was hurt.",
     "Flooding Closes East-Side Roads"),
    ("Many people think goldfish have a memory of only a few seconds. Experiments have shown that they can remember feeding times and simple tasks for months. The myth probably survives because it is a fun thing to say.",
     "Contrary to popular belief, goldfish can remember things for months, not just seconds.",
     "Goldfish Remember More Than You Think"),
    ("Our team has moved the weekly planning meeting from Tuesday to Wednesday at 10 a.m. The room stays the same. Please update your calendars and send agenda items by Tuesday afternoon.",
     "The weekly planning meeting now takes place on Wednesdays at 10 a.m., with agenda items due on Tuesday afternoon.",
     "Planning Meeting Moves to Wednesday"),
    ("Walking for thirty minutes a day can improve heart health, mood and sleep. It needs no special equipment and can fit into a lunch break or a commute. Even short walks add up over a week.",
     "A daily thirty-minute walk is an easy, equipment-free way to improve heart health, mood and sleep.",
     "The Benefits of a Daily Walk"),
    ("The museum's new exhibit displays tools used by farmers a hundred years ago. Visitors can try grinding grain by hand and churning butter. The exhibit runs until the end of October.",
     "Until the end of October, a hands-on museum exhibit shows farming tools from a century ago.",
     "Hands-On Farming History at the Museum"),
    ("Plastic bags can take hundreds of years to break down and often end up in rivers and oceans. Several countries now charge a small fee for each bag, and use has dropped sharply where they do. Reusable bags are a simple alternative.",
     "Plastic bags last for centuries and pollute waterways, but small bag fees have sharply cut their use.",
     "Small Fees, Fewer Plastic Bags"),
    ("Tomás forgot his umbrella and got soaked on the way to his interview. He arrived early enough to dry off in the restroom but still felt nervous. The interviewer joked about the weather, and the conversation went better than he had hoped.",
     "Despite arriving soaked and nervous, Tomás had an interview that went better than he expected.",
     "A Rainy Start to a Good Interview"),
    ("Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, and the third sends it to the rest of the body. Their blood is blue because it uses copper, not iron, to carry oxygen.",
     "Octopuses have three hearts and blue blood that carries oxygen using copper.",
     "Three Hearts and Blue Blood"),
    ("The new phone update adds a dark mode and a battery-saving setting. Some users reported that the update took almost an hour to install. The company recommends installing it while the phone is plugged in.",
     "A phone update adds dark mode and battery saving but can take nearly an hour, so it is best installed while charging.",
     "Phone Update Brings Dark Mode"),
    ("Composting turns kitchen scraps and garden waste into rich soil. It needs a mix of green material, like vegetable peels, and brown material, like dry leaves. Turning the pile every week or two adds air and speeds things up.",
     "Composting makes rich soil from a mix of green and brown waste, and turning the pile speeds it up.",
     "A Quick Guide to Composting"),
    ("The bakery on Elm Street is celebrating its twentieth anniversary this Saturday. Every customer will receive a free cinnamon roll, and there will be live music in the afternoon. The owners thanked the neighbourhood for two decades of support.",
     "The Elm Street bakery marks twenty years on Saturday with free cinnamon rolls and live music.",
     "Elm Street Bakery Turns Twenty"),
    ("Learning a language as an adult is slower in some ways than learning as a child. Adults, however, are better at understanding grammar rules and using study strategies. For most everyday goals, regular practice matters more than the age you start.",
     "Adults learn languages differently from children, and regular practice matters more than starting age for everyday goals.",
     "It Is Never Too Late to Learn a Language"),
    ("A power cut hit the northern suburbs on Thursday evening after strong winds brought down a line. Crews worked through the night, and electricity was restored to most homes by morning. The utility says a few streets may stay without power until noon.",
     "Strong winds caused a power cut in the northern suburbs on Thursday evening, and most homes had electricity back by morning.",
     "Wind Knocks Out Power in Northern Suburbs"),
    ("Cats often knock objects off tables, and experts have several explanations. The behaviour may be play, a way to get attention, or practice for hunting. Giving a cat more toys and playtime can reduce it.",
     "Cats knock things over for play, attention or hunting practice, and more playtime can help.",
     "Why Cats Knock Things Over"),
    ("The hiking trail to Pine Lake reopened after a month of repairs. Workers rebuilt a footbridge and cleared fallen trees from the path. Hikers are asked to stay on the marked route while new plants take root.",
     "The Pine Lake trail has reopened after a month of repairs, and hikers should keep to the marked path.",
     "Pine Lake Trail Reopens"),
    ("Drinking enough water helps the body control its temperature and keeps joints cushioned. How much you need varies with weather, activity and body size. Rarely feeling thirsty and having pale urine are simple signs that you are drinking enough.",
     "Water helps regulate body temperature and protect joints, and how much you need depends on weather, activity and size.",
     "How Much Water Do You Need?"),
    ("A group of volunteers cleaned up the beach on Sunday morning. In three hours they collected forty bags of litter, mostly plastic bottles and food wrappers. The organisers plan to hold a cleanup every month.",
     "Volunteers collected forty bags of litter at a Sunday beach cleanup and plan to repeat it every month.",
     "Volunteers Clear Forty Bags of Beach Litter"),
]


def make_summary(rng: random.Random, passage: str, summary: str) -> Record:
    instr = rng.choice(["Summarize the following passage in one sentence.",
                        "Write a one-sentence summary of this text.",
                        "What is the main point of the passage below? Answer in one sentence.",
                        "Condense this paragraph into a single sentence."])
    return Record(instr, passage, summary, "rewriting", "rewriting/summary")


def make_title(rng: random.Random, passage: str, title: str) -> Record:
    instr = rng.choice(["Suggest a short title for this passage.", "Write a headline for the following text.",
                        "Give this paragraph a title."])
    return Record(instr, passage, title, "rewriting", "rewriting/title")


def family_rewriting(rng: random.Random, reg: Registry, n: int) -> list[Record]:
    """Each passage yields a summary task and a title task (two per passage)."""
    chosen = rng.sample(PASSAGES, (n + 1) // 2)
    out: list[Record] = []
    for passage, summary, title in chosen:
        out.append(make_summary(rng, passage, summary))
        out.append(make_title(rng, passage, title))
    out = out[:n]
    for rec in out:
        if not reg.add(rec):
            raise RuntimeError(f"table record collides: {rec}")
    return out


FAMILIES: dict[str, Callable[[random.Random, Registry, int], list[Record]]] = {
    "arithmetic": family_arithmetic,
    "unit_conversion": family_unit_conversion,
    "string_edit": family_string_edit,
    "classification": family_classification,
    "explanation": family_explanation,
    "list_ops": family_list_ops,
    "facts": family_facts,
    "grammar": family_grammar,
    "rewriting": family_rewriting,
}


# --------------------------------------------------------------------------
# pool.jsonl: clean records, then deliberate defects
# --------------------------------------------------------------------------

def build_clean_pool() -> list[Record]:
    """All clean records, families shuffled together."""
    rng = random.Random(POOL_SEED)
    reg = Registry()
    records: list[Record] = []
    for family, n in FAMILY_COUNTS.items():
        records += FAMILIES[family](rng, reg, n)
    rng.shuffle(records)
    return records


def truncate_text(rng: random.Random, text: str) -> str:
    """Cut ``text`` between 35% and 75% of its length, ending on a letter or digit.

    Ending on an alphanumeric character guarantees the result never ends with
    terminal punctuation, so the defect is detectable by a heuristic too.
    """
    lo, hi = int(len(text) * 0.35), int(len(text) * 0.75)
    while True:
        cut = text[:rng.randint(lo, hi)].rstrip()
        if cut and cut[-1].isalnum():
            return cut


# Synonyms for one-word near duplicates: (word, replacement).  Whole words only,
# meaning-preserving so the original output is still a correct answer.
ONE_WORD_EDITS = [("Convert", "Change"), ("Calculate", "Compute"), ("Sort", "Arrange"),
                  ("passage", "text"), ("Explain", "Clarify"), ("Summarize", "Summarise"),
                  ("Reverse", "Invert"), ("number", "integer"), ("briefly", "quickly")]


def near_duplicate_variant(rec: Record, kind: str) -> Record | None:
    """Apply one small surface edit to the instruction; None when not applicable."""
    ins = rec.instruction
    if kind == "lowercase":
        new = ins.lower()
    elif kind == "whitespace":
        new = ins.replace(" ", "  ", 1) + " " if " " in ins else None
    elif kind == "punctuation":
        new = ins[:-1] if ins[-1] in ".?!" else ins + "."
    else:  # one_word
        new = None
        for word, repl in ONE_WORD_EDITS:
            if re.search(rf"\b{word}\b", ins):
                new = re.sub(rf"\b{word}\b", repl, ins, count=1)
                break
    if new is None or new == ins:
        return None
    return rec.replace(instruction=new)


@dataclass
class PoolBuild:
    """Everything ``build_pool`` computes; tests use ``reference`` as ground truth."""

    records: list[Record]
    reference: list[Record]     # the clean version of each final record
    defects: dict


def build_pool() -> PoolBuild:
    clean = build_clean_pool()
    rng = random.Random(DEFECT_SEED)
    n = len(clean)
    used: set[int] = set()

    def pick(cands: Iterable[int], k: int) -> list[int]:
        cands = [i for i in cands if i not in used]
        chosen = sorted(rng.sample(cands, k))
        used.update(chosen)
        return chosen

    # Truncate prose answers only (explanations, summaries, worked word
    # problems): cutting a bare number or a label would not look truncated.
    # Stratified so each kind of prose is represented.
    truncated = []
    for task, k in (("explanation/concept", N_TRUNCATED - 5), ("rewriting/summary", 3),
                    ("arithmetic/word_problem", 2)):
        truncated += pick((i for i in range(n) if clean[i].task == task and len(clean[i].output) >= 60), k)
    truncated.sort()
    mismatch = pick(range(n), N_MISMATCH)
    sources: list[int] = []
    for i in mismatch:
        cands = [j for j in range(n) if j not in used and clean[j].family != clean[i].family]
        j = rng.choice(cands)
        used.add(j)
        sources.append(j)
    exact_orig = pick(range(n), N_EXACT_DUP)
    kinds = ["lowercase", "whitespace", "punctuation", "one_word"] * (N_NEAR_DUP // 4)
    near_orig: list[int] = []
    near_kind: list[str] = []
    for kind in kinds:
        cands = [i for i in range(n) if i not in used and near_duplicate_variant(clean[i], kind)]
        i = rng.choice(cands)
        used.add(i)
        near_orig.append(i)
        near_kind.append(kind)

    # Apply in-place defects (these do not move any index).
    current = list(clean)
    for i in truncated:
        current[i] = clean[i].replace(output=truncate_text(rng, clean[i].output))
    for i, j in zip(mismatch, sources):
        current[i] = clean[i].replace(output=clean[j].output)

    # Schedule copies: each copy goes somewhere *after* its original.
    slots: dict[int, list[tuple[str, int, Record]]] = {}
    copies = [("exact", o, clean[o], "") for o in exact_orig] + \
             [("near", o, near_duplicate_variant(clean[o], k), k) for o, k in zip(near_orig, near_kind)]
    rng.shuffle(copies)
    for kind, o, rec, _edit in copies:
        slots.setdefault(rng.randint(o + 1, n), []).append((kind, o, rec))

    final: list[Record] = []
    reference: list[Record] = []
    where: dict[int, int] = {}          # clean index -> final index
    pending: list[tuple[str, int, int]] = []   # (kind, clean original, final index of copy)
    for pos in range(n + 1):
        for kind, o, rec in slots.get(pos, []):
            pending.append((kind, o, len(final)))
            final.append(rec)
            reference.append(clean[o])
        if pos < n:
            where[pos] = len(final)
            final.append(current[pos])
            reference.append(clean[pos])

    edit_of = dict(zip(near_orig, near_kind))
    exact_pairs = sorted([where[o], d] for k, o, d in pending if k == "exact")
    near_pairs = sorted([where[o], d] for k, o, d in pending if k == "near")
    near_edits = [edit_of[next(o for k, o, d in pending if d == dup)] for _, dup in near_pairs]
    families = [r.family for r in final]
    n_bad = N_MISMATCH + N_TRUNCATED + N_EXACT_DUP + N_NEAR_DUP
    fam_counts = {f: families.count(f) for f in FAMILY_COUNTS}
    defects = {
        "description": "Ground truth for examples/pool.jsonl. Indices are 0-based record (line) indices. "
                       "exact_duplicate / near_duplicate pairs are [original, duplicate] with original < duplicate. "
                       "mismatch_source pairs are [record, donor]: the record's output was copied from the donor, "
                       "a record of a different family. clean_count counts records that are not a mismatch, "
                       "not truncated and not a duplicate copy (originals of duplicates are clean).",
        "generator": "examples/make_examples.py",
        "record_count": len(final),
        "clean_count": len(final) - n_bad,
        "mismatch": [where[i] for i in mismatch],
        "mismatch_source": [[where[i], where[j]] for i, j in zip(mismatch, sources)],
        "truncated": [where[i] for i in truncated],
        "exact_duplicate": exact_pairs,
        "near_duplicate": near_pairs,
        "near_duplicate_edit": near_edits,
        "family_counts": fam_counts,
        "families": families,
        "tasks": [r.task for r in final],
    }
    return PoolBuild(final, reference, defects)


def validate_pool(pb: PoolBuild) -> None:
    """Fail loudly if the pool contains any duplicate that is not documented."""
    d = pb.defects
    recs = pb.records
    assert all(r.output for r in recs), "empty output in pool"
    listed_exact = {tuple(p) for p in d["exact_duplicate"]}
    listed_near = {tuple(p) for p in d["near_duplicate"]}
    toks = [record_tokens(r) for r in recs]
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(toks):
        by_len.setdefault(len(t), []).append(i)
    found_exact, found_near = set(), set()
    for idxs in by_len.values():
        for a_pos, a in enumerate(idxs):
            for b in idxs[a_pos + 1:]:
                if within_one_substitution(toks[a], toks[b]):
                    same = (recs[a].instruction, recs[a].input, recs[a].output) == \
                           (recs[b].instruction, recs[b].input, recs[b].output)
                    (found_exact if same else found_near).add((a, b))
    assert found_exact == listed_exact, (found_exact ^ listed_exact)
    assert found_near == listed_near, [(recs[a], recs[b]) for a, b in found_near ^ listed_near]
    inputs = sum(1 for r in recs if r.input)
    assert 0.28 <= inputs / len(recs) <= 0.4, inputs / len(recs)


# --------------------------------------------------------------------------
# Other artefacts
# --------------------------------------------------------------------------

def build_target(pool: list[Record]) -> list[Record]:
    """30 arithmetic word problems whose problem text never occurs in the pool."""
    rng = random.Random(TARGET_SEED)
    reg = Registry()
    for r in pool:          # pool problems count as already taken
        reg.add(r)
    seen = {normalise(r.input or r.instruction) for r in pool}

    def make() -> Record:
        while True:
            rec = task_word_problem(rng)
            if normalise(rec.input or rec.instruction) not in seen:
                return rec
    return collect(reg, 30, make)


def user_text(rec: Record) -> str:
    return f"{rec.instruction}\n\n{rec.input}" if rec.input else rec.instruction


SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a patient tutor. Keep answers short and correct.",
                  "You are a concise assistant. Answer in one or two sentences."]
FOLLOW_UPS = ["Thanks! Another one: ", "Great. Now this: ", "OK, next question. "]


def build_chat() -> tuple[list[dict], dict]:
    """40 chat records; every third one is multi-turn, every fourth has a system prompt."""
    rng = random.Random(CHAT_SEED)
    reg = Registry()
    per_family = {f: FAMILIES[f](rng, reg, 10) for f in FAMILY_COUNTS}
    for recs in per_family.values():
        rng.shuffle(recs)
    names = list(FAMILY_COUNTS)
    chats, fams, multi, system = [], [], [], []
    for k in range(40):
        fam = names[k % len(names)]
        msgs = []
        if k % 4 == 0:
            msgs.append({"role": "system", "content": SYSTEM_PROMPTS[(k // 4) % len(SYSTEM_PROMPTS)]})
            system.append(k)
        first = per_family[fam].pop()
        msgs += [{"role": "user", "content": user_text(first)}, {"role": "assistant", "content": first.output}]
        if k % 3 == 1:
            second = per_family[fam].pop()
            msgs += [{"role": "user", "content": rng.choice(FOLLOW_UPS) + user_text(second)},
                     {"role": "assistant", "content": second.output}]
            multi.append(k)
        chats.append({"messages": msgs})
        fams.append(fam)
    return chats, {"file": "chat_pool.jsonl", "record_count": len(chats), "multi_turn": multi,
                   "with_system": system, "families": fams}


def build_bad() -> tuple[bytes, dict]:
    """pool_bad.jsonl as raw bytes: 20 valid lines plus 4 broken ones."""
    rng = random.Random(BAD_SEED)
    reg = Registry()
    valid: list[Record] = []
    for f in ("arithmetic", "unit_conversion", "facts", "string_edit", "list_ops"):
        valid += FAMILIES[f](rng, reg, 4)
    rng.shuffle(valid)
    extra = FAMILIES["explanation"](rng, reg, 3)
    lines: list[bytes] = []
    it = iter(valid)
    for lineno in range(1, BAD_TOTAL_LINES + 1):
        if lineno == BAD_LINES["malformed_json"]:
            lines.append(extra[0].to_json()[:-1].encode("utf-8"))        # closing brace missing
        elif lineno == BAD_LINES["empty_output"]:
            lines.append(extra[1].replace(output="").to_json().encode("utf-8"))
        elif lineno == BAD_LINES["missing_output"]:
            lines.append(json.dumps({"instruction": extra[2].instruction, "input": extra[2].input},
                                    ensure_ascii=False).encode("utf-8"))
        elif lineno == BAD_LINES["invalid_utf8"]:
            # Latin-1 bytes: the "á" becomes a lone 0xE1 byte, which is not valid UTF-8.
            rec = {"instruction": "What is the capital of Colombia?", "input": "",
                   "output": "The capital of Colombia is Bogotá."}
            lines.append(json.dumps(rec, ensure_ascii=False).encode("latin-1"))
        else:
            lines.append(next(it).to_json().encode("utf-8"))
    info = {"file": "pool_bad.jsonl", "line_count": BAD_TOTAL_LINES, **BAD_LINES,
            "valid_lines": [k for k in range(1, BAD_TOTAL_LINES + 1) if k not in BAD_LINES.values()]}
    return b"".join(line + b"\n" for line in lines), info


def dumps_defects(d: dict) -> str:
    """One top-level key per line, values compact: readable and diff-friendly."""
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in d.items())
    return "{\n" + body + "\n}\n"


def jsonl(rows: Iterable[str]) -> str:
    return "".join(row + "\n" for row in rows)


def write_all(out: Path) -> dict[str, int]:
    """Generate every artefact into ``out``; return a per-file record count."""
    out.mkdir(parents=True, exist_ok=True)
    pb = build_pool()
    validate_pool(pb)
    target = build_target(pb.records)
    chats, chat_info = build_chat()
    bad_bytes, bad_info = build_bad()
    defects = dict(pb.defects)
    defects["pool_bad"] = bad_info
    defects["chat_pool"] = chat_info
    defects["target"] = {"file": "target_arithmetic.jsonl", "record_count": len(target)}

    def write(name: str, text: str) -> None:
        # newline="" so "\n" is written as-is on every platform.
        with open(out / name, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    write("pool.jsonl", jsonl(r.to_json() for r in pb.records))
    write("target_arithmetic.jsonl", jsonl(r.to_json() for r in target))
    write("chat_pool.jsonl", jsonl(json.dumps(c, ensure_ascii=False) for c in chats))
    write("defects.json", dumps_defects(defects))
    with open(out / "pool_bad.jsonl", "wb") as fh:
        fh.write(bad_bytes)
    return {"pool.jsonl": len(pb.records), "target_arithmetic.jsonl": len(target),
            "chat_pool.jsonl": len(chats), "pool_bad.jsonl": BAD_TOTAL_LINES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: the folder of this script)")
    args = ap.parse_args(argv)
    counts = write_all(args.out)
    for name, k in counts.items():
        print(f"{args.out / name}: {k} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Recipe text -> syntax tree, with every syntax error reported at once.

A recipe is split into statements first (a statement starts at column 1 with a
name or ``select``; every other non-blank line continues the statement above).
Each statement is then parsed on its own by the Lark grammar in
``grammars/datasel.lark``, so a missing ``)`` in one statement is reported and
the others are still parsed and checked.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from fractions import Fraction

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from datasel.dsl import ast
from datasel.dsl.depth import too_deep_statement, tree_too_deep
from datasel.dsl.diagnostics import Diagnostic, Source, Span

# Words for Lark's terminal names, so that errors read "expected ')'" and not "RPAR".
TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "PERCENT": "a percentage",
    "STRING": "a string",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "VBAR": "'|'",
    "AMPERSAND": "'&'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "COMPARE": "a comparison",
    "ARROW": "'->'",
    "SELECT": "'select'",
    "TRUE": "true",
    "FALSE": "false",
    "NONE": "none",
    "OF": "'of'",
    "NOT": "'not'",
    "IN": "'in'",
    "POOL": "'pool'",
    "$END": "the end of the statement",
}
_EXPRESSION_STARTS = {"NAME", "NUMBER", "STRING", "LPAR"}
_OPERATORS = {"VBAR", "AMPERSAND", "PLUS", "MINUS", "STAR", "SLASH", "COMPARE"}
_OPENERS = {"(": ")", "[": "]"}


@functools.lru_cache(maxsize=1)
def grammar() -> Lark:
    """The compiled LALR parser for one statement (built once per process)."""
    text = importlib.resources.files("datasel.grammars").joinpath("datasel.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", start=["start", "expr"], propagate_positions=True, maybe_placeholders=False)


_STATEMENT_START = re.compile(r"[A-Za-z_]")


def split_statements(text: str) -> list[tuple[int, int]]:
    """Character ranges of the statements in ``text`` (see the module docstring)."""
    ranges: list[tuple[int, int]] = []
    start = None
    offset = 0
    for line in text.split("\n"):
        line += "\n"  # lines end at "\n" only, as Source and Lark count them (not at U+2028, form feeds ...)
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            if start is None or _STATEMENT_START.match(line):
                if start is not None:
                    ranges.append((start, offset))
                start = offset
        offset += len(line)
    if start is not None:
        ranges.append((start, len(text)))
    return ranges


def parse(source: Source) -> tuple[ast.Program, list[Diagnostic]]:
    """Parse every statement of ``source``; return the program and all syntax errors."""
    program = ast.Program()
    errors: list[Diagnostic] = []
    line, counted = 1, 0
    for start, end in split_statements(source.text):
        # Each statement is parsed alone (linear in the recipe's length); a statement starts at
        # column 1, so only its line and character offsets need shifting to the whole file's.
        line += source.text.count("\n", counted, start)
        counted = start
        text = source.text[start:end]
        try:
            tree = grammar().parse(text, start="start")
        except UnexpectedInput as exc:
            errors.append(_syntax_error(source, text, start, end, exc, line - 1))
            name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)", text)
            if name and name.group(1) != "select":
                program.broken_names.add(name.group(1))
            continue
        if tree_too_deep(tree):
            errors.append(too_deep_statement(_span_at(source, start, start + 1)))
            if tree.data == "binding":
                program.broken_names.add(str(tree.children[0]))
            continue
        builder = _Builder(source, start, line - 1)
        builder.statement(tree, program)
        errors.extend(builder.errors)
    return program, errors


def parse_expression(source: Source) -> tuple[ast.Expr | None, list[Diagnostic]]:
    """Parse a lone expression (the right-hand side of ``--set NAME=EXPR``)."""
    if not source.text.strip():
        return None, [Diagnostic("empty expression", Span(source, 1, 1, 0, 0))]
    try:
        tree = grammar().parse(source.text, start="expr")
    except UnexpectedInput as exc:
        return None, [_syntax_error(source, source.text, 0, len(source.text), exc)]
    if tree_too_deep(tree):
        return None, [too_deep_statement(_span_at(source, 0, 1))]
    builder = _Builder(source)
    expr = builder.expr(tree)
    return (None, builder.errors) if builder.errors else (expr, [])


def _describe_expected(expected: set[str]) -> str:
    expected = {e for e in expected if not e.startswith("__")}
    words: list[str] = []
    if _EXPRESSION_STARTS <= expected:
        words.append("an expression")
        expected -= _EXPRESSION_STARTS | {"LSQB", "MINUS", "PERCENT", "TRUE", "FALSE", "NONE", "NOT"}
    has_operators = bool(expected & _OPERATORS) and (len(expected - _OPERATORS) > 0 or len(expected) > 2)
    if has_operators:
        expected -= _OPERATORS
    for name in sorted(expected, key=lambda e: (e == "$END", TERMINAL_WORDS.get(e, e))):
        words.append(TERMINAL_WORDS.get(name, f"'{name.lower()}'"))
    if has_operators:
        words.append("an operator")
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of statement"
    word = TERMINAL_WORDS.get(token.type)
    if token.type in ("NAME", "NUMBER", "PERCENT", "STRING"):
        return f"{word[2:] if word.startswith('a ') else word} {token.value}"
    return f"'{token.value}'"


def _strip_comments(text: str) -> str:
    """``text`` with ``#`` comments removed (a ``#`` inside a string is kept)."""
    out = []
    in_string = False
    i = 0
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif ch in '"\n':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _open_brackets(text: str) -> list[str]:
    """The brackets still open at the end of ``text`` (strings and comments skipped)."""
    stack: list[str] = []
    for ch in _strip_strings(_strip_comments(text)):
        if ch in _OPENERS:
            stack.append(ch)
        elif ch in ")]" and stack:
            stack.pop()
    return stack


def _compares_before(text: str) -> str | None:
    """The comparison operator ``text`` (a statement up to a comparison) already holds at the same bracket depth."""
    depth = 0
    found: list[str | None] = [None]
    clean = _strip_strings(_strip_comments(text))
    i = 0
    while i < len(clean):
        ch = clean[i]
        if ch in "([":
            depth += 1
            found.append(None)
        elif ch in ")]" and depth:
            depth -= 1
            found.pop()
        elif ch in "<>=!" and clean[i:i + 2] != "->" and (ch != "=" or clean[i:i + 2] == "=="):
            two = clean[i:i + 2]
            if two in ("==", "!=", "<=", ">="):
                found[-1] = two
                i += 2
                continue
            if ch in "<>":
                found[-1] = ch
        elif ch in "|&,":
            found[-1] = None  # a new operand of a looser operator
        i += 1
    return found[-1]


def _strip_strings(text: str) -> str:
    return re.sub(r'"([^"\\\n]|\\.)*"?', '""', text)


def _unclosed_bracket(source: Source, start: int, end: int) -> Span | None:
    """The innermost bracket opened in ``[start, end)`` and never closed."""
    stack: list[int] = []
    text = source.text
    i = start
    while i < end:
        ch = text[i]
        if ch == "#":
            nl = text.find("\n", i, end)
            i = end if nl == -1 else nl
            continue
        if ch == '"':
            i += 1
            while i < end and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
        elif ch in _OPENERS:
            stack.append(i)
        elif ch in ")]" and stack:
            stack.pop()
        i += 1
    if not stack:
        return None
    pos = stack[-1]
    return _span_at(source, pos, pos + 1)


def _span_at(source: Source, start: int, end: int) -> Span:
    line = source.text.count("\n", 0, start) + 1
    column = start - (source.text.rfind("\n", 0, start) + 1) + 1
    return Span(source, line, column, start, end)


def _syntax_error(source: Source, text: str, start: int, end: int, exc: UnexpectedInput,
                  line_offset: int = 0) -> Diagnostic:
    """One positioned message for a statement ``text`` (at ``start`` of ``source``, after ``line_offset`` lines)."""
    at_end = isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    )
    if at_end:
        last = start + len(text.rstrip())
        # Point just past the last character of the statement (skipping a trailing comment).
        stmt = source.text[start:end]
        code_end = start + len(_strip_comments(stmt).rstrip())
        pos = max(start, min(last, code_end))
        span = _span_at(source, max(start, pos - 1), pos) if pos > start else _span_at(source, start, start + 1)
        span = Span(source, span.line, span.column + 1 if pos > start else span.column, pos, pos + 1)
        message = "unexpected end of statement"
        expected = set(getattr(exc, "expected", None) or ())
    elif isinstance(exc, UnexpectedToken):
        token = exc.token
        span = Span(source, token.line + line_offset, token.column, token.start_pos + start, token.end_pos + start)
        message = f"unexpected {_describe_token(token)}"
        expected = set(exc.expected or ())
        line_text = source.line(span.line)
        first = _compares_before(text[:token.start_pos]) if token.type == "COMPARE" else None
        if first:
            message = (f"comparisons do not chain: 'a {first} b {token.value} c' is not allowed; "
                       f"combine two comparisons with '&', e.g. a {first} b & b {token.value} c")
            return Diagnostic(message, span)
        if token.column > 1 and not line_text[: token.column - 1].strip():
            message += " (a statement starts at column 1; indented lines continue the statement above)"
    elif isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream]
        pos = start + exc.pos_in_stream
        span = _span_at(source, pos, pos + 1)
        message = f"unexpected character {ch!r}"
        if ch == "'":
            message += " (strings use double quotes)"
        elif ch == '"':
            message = "this string is never closed (strings end with \" on the same line)"
        expected = set(exc.allowed or ()) if ch != '"' else set()
    else:  # pragma: no cover - Lark raises only the three above
        span = _span_at(source, start, start + 1)
        message = str(exc)
        expected = set()
    open_now = _open_brackets(source.text[start:span.start])
    if not open_now:
        expected -= {"RPAR", "RSQB", "COMMA"}
    elif open_now[-1] == "(":
        expected -= {"RSQB"}
    else:
        expected -= {"RPAR"}
    described = _describe_expected(expected)
    if described:
        message += f"; expected {described}"
    diagnostic = Diagnostic(message, span)
    opener = _unclosed_bracket(source, start, end) if at_end or "')'" in described or "']'" in described else None
    if opener is not None and (at_end or span.line != opener.line or True):
        closer = _OPENERS[source.text[opener.start]]
        diagnostic.notes.append((f"'{source.text[opener.start]}' opened here is never closed with '{closer}'", opener))
    return diagnostic


class _Builder:
    """Turns one statement's Lark tree into :mod:`datasel.dsl.ast` nodes."""

    def __init__(self, source: Source, start: int = 0, line_offset: int = 0):
        self.source = source
        self.errors: list[Diagnostic] = []  # problems the grammar cannot see (numbers too large)
        self.start = start  # where the statement begins in the source (positions are relative to it)
        self.line_offset = line_offset

    def span(self, item) -> Span:
        if isinstance(item, Token):
            return Span(self.source, item.line + self.line_offset, item.column, item.start_pos + self.start,
                        item.end_pos + self.start)
        meta = item.meta
        return Span(self.source, meta.line + self.line_offset, meta.column, meta.start_pos + self.start,
                    meta.end_pos + self.start)

    def statement(self, tree: Tree, program: ast.Program) -> None:
        if tree.data == "binding":
            name_tok, expr = tree.children
            program.bindings.append(
                ast.Binding(str(name_tok), self.expr(expr), self.span(name_tok), self.source.name)
            )
        else:
            (expr,) = tree.children
            program.selects.append(ast.Select(self.expr(expr), self.span(tree)))

    def expr(self, item) -> ast.Expr:
        if isinstance(item, Token):  # a lone terminal only appears wrapped by a rule
            raise AssertionError(f"unexpected token {item!r}")
        rule = item.data
        span = self.span(item)
        kids = item.children
        if rule == "number":
            try:
                return ast.Number(span, _fraction(str(kids[0])))
            except NumberError as exc:
                self.errors.append(Diagnostic(str(exc), span))
                return ast.Number(span, Fraction(0))
        if rule in ("percent", "percent_of_pool"):
            try:
                return ast.Percent(span, _fraction(str(kids[0])[:-1]) / 100, rule == "percent_of_pool")
            except NumberError as exc:
                self.errors.append(Diagnostic(str(exc), span))
                return ast.Percent(span, Fraction(0), rule == "percent_of_pool")
        if rule == "string":
            return ast.String(span, _unescape(str(kids[0])))
        if rule in ("true", "false"):
            return ast.Bool(span, rule == "true")
        if rule == "none":
            return ast.NoneLit(span)
        if rule == "name":
            return ast.Name(span, str(kids[0]))
        if rule == "call":
            call = ast.Call(span, str(kids[0]), self.span(kids[0]))
            if len(kids) > 1:
                for arg in kids[1].children:
                    if isinstance(arg, Tree) and arg.data == "kwarg":
                        call.kwargs.append(ast.Keyword(str(arg.children[0]), self.expr(arg.children[1]), self.span(arg.children[0])))
                    elif isinstance(arg, Tree) and arg.data == "kwlambda":
                        name, param, _, body = arg.children
                        value = ast.Lambda(self.span(arg), str(param), self.span(param), self.expr(body))
                        call.kwargs.append(ast.Keyword(str(name), value, self.span(name)))
                    else:
                        if isinstance(arg, Tree) and arg.data == "lambda":
                            param, _, body = arg.children
                            value = ast.Lambda(self.span(arg), str(param), self.span(param), self.expr(body))
                        else:
                            value = self.expr(arg)
                        if call.kwargs and call.positional_after_keyword is None:
                            call.positional_after_keyword = value.span
                        call.args.append(value)
            return call
        if rule == "list":
            items = [self.expr(c) for c in kids[0].children] if kids else []
            return ast.ListLit(span, items)
        if rule == "neg":
            return ast.Neg(span, self.expr(kids[1]))
        if rule == "negate":
            return ast.Not(span, self.expr(kids[-1]))
        if rule in ("member", "not_member"):
            left, right = kids[0], kids[-1]
            op = "in" if rule == "member" else "not in"
            return ast.BinOp(span, op, self.expr(left), self.expr(right), self._op_span(left, right, op.split()[0]))
        if rule in ("pipe", "intersect"):
            left, right = kids
            op = "|" if rule == "pipe" else "&"
            return ast.BinOp(span, op, self.expr(left), self.expr(right), self._op_span(left, right, op))
        if rule in ("add", "sub", "mul", "div", "compare"):
            left, op_tok, right = kids
            return ast.BinOp(span, str(op_tok), self.expr(left), self.expr(right), self.span(op_tok))
        raise AssertionError(f"unhandled rule {rule}")

    def _op_span(self, left, right, op: str) -> Span:
        # Anonymous operator tokens are filtered out of the tree; find the text between operands.
        lo = self.span(left).end
        hi = self.span(right).start
        pos = self.source.text.find(op, lo, hi)
        pos = lo if pos == -1 else pos
        return _span_at(self.source, pos, pos + 1)


#: Numbers in a recipe are at most this large in magnitude (whole numbers are exact below 2**53).
MAX_NUMBER = 10**15
_NUMBER_PARTS = re.compile(r"([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")


class NumberError(ValueError):
    """A number literal datasel cannot hold exactly."""


def _fraction(text: str) -> Fraction:
    """The exact value of a number literal; refuses magnitudes beyond :data:`MAX_NUMBER` without computing them."""
    match = _NUMBER_PARTS.fullmatch(text)
    if match is not None:
        whole, frac, exp = match.groups()
        exponent = 0
        if exp:
            exponent = int(exp) if len(exp.lstrip("+-")) <= 6 else (-(10**7) if exp.startswith("-") else 10**7)
        digits = len(whole.lstrip("0")) or 1
        if digits + max(exponent, 0) > 16 or exponent >= 10**7:
            raise NumberError(f"number too large: {_shown(text)} (numbers are limited to ±{MAX_NUMBER:.0e})")
        if exponent < -100 or len(whole) + len(frac or "") > 100:
            raise NumberError(f"number too small or with too many digits: {_shown(text)} "
                              "(at most 100 digits, exponents down to e-100)")
    value = Fraction(text)
    if abs(value) > MAX_NUMBER:
        raise NumberError(f"number too large: {_shown(text)} (numbers are limited to ±{MAX_NUMBER:.0e})")
    return value


def _shown(text: str) -> str:
    return text if len(text) <= 24 else text[:24] + "…"


def _unescape(token: str) -> str:
    body = token[1:-1]
    out = []
    i = 0
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], "\\" + body[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)

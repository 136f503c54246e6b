"""Source positions and compiler messages in the ``file:line:col: error: ...`` form."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """The text of one recipe (a file, the prelude, or a ``--set`` expression)."""

    name: str
    text: str

    def __post_init__(self):
        # One line ending everywhere ("\r\n" and a lone "\r" become "\n"), so the parser's
        # line numbers, the spans' offsets and the lines shown in messages all agree.
        if "\r" in self.text:
            object.__setattr__(self, "text", self.text.replace("\r\n", "\n").replace("\r", "\n"))

    def line(self, number: int) -> str:
        # Lines end at "\n" only, as the parser counts them (splitlines() would also split at U+2028,
        # U+0085, form feeds ..., and show the wrong line).
        lines = self.text.split("\n")
        return lines[number - 1] if 0 < number <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A region of a source: 1-based line/column of its start, character offsets."""

    source: Source = field(repr=False, compare=False)
    line: int
    column: int
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"


@dataclass
class Diagnostic:
    """One message about a recipe, with the source line and a caret under the problem."""

    message: str
    span: Span | None = None
    severity: str = "error"
    notes: list[tuple[str, Span | None]] = field(default_factory=list)

    def format(self) -> str:
        parts = [_format_one(self.severity, self.message, self.span)]
        for note, span in self.notes:
            parts.append(_format_one("note", note, span))
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format()


def _format_one(severity: str, message: str, span: Span | None) -> str:
    if span is None:
        return f"{severity}: {message}"
    head = f"{span.location()}: {severity}: {message}"
    line = span.source.line(span.line)
    if not line:
        return head
    # Underline the whole span when it stays on one line, else point at its start.
    first_line_end = span.source.text.find("\n", span.start)
    single_line = first_line_end == -1 or span.end <= first_line_end
    width = max(1, span.end - span.start) if single_line else 1
    width = min(width, max(1, len(line) - span.column + 1))
    # Keep tabs in the padding so the caret lines up under a tab-indented line.
    pad = "".join("\t" if c == "\t" else " " for c in line[: span.column - 1])
    caret = pad + "^" + "~" * (width - 1)
    return f"{head}\n    {_visible(line)}\n    {caret}"


def _visible(line: str) -> str:
    """The line with control and separator characters (form feed, U+2028, ...) shown as one
    placeholder each, so the terminal neither breaks the line nor moves the caret."""
    return "".join("\ufffd" if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in line)


class RecipeError(Exception):
    """A recipe (or a ``--set`` expression) has one or more static errors."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(
            diagnostics,
            key=lambda d: (d.span is None, d.span.source.name if d.span else "", d.span.start if d.span else 0),
        )
        super().__init__(self.format())

    def format(self) -> str:
        count = len(self.diagnostics)
        body = "\n".join(d.format() for d in self.diagnostics)
        if count > 1:
            body += f"\n{count} errors"
        return body

"""Recipe text -> checked program -> plan: the front half of datasel."""

from __future__ import annotations

import difflib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from datasel.dsl import ast
from datasel.dsl.checker import Checked, check
from datasel.dsl.depth import deep_recursion
from datasel.dsl.diagnostics import Diagnostic, RecipeError, Source
from datasel.dsl.parser import parse, parse_expression
from datasel.dsl.plan import Plan, build_plan

PRELUDE_NAME = "prelude.sel"


def prelude_source() -> Source:
    """The standard prelude shipped with the package."""
    text = importlib.resources.files("datasel.recipes").joinpath(PRELUDE_NAME).read_text(encoding="utf-8")
    return Source(f"<prelude>/{PRELUDE_NAME}", text)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (without ``.sel``), prelude excluded."""
    root = importlib.resources.files("datasel.recipes")
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".sel") and p.name != PRELUDE_NAME)


def recipe_source(path_or_text: str | Path, *, name: str | None = None) -> Source:
    """A recipe from a file path, or from text when ``name`` is given.

    A bare name such as ``superfiltering`` (or ``superfiltering.sel``) that is
    not a file finds the recipe shipped with the package.
    """
    if name is not None:
        return Source(name, str(path_or_text).removeprefix("\ufeff"))
    path = Path(path_or_text)
    if not path.exists():
        shipped = importlib.resources.files("datasel.recipes").joinpath(
            path.name if path.suffix == ".sel" else path.name + ".sel"
        )
        if shipped.is_file() and path.name != PRELUDE_NAME and len(path.parts) == 1:
            return Source(f"<recipes>/{shipped.name}", shipped.read_text(encoding="utf-8-sig"))
        hint = ""
        if len(path.parts) == 1:
            names = shipped_recipes()
            close = difflib.get_close_matches(path.stem, names, n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else "") + f" (shipped recipes: {', '.join(names)})"
        raise FileNotFoundError(f"{path}: no such recipe file{hint}")
    try:
        return Source(str(path), path.read_text(encoding="utf-8-sig"))  # a BOM is not part of the recipe
    except UnicodeDecodeError:
        raise RecipeError([Diagnostic(f"{path}: recipe is not valid UTF-8 text")]) from None


def parse_sets(sets: list[str] | dict[str, str] | None) -> tuple[dict[str, ast.Expr], list[Diagnostic]]:
    """Parse ``--set NAME=EXPR`` overrides."""
    overrides: dict[str, ast.Expr] = {}
    errors: list[Diagnostic] = []
    items: list[tuple[str, str]] = []
    if isinstance(sets, dict):
        items = list(sets.items())
    else:
        for text in sets or []:
            name, sep, expr = text.partition("=")
            name = name.strip()
            if not sep or not name.isidentifier():
                errors.append(Diagnostic(f"--set expects NAME=EXPRESSION, got {text!r}"))
                continue
            items.append((name, expr))
    seen: set[str] = set()
    for name, expr_text in items:
        if name in seen:
            errors.append(Diagnostic(f"--set {name} is given twice; give each name once"))
            continue
        seen.add(name)
        expr, errs = parse_expression(Source(f"--set {name}", expr_text))
        if errs and '"' not in expr_text:
            hint = _quoting_hint(name, expr_text)
            for d in errs:
                d.notes.append((hint, None))
        errors.extend(errs)
        if expr is not None:
            overrides[name] = expr
    return overrides, errors


_UNQUOTED_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\(\s*([^\"(),=]+?)\s*([,)].*)$", re.S)


def _quoting_hint(name: str, text: str) -> str:
    """How to write a string in ``--set``: double quotes inside, single quotes around for the shell."""
    call = _UNQUOTED_CALL.match(text)
    example = f'{call.group(1)}("{call.group(2)}"{call.group(3)}' if call else f'"{text.strip()}"'
    return (f"strings are written in double quotes, and the shell needs the whole expression quoted: "
            f"--set {name}='{example}'")


@dataclass
class Compiled:
    """A checked recipe and its plan."""

    source: Source
    checked: Checked
    plan: Plan


def check_recipe(source: Source, sets=None, *, expression: str | None = None) -> Checked:
    """Parse and check ``source`` over the prelude; raise :class:`RecipeError` listing every error.

    With ``expression``, that expression (for ``datasel eval``) is checked in
    the recipe's scope instead of the recipe's ``select``.
    """
    with deep_recursion():
        return _check_recipe(source, sets, expression)


def _check_recipe(source: Source, sets, expression: str | None) -> Checked:
    prelude = prelude_source()
    prelude_program, errors = parse(prelude)
    program, recipe_errors = parse(source)
    errors += recipe_errors
    overrides, set_errors = parse_sets(sets)
    errors += set_errors
    select = None
    if expression is not None:
        select, expr_errors = parse_expression(Source("<expression>", expression))
        errors += expr_errors
        if select is None and not expr_errors:
            errors.append(Diagnostic("empty expression"))
    if expression is not None and select is None:
        raise RecipeError(errors)
    return check([(prelude, prelude_program), (source, program)], overrides, errors, select=select)


def compile_recipe(source: Source, sets=None, fingerprints: dict[str, str] | None = None,
                   *, expression: str | None = None) -> Compiled:
    """Check and plan a recipe (see :func:`check_recipe`)."""
    with deep_recursion():
        checked = check_recipe(source, sets, expression=expression)
        return Compiled(source, checked, build_plan(checked, fingerprints))

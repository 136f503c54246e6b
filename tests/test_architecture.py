"""The layering rules of docs/architecture.md, checked on the source: the compiler and the engine know no
operator by name, and the operator library does not import them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from datasel.ops import registry

ROOT = Path(__file__).resolve().parents[1]
# The evaluation core.  (The parser names grammar rules, the data layer file containers, `measure` its
# metrics and the CLI gives examples in its help: words that happen to be op names, not dispatch on ops.)
CORE = ["dsl/accounting.py", "dsl/cache.py", "dsl/checker.py", "dsl/compiler.py", "dsl/diagnostics.py",
        "dsl/engine.py", "dsl/estimate.py", "dsl/explain.py", "dsl/macros.py", "dsl/plan.py", "dsl/progress.py",
        "dsl/reference.py", "dsl/runner.py", "dsl/ast.py"]


def code_strings(path: Path) -> list[tuple[int, str]]:
    """String literals of a module that are code: not docstrings, not dictionary keys, not f-string text."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        elif isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


@pytest.mark.parametrize("module", CORE)
def test_the_core_names_no_operator(module):
    names = set(registry.registry())
    found = [(line, text) for line, text in code_strings(ROOT / module) if text in names]
    assert found == [], f"{module} names operators: {found}"


def test_the_op_library_does_not_import_the_compiler_or_the_engine():
    offenders = []
    for path in sorted((ROOT / "ops").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            offenders += [(str(path.relative_to(ROOT)), m) for m in modules if m.startswith("datasel.dsl")]
    assert offenders == []


def test_every_builtin_is_declared_and_listed():
    from datasel.dsl.reference import list_ops

    listing = list_ops()
    for name in ("union", "intersect", "difference", "compare", "per_group", "restrict", "arith", "neg",
                 "dataset", "const", "var", "iterate"):
        assert registry.get(name) is not None, name
        assert f"  {name}(" in listing, name

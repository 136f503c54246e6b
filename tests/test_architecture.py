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


def test_the_worked_example_of_adding_an_op_works_as_documented(tmp_path, monkeypatch):
    """docs/architecture.md's example: the declaration as printed there, and the claims made about it."""
    import re

    import numpy as np

    from datasel.dsl.compiler import compile_recipe, recipe_source
    from datasel.dsl.diagnostics import RecipeError
    from datasel.dsl.reference import describe_op
    from datasel.dsl.runner import evaluate, run
    from datasel.ops.contract import Kind, Param
    from datasel.ops.registry import op
    from datasel.ops.scores import TEXT_FIELDS, record_text

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(@op\(\"digits\".*?)```", text, re.S).group(1)
    monkeypatch.setenv("DATASEL_CACHE", str(tmp_path / "cache"))
    namespace = dict(op=op, Param=Param, Kind=Kind, np=np, TEXT_FIELDS=TEXT_FIELDS, record_text=record_text,
                     __name__="datasel.ops.example")
    try:
        exec(code, namespace)
        pool = tmp_path / "pool.jsonl"
        rows = [{"instruction": "a", "input": "", "output": "12 apples, 3 pears"},
                {"instruction": "b", "input": "", "output": "none"},
                {"instruction": "c", "input": "", "output": "2024-01-31"}]
        pool.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
        values = evaluate("digits", pool, quiet=True).values
        assert values.tolist() == [3.0, 0.0, 8.0]
        assert 'digits(field: String = "output", data: Dataset = "pool") -> Scores' in describe_op("digits")
        with pytest.raises(RecipeError, match="did you mean 'output'"):
            compile_recipe(recipe_source('select digits(field="outptu") > 3', name="t.sel"))
        out = run("t.sel", pool, recipe_text="select digits > 2", quiet=True)
        assert out.selected.tolist() == [0, 2]
        assert out.manifest["funnel"][1]["dropped"] == {"digits > 2 is false": 1}
    finally:
        registry._REGISTRY.pop("digits", None)

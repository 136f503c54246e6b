"""The docs stay true to the code: generated reference in sync, every shipped recipe compiles and is listed."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.reference import markdown_reference

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.sel") if p.stem != "prelude")


def test_ops_reference_is_regenerated():
    committed = (ROOT / "docs" / "ops.md").read_text(encoding="utf-8")
    assert committed.strip() == markdown_reference().strip(), (
        "docs/ops.md is stale: run `datasel ops --markdown > docs/ops.md`"
    )


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_compiles_and_is_documented(name):
    compiled = compile_recipe(recipe_source(name))
    assert compiled.plan.nodes[compiled.plan.output].kind.value == "Selector"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"\n| `{name}` |" in readme, f"recipe {name} has no row in the README's methods table"


def test_recipes_are_installed_as_package_data():
    shipped = {p.name for p in importlib.resources.files("datasel.recipes").iterdir() if p.name.endswith(".sel")}
    assert "prelude.sel" in shipped
    assert {f"{n}.sel" for n in RECIPES} <= shipped

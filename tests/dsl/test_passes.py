"""The compiler's passes, each on its own: macro expansion (AST -> AST) and common-subexpression
elimination (plan -> plan), plus what the op declarations give the checker (columns, code versions)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from datasel.dsl import ast
from datasel.dsl.checker import check
from datasel.dsl.compiler import compile_recipe, prelude_source, recipe_source
from datasel.dsl.diagnostics import RecipeError, Source
from datasel.dsl.macros import expand_macros
from datasel.dsl.parser import parse
from datasel.dsl.plan import Planner, eliminate_common_subexpressions
from datasel.ops import registry
from datasel.ops.registry import code_fingerprint


def shape(e: ast.Expr) -> str:
    if isinstance(e, ast.Call):
        args = [shape(a) for a in e.args] + [f"{k.name}={shape(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, ast.BinOp):
        return f"({shape(e.left)} {e.op} {shape(e.right)})"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.String):
        return repr(e.value)
    if isinstance(e, ast.Number):
        return str(e.value)
    if isinstance(e, ast.Bool):
        return str(e.value).lower()
    if isinstance(e, ast.NoneLit):
        return "none"
    raise AssertionError(type(e).__name__)


def expanded_select(text: str) -> ast.Expr:
    """The select expression of ``text`` after the macro pass, through the public check()."""
    program, errors = parse(Source("t.sel", text))
    assert not errors
    prelude, pe = parse(prelude_source())
    checked = check([(prelude_source(), prelude), (Source("t.sel", text), program)])
    return checked.select


# ------------------------------------------------------------------ macro expansion
def test_a_macro_call_becomes_its_expression_with_the_call_arguments_in_place():
    e = expanded_select('select topk(ifd(hf("m"), kind="ppl", max_length=64), 3)')
    scores = e.args[0]
    assert shape(scores) == (
        "exp((loss(hf('m'), given='prompt', template='alpaca', max_length=64, direct_bos='eos') - "
        "loss(hf('m'), given='none', slack=none, template='alpaca', max_length=64, direct_bos='eos')))")
    # every node the macro made points at the macro call in the recipe
    call_span = (1, 13)
    assert (scores.span.line, scores.span.column) == call_span
    assert (scores.args[0].left.span.line, scores.args[0].left.span.column) == call_span


def test_macros_inside_macros_expand_and_defaults_refer_to_bindings():
    e = expanded_select("select topk(lp(finetune(model, data=pool)), 3)")
    text = shape(e.args[0])
    assert text.startswith("ratio((exp(loss(checkpoint(finetune(model, data=pool), 0), given='prompt'")
    assert "ppl" not in text and "lp(" not in text  # lp uses ppl; both expanded
    bare = expanded_select("select ifd < 1")
    assert shape(bare.left).startswith("ratio(loss(model, ")  # the bare name: the default model binding


def test_expand_macros_alone_on_given_calls():
    spec = registry.get("ppl")
    call = ast.Call(None, "ppl", None, [ast.Name(None, "m")], [])
    bindings = {"x": ast.Binding("x", call, None, "t")}
    out, select, errors = expand_macros(bindings, None, {id(call): spec})
    assert errors == [] and select is None
    assert shape(out["x"].expr) == ("exp(loss(m, given='prompt', template='alpaca', max_length=512, eos=false, "
                                    "target='answer'))")
    assert bindings["x"].expr is call  # the input is left as it was


def test_a_macro_refusing_its_arguments_is_a_positioned_error():
    with pytest.raises(RecipeError) as err:
        compile_recipe(recipe_source('k = "ppl"\nselect topk(ifd(model, kind=k), 3)', name="t.sel"))
    (d,) = err.value.diagnostics
    assert d.message == 'ifd: kind must be "loss" or "ppl", written literally; got <expression>'
    assert d.span.location() == "t.sel:2:13"


# ------------------------------------------------------------------ common subexpressions
def unmerged(text: str):
    compiled = compile_recipe(recipe_source(text, name="t.sel"))
    return Planner(compiled.checked, {}).plan()


def test_cse_merges_identical_subexpressions_and_keeps_every_name():
    text = 'a = length(field="output")\nb = length(field="output")\nselect topk(a, 5) + topk(b, 5)'
    raw = unmerged(text)
    lengths = [n for n in raw.nodes.values() if n.op == "length"]
    assert len(lengths) == 2  # one per binding before the pass
    merged = eliminate_common_subexpressions(raw)
    (length,) = [n for n in merged.nodes.values() if n.op == "length"]
    assert sorted(length.names) == ["a", "b"]
    assert len([n for n in merged.nodes.values() if n.op == "topk"]) == 1
    union = merged.nodes[merged.output]
    assert union.op == "union" and union.input("left") == union.input("right")


def test_cse_ids_are_content_identities_and_depend_on_dataset_fingerprints():
    compiled = compile_recipe(recipe_source("select topk(length, 5)", name="t.sel"))
    a = eliminate_common_subexpressions(Planner(compiled.checked, {"pool": "fp1"}).plan())
    b = eliminate_common_subexpressions(Planner(compiled.checked, {"pool": "fp1"}).plan())
    c = eliminate_common_subexpressions(Planner(compiled.checked, {"pool": "fp2"}).plan())
    assert list(a.nodes) == list(b.nodes)  # deterministic
    assert a.output != c.output  # another pool is another result


# ------------------------------------------------------------------ declarations
def test_a_column_that_the_op_does_not_produce_is_a_compile_error():
    with pytest.raises(RecipeError) as err:
        compile_recipe(recipe_source('select topk(column(loss(model), "nope"), 3)', name="t.sel"))
    (d,) = err.value.diagnostics
    assert d.message == 'column: loss has no output column "nope" (it has "value", "sum", "count")'
    assert d.span.text == '"nope"'
    compile_recipe(recipe_source('select topk(column(loss(model), "count"), 3)', name="t.sel"))


def _load(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_code_fingerprint_follows_code_not_docstrings_or_comments(tmp_path):
    base = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    a = _load(tmp_path, "fp_a", base)
    b = _load(tmp_path, "fp_b", 'def f(x):\n    """Another doc."""\n    # a comment\n    return x + 1\n')
    c = _load(tmp_path, "fp_c", 'def f(x):\n    """Doc."""\n    return x + 2\n')
    assert code_fingerprint(a.f) == code_fingerprint(b.f)
    assert code_fingerprint(a.f) != code_fingerprint(c.f)


def test_code_fingerprint_covers_the_algorithm_modules_an_op_names():
    loss = registry.get("loss")
    assert loss.code_version.startswith(loss.version + "+")
    from datasel.ops.registry import _algorithm_modules, _function_source

    used = _algorithm_modules(_function_source(loss.fn), loss.fn)
    assert "datasel.ops.algos.seqscore" in used and "datasel.ops.algos.templates" in used

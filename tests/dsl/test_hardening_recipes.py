"""Recipes that used to crash or hang the compiler: budget arithmetic, number literals, integer and
range parameters, odd characters and line endings, and ``--set`` misuse.

Each test names the behaviour and compiles (or runs) through the public API, then checks the exact
message and its position, so a parser error in place of the checker path named fails the test.
"""

from __future__ import annotations

import pytest

from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.diagnostics import RecipeError
from datasel.dsl.engine import OpError

pytestmark = pytest.mark.usefixtures("cache_dir")


def compile_text(text: str, sets=None):
    return compile_recipe(recipe_source(text, name="t.sel"), sets)


def only_error(text: str, sets=None):
    with pytest.raises(RecipeError) as info:
        compile_text(text, sets)
    diags = info.value.diagnostics
    assert len(diags) == 1, "\n".join(d.format() for d in diags)
    return diags[0]


def records(n: int) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": "y" * (i + 1)} for i in range(n)]


# ------------------------------------------------------------------ budgets written as arithmetic
@pytest.mark.parametrize("budget, kept", [("2 + 3", 5), ("3 * 2 + 1", 7), ("10 - 4", 6), ("12 / 4", 3)])
def test_literal_budget_arithmetic_runs(run_recipe, budget, kept):
    out = run_recipe(f"select topk(length, {budget})", records(20))
    # the longest outputs are the last records
    assert sorted(out.selected) == list(range(20 - kept, 20))


def test_budget_computed_from_a_count_runs(run_recipe):
    out = run_recipe("select topk(length, count(random(3)) + 1)", records(20))
    assert sorted(out.selected) == [16, 17, 18, 19]


def test_computed_budget_that_is_not_a_count_fails_with_the_op_position(run_recipe):
    with pytest.raises(OpError) as info:
        run_recipe("select topk(length, count(random(3)) / 2)", records(20))
    assert "a budget must be a whole, non-negative count; got 1.5" in str(info.value)
    assert "recipe.sel:1:8" in str(info.value)


def test_literal_budget_that_folds_to_a_fraction_is_a_compile_error():
    d = only_error("select topk(length, 1 / 3)")
    assert d.message.startswith("topk: a budget is a whole count or a percentage; got 1 / 3")
    assert (d.span.line, d.span.column) == (1, 21)


def test_literal_budget_that_folds_negative_is_a_compile_error():
    d = only_error("select topk(length, 2 - 5)")
    assert d.message == "topk: a budget cannot be negative"


def test_division_by_zero_in_literals_is_a_compile_error():
    d = only_error("select topk(length, 10 / 0)")
    assert d.message == "division by zero: 10 / 0"
    assert d.span.column == 24


def test_folded_number_reaches_the_op_as_one_value():
    plan = compile_text("select iterate(random(1), 2 * 3, c -> c)").plan
    (node,) = [n for n in plan.nodes.values() if n.op == "iterate"]
    assert node.params["rounds"] == 6
    assert not [n for n in plan.nodes.values() if n.op == "calc"]  # folded, not computed


# ------------------------------------------------------------------ integer and range parameters
@pytest.mark.parametrize("text, message, column", [
    ("select iterate(random(1), -1, c -> c)", "iterate: rounds must be at least 0, got -1", 27),
    ("select iterate(random(1), 2.5, c -> c)", "iterate: rounds must be a whole number, got 2.5", 27),
    ("select iterate(random(1), 20000, c -> c)", "iterate: rounds must be at most 10000, got 20000", 27),
    ("select kmeans(embed(minilm), 2.5) | topk(length, 3)", "kmeans: k must be a whole number, got 2.5", 30),
    ("select kmeans(embed(minilm), 0) | topk(length, 3)", "kmeans: k must be at least 1, got 0", 30),
    ("select random(3, seed=0.5)", "random: seed must be a whole number, got 0.5", 23),
    ("select random(3, seed=-1)", "random: seed must be at least 0, got -1", 23),
    ("select band(length, lo=-5)", "band: lo must be at least 0, got -5", 24),
    ("select band(length, hi=101)", "band: hi must be at most 100, got 101", 24),
    ("select dedup_near(threshold=1.5)", "dedup_near: threshold must be at most 1, got 1.5", 29),
])
def test_integer_and_range_parameters_are_checked_at_compile_time(text, message, column):
    d = only_error(text)
    assert d.message == message
    assert (d.span.line, d.span.column) == (1, column)


def test_computed_rounds_are_checked_when_the_plan_runs(run_recipe):
    with pytest.raises(OpError) as info:
        run_recipe("select iterate(random(1), count(random(3)) / 2, c -> c)", records(10))
    assert "rounds must be a whole number, got 1.5" in str(info.value)


def test_every_count_like_parameter_is_declared_whole():
    # A new op whose k / seed / rounds / batch / max_length forgets integer=True would accept 2.5.
    from datasel.ops import registry
    from datasel.ops.contract import Kind
    count_like = {"k", "seed", "rounds", "iters", "n_init", "batch", "max_length", "knn", "epochs",
                  "num_perm", "shingle", "nprobe", "max_new_tokens", "max_prompt_length", "lora_r"}
    loose = [f"{spec.name}.{p.name}" for spec in registry.registry().values() for p in spec.params
             if p.name in count_like and p.kind == Kind.NUMBER and not p.integer]
    assert loose == []


def test_parameter_ranges_are_documented_by_datasel_ops(cli):
    out = cli("ops", "kmeans").out
    assert "k            Number                 required; a whole number, at least 1" in out
    assert "seed         Number                 default 0; a whole number, 0 to 4294967295" in out


def test_column_of_what_a_macro_expands_to_is_a_positioned_error():
    # Found by the fuzz suite: the check after macro expansion raised AssertionError.
    d = only_error('select column(ifd_loss, "text_hash") < 3')
    assert 'has no output column "text_hash"' in d.message and d.span.column == 25


# ------------------------------------------------------------------ number literals
@pytest.mark.parametrize("literal", ["1e999", "1e5000", "1e9999999", "1" + "0" * 5000, "2e15"])
def test_huge_number_literals_are_positioned_errors(literal):
    d = only_error(f"select random({literal})")
    assert d.message.startswith(f"number too large: {literal[:24]}")
    assert (d.span.line, d.span.column) == (1, 15)


def test_number_with_too_many_digits_is_a_positioned_error():
    d = only_error("select random(3, seed=0." + "1" * 200 + ")")
    assert d.message.startswith("number too small or with too many digits")
    assert d.span.column == 23


def test_largest_allowed_number_compiles():
    compile_text("select random(3, seed=4294967295)")
    with pytest.raises(RecipeError, match="seed must be at most 4294967295"):
        compile_text("select random(3, seed=4294967296)")


# ------------------------------------------------------------------ characters and line endings
def test_recipe_text_with_a_bom_compiles():
    compile_text("\ufeffselect random(3)")


def test_recipe_file_with_a_bom_compiles(tmp_path):
    path = tmp_path / "bom.sel"
    path.write_bytes("select random(3)\n".encode("utf-8-sig"))
    compile_recipe(recipe_source(str(path)))


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c"])
def test_odd_separators_show_the_line_they_are_on(char):
    with pytest.raises(RecipeError) as info:
        compile_text(f"a = length\nb = length{char}c\nselect topk(a, 3)")
    d = info.value.diagnostics[0]
    assert d.message.startswith(f"unexpected character {char!r}")
    assert (d.span.line, d.span.column) == (2, 11)
    shown = d.format().splitlines()
    assert shown[1] == "    b = length\ufffdc"  # the real line 2, the character made visible
    assert shown[2] == "              ^"


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_windows_and_old_mac_line_endings_count_lines(newline):
    d = only_error(newline.join(["a = length", "b = nosuch", "select topk(a, 3)"]))
    assert d.message == "unknown name 'nosuch'"
    assert (d.span.line, d.span.column) == (2, 5)
    assert d.format().splitlines()[1] == "    b = nosuch"


def test_error_in_a_late_statement_of_a_long_recipe_is_positioned():
    # Statements are parsed one by one (linear time); offsets and lines must still be the file's.
    lines = [f"v{i} = length + {i}" for i in range(3000)]
    lines[2500] = "v2500 = length +"
    d = only_error("\n".join(lines) + "\nselect topk(v0, 3)")
    assert d.message == "unexpected end of statement; expected an expression"
    assert (d.span.line, d.span.column) == (2501, 17)
    lines[2500] = "v2500 = nosuch"
    d = only_error("\n".join(lines) + "\nselect topk(v0, 3)")
    assert (d.span.line, d.span.column, d.span.text) == (2501, 9, "nosuch")


# ------------------------------------------------------------------ --set misuse
@pytest.mark.parametrize("word", ["select", "true", "none"])
def test_set_of_a_reserved_word_is_refused(word):
    d = only_error("x = 3\nselect random(x)", [f"{word}=3"])
    assert d.message == f"'{word}' is a reserved word and cannot be set"


def test_set_given_twice_is_refused():
    with pytest.raises(RecipeError) as info:
        compile_text("x = 3\nselect random(x)", ["x=4", "x=5"])
    assert [d.message for d in info.value.diagnostics] == ["--set x is given twice; give each name once"]


# ------------------------------------------------------------------ nesting depth
from datasel.dsl.depth import MAX_DEPTH  # noqa: E402


def deep_recipes(levels: int) -> dict[str, str]:
    """Recipes whose select nests exactly ``levels`` levels, one per way of nesting."""
    n = levels - 2  # a topk(...) call around the scores and the innermost leaf take two levels
    return {
        "pipe": "select random(50)" + " | random(40)" * n,  # random(50) and its 50 are the leaf's two
        "calls": "select topk(" + "abs(" * n + "length" + ")" * n + ", 3)",
        "minus": "select topk(" + "-" * n + "length, 3)",
        "plus": "select topk(" + " + ".join(["length"] * (levels - 1)) + ", 3)",
        "names": "\n".join(["v0 = length"] + [f"v{i} = v{i - 1}" for i in range(1, n)]) + f"\nselect topk(v{n - 1}, 3)",
    }


@pytest.mark.parametrize("shape", ["pipe", "calls", "minus", "plus", "names"])
def test_recipe_at_the_documented_depth_compiles(shape):
    compile_text(deep_recipes(MAX_DEPTH)[shape])


@pytest.mark.parametrize("shape", ["pipe", "calls", "minus", "plus", "names"])
def test_one_level_past_the_documented_depth_is_a_positioned_error(shape):
    text = deep_recipes(MAX_DEPTH + 1)[shape]
    d = only_error(text)
    assert d.message.startswith(f"this expression nests {MAX_DEPTH + 1} levels deep")
    assert f"at most {MAX_DEPTH}" in d.message
    assert d.span.line == text.count("\n") + 1 and d.span.column == 8  # at the select's expression


def test_statement_far_past_the_depth_is_refused_before_it_is_built():
    d = only_error("select topk(" + "-" * 20000 + "length, 3)")
    assert d.message.startswith(f"this statement nests more than {MAX_DEPTH} levels deep")
    assert (d.span.line, d.span.column) == (1, 1)


def test_chain_of_names_reports_the_binding_that_crosses_the_limit():
    lines = ["v0 = length"] + [f"v{i} = v{i - 1} + 1" for i in range(1, 800)]
    d = only_error("\n".join(lines) + "\nselect topk(v799, 3)")
    # v_i nests 1 + 2i levels (its own "+" and the name use per step): v500 is the first past 1000
    assert d.span.line == 501 and d.span.text.startswith("v499 + 1")


def test_deep_set_expression_is_a_positioned_error():
    d = only_error("x = length\nselect topk(x, 3)", ["x=" + "-" * (MAX_DEPTH + 5) + "length"])
    assert d.message.startswith("this expression nests")
    assert d.span.source.name == "--set x"


def test_recipe_at_the_documented_depth_runs(run_recipe):
    out = run_recipe(deep_recipes(MAX_DEPTH)["pipe"], records(60))
    assert len(out.selected) == 40


def test_a_builtin_called_by_name_with_literal_arguments_runs(run_recipe):
    # Found by the fuzz suite: arith(x, 0, "+") folded right=0 into the node, and its label crashed.
    out = run_recipe('select 3 < arith(length, 0, "+")', records(6))
    assert out.selected == [3, 4, 5]

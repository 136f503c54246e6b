"""Name resolution and kind checking, written against docs/language.md.

Every test compiles a small recipe through the public API and looks at the
diagnostics of the :class:`RecipeError` (message, ``file:line:col``, format).
"""

from __future__ import annotations

import pytest

from datasel.dsl import compiler
from datasel.dsl.compiler import check_recipe, compile_recipe, recipe_source
from datasel.dsl.diagnostics import RecipeError, Source
from datasel.ops import registry


# --------------------------------------------------------------------------- helpers
def compile_text(text: str, sets=None, name: str = "t.sel"):
    return compile_recipe(recipe_source(text, name=name), sets)


def diagnostics(text: str, sets=None, name: str = "t.sel"):
    with pytest.raises(RecipeError) as info:
        compile_text(text, sets, name)
    return info.value.diagnostics


def only(text: str, sets=None):
    diags = diagnostics(text, sets)
    assert len(diags) == 1, "\n".join(d.format() for d in diags)
    return diags[0]


def messages(text: str, sets=None) -> list[str]:
    return [d.message for d in diagnostics(text, sets)]


def nodes_by_op(compiled, op: str):
    return [n for n in compiled.plan.nodes.values() if n.op == op]


def one_node(compiled, op: str):
    found = nodes_by_op(compiled, op)
    assert len(found) == 1, [n.params for n in found]
    return found[0]


# ------------------------------------------------------------------ a correct recipe
def test_a_correct_recipe_checks():
    checked = check_recipe(recipe_source("usable = length(field=\"output\") > 20\n"
                                         "select usable | topk(length, 10%)\n", name="t.sel"))
    assert checked.select is not None
    assert "usable" in checked.bindings


# ------------------------------------------------------------------ unknown names, ops, keywords
def test_unknown_name_with_did_you_mean():
    d = only("select topk(lenght, 5)")
    assert d.message == "unknown name 'lenght'; did you mean 'length'?"
    assert d.span.location() == "t.sel:1:13"
    assert d.format().splitlines()[2] == "                ^~~~~~"


def test_unknown_name_suggests_prelude_and_recipe_names():
    assert messages("select topk(response_char, 5)") == [
        "unknown name 'response_char'; did you mean 'response_chars'?"
    ]
    assert messages("my_filter = length > 3\nselect my_filtr") == [
        "unknown name 'my_filtr'; did you mean 'my_filter'?"
    ]


def test_unknown_name_suggests_the_lambda_parameter():
    assert messages("select iterate(random(3), 2, cur -> cru + random(1))") == [
        "unknown name 'cru'; did you mean 'cur'?"
    ]


def test_unknown_name_without_close_match_has_no_suggestion():
    assert messages("select topk(qqqqzzzz, 5)") == ["unknown name 'qqqqzzzz'"]


def test_unknown_operator_with_did_you_mean():
    d = only("select topp(length, 5)")
    assert d.message == "unknown operator 'topp'; did you mean 'topk'?"
    assert d.span.location() == "t.sel:1:8"
    assert d.format().splitlines()[2] == "           ^~~~"


def test_unknown_operator_still_checks_its_arguments():
    msgs = messages("select topp(lenght, 5)")
    assert "unknown operator 'topp'; did you mean 'topk'?" in msgs
    assert "unknown name 'lenght'; did you mean 'length'?" in msgs


def test_unknown_keyword_with_did_you_mean():
    d = only("select topk(length, 5, kk=3)")
    assert d.message == "topk has no parameter 'kk'; did you mean 'k'?"
    assert d.span.location() == "t.sel:1:24"
    assert d.format().splitlines()[2] == "                           ^~"


def test_unknown_keyword_without_close_match():
    assert messages("select random(3, zzzzqqq=1)") == ["random has no parameter 'zzzzqqq'"]


def test_calling_a_binding_is_an_error():
    assert messages("x = random(3)\nselect x(3)") == ["'x' is a name, not an operator; it cannot be called"]


def test_bare_operator_that_needs_arguments():
    assert messages("select topk") == ["'topk' is an operator that needs arguments (scores, k); write topk(...)"]


def test_bare_operator_with_all_defaults_is_a_call():
    compiled = compile_text("select topk(length, 5)")
    assert one_node(compiled, "length").params == {"field": "output", "unit": "chars"}


# ------------------------------------------------------------------ kinds of arguments
def test_kind_mismatch_message_of_the_documented_form():
    d = only("select topk(random(3), 2)")
    assert d.message == "topk expects Scores as argument 1 (scores), got Selector (random(3))"
    assert d.span.location() == "t.sel:1:13"
    assert d.format().splitlines() == [
        "t.sel:1:13: error: topk expects Scores as argument 1 (scores), got Selector (random(3))",
        "    select topk(random(3), 2)",
        "                ^~~~~~~~~",
    ]


def test_kind_mismatch_for_a_keyword_argument():
    assert messages("select random(3, seed=true)") == ["random expects Number as seed=, got Bool (true)"]


def test_kind_mismatch_through_a_binding_names_the_binding():
    assert messages("r = random(3)\nselect topk(r, 2)") == [
        "topk expects Scores as argument 1 (scores), got Selector (r)"
    ]


def test_missing_required_argument():
    d = only("select topk(length)")
    signature = registry.get("topk").signature()
    assert d.message == f"topk needs argument 'k' (Budget)  (signature: {signature})"
    assert d.span.location() == "t.sel:1:8"


def test_too_many_arguments():
    # One more positional argument than zscore declares (read from the registry, which grows).
    n = len(registry.get("zscore").params)
    args = ", ".join(["length"] + ["1"] * n)
    text = f"select topk(zscore({args}), 5)"
    diags = diagnostics(text)
    expected = f"zscore takes at most {n} arguments, got {n + 1}  (signature: {registry.get('zscore').signature()})"
    extra = [d for d in diags if d.message == expected]
    assert len(extra) == 1, [d.message for d in diags]
    assert extra[0].span.column == text.rindex("1") + 1  # the first argument too many


def test_argument_given_twice():
    d = only("select topk(length, 5, k=6)")
    assert d.message == "topk: argument 'k' given twice"
    assert d.span.location() == "t.sel:1:24"
    assert messages("select random(k=3, k=4)") == ["random: argument 'k' given twice"]


def test_keyword_arguments_in_any_order():
    compiled = compile_text('select topk(length(unit="words", field="instruction"), k=5)')
    assert one_node(compiled, "length").params == {"field": "instruction", "unit": "words"}
    assert one_node(compiled, "topk").params["k"] == 5


@pytest.mark.parametrize(
    "text, message, col",
    [
        ('select topk(length(field="outptu"), 5)',
         'length: field= must be one of "instruction", "input", "output", "prompt", "all"; '
         "got \"outptu\"; did you mean 'output'?", 26),
        ('select topk(length(unit="word"), 5)',
         'length: unit= must be one of "chars", "words"; got "word"; did you mean \'words\'?', 25),
        ('select topk(length("outptu"), 5)',
         'length: argument 1 (field) must be one of "instruction", "input", "output", "prompt", "all"; '
         "got \"outptu\"; did you mean 'output'?", 20),
    ],
)
def test_string_choices_with_suggestion(text, message, col):
    d = only(text)
    assert d.message == message
    assert d.span.location() == f"t.sel:1:{col}"


# ------------------------------------------------------------------ budgets
def test_fractional_budget_is_rejected_with_a_percentage_hint():
    d = only("select topk(length, 0.5)")
    assert "50%" in d.message
    assert d.span.location() == "t.sel:1:21"


def test_fractional_budget_rejected_for_every_selector():
    for text in ("select random(0.25)", "select sample(0.25)", "select bottomk(length, 0.25)"):
        assert any("25%" in m for m in messages(text)), text


def test_negative_budget_is_rejected():
    msgs = messages("select topk(length, -5)")
    assert any("negative" in m for m in msgs), msgs


def test_negative_percentage_is_rejected():
    assert len(messages("select topk(length, -5%)")) == 1


def test_percentage_over_100_is_rejected():
    d = only("select topk(length, 150%)")
    assert d.message == "a percentage must be between 0% and 100%, got 150%"
    assert d.span.location() == "t.sel:1:21"
    assert d.format().splitlines()[2] == "                        ^~~~"


@pytest.mark.parametrize("budget", ["0", "1000", "0%", "100%", "10.5%", "5% of pool", "1e3", "count(random(3))"])
def test_valid_budgets(budget):
    compile_text(f"select topk(length, {budget})")


def test_non_literal_budget_of_the_wrong_kind():
    assert messages("select topk(length, length)") == [
        "topk expects Budget as argument 2 (k), got Scores (length)"
    ]


# ------------------------------------------------------------------ pipes and operators
def test_scores_on_the_left_of_a_pipe():
    d = only("select length | topk(length, 5)")
    assert d.message == ("the left side of '|' must be a Selector or a Partition, got Scores (length); "
                         "to filter by a score compare it, e.g. length < 1")
    assert d.span.location() == "t.sel:1:8"


def test_scores_on_the_right_of_a_pipe():
    d = only("select random(5) | length")
    assert d.message == ("the right side of '|' must be a Selector or a Partition, got Scores (length); "
                         "to keep the best records write topk(length, 10%)")
    assert d.span.location() == "t.sel:1:20"


def test_number_on_the_left_of_a_pipe():
    assert messages("select 5 | random(3)") == [
        "the left side of '|' must be a Selector or a Partition, got Number (5)"
    ]


def test_partition_piped_into_a_partition():
    d = only('select groups("a") | groups("b")')
    assert d.message == "a Partition must be followed by a Selector to apply in each group, got another Partition"
    assert d.span.location() == "t.sel:1:22"


def test_partition_piped_into_a_selector_is_a_selector():
    checked = check_recipe(recipe_source('select groups("category") | topk(length, 10%) + random(1)', name="t.sel"))
    assert checked.type_of(checked.select).kind is registry.Kind.SELECTOR
    # The kind is what a caller sees: such a pipe is not Scores, so topk refuses it by name.
    assert messages('select topk(groups("category") | topk(length, 10%), 5)') == [
        'topk expects Scores as argument 1 (scores), got Selector (groups("category") | topk(length, 10%))'
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("select random(3) + length",
         "'+' is the union of two Selectors or arithmetic on Scores and numbers; "
         "got Selector (random(3)) and Scores (length)"),
        ("select random(3) - length",
         "'-' is the difference of two Selectors or arithmetic on Scores and numbers; "
         "got Selector (random(3)) and Scores (length)"),
        ("select random(3) + 1",
         "'+' is the union of two Selectors or arithmetic on Scores and numbers; "
         "got Selector (random(3)) and Number (1)"),
        ("select random(3) & length",
         "'&' intersects two selections (Selector & Selector); got Selector (random(3)) and Scores (length)"),
        ("select length & length",
         "'&' intersects two selections (Selector & Selector); got Scores (length) and Scores (length)"),
        ("select random(3) * 2",
         "'*' is arithmetic on Scores and numbers; got Selector (random(3)) and Number (2)"),
        ("select random(3) / length",
         "'/' is arithmetic on Scores and numbers; got Selector (random(3)) and Scores (length)"),
        ("select random(3) < 2",
         "'<' compares Scores with Scores or numbers, giving a Selector; got Selector (random(3)) and Number (2)"),
        ('select length < "a"',
         "'<' compares numbers; a string can only be compared with == or != (or 'in' a list)"),
    ],
)
def test_operators_on_wrong_kinds(text, message):
    d = only(text)
    assert d.message == message
    # the error points at the operator
    assert d.span.text in ("+", "-", "&", "*", "/", "<")
    assert d.span.location() == f"t.sel:1:{text.index(' ' + d.span.text + ' ') + 2}"


def test_comparing_two_numbers():
    d = only("x = 1 < 2\nselect random(3)")
    assert d.message == "comparing two numbers selects nothing; one side must be Scores"
    assert d.span.location() == "t.sel:1:7"


def test_negating_a_selector():
    assert messages("select -random(3)") == [
        "'-' negates Scores or numbers, got Selector (random(3)); for the records a selector leaves out write "
        "not random(3)"]


@pytest.mark.parametrize("text, message, where", [
    ('select length == "a"',
     'length is numeric: comparing it with a string needs per-record text, such as field("category") == "open_qa"',
     "length"),
    ('select field("c") in "a"',
     '\'in\' needs a list of strings or numbers written out, e.g. field("c") in ["a", "b"]; got String ("a")', '"a"'),
    ('select field("c") in [length]',
     '\'in\' needs a list of strings or numbers written out, e.g. field("c") in ["a", "b"]; got List ([length])',
     "[length]"),
    ('select not length',
     "'not' takes a Selector (it keeps the records the selector leaves out), got Scores (length); to drop records "
     "by a score compare it, e.g. not length > 0", "not length"),
])
def test_text_membership_and_not_errors(text, message, where):
    d = only(text)
    assert d.message == message
    assert d.span.text == where


@pytest.mark.parametrize("text", ['select field("c") == "a"', 'select "a" != field("c")',
                                  'select field("c") in ["a", "b"]', 'select field("c") not in [1, 2]',
                                  'select not field("c") == "a" | topk(length, 3)',
                                  'select not dedup_exact & length > 3'])
def test_text_membership_and_not_are_valid(text):
    compile_text(text)


def test_mixed_kind_operators_that_are_valid():
    compile_text("select topk(0.7 * length + 0.3 * rank(field(\"reward\")), 5) & (1 > length)")
    compile_text("select length >= field(\"x\") | topk(-length / 2, 10%) - random(1)")


# ------------------------------------------------------------------ per-record datasets
def test_scores_of_val_in_a_selector():
    d = only('select topk(field("x", data=val), 5)')
    assert d.message == 'topk selects from the pool but argument 1 (scores) covers val (field("x", data=val))'


def test_scores_of_val_through_a_transform_in_a_selector():
    msgs = messages("select topk(rank(length(data=val)), 5)")
    assert len(msgs) == 1 and "covers val" in msgs[0]


def test_scores_of_val_in_a_comparison():
    assert messages('select field("x", data=val) < 3') == [
        "comparisons select records of the pool; these Scores cover val"
    ]


def test_arithmetic_mixing_pool_and_val_scores():
    d = only('select topk(length * field("x", data=val), 5)')
    assert d.message == "'*' combines Scores of pool with Scores of val"
    assert d.span.location() == "t.sel:1:20"


# ------------------------------------------------------------------ select statements
def test_select_must_be_a_selector():
    assert messages("select length") == [
        "select needs a Selector, got Scores (length); did you mean topk(length, 10%)?"
    ]
    assert messages('select groups("c")') == ['select needs a Selector, got Partition (groups("c"))']


def test_no_select_statement():
    d = only("x = random(3)\n")
    assert d.message == "t.sel has no 'select' statement (a recipe ends with: select <selector>)"
    assert d.span is None


def test_two_select_statements():
    d = only("select random(3)\nselect random(4)\n")
    assert d.message == "a recipe has exactly one 'select' statement"
    assert d.span.location() == "t.sel:2:1"
    assert [(note, span.location()) for note, span in d.notes] == [("the first one is here", "t.sel:1:1")]


# ------------------------------------------------------------------ bindings and scopes
@pytest.mark.parametrize("name", ["pool", "val"])
def test_binding_a_builtin_dataset(name):
    d = only(f"{name} = random(3)\nselect random(3)")
    assert d.message == f"'{name}' is the built-in dataset and cannot be rebound"
    assert d.span.location() == "t.sel:1:1"


def test_setting_a_builtin_dataset():
    d = only("select random(3)", sets=["pool=random(3)"])
    assert d.message == "'pool' is the built-in dataset and cannot be set"


@pytest.mark.parametrize("word", ["true", "false", "none", "of"])
def test_reserved_words_cannot_be_bound(word):
    # docs: `select`, `true`, `false`, `none` and `of` are reserved.
    d = only(f"{word} = 3\nselect random(3)")
    assert d.message == f"'{word}' is a reserved word and cannot be bound"
    assert d.span.location() == "t.sel:1:1"


def test_select_cannot_be_bound():
    # `select` starts a select statement, so `select = 3` is read as one and fails to parse.
    d = only("select = 3\nselect random(3)")
    assert d.message == "unexpected '='; expected an expression"
    assert d.span.location() == "t.sel:1:8"


def test_same_name_bound_twice():
    d = only("a = random(1)\na = random(2)\nselect a")
    assert d.message == "'a' is bound twice in t.sel"
    assert d.span.location() == "t.sel:2:1"
    assert [(note, span.location()) for note, span in d.notes] == [("first bound here", "t.sel:1:1")]


@pytest.mark.parametrize(
    "text",
    ["a = b\nb = a\nselect a", "a = b + 1\nb = a\nselect random(a)"],
)
def test_cycle_between_two_bindings(text):
    d = only(text)
    assert d.message == "cycle in bindings: a -> b -> a"
    assert d.span.location() == "t.sel:1:1"


def test_self_cycle():
    assert messages("a = a + 1\nselect random(a)") == ["cycle in bindings: a -> a"]


def test_unused_bindings_are_checked_too():
    d = only("select topk(length, 5)\nx = rnadom(3)")
    assert d.message == "unknown operator 'rnadom'; did you mean 'random'?"
    assert d.span.location() == "t.sel:2:5"


def test_use_of_a_binding_with_a_syntax_error_is_not_reported_again():
    d = only("x = topk(length, 3\nselect x")
    assert d.message.startswith("unexpected end of statement")


def test_recipe_rebinds_a_prelude_name():
    compiled = compile_text('response_chars = length(field="instruction")\nselect topk(response_chars, 5)')
    assert one_node(compiled, "length").params == {"field": "instruction", "unit": "chars"}


def test_prelude_name_without_rebinding():
    compiled = compile_text("select topk(response_words, 5)")
    assert one_node(compiled, "length").params == {"field": "output", "unit": "words"}


@pytest.mark.parametrize("sets", [['response_chars=length(field="prompt")'],
                                  {"response_chars": 'length(field="prompt")'}])
def test_set_overrides_recipe_and_prelude(sets):
    text = 'response_chars = length(field="instruction")\nselect topk(response_chars, 5)'
    compiled = compile_text(text, sets=sets)
    assert one_node(compiled, "length").params == {"field": "prompt", "unit": "chars"}


def test_set_overrides_uses_inside_prelude_definitions(monkeypatch):
    prelude = Source("<prelude>/prelude.sel",
                     'base = length(field="instruction")\nbest = topk(base, 5)\n')
    monkeypatch.setattr(compiler, "prelude_source", lambda: prelude)
    compiled = compile_text("select best")
    assert one_node(compiled, "length").params["field"] == "instruction"
    compiled = compile_text("select best", sets=['base=length(field="input")'])
    assert one_node(compiled, "length").params["field"] == "input"
    assert one_node(compiled, "topk").params["k"] == 5


def test_same_name_bound_twice_in_the_prelude(monkeypatch):
    prelude = Source("<prelude>/prelude.sel", "a = random(1)\na = random(2)\n")
    monkeypatch.setattr(compiler, "prelude_source", lambda: prelude)
    d = only("select random(3)")
    assert d.message == "'a' is bound twice in <prelude>/prelude.sel"


def test_set_with_a_syntax_error_is_reported_with_its_source():
    d = only("select topk(response_chars, 5)", sets=['response_chars=length(field="prompt"'])
    assert d.span.location() == "--set response_chars:1:22"
    assert d.message == "unexpected end of statement; expected ')' or ','"


def test_set_without_equals():
    assert messages("select random(3)", sets=["bad"]) == ["--set expects NAME=EXPRESSION, got 'bad'"]


def test_set_value_of_the_wrong_kind_is_a_kind_error():
    msgs = messages("select topk(response_chars, 5)", sets=["response_chars=random(3)"])
    # One error, at the --set text, naming the kind the binding has: not one per use of the binding.
    assert msgs == ['\'response_chars\' is a Scores (length(field="output") in <prelude>/prelude.sel), so the new '
                    'value must be a Scores too; got Selector (random(3))']


# ------------------------------------------------------------------ all errors at once
def test_three_independent_mistakes_in_one_recipe_error():
    text = (
        "a = topp(length, 5)\n"          # typo in an operator name
        "b = topk(random(3), 2)\n"       # kind mismatch
        "c = topk(length, 3\n"           # missing )
        "select a + b\n"
    )
    with pytest.raises(RecipeError) as info:
        compile_text(text, name="three.sel")
    err = info.value
    assert [(d.span.location(), d.message) for d in err.diagnostics] == [
        ("three.sel:1:5", "unknown operator 'topp'; did you mean 'topk'?"),
        ("three.sel:2:10", "topk expects Scores as argument 1 (scores), got Selector (random(3))"),
        ("three.sel:3:19", "unexpected end of statement; expected ')' or ','"),
    ]
    lines = err.format().splitlines()
    assert lines[:3] == [
        "three.sel:1:5: error: unknown operator 'topp'; did you mean 'topk'?",
        "    a = topp(length, 5)",
        "        ^~~~",
    ]
    assert lines[3:6] == [
        "three.sel:2:10: error: topk expects Scores as argument 1 (scores), got Selector (random(3))",
        "    b = topk(random(3), 2)",
        "             ^~~~~~~~~",
    ]
    assert lines[6:9] == [
        "three.sel:3:19: error: unexpected end of statement; expected ')' or ','",
        "    c = topk(length, 3",
        "                      ^",
    ]
    assert lines[9] == "three.sel:3:9: note: '(' opened here is never closed with ')'"
    assert lines[-1] == "3 errors"
    assert str(err) == err.format()


def test_the_error_example_of_the_docs():
    text = "# header\nx = topk(lenght, 5)\ny = topk(embed, 3\nselect topk(random(3), 2)\n"
    with pytest.raises(RecipeError) as info:
        compile_text(text, name="recipe.sel")
    assert info.value.format() == (
        "recipe.sel:2:10: error: unknown name 'lenght'; did you mean 'length'?\n"
        "    x = topk(lenght, 5)\n"
        "             ^~~~~~\n"
        "recipe.sel:3:18: error: unexpected end of statement; expected ')' or ','\n"
        "    y = topk(embed, 3\n"
        "                     ^\n"
        "recipe.sel:3:9: note: '(' opened here is never closed with ')'\n"
        "    y = topk(embed, 3\n"
        "            ^\n"
        "recipe.sel:4:13: error: topk expects Scores as argument 1 (scores), got Selector (random(3))\n"
        "    select topk(random(3), 2)\n"
        "                ^~~~~~~~~\n"
        "3 errors"
    )


def test_errors_are_sorted_by_position():
    diags = diagnostics("select topk(lenght, 5) + zzz\nb = rnadom(1)\na = topp(length, 1)\n")
    starts = [d.span.start for d in diags]
    assert starts == sorted(starts) and len(diags) == 4


# ------------------------------------------------------------------ planned operators
def test_kmeans_pipeline_compiles_or_fails_precisely():
    try:
        compile_text("select kmeans(embed(minilm), 100) | topk(lp1, 10%)")
    except RecipeError as err:
        assert err.diagnostics
        for d in err.diagnostics:
            assert "unknown" in d.message or "not available yet" in d.message, d.message
            assert d.span is not None and d.span.line == 1


def test_planned_operators_are_not_available_yet():
    diags = diagnostics("select whisper(golden, 3)")
    by_col = {d.span.column: d.message for d in diags}
    assert set(by_col) == {8, 16}
    assert by_col[8].startswith("operator 'whisper' is not available yet: it arrives with ")
    assert by_col[16].startswith("'golden' is not available yet: it arrives with ")


def test_the_design_cards_g2is_example_compiles():
    from datasel.dsl.compiler import compile_recipe, recipe_source

    plan = compile_recipe(recipe_source("select graphwalk(grad_adam, anchors=pca(val_grad, 0.5))", name="t.sel")).plan
    ops = [n.op for n in plan.nodes.values()] if isinstance(plan.nodes, dict) else [n.op for n in plan.nodes]
    assert ops.count("grad") == 2 and "pca" in ops and "graphwalk" in ops and "finetune" in ops


# ------------------------------------------------------------------ lambdas and iterate
LAMBDA_MISPLACED = ("a function (name -> expression) is only allowed as an argument of an operator "
                    "that takes one, such as iterate")


def test_iterate_with_a_lambda_checks():
    compile_text("select iterate(random(3, seed=0), 2, cur -> cur + topk(length, count(cur)))")


def test_lambda_as_keyword_argument():
    # docs: keyword arguments may come in any order, for every parameter.
    compile_text("select iterate(init=random(3), rounds=2, step=cur -> cur + random(1))")


def test_lambda_given_to_an_operator_that_takes_no_function():
    d = only("select random(cur -> cur)")
    assert d.message == "random does not take a function for argument 1 (k)"
    assert d.span.location() == "t.sel:1:15"


def test_lambda_outside_a_call_is_a_syntax_error():
    # The grammar admits `name -> expression` only as a call argument, so anywhere else the
    # parser rejects it before the checker runs.
    d = only("x = cur -> cur\nselect random(3)")
    assert d.message == "unexpected '>'; expected an expression"
    assert d.span.location() == "t.sel:1:10"


@pytest.mark.parametrize("text, located", [
    # A keyword the operator does not have: nothing there takes a function.
    ("select random(3, nosuch=cur -> cur)",
     [("random has no parameter 'nosuch'", "t.sel:1:18"), (LAMBDA_MISPLACED, "t.sel:1:18")]),
    # A keyword argument of an unknown operator.
    ("select nosuch(f=cur -> cur)",
     [("unknown operator 'nosuch'", "t.sel:1:8"), (LAMBDA_MISPLACED, "t.sel:1:15")]),
])
def test_lambda_outside_a_function_argument_is_a_checker_error(text, located):
    assert [(d.message, d.span.location()) for d in diagnostics(text)] == located


def test_iterate_needs_a_function():
    assert messages("select iterate(random(3), 2, 5)") == [
        "iterate expects a function (name -> expression) for argument 3 (step), got Number (5)"
    ]


def test_lambda_result_kind_is_checked():
    d = only("select iterate(random(3), 2, cur -> length)")
    assert d.message == "the function given to iterate must return a Selector, got Scores"
    assert d.span.location() == "t.sel:1:37"


def test_lambda_parameter_is_a_selector_not_a_budget():
    assert messages("select iterate(random(3), 2, cur -> topk(length, cur))") == [
        "topk expects Budget as argument 2 (k), got Selector (cur)"
    ]


def test_lambda_parameter_is_not_visible_outside():
    msgs = messages("select iterate(random(3), 2, cur -> cur) + cur")
    assert msgs == ["unknown name 'cur'"]

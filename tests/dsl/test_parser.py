"""The parser of the .sel language: statements, literals, precedence, syntax errors.

Written against docs/language.md ("Statements and lines", "Operators and
precedence", "Calls, names and the prelude", "Errors").
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from datasel.dsl import ast
from datasel.dsl.diagnostics import Diagnostic, Source, Span
from datasel.dsl.parser import parse, parse_expression, split_statements


# --------------------------------------------------------------------------- helpers
def show(e: ast.Expr) -> str:
    """A fully parenthesised rendering of an expression tree."""
    if isinstance(e, ast.BinOp):
        return f"({show(e.left)} {e.op} {show(e.right)})"
    if isinstance(e, ast.Neg):
        return f"(-{show(e.operand)})"
    if isinstance(e, ast.Call):
        args = [show(a) for a in e.args] + [f"{k.name}={show(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Number):
        return str(e.value)
    if isinstance(e, ast.Percent):
        return f"{e.fraction * 100}%" + (" of pool" if e.of_pool else "")
    if isinstance(e, ast.String):
        return repr(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.NoneLit):
        return "none"
    if isinstance(e, ast.ListLit):
        return "[" + ", ".join(show(i) for i in e.items) + "]"
    if isinstance(e, ast.Lambda):
        return f"({e.param} -> {show(e.body)})"
    if isinstance(e, ast.Not):
        return f"(not {show(e.operand)})"
    raise AssertionError(type(e).__name__)


def parse_ok(text: str, name: str = "t.sel") -> ast.Program:
    program, errors = parse(Source(name, text))
    assert errors == [], "\n".join(d.format() for d in errors)
    return program


def select_expr(text: str) -> ast.Expr:
    program = parse_ok("select " + text)
    assert len(program.selects) == 1
    return program.selects[0].expr


def shape(text: str) -> str:
    return show(select_expr(text))


def errors_of(text: str, name: str = "t.sel") -> list[Diagnostic]:
    _, errors = parse(Source(name, text))
    assert errors, f"expected a syntax error in {text!r}"
    return errors


def only_error(text: str) -> Diagnostic:
    errors = errors_of(text)
    assert len(errors) == 1, [d.format() for d in errors]
    return errors[0]


def statements(text: str) -> list[str]:
    return [text[a:b] for a, b in split_statements(text)]


# ------------------------------------------------------------------ statement splitting
def test_each_column_one_name_or_select_starts_a_statement():
    text = "a = 1\nb = 2\nselect a\n"
    assert [s.strip() for s in statements(text)] == ["a = 1", "b = 2", "select a"]
    program = parse_ok(text)
    assert [b.name for b in program.bindings] == ["a", "b"]
    assert len(program.selects) == 1


def test_indented_lines_continue_the_statement_above():
    program = parse_ok("x = topk(\n    length,\n    5)\nselect x\n")
    assert [b.name for b in program.bindings] == ["x"]
    assert show(program.bindings[0].expr) == "topk(length, 5)"


def test_indented_name_equals_is_a_continuation_not_a_new_binding():
    # `  y = 2` is indented, so it continues `x = 1` (and is then a syntax error).
    program, errors = parse(Source("t.sel", "x = 1\n  y = 2\nselect x\n"))
    assert [b.name for b in program.bindings] == []
    assert len(errors) == 1
    assert errors[0].span.location() == "t.sel:2:3"


@pytest.mark.parametrize("lead", ["|", ")", "+", "-", "&", "*", "<"])
def test_lines_starting_with_an_operator_or_bracket_at_column_one_continue(lead):
    continuation = {
        "|": "| topk(length, 5)",
        ")": ")",
        "+": "+ random(2)",
        "-": "- random(2)",
        "&": "& random(2)",
        "*": "* 2",
        "<": "< 3",
    }[lead]
    head = "x = f(random(1)\n" if lead == ")" else "x = random(1)\n"
    program = parse_ok(head + continuation + "\nselect x\n")
    assert [b.name for b in program.bindings] == ["x"]
    assert len(program.selects) == 1


def test_long_pipe_written_over_several_lines():
    program = parse_ok("select kmeans(embed(minilm), 100)\n     | topk(lp1, 10%)\n")
    assert show(program.selects[0].expr) == "(kmeans(embed(minilm), 100) | topk(lp1, 10%))"


def test_comments_and_blank_lines_are_ignored_everywhere():
    text = (
        "# a header comment\n"
        "\n"
        "x = f(1,   # trailing comment\n"
        "# a column-1 comment inside a statement\n"
        "\n"
        "      2)   # another\n"
        "   # indented comment\n"
        "\n"
        "select x # the result\n"
        "# the end\n"
    )
    program = parse_ok(text)
    assert [b.name for b in program.bindings] == ["x"]
    assert show(program.bindings[0].expr) == "f(1, 2)"
    assert show(program.selects[0].expr) == "x"
    assert len(split_statements(text)) == 2


def test_a_file_of_only_comments_has_no_statements():
    program = parse_ok("# nothing\n\n   # here\n")
    assert program.bindings == [] and program.selects == []


def test_hash_inside_a_string_is_not_a_comment():
    assert shape('field("a#b")') == "field('a#b')"


def test_crlf_line_endings():
    program = parse_ok("x = 1\r\nselect topk(x,\r\n  3)\r\n")
    assert [b.name for b in program.bindings] == ["x"]
    assert show(program.selects[0].expr) == "topk(x, 3)"


def test_binding_and_select_positions():
    program = parse_ok("\n# c\nlonger_name = 1\nselect longer_name\n")
    binding = program.bindings[0]
    assert binding.name == "longer_name"
    assert binding.span.location() == "t.sel:3:1"
    assert binding.span.text == "longer_name"
    assert program.selects[0].span.location() == "t.sel:4:1"


def test_names_are_letters_digits_underscores():
    program = parse_ok("_a1 = 2\nB_2c = _a1\nselect B_2c\n")
    assert [b.name for b in program.bindings] == ["_a1", "B_2c"]


def test_a_name_cannot_start_with_a_digit():
    d = only_error("select 1abc")
    assert d.message.startswith("unexpected name abc")


def test_name_that_starts_with_select_is_a_name():
    program = parse_ok("selected = 1\nselect selected\n")
    assert [b.name for b in program.bindings] == ["selected"]
    assert show(program.selects[0].expr) == "selected"


# ----------------------------------------------------------------------------- literals
@pytest.mark.parametrize(
    "text, value",
    [
        ("0", Fraction(0)),
        ("1000", Fraction(1000)),
        ("0.5", Fraction(1, 2)),
        ("2.5e-3", Fraction(1, 400)),
        ("1E+3", Fraction(1000)),
        ("2e3", Fraction(2000)),
        ("1.5E2", Fraction(150)),
    ],
)
def test_number_literals_are_exact(text, value):
    e = select_expr(f"f({text})").args[0]
    assert isinstance(e, ast.Number)
    assert e.value == value
    assert e.span.text == text


def test_number_python_value_is_int_when_whole():
    assert select_expr("f(1000)").args[0].python() == 1000
    assert isinstance(select_expr("f(1e3)").args[0].python(), int)
    assert select_expr("f(0.25)").args[0].python() == 0.25


@pytest.mark.parametrize(
    "text, fraction, of_pool",
    [
        ("10%", Fraction(1, 10), False),
        ("10.5%", Fraction(21, 200), False),
        ("0%", Fraction(0), False),
        ("100%", Fraction(1), False),
        ("5% of pool", Fraction(1, 20), True),
        ("12.5% of pool", Fraction(1, 8), True),
    ],
)
def test_percentages(text, fraction, of_pool):
    e = select_expr(f"topk(s, {text})").args[1]
    assert isinstance(e, ast.Percent)
    assert e.fraction == fraction
    assert e.of_pool is of_pool
    assert e.span.text == text


def test_percent_with_space_before_sign_is_an_error():
    d = only_error("select topk(s, 50 %)")
    assert d.message.startswith("unexpected character '%'")
    assert d.span.location() == "t.sel:1:19"


def test_of_pool_must_be_complete():
    d = only_error("select topk(s, 5% of)")
    assert "'pool'" in d.message


def test_string_escapes():
    e = select_expr(r'f("a\"b\\c\nd\te")').args[0]
    assert isinstance(e, ast.String)
    assert e.value == 'a"b\\c\nd\te'


def test_empty_string():
    e = select_expr('f("")').args[0]
    assert isinstance(e, ast.String) and e.value == ""


def test_booleans_and_none():
    args = select_expr("f(true, false, none)").args
    assert isinstance(args[0], ast.Bool) and args[0].value is True
    assert isinstance(args[1], ast.Bool) and args[1].value is False
    assert isinstance(args[2], ast.NoneLit)


@pytest.mark.parametrize(
    "text, rendered",
    [
        ("[]", "[]"),
        ("[1]", "[1]"),
        ("[1, 2, 3]", "[1, 2, 3]"),
        ("[1, 2,]", "[1, 2]"),
        ('["a", [true, none],]', "['a', [true, none]]"),
        ("[a + 1, f(x)]", "[(a + 1), f(x)]"),
    ],
)
def test_lists_including_trailing_commas(text, rendered):
    e = select_expr(f"f({text})").args[0]
    assert isinstance(e, ast.ListLit)
    assert show(e) == rendered


def test_a_list_needs_items_between_commas():
    d = only_error("select [,]")
    assert d.message.startswith("unexpected ','")


def test_calls_positional_keyword_and_trailing_comma():
    call = select_expr('length(field="output", unit="words",)')
    assert isinstance(call, ast.Call)
    assert call.func == "length"
    assert call.args == []
    assert [(k.name, k.value.value) for k in call.kwargs] == [("field", "output"), ("unit", "words")]
    assert call.kwargs[0].span.text == "field"
    assert call.func_span.text == "length"

    call = select_expr("topk(ifd, 5%, )")
    assert show(call) == "topk(ifd, 5%)"
    assert select_expr("f()").args == []


def test_lambda_argument():
    call = select_expr("iterate(random(100, seed=0), 10, cur -> cur + kcenter(x, 100, given=cur))")
    assert show(call) == "iterate(random(100, seed=0), 10, (cur -> (cur + kcenter(x, 100, given=cur))))"
    lam = call.args[2]
    assert isinstance(lam, ast.Lambda)
    assert lam.param == "cur"
    assert lam.param_span.text == "cur"


def test_lambda_body_extends_as_far_as_possible():
    call = select_expr("f(c -> c | topk(s, 5) & g(1), 3)")
    assert show(call) == "f((c -> (c | (topk(s, 5) & g(1)))), 3)"


def test_parenthesised_expressions_and_spans():
    e = select_expr("(a | b)")
    assert show(e) == "(a | b)"
    assert isinstance(e, ast.BinOp) and e.op == "|"
    assert e.op_span.text == "|"


def test_operator_spans_point_at_the_operator():
    e = select_expr("abc  <=  def")
    assert e.op == "<=" and e.op_span.text == "<="
    e = select_expr("a & b")
    assert e.op_span.text == "&" and e.op_span.location() == "t.sel:1:10"


# --------------------------------------------------------------------------- precedence
@pytest.mark.parametrize(
    "written, means",
    [
        # the "So:" table of docs/language.md, row by row
        ("ifd < 1 | topk(ifd, 5%)", "((ifd < 1) | topk(ifd, 5%))"),
        ("length > 20 & ifd < 1", "((length > 20) & (ifd < 1))"),
        ("kmeans(x, 100) | topk(s, 10%) + random(1)", "(kmeans(x, 100) | (topk(s, 10%) + random(1)))"),
        ("0.7*ifd + 0.3*rank(reward)", "((7/10 * ifd) + (3/10 * rank(reward)))"),
        ("ifd < 1 + x", "(ifd < (1 + x))"),
        ("topk(a, 5) + topk(b, 5) & length > 20", "((topk(a, 5) + topk(b, 5)) & (length > 20))"),
        ("a | b | c", "((a | b) | c)"),
        ("-x * 2", "((-x) * 2)"),
    ],
)
def test_precedence_examples_from_the_docs(written, means):
    assert shape(written) == means


@pytest.mark.parametrize(
    "written, means",
    [
        # level 1 (|) is looser than level 2 (&)
        ("a | b & c", "(a | (b & c))"),
        ("a & b | c", "((a & b) | c)"),
        # level 2 (&) is looser than level 3 (comparisons)
        ("a & b < c", "(a & (b < c))"),
        ("a < b & c", "((a < b) & c)"),
        # level 3 (comparisons) is looser than level 4 (+ -)
        ("a < b + c", "(a < (b + c))"),
        ("a - b >= c", "((a - b) >= c)"),
        # level 4 (+ -) is looser than level 5 (* /)
        ("a + b * c", "(a + (b * c))"),
        ("a / b - c", "((a / b) - c)"),
        # level 5 (* /) is looser than level 6 (unary -)
        ("-a * b", "((-a) * b)"),
        ("a * -b", "(a * (-b))"),
        ("a / -b", "(a / (-b))"),
        # level 6 (unary -) is looser than level 7 (calls, grouping)
        ("-f(x)", "(-f(x))"),
        ("-(a + b)", "(-(a + b))"),
        ("- -a", "(-(-a))"),
        ("a - -b", "(a - (-b))"),
        # level 7: parentheses override everything
        ("(a | b) & c", "((a | b) & c)"),
        ("(a + b) * c", "((a + b) * c)"),
        ("a * (b + c)", "(a * (b + c))"),
        ("a | (b | c)", "(a | (b | c))"),
        # all levels at once
        ("a | b & c < d + e * -f(g)", "(a | (b & (c < (d + (e * (-f(g)))))))"),
        ("-f(g) * e + d < c & b | a", "((((((-f(g)) * e) + d) < c) & b) | a)"),
    ],
)
def test_each_precedence_level_binds_looser_than_the_next(written, means):
    assert shape(written) == means


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_operator(op):
    e = select_expr(f"ifd {op} 1")
    assert isinstance(e, ast.BinOp) and e.op == op
    assert show(e) == f"(ifd {op} 1)"


@pytest.mark.parametrize(
    "written, means",
    [
        ("a | b | c | d", "(((a | b) | c) | d)"),
        ("a & b & c", "((a & b) & c)"),
        ("a + b + c", "((a + b) + c)"),
        ("a - b - c", "((a - b) - c)"),
        ("a + b - c", "((a + b) - c)"),
        ("a - b + c", "((a - b) + c)"),
        ("a * b * c", "((a * b) * c)"),
        ("a / b / c", "((a / b) / c)"),
        ("a * b / c", "((a * b) / c)"),
    ],
)
def test_binary_operators_are_left_associative(written, means):
    assert shape(written) == means


@pytest.mark.parametrize("written, col", [("a < b < c", 14), ("a < b == c", 14), ("a >= b != c", 15)])
def test_comparisons_do_not_chain(written, col):
    d = only_error("select " + written)
    first, second = [t for t in written.split() if t in ("<", "==", ">=", "!=")]
    assert d.message == (f"comparisons do not chain: 'a {first} b {second} c' is not allowed; combine two "
                         f"comparisons with '&', e.g. a {first} b & b {second} c")
    assert d.span.location() == f"t.sel:1:{col}"


@pytest.mark.parametrize("written", ["(a < b) & b < c", "f(a < b, c < d)", "[a < b, c > d]", "a < b | c > d"])
def test_separate_comparisons_are_not_a_chain(written):
    parse_ok("select " + written)


@pytest.mark.parametrize("written, means", [
    ("not a & b", "((not a) & b)"),
    ("not a < b", "(not (a < b))"),
    ("a | not b | c", "((a | (not b)) | c)"),
    ("not not a", "(not (not a))"),
    ('f("x") in ["a", "b"] & g', "((f('x') in ['a', 'b']) & g)"),
    ('f("x") not in [1, 2]', "(f('x') not in [1, 2])"),
    ("not a in [1]", "(not (a in [1]))"),
])
def test_not_and_membership_precedence(written, means):
    assert shape(written) == means


def test_chained_comparison_with_parentheses_parses():
    assert shape("(a < b) < c") == "((a < b) < c)"


# --------------------------------------------------------------------------- syntax errors
def test_unexpected_token_message_and_position():
    d = only_error("x = topk(a,, 3)\nselect x\n")
    assert d.message.startswith("unexpected ','; expected ")
    assert "an expression" in d.message
    assert d.span.location() == "t.sel:1:12"
    assert d.severity == "error"


def test_unexpected_name_token_names_it_and_underlines_it():
    d = only_error("select a bcd")
    assert d.message.startswith("unexpected name bcd")
    assert d.format().splitlines() == [
        f"t.sel:1:10: error: {d.message}",
        "    select a bcd",
        "             ^~~",
    ]


def test_unexpected_closing_paren_at_top_level():
    d = only_error("select y ) z")
    assert d.message.startswith("unexpected ')'")
    assert "end of the statement" in d.message
    assert d.span.location() == "t.sel:1:10"


def test_unexpected_token_at_top_level_does_not_expect_closing_bracket():
    # No bracket is open in `select 1x`, so "expected ')'" would mislead.
    d = only_error("select 1x")
    assert d.message.startswith("unexpected name x")
    assert "')'" not in d.message
    assert "']'" not in d.message


def test_missing_close_paren_at_end_of_statement():
    text = "x = topk(embed, 3\nselect x\n"
    d = only_error(text)
    assert d.message == "unexpected end of statement; expected ')' or ','"
    assert d.span.location() == "t.sel:1:18"
    assert len(d.notes) == 1
    note, span = d.notes[0]
    assert note == "'(' opened here is never closed with ')'"
    assert span.location() == "t.sel:1:9"
    assert d.format() == (
        "t.sel:1:18: error: unexpected end of statement; expected ')' or ','\n"
        "    x = topk(embed, 3\n"
        "                     ^\n"
        "t.sel:1:9: note: '(' opened here is never closed with ')'\n"
        "    x = topk(embed, 3\n"
        "            ^"
    )


def test_missing_close_paren_note_names_the_innermost_open_paren():
    d = only_error("select f(a, g(b, 3\n")
    assert d.notes[0][1].location() == "t.sel:1:14"


def test_missing_close_paren_over_several_lines_points_after_last_token():
    d = only_error("x = topk(a,\n   3\n  # a comment\n\nselect x\n")
    assert d.message == "unexpected end of statement; expected ')' or ','"
    assert d.span.location() == "t.sel:2:5"
    assert d.notes[0][1].location() == "t.sel:1:9"


def test_missing_close_paren_position_ignores_trailing_comment():
    d = only_error("x = topk(a, 3   # note\nselect x\n")
    assert d.span.location() == "t.sel:1:14"


def test_missing_close_paren_position_with_hash_inside_a_string():
    # '#' inside a string is not a comment: the error is after `3`, not inside the string.
    d = only_error('x = f("a#b", 3\nselect x\n')
    assert d.message == "unexpected end of statement; expected ')' or ','"
    assert d.span.location() == "t.sel:1:15"


def test_paren_inside_a_string_is_not_an_open_bracket():
    d = only_error('x = f("a(b", 3\nselect x\n')
    assert d.notes[0][1].location() == "t.sel:1:6"


def test_missing_close_bracket_of_a_list():
    d = only_error("x = [1, 2\nselect x\n")
    assert d.message.startswith("unexpected end of statement; expected ")
    assert "']'" in d.message
    assert d.notes == [("'[' opened here is never closed with ']'", d.notes[0][1])]
    assert d.notes[0][1].location() == "t.sel:1:5"


def test_unexpected_end_of_statement_after_operator():
    d = only_error("select a |")
    assert d.message == "unexpected end of statement; expected an expression"
    assert d.span.location() == "t.sel:1:11"
    assert d.notes == []


def test_empty_select_and_empty_binding():
    d = only_error("select\n")
    assert d.message == "unexpected end of statement; expected an expression"
    assert d.span.location() == "t.sel:1:7"
    program, errors = parse(Source("t.sel", "x =\nselect 1\n"))
    assert len(errors) == 1 and errors[0].span.location() == "t.sel:1:4"
    assert "x" in program.broken_names


def test_unexpected_character():
    d = only_error("select a @ b")
    assert d.message.startswith("unexpected character '@'")
    assert d.span.location() == "t.sel:1:10"
    assert d.format().splitlines()[1:] == ["    select a @ b", "             ^"]


def test_single_quote_gets_the_double_quote_hint():
    d = only_error("select length(field='output')")
    assert d.message.startswith("unexpected character \"'\" (strings use double quotes)")
    assert d.span.location() == "t.sel:1:21"


def test_unexpected_character_on_a_continuation_line():
    d = only_error("select x\n   @")
    assert d.span.location() == "t.sel:2:4"
    assert d.format().splitlines()[1:] == ["       @", "       ^"]


def test_errors_in_two_statements_are_both_reported():
    text = "x = topk(a,, 3)\ny = 1\nselect y ) z\nz = 'abc'\n"
    program, errors = parse(Source("t.sel", text))
    assert [d.span.location() for d in errors] == ["t.sel:1:12", "t.sel:3:10", "t.sel:4:5"]
    assert errors[2].message.startswith("unexpected character \"'\" (strings use double quotes)")
    # the good statement between them is still parsed
    assert [b.name for b in program.bindings] == ["y"]
    assert program.broken_names == {"x", "z"}
    assert program.selects == []


def test_a_broken_statement_does_not_hide_the_next_one():
    program, errors = parse(Source("t.sel", "x = topk(a, 3\nselect x\n"))
    assert len(errors) == 1
    assert len(program.selects) == 1
    assert program.broken_names == {"x"}


def test_lambda_is_not_an_expression_on_its_own():
    d = only_error("x = cur -> cur\nselect x\n")
    assert d.message.startswith("unexpected")
    assert d.span.line == 1


def test_reserved_select_cannot_be_bound():
    d = only_error("select = 3\nselect 1\n")
    assert d.message.startswith("unexpected '='")


# --------------------------------------------------------------------------- Diagnostic.format
def test_format_underlines_the_whole_span_with_tildes():
    src = Source("dir/r.sel", "a = 1\nselect topk(lenght, 5)\n")
    d = Diagnostic("unknown name 'lenght'", Span(src, 2, 13, 18, 24))
    assert d.format() == (
        "dir/r.sel:2:13: error: unknown name 'lenght'\n"
        "    select topk(lenght, 5)\n"
        "                ^~~~~~"
    )
    assert str(d) == d.format()


def test_format_multi_line_span_points_at_its_start_only():
    src = Source("r.sel", "select f(a,\n   b)\n")
    d = Diagnostic("msg", Span(src, 1, 8, 7, 17))
    assert d.format().splitlines()[2] == "           ^"


def test_format_without_span_and_with_note():
    assert Diagnostic("no select").format() == "error: no select"
    src = Source("r.sel", "x = 1\n")
    d = Diagnostic("bad", Span(src, 1, 1, 0, 1), notes=[("see here", Span(src, 1, 5, 4, 5))])
    assert d.format().splitlines() == [
        "r.sel:1:1: error: bad",
        "    x = 1",
        "    ^",
        "r.sel:1:5: note: see here",
        "    x = 1",
        "        ^",
    ]


# --------------------------------------------------------------------------- parse_expression
def test_parse_expression_for_set_values():
    e, errors = parse_expression(Source("--set model", 'hf("Qwen/Qwen2.5-0.5B")'))
    assert errors == []
    assert isinstance(e, ast.Call) and e.func == "hf"
    assert e.args[0].value == "Qwen/Qwen2.5-0.5B"
    assert e.span.source.name == "--set model"


def test_parse_expression_precedence_and_multiline():
    e, errors = parse_expression(Source("--set x", "a | b & c <\n  1 + 2 * 3"))
    assert errors == []
    assert show(e) == "(a | (b & (c < (1 + (2 * 3)))))"


def test_parse_expression_literals():
    for text, rendered in [("5% of pool", "5% of pool"), ("10.5%", "21/2%"), ("[1, 2,]", "[1, 2]"),
                           ("none", "none"), ("-3", "(-3)"), ('"a\\tb"', "'a\\tb'")]:
        e, errors = parse_expression(Source("--set x", text))
        assert errors == [], text
        assert show(e) == rendered


def test_parse_expression_empty():
    e, errors = parse_expression(Source("--set x", "   "))
    assert e is None
    assert [d.message for d in errors] == ["empty expression"]


def test_parse_expression_syntax_error_is_positioned_in_the_set_source():
    e, errors = parse_expression(Source("--set m", "topk(a, "))
    assert e is None
    assert len(errors) == 1
    d = errors[0]
    assert d.message.startswith("unexpected end of statement; expected an expression")
    assert d.span.location() == "--set m:1:8"
    assert d.notes[0][0] == "'(' opened here is never closed with ')'"
    assert d.notes[0][1].location() == "--set m:1:5"


def test_parse_expression_rejects_statements():
    e, errors = parse_expression(Source("--set m", "a = 1"))
    assert e is None and len(errors) == 1
    assert errors[0].message.startswith("unexpected '='")

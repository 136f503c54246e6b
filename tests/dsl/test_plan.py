"""The planner (checked program -> DAG) and the plan printers.

Written against docs/language.md and the contract in dsl/plan.py: a node's id
is a hash of (op, version, canonical params, input ids), so identical
sub-expressions are one node, ids are stable, and they change with a
parameter, an op version or a dataset fingerprint.
"""

from __future__ import annotations

import json

import pytest

from datasel.dsl import explain
from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.ops import registry


# --------------------------------------------------------------------------- helpers
def plan_of(text: str, sets=None, fingerprints=None, name: str = "t.sel"):
    return compile_recipe(recipe_source(text, name=name), sets, fingerprints).plan


def nodes(plan, op: str):
    return [n for n in plan.nodes.values() if n.op == op]


def one(plan, op: str):
    found = nodes(plan, op)
    assert len(found) == 1, f"{len(found)} {op} nodes"
    return found[0]


def input_of(plan, node, role: str):
    assert role in node.roles, (node.op, node.roles)
    return plan.nodes[node.inputs[node.roles.index(role)]]


def output(plan):
    return plan.nodes[plan.output]


def reachable_ids(plan):
    return {n.id for n in plan.reachable()}


# --------------------------------------------------------------------------- CSE
def test_same_scores_used_twice_are_planned_once():
    plan = plan_of("select topk(length, 5) + topk(length, 10)")
    assert len(nodes(plan, "length")) == 1
    topks = nodes(plan, "topk")
    assert len(topks) == 2
    length = one(plan, "length")
    assert all(input_of(plan, t, "scores").id == length.id for t in topks)
    assert sorted(t.params["k"] for t in topks) == [5, 10]
    assert output(plan).op == "union"


def test_identical_selectors_are_one_node():
    plan = plan_of("select topk(length, 5) + topk(length, 5)")
    assert len(nodes(plan, "topk")) == 1
    union = output(plan)
    assert input_of(plan, union, "left").id == input_of(plan, union, "right").id


def test_same_expression_through_prelude_and_recipe_names_is_one_node():
    plan = plan_of('a = length(field="output")\nselect topk(response_chars, 5) + topk(a, 10)')
    length = one(plan, "length")
    assert set(length.names) == {"response_chars", "a"}
    assert len(nodes(plan, "topk")) == 2


def test_explicit_defaults_and_bare_name_are_one_node():
    plan = plan_of('select topk(length, 5) + topk(length(), 6) + topk(length(field="output", unit="chars"), 7)')
    assert len(nodes(plan, "length")) == 1


def test_equal_budgets_written_differently_are_one_node():
    plan = plan_of("select topk(length, 10%) + topk(length, 10.0%) + topk(length, 10.00%)")
    assert len(nodes(plan, "topk")) == 1


def test_identical_iterate_expressions_are_one_node():
    text = ("a = iterate(random(3), 2, cur -> cur + random(1))\n"
            "b = iterate(random(3), 2, cur -> cur + random(1))\n"
            "select a + b")
    plan = plan_of(text)
    assert len(nodes(plan, "iterate")) == 1
    assert len(nodes(plan, "var")) == 1


# --------------------------------------------------------------------------- node identity
def test_node_ids_are_stable_across_compilations():
    text = 'select length(field="instruction") > 5 | topk(rank(length), 10%) + random(3, seed=1)'
    first, second = plan_of(text), plan_of(text)
    assert list(first.nodes) == list(second.nodes)
    assert first.output == second.output


def test_node_ids_do_not_depend_on_layout_comments_or_file_name():
    plain = plan_of("select topk(length, 5)")
    moved = plan_of("# a comment\n\nx = 1\nselect topk(\n    length,   # scores\n    5)\n", name="other.sel")
    assert plain.output == moved.output


def test_iterate_ids_do_not_depend_on_layout_or_file_name():
    text = "select iterate(random(3), 2, cur -> cur + random(1))"
    plain = plan_of(text)
    moved = plan_of("# a comment\n\n" + text, name="other.sel")
    assert plain.output == moved.output


def test_changing_a_parameter_changes_that_node_and_its_users_only():
    a = plan_of("select topk(length, 5)")
    b = plan_of("select topk(length, 6)")
    assert one(a, "length").id == one(b, "length").id
    assert one(a, "dataset").id == one(b, "dataset").id
    assert one(a, "topk").id != one(b, "topk").id
    assert a.output != b.output


def test_changing_an_upstream_parameter_changes_downstream_ids():
    a = plan_of('select topk(length(unit="chars"), 5)')
    b = plan_of('select topk(length(unit="words"), 5)')
    assert one(a, "length").id != one(b, "length").id
    assert one(a, "topk").id != one(b, "topk").id
    assert one(a, "topk").params == one(b, "topk").params


def test_changing_an_op_version_changes_its_id_and_its_users(monkeypatch):
    text = "select topk(length, 5) + random(2)"
    before = plan_of(text)
    monkeypatch.setattr(registry.get("length"), "version", "999-test")
    after = plan_of(text)
    assert one(before, "length").id != one(after, "length").id
    assert one(before, "topk").id != one(after, "topk").id
    assert before.output != after.output
    # nodes that do not depend on `length` keep their id
    assert one(before, "random").id == one(after, "random").id
    assert one(before, "dataset").id == one(after, "dataset").id


def test_dataset_fingerprint_changes_every_id():
    text = "select topk(length, 5)"
    default = plan_of(text)
    abc = plan_of(text, fingerprints={"pool": "abc"})
    abc_again = plan_of(text, fingerprints={"pool": "abc"})
    abd = plan_of(text, fingerprints={"pool": "abd"})
    assert list(abc.nodes) == list(abc_again.nodes)
    for other in (default, abd):
        assert one(abc, "dataset").id != one(other, "dataset").id
        assert one(abc, "length").id != one(other, "length").id
        assert abc.output != other.output
    assert abc.datasets == {"pool": "abc"}


def test_val_fingerprint_changes_only_what_reads_val():
    # A model fine-tuned on val scores the pool: val -> finetune -> loss -> topk -> union.
    text = 'select topk(loss(finetune(hf("smollm"), data=val)), 5) + random(1)'
    a = plan_of(text, fingerprints={"pool": "p", "val": "v1"})
    a_again = plan_of(text, fingerprints={"pool": "p", "val": "v1"})
    b = plan_of(text, fingerprints={"pool": "p", "val": "v2"})
    assert list(a.nodes) == list(a_again.nodes)

    def ids(plan):
        out = {}
        for n in plan.nodes.values():
            label = f"dataset {n.params['name']}" if n.op == "dataset" else n.op
            assert label not in out, label
            out[label] = n.id
        return out

    before, after = ids(a), ids(b)
    assert set(before) == set(after)
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {"dataset val", "finetune", "loss", "topk", "union"}
    assert set(before) - changed == {"dataset pool", "hf", "random"}
    assert a.output != b.output
    # A val that nothing selected reads does not move the plan.
    unused = 'select topk(length, 5) + random(1)\nv = field("x", data=val)'
    assert (plan_of(unused, fingerprints={"pool": "p", "val": "v1"}).output
            == plan_of(unused, fingerprints={"pool": "p", "val": "v2"}).output)


# --------------------------------------------------------------------------- pipes
def test_pipe_pushes_the_selector_onto_its_input():
    plan = plan_of("select length > 20 | topk(length, 10%)")
    topk = one(plan, "topk")
    compare = one(plan, "compare")
    assert plan.output == topk.id
    assert input_of(plan, topk, "input").id == compare.id
    assert input_of(plan, compare, "input").op == "dataset"
    assert compare.params == {"op": ">", "rhs": 20}
    assert input_of(plan, compare, "scores").id == one(plan, "length").id


def test_chained_pipes_feed_each_other():
    plan = plan_of("select random(50) | length > 3 | topk(length, 5)")
    topk = output(plan)
    assert topk.op == "topk"
    compare = input_of(plan, topk, "input")
    assert compare.op == "compare"
    assert input_of(plan, compare, "input").op == "random"


def test_union_after_a_pipe_applies_both_sides_to_the_piped_set():
    plan = plan_of("select random(50) | topk(length, 5) + bottomk(length, 1)")
    union = output(plan)
    assert union.op == "union"
    left, right = input_of(plan, union, "left"), input_of(plan, union, "right")
    assert (left.op, right.op) == ("topk", "bottomk")
    r50 = one(plan, "random")
    assert input_of(plan, left, "input").id == r50.id
    assert input_of(plan, right, "input").id == r50.id
    # The combination's own input is the piped set too (the funnel reads what reached it).
    assert input_of(plan, union, "input").id == r50.id


@pytest.mark.parametrize("op, name", [("&", "intersect"), ("+", "union"), ("-", "difference")])
def test_set_operators_become_combine_nodes(op, name):
    plan = plan_of(f"select topk(length, 5) {op} random(3)")
    node = output(plan)
    assert node.op == name
    assert node.roles == ["input", "left", "right"]
    assert [plan.nodes[i].op for i in node.inputs] == ["dataset", "topk", "random"]


def test_number_on_the_left_of_a_comparison_is_turned_around():
    assert one(plan_of("select 1 > length"), "compare").params == {"op": "<", "rhs": 1}
    assert one(plan_of("select 1 <= length"), "compare").params == {"op": ">=", "rhs": 1}
    assert plan_of("select 1 > length").output == plan_of("select length < 1").output


def test_comparison_of_two_scores_has_an_rhs_input():
    plan = plan_of('select length >= field("x")')
    compare = one(plan, "compare")
    assert compare.params == {"op": ">="}
    assert input_of(plan, compare, "rhs").op == "field"


def test_arithmetic_on_scores_becomes_arith_nodes():
    plan = plan_of("select topk(0.5 * length + 1, 5)")
    arith = sorted(n.params["op"] for n in nodes(plan, "arith"))
    assert arith == ["*", "+"]


def test_partition_pipe_becomes_per_group_with_body_and_var():
    plan = plan_of('select groups("category") | topk(length, 10%)')
    per_group = output(plan)
    assert per_group.op == "per_group"
    assert input_of(plan, per_group, "partition").op == "groups"
    body = plan.nodes[per_group.body]
    var = plan.nodes[per_group.var]
    assert body.op == "topk"
    assert var.op == "var" and var.params["scope"] == "group"
    assert input_of(plan, body, "input").id == var.id
    assert var.id in body.free_vars
    assert body.id in per_group.body_nodes
    assert per_group.free_vars == frozenset()
    # the scores do not depend on the group: computed once, outside the body
    assert one(plan, "length").free_vars == frozenset()
    assert one(plan, "length").id not in per_group.body_nodes


def test_partition_pipe_with_union_body():
    plan = plan_of('select groups("category") | topk(length, 10%) + random(1)')
    per_group = output(plan)
    body = plan.nodes[per_group.body]
    assert body.op == "union"
    assert input_of(plan, body, "input").id == per_group.var
    for role in ("left", "right"):
        assert input_of(plan, input_of(plan, body, role), "input").id == per_group.var


def test_iterate_plans_a_body_with_a_round_variable():
    plan = plan_of("select iterate(random(3, seed=0), 2, cur -> cur + topk(length, count(cur)))")
    it = output(plan)
    assert it.op == "iterate"
    assert it.params["rounds"] == 2
    assert input_of(plan, it, "init").op == "random"
    var = plan.nodes[it.var]
    assert var.op == "var"
    assert var.params == {"name": "cur", "scope": "round"}
    body = plan.nodes[it.body]
    assert body.op == "union"
    assert body.free_vars == frozenset({var.id})
    assert input_of(plan, body, "left").id == var.id
    count = one(plan, "count")
    assert count.free_vars == frozenset({var.id})
    assert {body.id, count.id, one(plan, "topk").id} <= it.body_nodes
    assert it.free_vars == frozenset()
    assert one(plan, "length").free_vars == frozenset()
    assert one(plan, "random").free_vars == frozenset()


# --------------------------------------------------------------------------- canonical params
def test_budgets_arrive_canonically_in_params():
    plan = plan_of("select topk(length, 5% of pool) + topk(length, 10%) + topk(length, 10.5%) + topk(length, 7)")
    ks = sorted(json.dumps(n.params["k"]) for n in nodes(plan, "topk"))
    assert ks == sorted(json.dumps(k) for k in [{"budget": "5% of pool"}, {"budget": "10%"},
                                                 {"budget": "10.5%"}, 7])


def test_budget_values_keep_their_meaning():
    plan = plan_of("select topk(length, 5% of pool) + bottomk(length, 10%)")
    top = one(plan, "topk").values["k"]
    bottom = one(plan, "bottomk").values["k"]
    assert (top.of_pool, bottom.of_pool) == (True, False)
    assert top.resolve(10, 1000) == 10 and top.resolve(100, 1000) == 50
    assert bottom.resolve(99, 1000) == 9


def test_whole_float_literal_is_an_integer_param():
    assert one(plan_of("select random(1e3)"), "random").params["k"] == 1000
    assert plan_of("select random(1e3)").output == plan_of("select random(1000)").output


# --------------------------------------------------------------------------- explain
TEXT = 'usable = length(field="output") > 20\nselect usable | groups("category") | topk(length, 10%) + random(1)'


def test_to_json_shape():
    plan = plan_of(TEXT)
    doc = explain.to_json(plan)
    json.dumps(doc)  # JSON-able
    assert set(doc) == {"nodes", "output"}
    ids = [n["id"] for n in doc["nodes"]]
    assert doc["output"] == plan.output and doc["output"] in ids
    assert set(ids) == reachable_ids(plan)
    assert len(ids) == len(set(ids))
    seen = set()
    for entry in doc["nodes"]:
        assert {"id", "op", "kind", "params", "inputs", "cache"} <= set(entry)
        node = plan.nodes[entry["id"]]
        assert entry["op"] == node.op
        assert entry["kind"] == str(node.kind)
        assert entry["params"] == node.params
        assert entry["inputs"] == node.inputs
        assert entry["cache"] is None
        assert set(entry["inputs"]) <= seen  # inputs come before their users
        seen.add(entry["id"])
    per_group = next(e for e in doc["nodes"] if e["op"] == "per_group")
    assert per_group["body"] in ids and per_group["variable"] in ids
    usable = next(e for e in doc["nodes"] if e["op"] == "compare")
    assert usable["names"] == ["usable"]


def test_to_json_reports_cache_state():
    plan = plan_of("select topk(length, 5)")
    state = {plan.output: {"state": "hit"}}
    doc = explain.to_json(plan, state)
    by_id = {e["id"]: e for e in doc["nodes"]}
    assert by_id[plan.output]["cache"] == "hit"
    assert by_id[one(plan, "length").id]["cache"] is None


def test_to_text_mentions_every_node():
    plan = plan_of(TEXT)
    text = explain.to_text(plan, title="t.sel")
    reachable = plan.reachable()
    assert text.splitlines()[0] == f"plan for t.sel: {len(reachable)} nodes, output #{len(reachable)}"
    rows = text.splitlines()[1:]
    assert len(rows) == len(reachable)
    for i, (row, node) in enumerate(zip(rows, reachable), start=1):
        assert row.split()[0] == f"#{i}"
        assert node.op in row or node.label() in row
    assert "usable = compare" in text


def test_to_dot_mentions_every_node_and_edge():
    plan = plan_of(TEXT)
    dot = explain.to_dot(plan)
    assert dot.startswith("digraph plan {") and dot.rstrip().endswith("}")
    reachable = plan.reachable()
    number = {n.id: i for i, n in enumerate(reachable, start=1)}
    for node in reachable:
        assert f"  n{number[node.id]} [label=" in dot
        for role, inp in zip(node.roles, node.inputs):
            assert f'n{number[inp]} -> n{number[node.id]} [label="{role}"]' in dot
        if node.body:
            assert f"n{number[node.body]} -> n{number[node.id]} [label=\"body\"" in dot
    assert f"n{number[plan.output]} [label=" in dot and "peripheries=2" in dot

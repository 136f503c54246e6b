"""Printing a plan: a readable text listing, JSON for tools, DOT for graphviz."""

from __future__ import annotations

import json

from datasel.dsl.plan import Plan
from datasel.ops.contract import Role

_CACHE_WORDS = {"hit": "cached", "partial": "partly cached", "miss": "to compute", None: ""}


def _numbering(plan: Plan) -> dict[str, int]:
    return {node.id: i for i, node in enumerate(plan.reachable(), start=1)}


def to_json(plan: Plan, cache_state: dict[str, dict] | None = None) -> dict:
    """``{"nodes": [...], "output": id}`` with each node's cache state (null without a pool)."""
    nodes = []
    for node in plan.reachable():
        state = (cache_state or {}).get(node.id)
        entry = {
            "id": node.id,
            "op": node.op,
            "kind": str(node.kind),
            "params": node.params,
            "inputs": node.inputs,
            "input_roles": node.roles,
            "cache": state["state"] if state else None,
            "names": node.names,
            "dataset": node.dataset,
            "position": node.span.location() if node.span else None,
        }
        if state and "fraction" in state:
            entry["cached_fraction"] = state["fraction"]
        if node.body:
            entry["body"] = node.body
            entry["variable"] = node.var
        if node.free_vars:
            entry["per"] = sorted(plan.nodes[v].params["scope"] for v in node.free_vars)
        nodes.append(entry)
    return {"nodes": nodes, "output": plan.output}


def to_text(plan: Plan, cache_state: dict[str, dict] | None = None, title: str = "") -> str:
    """A numbered listing, inputs before their users; ``#n`` refers to node n."""
    number = _numbering(plan)
    nodes = plan.reachable()
    lines = []
    if title:
        lines.append(f"plan for {title}: {len(nodes)} nodes, output #{number[plan.output]}")
    rows = []
    for node in nodes:
        refs = []
        for role, inp in zip(node.roles, node.inputs):
            target = plan.nodes[inp]
            if target.role is Role.CONST:
                refs.append(f"{role}={json.dumps(target.params['value'])}")
            elif role == node.spec.maps_over and target.role is Role.DATASET and target.params["name"] == "pool":
                continue
            elif target.role is Role.VARIABLE and role == "of":
                continue
            else:
                refs.append(f"{role}=#{number[inp]}")
        if node.body:
            refs.append(f"each {plan.nodes[node.var].params['scope']}: #{number[node.body]}")
        label = node.label()
        what = f"{label}  [{', '.join(refs)}]" if refs else label
        if node.names:
            what = f"{' = '.join(node.names)} = {what}"
        state = (cache_state or {}).get(node.id)
        cache = ""
        if node.free_vars:
            scopes = sorted({plan.nodes[v].params["scope"] for v in node.free_vars})
            cache = f"per {'/'.join(scopes)}"
        elif state:
            cache = _CACHE_WORDS[state["state"]]
            if state["state"] == "partial":
                cache += f" {state['fraction']:.0%}"
            if state.get("note"):
                cache += f" ({state['note']})"
        rows.append((f"#{number[node.id]}", str(node.kind), what, cache, _work_line(state)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    total, timed, bounded = 0.0, True, False
    for r in rows:
        line = f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}"
        if r[3]:
            line += f"  {r[3]}"
        lines.append(line.rstrip())
        if r[4]:
            lines.append(f"  {'':<{widths[0]}}  {'':<{widths[1]}}  └ {r[4]}")
    for state in (cache_state or {}).values():
        work = state.get("work")
        if work:
            bounded |= not state.get("exact", True)
            if work.get("seconds") is None:
                timed = False
            else:
                total += work["seconds"]
    if any(state.get("work") for state in (cache_state or {}).values()):
        from datasel.dsl.progress import duration as _duration

        bound = "at most " if bounded else ""
        lines.append(f"model work left on this pool: {bound}about {_duration(total)}"
                     + ("" if timed else " (some steps have no time estimate)")
                     + "; rough, from rates measured once on this machine")
    elif cache_state:
        lines.append("model work left on this pool: none")
    return "\n".join(lines)


def _work_line(state: dict | None) -> str:
    """``569 records to compute: 71,234 tokens forward, ≈ 3m10s`` for a node with work left."""
    if not state or not state.get("work"):
        return ""
    from datasel.dsl.estimate import format_work
    from datasel.ops.context import Work

    return format_work(Work(**state["work"]), state.get("exact", True))


def to_dot(plan: Plan, cache_state: dict[str, dict] | None = None) -> str:
    """Graphviz source: boxes per node, edges labelled with the input's role."""
    number = _numbering(plan)
    colours = {"hit": "palegreen", "partial": "khaki", "miss": "lightpink"}
    out = ["digraph plan {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
    for node in plan.reachable():
        label = f"#{number[node.id]} {node.label()}\\n{node.kind}"
        if node.names:
            label = f"{', '.join(node.names)} =\\n" + label
        label = label.replace('"', '\\"')
        state = (cache_state or {}).get(node.id)
        fill = f', style=filled, fillcolor="{colours[state["state"]]}"' if state and state["state"] in colours else ""
        shape = ", peripheries=2" if node.id == plan.output else ""
        out.append(f'  n{number[node.id]} [label="{label}"{fill}{shape}];')
        for role, inp in zip(node.roles, node.inputs):
            out.append(f'  n{number[inp]} -> n{number[node.id]} [label="{role}"];')
        if node.body:
            out.append(f'  n{number[node.body]} -> n{number[node.id]} [label="body", style=dashed];')
    out.append("}")
    return "\n".join(out)

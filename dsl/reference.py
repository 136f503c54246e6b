"""Operator reference text, generated from the op declarations (``datasel ops``, docs/ops.md)."""

from __future__ import annotations

import textwrap

from datasel.ops import registry as reg
from datasel.ops.contract import Role

ROLE_WORDS = {
    Role.MAP: "per record, cached per record, computed only for the rows that reach it",
    Role.SCORES: "per record, recomputed on demand (cheap)",
    Role.SELECTOR: "a selector: applied to the records that reach it",
    Role.PARTITION: "a partition: groups the records that reach it",
    Role.SET_SCORES: "per record, computed for the records that reach it together and cached whole",
    Role.VALUE: "a value computed once per run",
    Role.MACRO: "defined as an expression over other operators (shown by `datasel compile`), whose parts are shared",
    Role.DATASET: "a leaf of every plan: a dataset from the command line, identified by its content",
    Role.CONST: "a leaf of a plan: a literal",
    Role.VARIABLE: "a variable bound while the plan runs",
}


def list_ops() -> str:
    """One line per operator: signature and summary, grouped by family."""
    ops = reg.registry()
    by_family: dict[str, list[reg.OpSpec]] = {}
    for spec in ops.values():
        by_family.setdefault(spec.family, []).append(spec)
    lines = []
    for family in sorted(by_family):
        lines.append(f"{family}:")
        for spec in sorted(by_family[family], key=lambda s: s.name):
            lines.append(f"  {spec.signature()}")
            if spec.summary:
                lines.append(f"      {spec.summary}")
    lines.append("")
    lines.append("`datasel ops NAME` shows one operator in full.")
    return "\n".join(lines)


def describe_op(name: str) -> str | None:
    """The full description of one operator, or None if unknown."""
    spec = reg.get(name)
    if spec is None:
        return None
    lines = [spec.signature(), "", textwrap.indent(spec.doc, "  ") if spec.doc else "", ""]
    lines.append("parameters:")
    for p in spec.params:
        default = "required" if p.required else f"default {reg.format_value(p.default)}"
        choices = f"; one of {', '.join(reg.format_value(c) for c in p.choices)}" if p.choices else ""
        choices += f"; {p.bounds()}" if p.bounds() else ""
        lines.append(f"  {p.name:<12} {reg.kind_name(p.kind):<22} {default}{choices}")
        if p.doc:
            lines.append(f"  {'':<12} {p.doc}")
    lines.append("")
    if spec.role is Role.MAP:
        columns = ", ".join(f"{c.name} (a list per record)" if c.ragged else c.name for c in spec.columns)
        lines.append(f"outputs per record: {columns}")
        r = spec.resources
        lines.append(f"resources per worker: {r.cpus:g} CPU" + (f", {r.gpus:g} GPU when there is one" if r.gpus else "")
                     + (f", about {r.memory_gb:g} GB" if r.memory_gb else ""))
    lines.append(f"evaluation: {ROLE_WORDS[spec.role]}; op version {spec.version}, with a fingerprint of its code "
                 f"({spec.code_version}; part of every cache key)")
    return "\n".join(lines)


def markdown_reference() -> str:
    """The operator reference as Markdown, grouped by family."""
    ops = reg.registry()
    out = ["# Operator reference", "",
           "Generated from the operator declarations by `datasel ops --markdown`; do not edit by hand.", ""]
    by_family: dict[str, list[reg.OpSpec]] = {}
    for spec in ops.values():
        by_family.setdefault(spec.family, []).append(spec)
    for family in sorted(by_family):
        out += [f"## {family}", ""]
        for spec in sorted(by_family[family], key=lambda s: s.name):
            out += [f"### `{spec.name}`", "", f"`{spec.signature()}`", "", spec.doc or "", ""]
            out += ["| parameter | kind | default | notes |", "|---|---|---|---|"]
            for p in spec.params:
                default = "*required*" if p.required else f"`{reg.format_value(p.default)}`"
                notes = p.doc + (f" (one of {', '.join(reg.format_value(c) for c in p.choices)})" if p.choices else "")
                notes += f" ({p.bounds()})" if p.bounds() else ""
                out.append(f"| `{p.name}` | {reg.kind_name(p.kind)} | {default} | {notes} |")
            out += ["", f"*{ROLE_WORDS[spec.role]}; version {spec.version}.*", ""]
    return "\n".join(out)

"""Every pool record accounted for: the funnel of a run, and why each record was kept or dropped.

After a run, the output selection is walked back along its pipe stages
(``clean | fits | facility(emb, 10%)`` has three) and each stage is asked, for
every record that reached it, whether it kept the record and why: a
comparison gives the value it compared, ``topk`` the rank and the cut-off,
``dedup_exact`` the record it duplicates, a score that is NaN the operator
that produced no value and its reason ("the prompt fills max_length").  The
answers come from the cached values and from what ops said while running
(``ctx.exclude``, stored with their cached results), so a cached rerun
accounts for every record in the same words.

The result goes into the manifest (``funnel`` and ``records``), is printed
after ``datasel run``, and is what ``datasel why`` reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from datasel.dsl.data import Dataset
from datasel.dsl.engine import Engine, RunContext
from datasel.dsl.plan import Node, Plan
from datasel.ops.contract import Role, Verdict

KEPT, DROPPED = True, False


def expression_text(node: Node, limit: int = 60) -> str:
    """What the user wrote for a node (whitespace collapsed), else its label."""
    text = " ".join(node.span.text.split()) if node.span is not None else node.label()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stage_label(node: Node) -> str:
    """A stage as the funnel shows it: ``fits = ifd_ppl < 1``, ``facility(emb, 10% of pool)``."""
    text = expression_text(node)
    names = [n for n in node.names if n != text]
    return f"{names[0]} = {text}" if names else text


def pipe_chain(plan: Plan, node_id: str, base: str | None = None) -> list[str]:
    """The pipe stages from the first one to ``node_id``, stopping at ``base`` (or a dataset / variable)."""
    chain = []
    nid = node_id
    while nid is not None and nid != base:
        node = plan.nodes[nid]
        if node.role in (Role.DATASET, Role.VARIABLE):
            break
        chain.append(nid)
        nid = node.input("input")
    return chain[::-1]


@dataclass
class Stage:
    """One pipe stage of the output: the records that reached it and its verdict on each."""

    number: int
    node: Node
    label: str
    rows: np.ndarray  # pool indices that reached the stage, sorted
    kept: np.ndarray  # bool per row
    verdict: Verdict  # aligned with rows

    def dropped_reasons(self) -> Counter:
        cases = self.verdict.case[~self.kept]
        return Counter(self.verdict.notes[int(c)][1] for c in cases)


class Accounting:
    """The funnel and per-record verdicts of one run; see :func:`account`."""

    def __init__(self, pool: Dataset, stages: list[Stage], selected: np.ndarray):
        self.pool = pool
        self.stages = stages
        self.selected = np.asarray(selected, dtype=np.int64)

    def record_name(self, index: int) -> str:
        """``record 17 (line 18)``: a pool record by its position in the file (and line, for JSON Lines)."""
        position = int(self.pool.positions[index])
        line = self.pool.lines[index]
        return f"record {position} (line {line})" if line else f"record {position}"

    def dropped_at(self) -> np.ndarray:
        """Per pool record: the number of the stage that dropped it, 0 if selected."""
        out = np.zeros(len(self.pool), dtype=np.int64)
        for stage in self.stages:
            out[stage.rows[~stage.kept]] = stage.number
        return out

    def funnel(self) -> list[dict]:
        rows = [{"stage": 0, "label": "pool", "out": len(self.pool)}]
        for s in self.stages:
            rows.append({
                "stage": s.number, "label": s.label, "op": s.node.op, "node": s.node.id,
                "position": s.node.span.location() if s.node.span else None,
                "in": int(len(s.rows)), "out": int(s.kept.sum()),
                "dropped": dict(s.dropped_reasons().most_common()),
            })
        return rows

    def to_json(self) -> dict:
        """The manifest's ``funnel`` and ``records`` sections (every pool record, its stage and reason)."""
        n = len(self.pool)
        funnel = self.funnel()
        dropped_at = self.dropped_at()
        reason: list[str | None] = [None] * n
        for stage, entry in zip(self.stages, funnel[1:]):
            case = np.full(n, -1, dtype=np.int64)
            case[stage.rows] = stage.verdict.case
            values = {}
            for name, column in stage.verdict.values.items():
                if np.ndim(column) == 0 and not isinstance(column, (list, tuple)):
                    values[name] = _json_value(column)
                    continue
                full = np.full(n, None, dtype=object)
                full[stage.rows] = [_json_value(v) for v in np.asarray(column, dtype=object)]
                values[name] = full.tolist()
            entry["notes"] = [list(note) for note in stage.verdict.notes]
            entry["case"] = [None if c < 0 else c for c in case.tolist()]
            entry["values"] = values
            for row in np.flatnonzero(~stage.kept):
                reason[int(stage.rows[row])] = stage.verdict.text(int(row), self.record_name)
        return {
            "funnel": funnel,
            "records": {
                "position": [int(p) for p in self.pool.positions],
                "line": list(self.pool.lines),
                "stage": [int(s) if s else None for s in dropped_at],
                "reason": reason,
            },
        }

    def summary(self) -> str:
        """The funnel as a small table, for the end of ``datasel run``."""
        rows = self.funnel()
        width = max(len(str(r["out"])) for r in rows)
        label_width = min(48, max(len(r["label"]) for r in rows))
        lines = [f"  {rows[0]['out']:>{width}}  pool"]
        for r in rows[1:]:
            lost = r["in"] - r["out"]
            reasons = ", ".join(f"{reason} ({count})" if len(r["dropped"]) > 1 else reason
                                for reason, count in r["dropped"].items())
            tail = f"  −{lost}: {reasons}" if lost else ""
            lines.append(f"  {r['out']:>{width}}  {r['label']:<{label_width}}{tail}")
        return "\n".join(lines)

    def one_line(self) -> str:
        """``586 → 574 dedup_exact → 569 ifd_ppl < 1 → 58 facility``."""
        parts = [str(len(self.pool))]
        for s in self.stages:
            parts.append(f"{int(s.kept.sum())} {expression_text(s.node, 28)}")
        return " → ".join(parts)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------- verdicts
class Explainer:
    """Builds verdicts for plan nodes from the engine's (cached) results."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.plan = engine.plan
        self.pool = engine.pool

    def record_name(self, index: int) -> str:
        position = int(self.pool.positions[index])
        line = self.pool.lines[index]
        return f"record {position} (line {line})" if line else f"record {position}"

    def stage(self, node: Node, env: dict) -> tuple[np.ndarray, np.ndarray, Verdict]:
        """``(rows that reached node, kept mask, verdict)`` for one node applied under ``env``."""
        rows = np.sort(self.engine.selection(node.input("input"), env).indices)
        kept_order = self.engine.selection(node.id, env).indices
        kept = np.isin(rows, kept_order)
        verdict = self.declared(node, env, rows, kept, kept_order)
        return rows, kept, self.with_exclusions(node, env, rows, kept, verdict)

    def declared(self, node: Node, env: dict, rows, kept, kept_order) -> Verdict:
        spec = node.spec
        if spec.explain is not None:
            args = self.engine.arguments(node, env)
            ctx = ExplainContext(self, node, env)
            verdict = spec.explain(ctx, rows, kept_order, **args)
            if verdict is not None:
                return verdict
        order = np.zeros(len(rows), dtype=np.int64)
        order[np.searchsorted(rows, kept_order)] = np.arange(1, len(kept_order) + 1)
        name = node.op
        return Verdict(
            [(KEPT, "picked", f"pick {{order}} of {{k}} by {name}"),
             (DROPPED, "not picked", f"not among the {{k}} records {name} picked from {{n}}")],
            np.where(kept, 0, 1), {"order": order, "k": len(kept_order), "n": len(rows)})

    def with_exclusions(self, node: Node, env: dict, rows, kept, verdict: Verdict) -> Verdict:
        """Let what the op said about a record (``ctx.exclude``) override the generic verdict."""
        exclusions = self.engine.exclusions_of(node.id, env)
        if not exclusions:
            return verdict
        notes = list(verdict.notes)
        case = np.asarray(verdict.case, dtype=np.int64).copy()
        values = {name: (np.array([col] * len(rows), dtype=object) if np.ndim(col) == 0
                         else np.asarray(col, dtype=object).copy())
                  for name, col in verdict.values.items()}
        for ex in exclusions:
            pos = np.searchsorted(rows, ex.indices)
            ok = (pos < len(rows))
            ok[ok] &= rows[pos[ok]] == ex.indices[ok]
            ok[ok] &= ~kept[pos[ok]]
            if not ok.any():
                continue
            notes.append((DROPPED, ex.reason, ex.detail or ex.reason))
            case[pos[ok]] = len(notes) - 1
            for name, column in ex.values.items():
                if name not in values:
                    values[name] = np.full(len(rows), None, dtype=object)
                values[name][pos[ok]] = np.asarray(column, dtype=object)[ok]
        return Verdict(notes, case, values)

    # Combinations and groups are explained record by record (their parts are sub-expressions).
    def expression(self, node_id: str, env: dict, base: str, rows: np.ndarray) -> tuple[np.ndarray, list, list]:
        """What the sub-expression rooted at ``node_id`` did to ``rows`` (the records of node ``base``).

        Returns (kept mask, reason per row, text per row).
        """
        chain = pipe_chain(self.plan, node_id, base)
        kept = np.ones(len(rows), dtype=bool)
        reasons: list[str] = ["kept"] * len(rows)
        texts: list[str] = ["kept"] * len(rows)
        labels = [stage_label(self.plan.nodes[n]) for n in chain]
        for nid, label in zip(chain, labels):
            stage_rows, stage_kept, verdict = self.stage(self.plan.nodes[nid], env)
            where = np.searchsorted(stage_rows, rows)
            inside = where < len(stage_rows)
            inside[inside] &= stage_rows[where[inside]] == rows[inside]
            for i in np.flatnonzero(inside & kept):
                row = int(where[i])
                text = verdict.text(row, self.record_name)
                if len(chain) > 1:
                    text = f"{label}: {text}"
                if stage_kept[row]:
                    texts[i] = text
                else:
                    kept[i] = False
                    reasons[i] = verdict.notes[int(verdict.case[row])][1]
                    texts[i] = text
        return kept, reasons, texts



class ExplainContext(RunContext):
    """What an op's ``explain`` hook may ask besides the run-time context: verdicts on its sub-expressions."""

    def __init__(self, explainer: Explainer, node: Node, env: dict):
        super().__init__(explainer.engine, node, env, explainer.pool)
        self._explainer = explainer

    def input_label(self, param: str) -> str:
        """How the funnel names the expression given as ``param`` (``every record`` for the input itself)."""
        nid = self._node.input(param)
        if nid == self._node.input("input"):
            return "every record"
        return stage_label(self._explainer.plan.nodes[nid])

    def explain_input(self, param: str, rows: np.ndarray) -> tuple[np.ndarray, list, list]:
        """What the selector given as ``param`` did to ``rows`` (which reached this node): kept, reasons, texts."""
        return self._explainer.expression(self._node.input(param), self._env, self._node.input("input"), rows)

    def input_exclusions(self, param: str) -> list:
        """What the op given as ``param`` said about records it left out (``ctx.exclude``): a partition's
        records in no group, say."""
        return list(self._engine.exclusions_of(self._node.input(param), self._env))

    def explain_call(self, param: str, members: np.ndarray, group: tuple | None = None):
        """What the function argument ``param`` did to ``members`` when called with them (a group, say)."""
        inner = dict(self._env)
        selection = self._engine.selection_of(members)
        if group is not None:
            self._engine._groups[selection.key] = group
        inner[self._node.var] = selection
        return self._explainer.expression(self._node.body, inner, self._node.var, np.sort(members))


def account(engine: Engine, selected: np.ndarray) -> Accounting:
    """The funnel and per-record verdicts of the run that ``engine`` just finished."""
    explainer = Explainer(engine)
    stages = []
    for number, nid in enumerate(pipe_chain(engine.plan, engine.plan.output), start=1):
        node = engine.plan.nodes[nid]
        rows, kept, verdict = explainer.stage(node, {})
        stages.append(Stage(number, node, stage_label(node), rows, kept, verdict))
    return Accounting(engine.pool, stages, selected)


# ------------------------------------------------------------- datasel why
def find_record(manifest: dict, record: str, *, line: bool = False,
                pool_loader: Callable[[], Dataset] | None = None) -> int:
    """The pool index (row of the manifest's ``records``) that ``record`` names.

    ``record`` is the record's position in the pool file (as in ``selected``),
    with ``line`` a line number of the file, or the text of a JSON Lines line
    (matched by content, which needs ``pool_loader``).
    """
    table = manifest["records"]
    text = record.strip()
    if text.startswith("{"):
        import json

        from datasel.dsl.data import record_hash

        if pool_loader is None:
            raise ValueError("matching a record by its text needs the pool file")
        try:
            wanted = record_hash(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"not a JSON record: {exc}") from None
        pool = pool_loader()
        hits = [i for i, h in enumerate(pool.hashes.tolist()) if h == wanted]
        if not hits:
            raise ValueError("no record of the pool has exactly this content")
        return hits[0]
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"RECORD must be a record number, a line number with --line, or a JSON line; got {record!r}") from None
    column = table["line"] if line else table["position"]
    if number in column:
        return column.index(number)
    skipped = [b for b in manifest.get("bad_records", []) if b.get("line" if line else "position") == number]
    if skipped:
        b = skipped[0]
        raise LookupError(f"skipped when the pool was read ({b['reason']}: {b['detail']}); it never reached the recipe")
    what = "line" if line else "record"
    raise ValueError(f"the pool has no {what} {number} "
                     f"({'lines' if line else 'records'} {min(column, default=0)}–{max(column, default=0)})")


def preview(manifest: dict, index: int, width: int = 100) -> str | None:
    """The record's instruction and response, shortened, read from its line of a JSON Lines pool (if it is there)."""
    import json
    from pathlib import Path

    from datasel.dsl.data import BadRecord, normalize

    line = manifest["records"]["line"][index]
    path = Path(manifest["pool"]["path"])
    if not line or not path.is_file():
        return None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == line:
                break
        else:
            return None
    try:
        record = normalize(json.loads(raw), manifest["pool"].get("format") or "alpaca")
    except (ValueError, BadRecord, UnicodeDecodeError):
        return None

    def short(text: str, n: int) -> str:
        text = " ".join(text.split())
        return json.dumps(text if len(text) <= n else text[: n - 1] + "…", ensure_ascii=False)

    prompt = record["instruction"] + (" " + record["input"] if record["input"] else "")
    return f"{short(prompt, width * 3 // 5)} → {short(record['output'], width * 2 // 5)}"


def why(manifest: dict, index: int, *, show: str | None = None) -> str:
    """The path of pool record ``index`` through the recipe, from a run's manifest (``show``: a preview line)."""
    table = manifest["records"]
    position = table["position"][index]

    def record_name(i: int) -> str:
        p, ln = table["position"][i], table["line"][i]
        return f"record {p} (line {ln})" if ln else f"record {p}"

    head = record_name(index)
    lines = [f"{head} of {manifest['pool']['path']}"]
    if show:
        lines.append(f"  {show}")
    funnel = manifest["funnel"]
    width = max((len(s["label"]) for s in funnel[1:]), default=0)
    width = min(width, 48)
    for stage in funnel[1:]:
        case = stage["case"][index]
        if case is None:
            break
        kept, _, template = stage["notes"][case]
        fields = {}
        for name, column in stage["values"].items():
            value = column[index] if isinstance(column, list) else column
            if name == "record" and isinstance(value, int):
                value = record_name(value)
            fields[name] = value
        try:
            text = template.format(**fields)
        except (KeyError, ValueError, TypeError, IndexError):
            text = template
        word = "kept   " if kept else "DROPPED"
        lines.append(f"  {stage['stage']}. {stage['label']:<{width}}  {word}  {text}")
    selected = manifest.get("selected", [])
    if position in selected:
        lines.append(f"selected: pick {selected.index(position) + 1} of {len(selected)} (in selection order)")
    else:
        stage = table["stage"][index]
        lines.append(f"not selected: dropped at stage {stage} of {len(funnel) - 1}")
    return "\n".join(lines)

"""A template's text is part of the cache key of every op that renders it.

The ops that render a prompt template (``loss``, ``generation_stats``, ``finetune``) or a text kind
(``hidden``, ``embed``) declare ``key_fn``; the engine folds its result into the node's run-time key
(``Engine.key``), which names the cached values.  Editing a template's text (monkeypatched here)
must change that key, an edit to another template must not, and an unchanged template must give
the same key in a fresh process (no ``hash()`` randomisation).  No model is loaded: the model is
a folder holding only a config, which is all its fingerprint reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from datasel.dsl.cache import Cache
from datasel.dsl.compiler import compile_recipe, recipe_source
from datasel.dsl.engine import Engine
from datasel.ops.algos import templates as T

pytestmark = pytest.mark.usefixtures("cache_dir")

# name -> (recipe text with {m} for the model folder, the op whose key is read)
RECIPES = {
    "loss": ('select topk(loss(hf("{m}")), 2)', "loss"),
    "loss_header": ('select topk(loss(hf("{m}"), given="header"), 2)', "loss"),
    "loss_none": ('select topk(loss(hf("{m}"), template="none"), 2)', "loss"),
    "generation_stats": ('select topk(uncertainty(hf("{m}"), kind="entropy"), 2)', "generation_stats"),
    "finetune": ('select topk(loss(finetune(hf("{m}"), data=pool)), 2)', "finetune"),
    "hidden": ('select kcenter(hidden(hf("{m}"), text="alpaca_prompt"), 2)', "hidden"),
    "embed": ('select kcenter(embed(encoder("{m}")), 2)', "embed"),
}


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    return folder


def run_key(name: str, model_dir, cache_root) -> str:
    """The run-time key of the op node of recipe ``name`` (what its cached values are stored under)."""
    text, op = RECIPES[name]
    plan = compile_recipe(recipe_source(text.format(m=model_dir), name="t.sel")).plan
    (node,) = [n for n in plan.nodes.values() if n.op == op]
    return Engine(plan, {}, Cache(cache_root), quiet=True).key(node.id, {})


def _reword_alpaca(monkeypatch):
    monkeypatch.setattr(T, "_ALPACA_NOINPUT", T._ALPACA_NOINPUT.replace("Write a response", "Write an answer"))


def _reword_alpaca_input(monkeypatch):
    monkeypatch.setattr(T, "_ALPACA_INPUT", T._ALPACA_INPUT.replace("### Input:", "### Context:"))


def _reword_alpaca_header(monkeypatch):
    monkeypatch.setitem(T._DIRECT_PREFIX, "alpaca", "### Answer:")


def _reword_none(monkeypatch):
    field_prompt = T._field_prompt

    def edited(template, instruction, inp):
        text = field_prompt(template, instruction, inp)
        return text.replace("\n", "\n\n") if template == "none" else text

    monkeypatch.setattr(T, "_field_prompt", edited)


def _reword_instruction_input(monkeypatch):
    text_for = T.text_for

    def edited(kind, record, tokenizer=None):
        text = text_for(kind, record, tokenizer)
        return text.replace("\n", " ") if kind == "instruction_input" else text

    monkeypatch.setattr(T, "text_for", edited)


def _reword_vicuna(monkeypatch):
    monkeypatch.setattr(T, "_VICUNA_SYSTEM", T._VICUNA_SYSTEM.replace("curious", "patient"))


@pytest.mark.parametrize("name, edit", [
    ("loss", _reword_alpaca),
    ("loss", _reword_alpaca_input),
    ("loss_header", _reword_alpaca_header),
    ("loss_none", _reword_none),
    ("generation_stats", _reword_alpaca),
    ("finetune", _reword_alpaca),
    ("hidden", _reword_alpaca),
    ("embed", _reword_instruction_input),
])
def test_editing_the_rendered_text_changes_the_key(name, edit, model_dir, cache_dir):
    before = run_key(name, model_dir, cache_dir)
    with pytest.MonkeyPatch.context() as mp:
        edit(mp)
        edited = run_key(name, model_dir, cache_dir)
    assert edited != before
    assert run_key(name, model_dir, cache_dir) == before  # the original text gives the original key back


@pytest.mark.parametrize("name, edit", [
    ("loss", _reword_vicuna),
    ("loss_none", _reword_alpaca),
    ("hidden", _reword_instruction_input),
    ("embed", _reword_alpaca),
])
def test_editing_another_template_keeps_the_key(name, edit, model_dir, cache_dir, monkeypatch):
    before = run_key(name, model_dir, cache_dir)
    edit(monkeypatch)
    assert run_key(name, model_dir, cache_dir) == before


def test_the_rendering_version_is_in_every_key(model_dir, cache_dir, monkeypatch):
    before = {name: run_key(name, model_dir, cache_dir) for name in RECIPES}
    monkeypatch.setattr(T, "RENDERING_VERSION", T.RENDERING_VERSION + "-next")
    after = {name: run_key(name, model_dir, cache_dir) for name in RECIPES}
    assert [name for name in RECIPES if after[name] == before[name]] == []


_KEYS_IN_A_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[3])
from test_template_keys import RECIPES, run_key
print(json.dumps({name: run_key(name, sys.argv[1], sys.argv[2]) for name in RECIPES}))
"""


def test_keys_are_the_same_in_fresh_processes(model_dir, cache_dir):
    here = {name: run_key(name, model_dir, cache_dir) for name in RECIPES}
    assert len(set(here.values())) == len(RECIPES)
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _KEYS_IN_A_FRESH_PROCESS, str(model_dir), str(cache_dir),
                              os.path.dirname(__file__)], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == here

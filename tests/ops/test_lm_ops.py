"""Language-model scoring operators through the language (loss, ppl, ifd, lp, hidden,
generation_stats / uncertainty, finetune), each against an independent computation written here:
batch-1 fp32 Hugging Face forwards with ``labels`` (−100 on the context), the Alpaca template typed
out literally (Stanford Alpaca's prompt, tatsu-lab/stanford_alpaca ``train.py``), a naive greedy
loop keeping full logits, and checkpoints loaded by hand.  Tiny random models (tests/ops/conftest.py) keep the fast tests fast; the real SmolLM2 IFD
test is marked slow.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

nan = math.nan

# ------------------------------------------------------------------ templates
# The Alpaca prompt (tatsu-lab/stanford_alpaca, PROMPT_DICT in train.py; also in tianyi-lab/Cherry_LLM
# cherry_seletion/data_analysis.py) and Superfiltering's "none" (tianyi-lab/Superfiltering
# code_ifd/data_analysis.py, PROMPT_DICT_NONE), typed again here independently of the library.
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NOINPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca(rec: dict) -> str:
    if rec.get("input", ""):
        return ALPACA_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return ALPACA_NOINPUT.format(instruction=rec["instruction"])


def plain(rec: dict) -> str:
    """Superfiltering's template ``none``."""
    if rec.get("input", ""):
        return f"{rec['instruction']}\n{rec['input']}\n"
    return f"{rec['instruction']}\n"


RECORDS = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning, my friend!",
     "output": "Guten Morgen, mein Freund! Wie geht es dir heute?"},
    {"instruction": "Write one short sentence about autumn leaves.", "input": "",
     "output": "Red and golden leaves drift slowly down onto the quiet path."},
    {"instruction": "Reverse the word.", "input": "résumé", "output": "émusér"},
    {"instruction": "Is 91 a prime number? Explain briefly.", "input": "",
     "output": "No. 91 = 7 × 13, so it has divisors other than 1 and itself."},
    {"instruction": "Sort ascending", "input": "9, 3, 7, 1", "output": "1, 3, 7, 9"},
    {"instruction": "Name a colour of the rainbow.", "input": "", "output": "Blue"},
    {"instruction": "Summarise: The cat slept all day in the sun, then ate dinner and slept again.",
     "input": "", "output": "A lazy cat sleeps, eats and sleeps."},
    {"instruction": "Convert 5 km to miles.", "input": "", "output": "5 km is about 3.11 miles 🙂"},
]


def ids(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def hf_loss(model, context: list[int], answer: list[int]) -> tuple[float, int]:
    """Mean answer CE by Hugging Face's own ``labels`` loss: (mean, number of scored tokens)."""
    seq = context + answer
    labels = [-100] * len(context) + answer
    count = sum(1 for t in labels[1:] if t != -100)
    if count == 0:
        return nan, 0
    with torch.no_grad():
        out = model(input_ids=torch.tensor([seq]), labels=torch.tensor([labels]))
    return float(out.loss), count


def start_id(tok) -> int:
    """What an empty context starts from: the BOS id, else the EOS id (GPT-2)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def reference_losses(model, tok, records, *, given="prompt", template=alpaca, max_length=512, eos=False,
                     target="answer", direct_bos="eos"):
    """Independent per-record (mean, count) of the answer-only loss, batch 1."""
    means, counts = [], []
    for rec in records:
        prompt_ids = ids(tok, template(rec))
        answer_ids = ids(tok, rec["output"], special=False) + ([tok.eos_token_id] if eos else [])
        if target == "prompt":
            context, answer = [start_id(tok)], prompt_ids[: max_length - 1]
        elif given == "prompt":
            context, answer = prompt_ids, answer_ids[: max(0, max_length - len(prompt_ids))]
        elif given == "none":
            context = [start_id(tok)] if direct_bos == "eos" else []
            answer = answer_ids[: max(0, min(max_length - len(prompt_ids), max_length - len(context)))]
        elif given == "header":
            context = ids(tok, "### Response:")
            answer = answer_ids[: max(0, min(max_length - len(prompt_ids), max_length - len(context)))]
        else:
            raise AssertionError(given)
        m, c = hf_loss(model, context, answer)
        means.append(m)
        counts.append(c)
    return np.array(means), np.array(counts, dtype=np.float64)


def assert_close(got, expected, rtol=1e-4, atol=0.0):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)


@pytest.fixture
def tiny(tiny_llama_dir, hf_model):
    model, tok = hf_model(tiny_llama_dir)
    return str(tiny_llama_dir), model, tok


def _evaluate(expr, pool, **kw):
    from datasel.dsl.runner import evaluate

    return np.asarray(evaluate(expr, pool, cache_dir=os.environ["DATASEL_CACHE"], quiet=True, **kw).values)


# =================================================================== loss / ppl
LOSS_VARIANTS = {
    "prompt": ("", dict()),
    "none": (', given="none"', dict(given="none")),
    "header": (', given="header"', dict(given="header")),
    "eos": (", eos=true", dict(eos=True)),
    "target_prompt": (', target="prompt"', dict(target="prompt")),
    "template_none": (', template="none"', dict(template=plain)),
}


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_loss_equals_batch1_labels_loss(eval_expr, write_pool, tiny, variant):
    folder, model, tok = tiny
    suffix, kw = LOSS_VARIANTS[variant]
    pool = write_pool(RECORDS)
    expected, counts = reference_losses(model, tok, RECORDS, **kw)
    assert np.isfinite(expected).all() and len(set(np.round(expected, 3))) > 5  # the values vary
    got = eval_expr(f'loss(hf("{folder}"){suffix})', pool)
    assert_close(got, expected)
    assert_close(eval_expr(f'column(loss(hf("{folder}"){suffix}), "count")', pool), counts, rtol=0)
    assert_close(eval_expr(f'column(loss(hf("{folder}"){suffix}), "sum")', pool), expected * counts)
    assert_close(eval_expr(f'ppl(hf("{folder}"){suffix})', pool), np.exp(expected))


def test_loss_count_is_answer_token_count(eval_expr, tiny):
    folder, _, tok = tiny
    got = eval_expr(f'column(loss(hf("{folder}"), template="alpaca"), "count")', RECORDS)
    assert got.tolist() == [len(ids(tok, r["output"], special=False)) for r in RECORDS]
    # given="none" scores the same answer tokens, from a BOS start
    got_none = eval_expr(f'column(loss(hf("{folder}"), given="none"), "count")', RECORDS)
    assert got_none.tolist() == got.tolist()


@pytest.mark.parametrize("given", ["prompt", "none"])
def test_loss_gpt2_without_bos(eval_expr, write_pool, tiny_gpt2_dir, hf_model, given):
    """GPT-2 (no BOS token): the direct pass starts from the EOS id so every answer token is scored."""
    model, tok = hf_model(tiny_gpt2_dir)
    assert tok.bos_token_id is None
    pool = write_pool(RECORDS)
    expected, counts = reference_losses(model, tok, RECORDS, given=given)
    got = eval_expr(f'loss(hf("{tiny_gpt2_dir}"), given="{given}")', pool)
    assert_close(got, expected)
    assert eval_expr(f'column(loss(hf("{tiny_gpt2_dir}"), given="{given}"), "count")', pool).tolist() == \
        [len(ids(tok, r["output"], special=False)) for r in RECORDS]


def test_loss_gpt2_direct_bos_none_leaves_first_token_unscored(eval_expr, write_pool, tiny_gpt2_dir, hf_model):
    model, tok = hf_model(tiny_gpt2_dir)
    pool = write_pool(RECORDS)
    expected, counts = reference_losses(model, tok, RECORDS, given="none", direct_bos="none")
    got = eval_expr(f'loss(hf("{tiny_gpt2_dir}"), given="none", direct_bos="none")', pool)
    assert_close(got, expected)
    answer_lengths = np.array([len(ids(tok, r["output"], special=False)) for r in RECORDS])
    assert_close(eval_expr(f'column(loss(hf("{tiny_gpt2_dir}"), given="none", direct_bos="none"), "count")',
                           pool), answer_lengths - 1, rtol=0)


LONG = " ".join(["please"] * 70)
MAXLEN_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there, how are you doing today?"},
    {"instruction": LONG, "input": "", "output": "This prompt alone fills the window."},
    {"instruction": "Describe the sea.", "input": "",
     "output": " ".join(["The sea is wide and deep and blue"] * 6)},  # clipped by the budget
    {"instruction": "Add.", "input": "1 + 1", "output": "2"},
    {"instruction": "Repeat this.", "input": LONG, "output": "No room for me either."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
]
MAXLEN = 64


def test_max_length_clips_answers_and_nans_full_prompts(eval_expr, write_pool, tiny):
    folder, model, tok = tiny
    pool = write_pool(MAXLEN_RECORDS)
    prompt_len = [len(ids(tok, alpaca(r))) for r in MAXLEN_RECORDS]
    answer_len = [len(ids(tok, r["output"], special=False)) for r in MAXLEN_RECORDS]
    # the set-up does what the test needs: two full prompts, one clipped answer
    assert [p >= MAXLEN for p in prompt_len] == [False, True, False, False, True, False]
    assert prompt_len[2] + answer_len[2] > MAXLEN

    expected, counts = reference_losses(model, tok, MAXLEN_RECORDS, max_length=MAXLEN)
    got = eval_expr(f'loss(hf("{folder}"), max_length={MAXLEN})', pool)
    assert_close(got, expected)
    assert np.isnan(got).tolist() == [False, True, False, False, True, False]
    got_count = eval_expr(f'column(loss(hf("{folder}"), max_length={MAXLEN}), "count")', pool)
    assert got_count[2] == MAXLEN - prompt_len[2] < answer_len[2]
    assert_close(got_count, counts, rtol=0)

    # the direct pass scores the same tokens (clipped by the prompt's budget) from a BOS start
    expected_direct, counts_direct = reference_losses(model, tok, MAXLEN_RECORDS, given="none", max_length=MAXLEN)
    assert_close(eval_expr(f'loss(hf("{folder}"), given="none", max_length={MAXLEN})', pool), expected_direct)
    direct_count = eval_expr(f'column(loss(hf("{folder}"), given="none", max_length={MAXLEN}), "count")', pool)
    assert_close(direct_count, got_count, rtol=0)


def test_selector_leaves_out_nan_losses_and_counts_them(run_recipe, tiny):
    folder, model, tok = tiny
    expected, _ = reference_losses(model, tok, MAXLEN_RECORDS, max_length=MAXLEN)
    out = run_recipe(f'select topk(loss(hf("{folder}"), max_length={MAXLEN}), 3)', MAXLEN_RECORDS)
    finite = [i for i in range(len(expected)) if not np.isnan(expected[i])]
    top = sorted(finite, key=lambda i: -expected[i])[:3]
    assert out.selected == top
    reasons = {k: v for k, v in out.manifest["exclusions"].items() if "no score" in k}
    assert list(reasons.values()) == [2], out.manifest["exclusions"]
    # a budget above the number of scored rows keeps exactly the scored rows
    out = run_recipe(f'select topk(loss(hf("{folder}"), max_length={MAXLEN}), 5)', MAXLEN_RECORDS)
    assert sorted(out.selected) == finite


# =================================================================== IFD
def _cond_direct(model, tok, records, template=alpaca):
    cond, _ = reference_losses(model, tok, records, given="prompt", template=template)
    direct, _ = reference_losses(model, tok, records, given="none", template=template)
    return cond, direct


def test_ifd_loss_and_ppl_kinds(eval_expr, write_pool, tiny):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    cond, direct = _cond_direct(model, tok, RECORDS)
    assert_close(eval_expr(f'ifd(hf("{folder}"), kind="loss")', pool), cond / direct)
    assert_close(eval_expr(f'ifd(hf("{folder}"))', pool), cond / direct)
    assert_close(eval_expr(f'ifd(hf("{folder}"), kind="ppl")', pool), np.exp(cond - direct))
    cond_n, direct_n = _cond_direct(model, tok, RECORDS, template=plain)
    assert_close(eval_expr(f'ifd(hf("{folder}"), kind="ppl", template="none")', pool), np.exp(cond_n - direct_n))
    assert not np.allclose(cond_n, cond)  # the template matters


def test_ifd_direct_pass_is_shared_with_loss(run_recipe, tiny):
    folder, model, tok = tiny
    text = f'm = hf("{folder}")\nselect topk(ifd(m), 3) + topk(loss(m, given="none"), 2)\n'
    out = run_recipe(text, RECORDS)
    plan = out.manifest["plan"]["nodes"]
    losses = [n for n in plan if n["op"] == "loss"]
    direct = [n for n in losses if n["params"]["given"] == "none"]
    assert len(direct) == 1, [n["params"] for n in losses]
    assert len(losses) == 2 and len([n for n in plan if n["op"] == "hf"]) == 1
    # the selection itself, independently
    cond, direct_v = _cond_direct(model, tok, RECORDS)
    ifd = cond / direct_v
    first = sorted(range(len(RECORDS)), key=lambda i: -ifd[i])[:3]
    second = [i for i in sorted(range(len(RECORDS)), key=lambda i: -direct_v[i])[:2] if i not in first]
    assert out.selected == first + second
    # the shared node was computed once, for all rows both users asked for
    stats = [n for n in out.manifest["nodes"] if n["id"] == direct[0]["id"]]
    assert len(stats) == 1 and stats[0]["rows_computed"] == len(RECORDS)


def test_ifd_from_the_cli(cli, write_pool, tiny):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    res = cli("eval", f'ifd(hf("{folder}"))', "--pool", pool)
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines() if line.strip()]
    assert [r["index"] for r in rows] == list(range(len(RECORDS)))
    cond, direct = _cond_direct(model, tok, RECORDS)
    assert_close([r["value"] for r in rows], cond / direct)


def test_set_model_switches_prelude_names(write_pool, tiny, cache_dir, monkeypatch):
    from datasel.ops.algos import lm_loading

    loaded = []
    real_load = lm_loading.load_causal_lm

    def recording(spec, **kw):
        loaded.append(str(spec))
        return real_load(spec, **kw)

    monkeypatch.setattr(lm_loading, "load_causal_lm", recording)
    from datasel.dsl.engine import LOCAL

    monkeypatch.setattr(LOCAL, "_states", type(LOCAL._states)())  # no model set up by an earlier test
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    sets = [f'model=hf("{folder}")']
    via_prelude = _evaluate("ifd_loss", pool, sets=sets)
    direct = _evaluate(f'ifd(hf("{folder}"))', pool)
    assert_close(via_prelude, direct, rtol=0)
    cond, direct_v = _cond_direct(model, tok, RECORDS)
    assert_close(via_prelude, cond / direct_v)
    cond_n, direct_n = _cond_direct(model, tok, RECORDS, template=plain)
    assert_close(_evaluate("ifd_ppl", pool, sets=sets), np.exp(cond_n - direct_n))
    # Every language model loaded was the one --set named; SmolLM2 (the default `model`) never was.
    assert loaded and set(loaded) == {folder}


# =================================================================== hidden
def _hidden_reference(folder, tok, texts, layer=-1):
    from transformers import AutoModel

    body = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    for text in texts:
        x = torch.tensor([ids(tok, text)])
        with torch.no_grad():
            res = body(input_ids=x, output_hidden_states=True)
        h = res.last_hidden_state[0] if layer == -1 else res.hidden_states[layer][0]
        out.append(h.numpy().astype(np.float64))
    return out


@pytest.mark.parametrize("pool_kind", ["mean", "last"])
def test_hidden_pooling(eval_expr, write_pool, tiny, pool_kind):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    states = _hidden_reference(folder, tok, [alpaca(r) for r in RECORDS])
    expected = np.stack([h.mean(0) if pool_kind == "mean" else h[-1] for h in states])
    got = eval_expr(f'hidden(hf("{folder}"), pool="{pool_kind}", text="alpaca_prompt")', pool)
    assert got.shape == (len(RECORDS), 64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_hidden_default_text_layer_and_normalize(eval_expr, write_pool, tiny):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    # DiverseEvol's default: Alpaca prompt + answer + EOS, last layer, mean
    texts = [alpaca(r) + r["output"] + tok.eos_token for r in RECORDS]
    assert all(ids(tok, t)[-1] == tok.eos_token_id for t in texts)
    states = _hidden_reference(folder, tok, texts)
    np.testing.assert_allclose(eval_expr(f'hidden(hf("{folder}"))', pool),
                               np.stack([h.mean(0) for h in states]), rtol=1e-4, atol=1e-5)
    layer1 = _hidden_reference(folder, tok, [alpaca(r) for r in RECORDS], layer=1)
    got = eval_expr(f'hidden(hf("{folder}"), layer=1, text="alpaca_prompt", normalize=true)', pool)
    expected = np.stack([h.mean(0) for h in layer1])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# =================================================================== uncertainty
MAX_NEW = 5


def naive_generation(model, tok, prompt: str, eos_ids: set[int], max_new: int) -> dict:
    """Greedy decoding, batch 1, no KV cache, full logits kept; T counts the EOS step."""
    seq = ids(tok, prompt)
    logits_kept = []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        logits_kept.append(logits)
        chosen = int(torch.argmax(logits))
        seq.append(chosen)
        if chosen in eos_ids:
            break
    ent, lp, margins = [], [], []
    for logits in logits_kept:
        p = torch.softmax(logits, -1)
        logp = torch.log_softmax(logits, -1)
        ent.append(float(-(p * logp).sum()))
        lp.append(float(logp.max()))
        top = torch.sort(p, descending=True).values
        margins.append(float(top[0] - top[1]))
    return {"entropy": float(np.mean(ent)), "least_confidence": 1.0 - math.exp(sum(lp)),
            "mean_margin": float(np.mean(margins)), "min_margin": float(min(margins)),
            "tokens": len(logits_kept)}


@pytest.fixture(scope="module")
def eos_variant(tiny_llama_dir, hf_model, tmp_path_factory):
    """The tiny model with a second EOS id that some (not all) greedy answers hit early."""
    model, tok = hf_model(tiny_llama_dir)
    gens = []
    for rec in RECORDS:
        seq = ids(tok, alpaca(rec))
        out = []
        for _ in range(MAX_NEW):
            with torch.no_grad():
                t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
        gens.append(out)
    candidates = {t for g in gens for t in g[1:MAX_NEW - 1]}
    stop = min(candidates, key=lambda t: (sum(t in g for g in gens), t))
    folder = tmp_path_factory.mktemp("tiny-eos")
    for f in Path(tiny_llama_dir).iterdir():
        shutil.copy(f, folder / f.name)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((folder / name).read_text())
        cfg["eos_token_id"] = [tok.eos_token_id, stop]
        (folder / name).write_text(json.dumps(cfg, indent=1))
    return folder, {tok.eos_token_id, stop}


def test_uncertainty_kinds_equal_naive_greedy_loop(eval_expr, write_pool, eos_variant, hf_model):
    folder, eos_ids = eos_variant
    model, tok = hf_model(folder)
    pool = write_pool(RECORDS)
    ref = [naive_generation(model, tok, alpaca(r), eos_ids, MAX_NEW) for r in RECORDS]
    lengths = [r["tokens"] for r in ref]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW  # EOS ends some answers early, not all
    for kind in ("entropy", "least_confidence", "mean_margin", "min_margin"):
        got = eval_expr(f'uncertainty(hf("{folder}"), kind="{kind}", max_new_tokens={MAX_NEW})', pool)
        assert_close(got, [r[kind] for r in ref], rtol=1e-4, atol=1e-7)
    got_tokens = eval_expr(f'column(generation_stats(hf("{folder}"), max_new_tokens={MAX_NEW}), "tokens")', pool)
    assert got_tokens.tolist() == lengths


def test_uncertainty_kinds_share_one_generation_pass(run_recipe, tiny):
    folder, model, tok = tiny
    text = (f'm = hf("{folder}")\n'
            f'select topk(uncertainty(m, kind="entropy", max_new_tokens={MAX_NEW}), 1)\n'
            f'     + topk(uncertainty(m, kind="least_confidence", max_new_tokens={MAX_NEW}), 1)\n'
            f'     + bottomk(uncertainty(m, kind="mean_margin", max_new_tokens={MAX_NEW}), 1)\n'
            f'     + bottomk(uncertainty(m, kind="min_margin", max_new_tokens={MAX_NEW}), 1)\n')
    out = run_recipe(text, RECORDS)
    plan = out.manifest["plan"]["nodes"]
    assert len([n for n in plan if n["op"] == "generation_stats"]) == 1
    assert sorted(n["params"]["name"] for n in plan if n["op"] == "column") == \
        ["entropy", "least_confidence", "mean_margin", "min_margin"]
    gen = [n for n in out.manifest["nodes"] if n["op"] == "generation_stats"]
    assert len(gen) == 1 and gen[0]["rows_computed"] == len(RECORDS)
    # and the picks follow the naive loop
    ref = [naive_generation(model, tok, alpaca(r), {tok.eos_token_id}, MAX_NEW) for r in RECORDS]
    expected = []
    for kind, sign in (("entropy", -1), ("least_confidence", -1), ("mean_margin", 1), ("min_margin", 1)):
        best = sorted(range(len(RECORDS)), key=lambda i: sign * ref[i][kind])[0]
        if best not in expected:
            expected.append(best)
    assert out.selected == expected


# =================================================================== finetune + learning percentage
FT = "finetune(hf(\"{folder}\"), data=random(4, seed=0), epochs=2, lr=0.05, batch=2)"


def _work_files(cache_dir: Path) -> dict[str, int]:
    work = Path(cache_dir) / "work"
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}


def _run_dirs(cache_dir: Path) -> list[Path]:
    work = Path(cache_dir) / "work"
    return sorted(p for p in work.iterdir() if p.is_dir()) if work.exists() else []


def _checkpoint_ppl(folder: Path, base: str, tok, records) -> np.ndarray:
    """Perplexity of answer + EOS after the Alpaca prompt under one checkpoint folder, loaded by hand."""
    from transformers import AutoModelForCausalLM

    from datasel.ops.algos.finetune import load_checkpoint

    model = load_checkpoint(folder, lambda spec: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                            dtype="float32", device="cpu")
    means, _ = reference_losses(model, tok, records, eos=True)
    return np.exp(means)


def test_learning_percentage_equals_checkpoint_perplexities(run_recipe, write_pool, tiny, cache_dir, tmp_path):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    recipe = tmp_path / "lp.sel"
    recipe.write_text(f"ft = {FT.format(folder=folder)}\nselect topk(lp(ft, epoch=1, epochs=2), 3)\n")

    first = run_recipe(recipe.read_text(), pool)
    runs = _run_dirs(cache_dir)
    assert len(runs) == 1, runs
    epochs = sorted(p.name for p in runs[0].iterdir() if p.is_dir() and p.name.startswith("epoch-"))
    assert epochs == ["epoch-0", "epoch-1", "epoch-2"]
    P = [_checkpoint_ppl(runs[0] / f"epoch-{i}", folder, tok, RECORDS) for i in range(3)]
    # epoch 0 is the base model (LoRA B = 0)
    base = np.exp(reference_losses(model, tok, RECORDS, eos=True)[0])
    assert_close(P[0], base)
    assert np.abs(P[0] - P[2]).min() > 1e-3 * P[0].max()  # training moved every record's perplexity
    expected = (P[0] - P[1]) / (P[0] - P[2])

    got = _evaluate("lp(ft, epoch=1, epochs=2)", pool, recipe=recipe)
    assert_close(got, expected, rtol=1e-3, atol=1e-6)
    for i in range(3):
        assert_close(_evaluate(f"ppl(checkpoint(ft, {i}), eos=true)", pool, recipe=recipe), P[i], rtol=1e-4)
    assert_close(_evaluate("lp(ft, approx=true, epochs=2)", pool, recipe=recipe), (P[0] - P[1]) / P[0],
                 rtol=1e-3, atol=1e-6)
    assert first.selected == sorted(range(len(RECORDS)), key=lambda i: -expected[i])[:3]

    # a second run is cached everywhere and does not retrain
    before = _work_files(cache_dir)
    second = run_recipe(recipe.read_text(), pool)
    statuses = {n["op"]: n["status"] for n in second.manifest["nodes"] if n["status"] != "cached"}
    assert statuses == {}, second.manifest["nodes"]
    assert _work_files(cache_dir) == before
    assert second.selected == first.selected


def test_learning_percentage_zero_denominator_is_nan(run_recipe, eval_expr, write_pool, tiny):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    ft = f'finetune(hf("{folder}"), data=random(4, seed=0), epochs=2, lr=0, batch=2)'
    got = eval_expr(f"lp({ft}, epoch=1, epochs=2)", pool)
    assert np.isnan(got).all(), got  # nothing was learned: P0 − P2 = 0
    out = run_recipe(f"select topk(lp({ft}, epoch=1, epochs=2), 3)", pool)
    assert out.selected == []
    assert sorted(out.manifest["exclusions"].values()) == [len(RECORDS)], out.manifest["exclusions"]


FT_BY_LENGTH = 'ft = finetune(hf("{folder}"), data=topk(length, 4), epochs=1, lr=0.05, batch=2)\n'


def _no_tie_at_four():
    # no tie at the cut: topk(length, 4) picks the same four records in any order of the pool
    lengths = sorted((len(r["output"]) for r in RECORDS), reverse=True)
    assert lengths[3] > lengths[4]


def test_finetune_key_is_the_records_contents(run_recipe, write_pool, tiny, cache_dir):
    folder, model, tok = tiny
    _no_tie_at_four()
    recipe = FT_BY_LENGTH.format(folder=folder) + "select topk(loss(ft), 3)\n"
    forward = write_pool(RECORDS, "forward.jsonl")
    backward = write_pool(RECORDS[::-1], "backward.jsonl")
    a = run_recipe(recipe, forward)
    runs = _run_dirs(cache_dir)
    assert len(runs) == 1
    before = _work_files(cache_dir)
    b = run_recipe(recipe, backward)
    assert _run_dirs(cache_dir) == runs, "the same records in another order were trained again"
    assert _work_files(cache_dir) == before
    n = len(RECORDS)
    assert [n - 1 - i for i in b.selected] == a.selected
    assert [s["status"] for s in b.manifest["nodes"] if s["op"] == "finetune"] == ["cached"]
    # other records: another run
    run_recipe(recipe.replace("topk(length, 4)", "topk(length, 3)"), forward)
    assert len(_run_dirs(cache_dir)) == 2


def test_finetune_reused_from_a_reordered_pool_scores_new_records(write_pool, tiny, cache_dir, tmp_path):
    """The same training records in another pool order, plus a new (short, untrained) record that
    must be scored with the cached run: the run is found, not retrained and not refused."""
    folder, model, tok = tiny
    _no_tie_at_four()
    recipe = tmp_path / "ft.sel"
    recipe.write_text(FT_BY_LENGTH.format(folder=folder) + "select topk(loss(ft), 3)\n")
    forward = write_pool(RECORDS, "forward.jsonl")
    new = {"instruction": "Say yes.", "input": "", "output": "Yes"}
    backward = write_pool(RECORDS[::-1] + [new], "backward.jsonl")
    va = _evaluate("loss(ft)", forward, recipe=recipe)
    runs = _run_dirs(cache_dir)
    before = _work_files(cache_dir)
    vb = _evaluate("loss(ft)", backward, recipe=recipe)
    assert _run_dirs(cache_dir) == runs and _work_files(cache_dir) == before
    n = len(RECORDS)
    assert_close(vb[:n][::-1], va, rtol=1e-6)
    assert np.isfinite(vb[n])


# =================================================================== DiverseEvol-shaped iteration
def test_diverseevol_iteration_runs_and_is_cached(run_recipe, write_pool, tiny, cache_dir):
    folder, model, tok = tiny
    pool = write_pool(RECORDS)
    text = (f'select iterate(random(3, seed=0), 2, cur -> cur + kcenter(hidden(finetune(hf("{folder}"), '
            "data=cur, epochs=1)), 2, given=cur))\n")
    first = run_recipe(text, pool)
    assert len(first.selected) == 3 + 2 + 2 and len(set(first.selected)) == 7
    init = run_recipe("select random(3, seed=0)\n", pool).selected
    assert first.selected[:3] == init
    assert len(_run_dirs(cache_dir)) == 2  # one fine-tuning run per round
    before = _work_files(cache_dir)

    second = run_recipe(text, pool)
    assert second.selected == first.selected
    assert _work_files(cache_dir) == before
    bad = [(n["op"], n["status"]) for n in second.manifest["nodes"] if n["status"] != "cached"]
    assert bad == [], second.manifest["nodes"]
    assert all(n["rows_computed"] == 0 for n in second.manifest["nodes"])


# =================================================================== real SmolLM2 (slow)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_real_smollm_ifd_flags_mismatched_responses(write_pool, cache_dir):
    defects = json.loads((EXAMPLES / "defects.json").read_text())
    lines = (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    mismatch = list(defects["mismatch"])
    bad = set(mismatch) | set(defects["truncated"]) | {d for _, d in defects["exact_duplicate"]} | \
        {d for _, d in defects["near_duplicate"]}
    clean = [i for i in range(len(lines)) if i not in bad]
    clean = clean[:: len(clean) // (32 - len(mismatch))][: 32 - len(mismatch)]
    chosen = sorted(mismatch + clean)
    assert len(chosen) == 32
    pool = write_pool([json.loads(lines[i]) for i in chosen])
    is_mismatch = np.array([i in set(mismatch) for i in chosen])

    results = {}
    for label, expr in (("ifd(model)", "ifd(model)"),
                        ('ifd(model, kind="ppl", template="none")', 'ifd(model, kind="ppl", template="none")')):
        values = _evaluate(expr, pool)
        assert np.isfinite(values).all()
        rate_mis = float(np.mean(values[is_mismatch] > 1))
        rate_clean = float(np.mean(values[~is_mismatch] > 1))
        med_mis = float(np.median(values[is_mismatch]))
        med_clean = float(np.median(values[~is_mismatch]))
        results[label] = (rate_mis, rate_clean, med_mis, med_clean)
        print(f"{label}: IFD>1 in {rate_mis:.0%} of {is_mismatch.sum()} mismatches vs {rate_clean:.0%} of "
              f"{(~is_mismatch).sum()} clean records; median IFD {med_mis:.3f} vs {med_clean:.3f}")
    for label, (rate_mis, rate_clean, med_mis, med_clean) in results.items():
        assert rate_mis > rate_clean, (label, results[label])
        assert med_mis > med_clean, (label, results[label])

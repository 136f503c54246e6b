"""Model operators: hf (local folders, offline hub ids, errors, content identity), encoder + embed
against sentence-transformers itself, and checkpoint(run, i) of a fine-tuning run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

ALPACA_NOINPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

RECORDS = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "17 + 25 = 42"},
    {"instruction": "Translate to German", "input": "Good morning!", "output": "Guten Morgen!"},
    {"instruction": "Reverse the word.", "input": "résumé", "output": "émusér"},
    {"instruction": "Sort ascending", "input": "9, 3, 7, 1", "output": "1, 3, 7, 9"},
    {"instruction": "Name a colour of the rainbow.", "input": "", "output": "Blue"},
    {"instruction": "Convert 5 km to miles.", "input": "", "output": "5 km is about 3.11 miles."},
    {"instruction": "Is 91 prime?", "input": "", "output": "No: 91 = 7 × 13."},
]


def alpaca(rec: dict) -> str:
    if rec.get("input", ""):
        return ALPACA_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return ALPACA_NOINPUT.format(instruction=rec["instruction"])


def reference_loss(model, tok, records, *, given="prompt") -> np.ndarray:
    """Batch-1 Hugging Face ``labels`` loss of the answer after the Alpaca prompt (or after BOS/EOS)."""
    out = []
    for rec in records:
        answer = list(tok(rec["output"], add_special_tokens=False)["input_ids"])
        if given == "prompt":
            context = list(tok(alpaca(rec))["input_ids"])
        else:
            context = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        labels = [-100] * len(context) + answer
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([context + answer]), labels=torch.tensor([labels])).loss
        out.append(float(loss))
    return np.array(out)


def _evaluate(expr, pool, **kw):
    from datasel.dsl.runner import evaluate

    return np.asarray(evaluate(expr, pool, cache_dir=os.environ["DATASEL_CACHE"], quiet=True, **kw).values)


# =================================================================== hf: errors
def test_missing_folder_is_a_clean_error(cli, write_pool, tmp_path):
    pool = write_pool(RECORDS)
    recipe = tmp_path / "r.sel"
    recipe.write_text('select topk(loss(hf("/no/such/folder")), 2)\n')
    for args in (("run", recipe, "--pool", pool), ("eval", 'ifd(hf("/no/such/folder"))', "--pool", pool)):
        res = cli(*args)
        assert res.code == 1, res
        assert "/no/such/folder" in res.err
        assert "Traceback" not in res.err and "Traceback" not in res.out
        paragraph = res.err.strip().splitlines()
        assert paragraph[0].startswith("error") and len(paragraph) <= 2, res.err  # message (+ --debug hint)


def test_missing_folder_error_names_the_operator_and_position(cli, write_pool, tmp_path):
    """docs/language.md: errors at run time name the operator and its position in the recipe."""
    pool = write_pool(RECORDS)
    recipe = tmp_path / "r.sel"
    recipe.write_text('x = length\nselect topk(loss(hf("/no/such/folder")), 2)\n')
    res = cli("run", recipe, "--pool", pool)
    assert res.code == 1
    assert "r.sel:2:" in res.err and "hf" in res.err, res.err


def test_unknown_hub_id_fails_offline(cli, write_pool, tmp_path, monkeypatch):
    from datasel.dsl.engine import OpError
    from datasel.dsl.runner import evaluate
    from datasel.ops.algos.lm_loading import ModelNotAvailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = write_pool(RECORDS)
    name = "datasel-tests/no-such-model-anywhere"
    with pytest.raises(OpError, match="neither a local folder nor in the local Hugging Face cache") as info:
        evaluate(f'loss(hf("{name}"))', pool, cache_dir=os.environ["DATASEL_CACHE"], quiet=True)
    err = info.value
    chain = [err, err.__cause__, getattr(err, "cause", None)]
    assert any(isinstance(e, ModelNotAvailable) for e in chain), repr(err)
    message = str(err)
    assert name in message and "never downloads" in message and f"hf download {name}" in message
    res = cli("eval", f'loss(hf("{name}"))', "--pool", pool)
    assert res.code == 1 and "Traceback" not in res.err
    assert "ModelNotAvailable" in res.err or "neither a local folder" in res.err
    assert f"hf download {name}" in res.err


# =================================================================== hf: identity of a folder
def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in Path(folder).iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def test_replacing_a_folders_weights_invalidates_results(write_pool, tiny_llama_dir, smol_tok, hf_model, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    pool = write_pool(RECORDS)
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    first_model, tok = hf_model(tiny_llama_dir)
    got1 = _evaluate(f'loss(hf("{folder}"))', pool)
    np.testing.assert_allclose(got1, reference_loss(first_model, tok, RECORDS), rtol=1e-4)
    config = first_model.config
    torch.manual_seed(123)
    LlamaForCausalLM(config).save_pretrained(folder)  # same config, new weights
    from datasel.ops.algos.lm_loading import clear_model_memo

    clear_model_memo()
    second_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected2 = reference_loss(second_model, tok, RECORDS)
    assert not np.allclose(expected2, got1)
    np.testing.assert_allclose(_evaluate(f'loss(hf("{folder}"))', pool), expected2, rtol=1e-4)


def test_a_folders_tokenizer_is_part_of_its_identity(write_pool, tiny_llama_dir, tiny_gpt2_tok, hf_model, tmp_path):
    """Same weights and config, tokenizer files replaced in place (no BOS any more): the direct pass,
    which starts from BOS (else EOS), must be recomputed."""
    from datasel.ops.algos.lm_loading import clear_model_memo

    pool = write_pool(RECORDS)
    model, tok = hf_model(tiny_llama_dir)
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    exp_a = reference_loss(model, tok, RECORDS, given="none")
    np.testing.assert_allclose(_evaluate(f'loss(hf("{folder}"), given="none")', pool), exp_a, rtol=1e-4)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tiny_gpt2_tok.save_pretrained(folder)
    clear_model_memo()
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(str(folder))
    assert tok.bos_token_id is not None and tok2.bos_token_id is None
    exp_b = reference_loss(model, tok2, RECORDS, given="none")
    assert not np.allclose(exp_a, exp_b)
    np.testing.assert_allclose(_evaluate(f'loss(hf("{folder}"), given="none")', pool), exp_b, rtol=1e-4)


def test_a_folders_generation_config_is_part_of_its_identity(write_pool, tiny_llama_dir, hf_model, tmp_path):
    """uncertainty stops at the generation config's EOS ids: editing them in place changes the answers."""
    from datasel.ops.algos.lm_loading import clear_model_memo

    pool = write_pool(RECORDS)
    model, tok = hf_model(tiny_llama_dir)
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    expr = f'column(generation_stats(hf("{folder}"), max_new_tokens=4), "tokens")'
    assert _evaluate(expr, pool)[0] == 4
    # the first greedy token of record 0 becomes an extra EOS id: that answer is now 1 token long
    ids = list(tok(alpaca(RECORDS[0]))["input_ids"])
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg["eos_token_id"] = [tok.eos_token_id, first]
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    clear_model_memo()
    assert _evaluate(expr, pool)[0] == 1


# =================================================================== encoder + embed
def test_minilm_embed_equals_sentence_transformers(write_pool):
    from sentence_transformers import SentenceTransformer

    from datasel.ops.algos.lm_loading import minilm_path

    lines = (EXAMPLES / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    records = [json.loads(line) for line in lines]
    pool = write_pool(records)
    texts = [r["instruction"] + ("\n" + r["input"] if r.get("input", "") else "") for r in records]
    assert sum(bool(r.get("input")) for r in records) > 5
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    expected = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = _evaluate('embed(encoder("minilm"))', pool)
    assert got.shape == (50, 384)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_evaluate("emb", pool), expected, rtol=1e-5, atol=1e-5)  # prelude name
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    responses = st.encode([r["output"] for r in records], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(_evaluate('embed(minilm, text="response")', pool), responses, rtol=1e-5, atol=1e-5)


def test_encoder_missing_folder_is_a_clean_error(cli, write_pool):
    pool = write_pool(RECORDS)
    res = cli("eval", 'embed(encoder("/no/such/encoder"))', "--pool", pool)
    assert res.code == 1 and "/no/such/encoder" in res.err and "Traceback" not in res.err


# =================================================================== checkpoint
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_zero_scores_like_the_base_model(write_pool, tiny_llama_dir, tiny_gpt2_dir, hf_model, arch,
                                                    tmp_path):
    folder = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    model, tok = hf_model(folder)
    pool = write_pool(RECORDS)
    recipe = tmp_path / "ft.sel"
    recipe.write_text(f'ft = finetune(hf("{folder}"), data=random(4, seed=0), epochs=1, lr=0.05, batch=2)\n'
                      "select topk(loss(ft), 2)\n")
    base = reference_loss(model, tok, RECORDS)
    np.testing.assert_allclose(_evaluate(f'loss(hf("{folder}"))', pool), base, rtol=1e-4)
    start = _evaluate("loss(checkpoint(ft, 0))", pool, recipe=recipe)
    np.testing.assert_allclose(start, base, rtol=1e-4)
    after = _evaluate("loss(checkpoint(ft, 1))", pool, recipe=recipe)
    assert np.abs(after - base).max() > 1e-2  # training changed the model
    # the run used as a model, and epoch -1, mean the last checkpoint
    np.testing.assert_allclose(_evaluate("loss(checkpoint(ft))", pool, recipe=recipe), after, rtol=1e-6)
    np.testing.assert_allclose(_evaluate("loss(ft)", pool, recipe=recipe), after, rtol=1e-6)
    # independently: epoch-1 folder loaded by hand
    from transformers import AutoModelForCausalLM

    from datasel.ops.algos.finetune import load_checkpoint

    work = Path(os.environ["DATASEL_CACHE"]) / "work"
    (run,) = [p for p in work.iterdir() if p.is_dir()]
    ck = load_checkpoint(run / "epoch-1", lambda spec: AutoModelForCausalLM.from_pretrained(str(folder),
                                                                                          dtype=torch.float32),
                         dtype="float32", device="cpu")
    np.testing.assert_allclose(after, reference_loss(ck, tok, RECORDS), rtol=1e-4)


def test_fine_tuned_model_is_loaded_once_for_all_chunks(write_pool, tiny_llama_dir, tmp_path, monkeypatch):
    from datasel.ops import registry
    from datasel.ops.algos import finetune

    pool = write_pool(RECORDS)
    recipe = tmp_path / "ft.sel"
    recipe.write_text(f'ft = finetune(hf("{tiny_llama_dir}"), data=random(4, seed=0), epochs=1, lr=0.05, batch=2)\n'
                      "select topk(loss(ft), 2)\n")
    _evaluate("loss(checkpoint(ft, 0))", pool, recipe=recipe)  # trains the run (cached for the next call)
    loads = []
    real = finetune.load_checkpoint
    monkeypatch.setattr(finetune, "load_checkpoint", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(registry.get("loss"), "chunk_rows", 3)  # several chunks
    chunked = _evaluate("loss(ft)", pool, recipe=recipe)
    assert len(RECORDS) > 3 and np.isfinite(chunked).all()
    assert len(loads) == 1, loads
    np.testing.assert_allclose(chunked, _evaluate("loss(checkpoint(ft, 1))", pool, recipe=recipe), rtol=1e-6)


def test_checkpoint_errors(cli, write_pool, tiny_llama_dir, tmp_path):
    pool = write_pool(RECORDS)
    res = cli("eval", f'loss(checkpoint(finetune(hf("{tiny_llama_dir}"), data=random(2), epochs=1), 3))',
              "--pool", pool)
    assert res.code == 1 and "epoch 3 does not exist" in res.err and "Traceback" not in res.err
    res = cli("eval", f'loss(checkpoint(hf("{tiny_llama_dir}"), 0))', "--pool", pool)
    assert res.code == 1 and "finetune" in res.err and "Traceback" not in res.err

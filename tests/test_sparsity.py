"""Which heads and which neurons each sparsity source selects, checked by value against independent computations.

"Sparse differs from dense" cannot tell the right heads from the wrong ones; these tests name the ids each
source must pick: the oracle the largest-norm KV groups (recomputed from a dense prefill), the router each
layer's own weights (numpy), random a fresh draw per sequence, the MLP router the same function that
training fits (numpy, no activation between its two layers).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import SparsityConfig, init_cache, init_params, preset
from polar_jax import model as model_lib
from polar_jax.sparsity import attention_heads, mlp_neurons
from training import routers as rt

# GQA with 4 KV groups of 2 heads, 3 layers (layer 0 dense): top-2 of 4 differs from bottom-2 and from any
# one fixed choice.
CFG = preset("tiny-llama-gqa").replace(n_layers=3, n_heads=8, n_kv_heads=4)


def _top(scores: np.ndarray, k: int) -> list[set[int]]:
    """Per row, the ids of the k largest scores (numpy, independent of jax.lax.top_k and _top_slots)."""
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]


def _chosen(ids) -> list[set[int]]:
    return [set(int(i) for i in row if i >= 0) for row in np.asarray(ids)]


def _spy_heads(monkeypatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Record (head ids [B, C], router input h [B, D]) of every sparse layer the model runs, in layer order."""
    calls, real = [], model_lib.attention_heads

    def spy(sp, cfg, layer, count, capacity, h, routers, key, dense_norms=None, **kw):
        ids = real(sp, cfg, layer, count, capacity, h, routers, key, dense_norms, **kw)
        if ids is not None:
            jax.debug.callback(lambda i, x: calls.append((np.asarray(i), np.asarray(x, np.float64))), ids, h,
                               ordered=True)
        return ids

    monkeypatch.setattr(model_lib, "attention_heads", spy)
    return calls


def _decode_one(params, tokens: np.ndarray, sp: SparsityConfig):
    """Dense prefill of tokens[:, :-1], then one decode step of the last token with `sp`."""
    B, T = tokens.shape
    cache = init_cache(CFG, B, T, jnp.float32)
    _, cache, _ = model_lib.forward(CFG, params, jnp.asarray(tokens[:, :-1]), cache)
    return model_lib.forward(CFG, params, jnp.asarray(tokens[:, -1:]), cache, sparsity=sp, key=jax.random.key(3))


# ---------------------------------------------------------------------------------------------------
# oracle: the largest-norm groups

def test_oracle_picks_the_largest_norm_groups_unit():
    B, K, k = 5, CFG.n_kv_heads, 2
    norms = np.asarray(jax.random.uniform(jax.random.key(11), (B, K)), np.float32)
    ids = attention_heads(SparsityConfig(attn="oracle", attn_density=0.5), CFG, 1, k, 3, jnp.zeros((B, CFG.dim)),
                          None, jax.random.key(0), dense_norms=lambda: jnp.asarray(norms))
    assert np.asarray(ids).shape == (B, 3) and np.all(np.asarray(ids)[:, k:] == -1)
    assert _chosen(ids) == _top(norms, k)


def test_oracle_in_the_model_keeps_the_groups_a_dense_prefill_finds_largest(monkeypatch):
    """Layer 1's oracle choice at a decode step == the top groups by output norm of the same token in a dense
    prefill of the whole sequence (layer 0 is dense in both, so layer 1 sees the same input)."""
    B, T, k = 6, 11, 2
    params = init_params(CFG, jax.random.key(12))
    tokens = np.random.default_rng(13).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    calls = _spy_heads(monkeypatch)
    _decode_one(params, tokens, SparsityConfig(attn="oracle", attn_density=k / CFG.n_kv_heads))
    assert len(calls) == CFG.n_layers - 1
    _, _, col = model_lib.forward(CFG, params, jnp.asarray(tokens), init_cache(CFG, B, T, jnp.float32),
                                  collect=True)
    group = np.asarray(rt.group_norms(col.head_norms[1, :, -1], CFG.n_kv_heads))  # [B, K]
    srt = np.sort(group, axis=-1)[:, ::-1]
    clear = (srt[:, k - 1] - srt[:, k]) > 1e-3 * srt[:, 0]  # rows without a near-tie at the cut
    assert clear.sum() >= B - 1
    got, want = _chosen(calls[0][0]), _top(group, k)
    assert [g for g, c in zip(got, clear) if c] == [w for w, c in zip(want, clear) if c]


# ---------------------------------------------------------------------------------------------------
# router: each layer its own weights

def _attn_routers(key):
    L, D, K = CFG.n_layers, CFG.dim, CFG.n_kv_heads
    kw, kb = jax.random.split(key)
    return {"attn": {"w": jax.random.normal(kw, (L, D, K)), "b": jax.random.normal(kb, (L, K))}}


def test_router_heads_use_each_layers_weights_unit():
    B, k = 7, 2
    routers = _attn_routers(jax.random.key(14))
    h = np.asarray(jax.random.normal(jax.random.key(15), (B, CFG.dim)), np.float32)
    sp = SparsityConfig(attn="router", attn_density=0.5)
    w, b = (np.asarray(routers["attn"][n], np.float64) for n in ("w", "b"))
    for layer in range(1, CFG.n_layers):
        ids = attention_heads(sp, CFG, jnp.int32(layer), k, k, jnp.asarray(h), routers, jax.random.key(0))
        assert _chosen(ids) == _top(h @ w[layer] + b[layer], k), f"layer {layer}"
        # training fits rt.attn_logits: it must be the same function
        np.testing.assert_allclose(np.asarray(rt.attn_logits(jax.tree.map(lambda a: a[layer], routers["attn"]),
                                                             jnp.asarray(h))), h @ w[layer] + b[layer], rtol=1e-4,
                                   atol=1e-4)


def test_router_in_the_model_uses_each_layers_weights(monkeypatch):
    B, T, k = 6, 9, 2
    params = init_params(CFG, jax.random.key(16))
    routers = _attn_routers(jax.random.key(17))
    tokens = np.random.default_rng(18).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    calls = _spy_heads(monkeypatch)
    _decode_one({**params, "routers": routers}, tokens, SparsityConfig(attn="router", attn_density=0.5))
    assert len(calls) == CFG.n_layers - 1
    w, b = (np.asarray(routers["attn"][n], np.float64) for n in ("w", "b"))
    for layer, (ids, h) in enumerate(calls, start=1):  # the sparse layers run in order after dense layer 0
        assert _chosen(ids) == _top(h @ w[layer] + b[layer], k), f"layer {layer}"


# ---------------------------------------------------------------------------------------------------
# random: a fresh draw per sequence

def test_random_heads_differ_between_sequences():
    B, K, k = 400, CFG.n_kv_heads, 2
    sp = SparsityConfig(attn="random", attn_density=0.5)
    ids = attention_heads(sp, CFG, 1, k, k, jnp.zeros((B, CFG.dim)), None, jax.random.key(19))
    chosen = _chosen(ids)
    assert all(len(c) == k and c <= set(range(K)) for c in chosen)
    # 6 possible pairs, each about B/6 times if every sequence draws its own
    pairs = {frozenset(c) for c in chosen}
    assert len(pairs) == 6
    freq = np.bincount([i for c in chosen for i in c], minlength=K) / B
    np.testing.assert_allclose(freq, k / K, atol=0.1)
    other = attention_heads(sp, CFG, 2, k, k, jnp.zeros((B, CFG.dim)), None, jax.random.key(19))
    assert _chosen(other) != chosen  # another layer draws again


# ---------------------------------------------------------------------------------------------------
# MLP: the router function that training fits, and the oracle's active neurons

def test_mlp_router_union_is_the_trained_function_topk():
    """Inference must apply the same function as training (rt.mlp_logits: linear, linear; no activation
    between): the union over the batch of each token's top-k of (h @ w1 + b1) @ w2 + b2."""
    B, D, R, F, k, layer = 3, CFG.dim, 32, CFG.mlp_dim, 9, 1
    ks = jax.random.split(jax.random.key(20), 5)
    L = CFG.n_layers
    r = {"w1": jax.random.normal(ks[0], (L, D, R)) * D ** -0.5, "b1": jax.random.normal(ks[1], (L, R)),
         "w2": jax.random.normal(ks[2], (L, R, F)) * R ** -0.5, "b2": 0.1 * jax.random.normal(ks[3], (L, F))}
    h = np.asarray(jax.random.normal(ks[4], (B, D)), np.float32)
    rn = {n: np.asarray(a[layer], np.float64) for n, a in r.items()}
    logits = (h @ rn["w1"] + rn["b1"]) @ rn["w2"] + rn["b2"]  # [B, F]
    assert np.any(h @ rn["w1"] + rn["b1"] < 0)  # an activation between the layers would change the result
    np.testing.assert_allclose(np.asarray(rt.mlp_logits({n: a[layer] for n, a in r.items()}, jnp.asarray(h))),
                               logits, rtol=1e-4, atol=1e-4)
    want = set().union(*_top(logits, k))
    sp = SparsityConfig(mlp="router", mlp_k=k)
    idx, n = mlp_neurons(sp, CFG, jnp.int32(layer), jnp.int32(k), B * k, jnp.asarray(h), {"mlp": r},
                         jax.random.key(0))
    assert int(n) == len(want) and set(np.asarray(idx)[: int(n)].tolist()) == want


def test_mlp_oracle_union_is_the_active_neurons():
    B, F = 4, CFG.mlp_dim
    hidden = np.maximum(np.asarray(jax.random.normal(jax.random.key(21), (B, F))) - 1.5, 0)  # ~7 % active
    want = set(np.flatnonzero(hidden.any(axis=0)).tolist())
    idx, n = mlp_neurons(SparsityConfig(mlp="oracle"), CFG, 1, F, F, jnp.zeros((B, CFG.dim)), None,
                         jax.random.key(0), dense_hidden=lambda: jnp.asarray(hidden))
    assert 0 < int(n) < F and set(np.asarray(idx)[: int(n)].tolist()) == want


@pytest.mark.parametrize("kw,message", [
    (dict(attn_density=0.25), "needs attn = router, oracle or random"),  # attn stays "all": silently dense
    (dict(mlp_k=64), "mlp_k / mlp_k_table need mlp = router or random"),
    (dict(mlp="random", mlp_k=2.5), "mlp_k must be whole neurons"),
    (dict(mlp="router", mlp_k=64, mlp_k_table=((1, (128,)),)), "either mlp_k or mlp_k_table, not both"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(dense_layers=None), "dense_layers must be a list of layer indices"),
])
def test_settings_that_would_be_ignored_or_crash_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**kw)


def test_mlp_oracle_needs_a_relu_model():
    """A gated SiLU MLP has no activation that is exactly zero: the oracle would keep every neuron."""
    SparsityConfig(mlp="oracle").check_layers(preset("tiny-opt"))
    with pytest.raises(ValueError, match="gated silu MLP has none that are, so it would run dense"):
        SparsityConfig(mlp="oracle").check_layers(preset("tiny-llama"))


def test_a_density_rounds_to_a_head_count_half_up():
    """0.5 of 5 groups keeps 3 (np.round's half-to-even gave 2: 40%), 0.5 of 7 keeps 4; the same count from the
    config, the router labels (training) and a per-request density (the server's)."""
    from polar_jax.sparsity import row_head_counts

    for K, density, want in ((5, 0.5, 3), (7, 0.5, 4), (3, 0.5, 2), (8, 0.3, 2), (4, 0.01, 1)):
        cfg = preset("tiny-llama-gqa").replace(n_heads=K, n_kv_heads=K)
        got = SparsityConfig(attn="random", attn_density=density, dense_layers=()).head_counts(cfg)
        assert set(got.tolist()) == {want}, (K, density, got)
        assert rt.topk_count(density, K) == want
        per_row = row_head_counts(cfg, 0, jnp.asarray([density, np.nan], jnp.float32))
        assert per_row[:, 0].tolist() == [want, 0]


def test_a_nan_density_is_refused(tmp_path):
    """NaN passes both `<= 0` and `> 1`: it was accepted and ran every sparse layer with no heads at all (its
    head count cast to -2**31); a JSON file may hold one (json reads NaN)."""
    with pytest.raises(ValueError, match=r"attention density must lie in \(0, 1\]"):
        SparsityConfig(attn="oracle", attn_density=float("nan"))
    path = tmp_path / "sp.json"
    path.write_text('{"attn": "oracle", "attn_density": [1.0, NaN, 0.5]}')
    with pytest.raises(ValueError, match=f"bad sparsity config {path}: attention density must lie in"):
        SparsityConfig.from_json(path)



@pytest.mark.parametrize("field,value,message", [
    ("attn_density", "0.5", "attn_density must be a number or a list of them, got '0.5'"),
    ("attn_density", True, "attn_density must be a number or a list of them, got True"),
    ("attn_density", [1.0, "0.5", 0.5], r"attn_density must be a number or a list of them, got \(1.0, '0.5', 0.5\)"),
    ("mlp_k", "8", "mlp_k must be whole neurons, >= 1 per layer, got '8'"),
    ("mlp_k", [4, True, 4], r"mlp_k must be whole neurons, >= 1 per layer, got \(4, True, 4\)"),
    ("mlp_k_table", {"4": [8, True, 8]}, r"mlp_k_table\[4\] must be whole neurons, >= 1 per layer, got \(8, True, 8\)"),
])
def test_numbers_given_as_strings_or_booleans_are_refused(tmp_path, field, value, message):
    """numpy reads "0.5" as 0.5 and true as 1 (bool is an int subclass): a quoted density or a stray boolean in a
    config file ran as that number, and the config kept the string. The error names the field and the file."""
    source = {"attn_density": {"attn": "random"}, "mlp_k": {"mlp": "random"}, "mlp_k_table": {"mlp": "router"}}
    path = tmp_path / "sp.json"
    path.write_text(json.dumps({**source[field], field: value}))
    with pytest.raises(ValueError, match=f"bad sparsity config {path}: {message}"):
        SparsityConfig.from_json(path)


def test_to_json_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails once the file is open (a full disk, Ctrl-C) left the config half written: now the old
    file stays whole, no temporary file is left beside it, and a new file gets the mode a plain write gives."""
    path = tmp_path / "sp.json"
    old = SparsityConfig(attn="random", attn_density=0.5, seed=3)
    old.to_json(path)
    text = path.read_text()
    dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *a, **k: dumps(*a, **k) + "\ud800")  # the encoder fails on it
    with pytest.raises(UnicodeEncodeError):
        SparsityConfig(attn="random", attn_density=0.25).to_json(path)
    assert path.read_text() == text and SparsityConfig.from_json(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["sp.json"]
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the umask's, not mkstemp's 0600

@pytest.mark.parametrize("table", [((1, (300, 0, 256)),), ((1, (300, 1.5, 256)),), ((1, (8, -2)), (4, (8, 8)))])
def test_mlp_k_table_entries_must_be_whole_neurons(tmp_path, table):
    """A calibrated table's k are checked as mlp_k is: a 0 failed only at the first decode step with a message
    about mlp_k, which the file does not hold; 1.5 ran as 1 neuron per token."""
    with pytest.raises(ValueError, match=r"mlp_k_table\[1\] must be whole neurons, >= 1 per layer"):
        SparsityConfig(mlp="router", mlp_k_table=table)
    path = tmp_path / "sp.json"
    path.write_text(json.dumps({"mlp": "router", "mlp_k_table": {str(b): list(ks) for b, ks in table}}))
    with pytest.raises(ValueError, match=rf"bad sparsity config {path}: mlp_k_table\[1\] must be whole neurons"):
        SparsityConfig.from_json(path)


def test_more_neurons_than_the_model_has_is_refused():
    """A table calibrated on a wider MLP (another model of the same depth) ran clipped to F without a word: the
    layers it names sparse ran dense."""
    cfg = preset("tiny-opt")
    F = cfg.mlp_dim
    SparsityConfig(mlp="router", mlp_k_table=((1, (F, F, 8)),)).check_layers(cfg)  # F itself: every neuron
    with pytest.raises(ValueError, match=rf"mlp_k_table\[4\] keeps up to {F + 128} neurons a layer; tiny-opt's MLP "
                                         rf"has {F}"):
        SparsityConfig(mlp="router", mlp_k_table=((1, (F, F, 8)), (4, (F, F + 128, 8)))).check_layers(cfg)
    with pytest.raises(ValueError, match=rf"mlp_k keeps up to {2 * F} neurons"):
        SparsityConfig(mlp="random", mlp_k=2 * F).check_layers(cfg)

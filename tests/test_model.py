"""Model tests: parity with transformers, decode consistency, generation, sparsity plumbing, bad input."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convert.hf import params_from_torch_state_dict
from polar_jax import SamplingConfig, SparsityConfig, forward, generate, init_cache, init_params, preset
from polar_jax.cache import KVCache, cache_bytes
from polar_jax.model import Riders, forward_packed
from polar_jax.params import param_shapes
from polar_jax.sparsity import Segment, _top_slots, plan

fwd = jax.jit(forward, static_argnums=0, static_argnames=("sparsity", "last_only", "collect"))

TINY = ["tiny-opt", "tiny-opt-350m", "tiny-llama", "tiny-llama-gqa", "tiny-llama3"]


def hf_config(cfg):
    if cfg.family == "opt":
        return transformers.OPTConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, ffn_dim=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_positions,
            do_layer_norm_before=not cfg.post_norm, word_embed_proj_dim=cfg.embed_dim)
    rs = cfg.rope_scaling
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_scaling=None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": rs.original_max_positions})


def random_hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    cls = transformers.OPTForCausalLM if cfg.family == "opt" else transformers.LlamaForCausalLM
    model = cls(hf_config(cfg)).eval()
    with torch.no_grad():  # larger than the default init, so every layer matters to the logits
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return model


def ragged_batch(cfg, rng, lengths, T):
    tokens = rng.integers(0, cfg.vocab_size, (len(lengths), T))
    return tokens, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("name", TINY)
def test_parity_with_transformers(name):
    cfg = preset(name)
    model = random_hf_model(cfg)
    params = params_from_torch_state_dict(cfg, model.state_dict())
    tokens, lens = ragged_batch(cfg, np.random.default_rng(1), [13, 4, 9], 13)
    mask = (np.arange(13)[None] < lens[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    with jax.default_matmul_precision("highest"):  # on a GPU the fp32 default is TF32; parity is fp32
        logits, cache, _ = forward(cfg, params, jnp.asarray(tokens), init_cache(cfg, 3, 32, jnp.float32),
                                   n_new=jnp.asarray(lens))
    # 2e-4: prefill attention is a blockwise online softmax, whose fp32 sums run in another order than
    # torch's one-pass softmax (seen: 1.1e-4 on tiny-opt-350m's post-norm stack).
    for b, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), ref[b, :n], atol=2e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)


@pytest.mark.parametrize("name", ["tiny-opt-350m", "tiny-llama-gqa"])
def test_decode_steps_match_full_forward(name):
    cfg = preset(name)
    params = init_params(cfg, jax.random.key(2))
    B, T, P = 3, 12, 5
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (B, T)))
    full, _, _ = fwd(cfg, params, tokens, init_cache(cfg, B, 32, jnp.float32))
    logits, cache, _ = fwd(cfg, params, tokens[:, :P], init_cache(cfg, B, 32, jnp.float32))
    steps = [logits]
    for t in range(P, T):
        logits, cache, _ = fwd(cfg, params, tokens[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-opt-350m", "tiny-llama-gqa"])
@pytest.mark.parametrize("sparse", [False, True])
def test_forward_packed_equals_a_prefill_then_a_decode_step(name, sparse):
    """Chunks packed on one token axis (a gap between them, a padding tail, an empty chunk) with decode rows
    riding along give each part what its own call gives: each chunk's last-token logits (and with
    all_logits every token's), the riders' logits (the padding rider's aside) and every written page."""
    cfg = preset(name)
    params = init_params(cfg, jax.random.key(4))
    rng = np.random.default_rng(5)
    pool = init_cache(cfg, 6, 64, jnp.float32)  # rows 0-2 prefill chunks, rows 3-5 ride; 2 pages each
    pre_table, rider_table = pool.page_table[:3], pool.page_table[3:]
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 7)))
    _, ridden, _ = fwd(cfg, params, prompts, KVCache(pool.k, pool.v, rider_table, jnp.zeros(3, jnp.int32)),
                       n_new=jnp.asarray([7, 5, 6]))
    riders = Riders(tokens=jnp.asarray(rng.integers(0, cfg.vocab_size, 3)), lengths=ridden.lengths,
                    valid=jnp.asarray([True, True, False]), page_table=rider_table)
    starts = jnp.asarray([0, 3, 0], jnp.int32)
    tokens, n_new = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9))), jnp.asarray([9, 6])
    flat = rng.integers(0, cfg.vocab_size, 20)  # padding tokens are random too: they must not matter
    flat[0:9], flat[11:17] = tokens[0], tokens[1, :6]
    offsets, n_packed = jnp.asarray([0, 11, 19]), jnp.asarray([9, 6, 0])
    sp = (SparsityConfig(attn="random", attn_density=0.5, mlp="random", mlp_k=cfg.mlp_dim // 4) if sparse
          else None)
    key = jax.random.key(6)
    packed = jax.jit(forward_packed, static_argnums=0, static_argnames=("sparsity", "max_new", "all_logits"))

    got, got_r, k, v = packed(cfg, params, jnp.asarray(flat), KVCache(ridden.k, ridden.v, pre_table, starts),
                              offsets, n_packed, max_new=9, riders=riders, sparsity=sp, key=key)
    pre = KVCache(ridden.k, ridden.v, pre_table[:2], starts[:2])
    want, after, _ = fwd(cfg, params, tokens, pre, n_new=n_new, last_only=True)
    want_r, after, _ = fwd(cfg, params, riders.tokens[:, None],
                           KVCache(after.k, after.v, rider_table, riders.lengths),
                           n_new=riders.valid.astype(jnp.int32), sparsity=sp, key=key)
    np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(want), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got_r[:2]), np.asarray(want_r[:2, 0]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(k), np.asarray(after.k), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(v), np.asarray(after.v), atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(k - ridden.k))) > 0  # the pages were written at all

    every, none, _, _ = packed(cfg, params, jnp.asarray(flat), KVCache(ridden.k, ridden.v, pre_table, starts),
                               offsets, n_packed, max_new=9, all_logits=True)
    full, _, _ = fwd(cfg, params, tokens, pre, n_new=n_new)
    assert none is None and every.shape == (20, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(every[0:9]), np.asarray(full[0]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(every[11:17]), np.asarray(full[1, :6]), atol=2e-5, rtol=0)


def greedy_reference(cfg, params, prompt, n):
    """Greedy continuation by re-running the full forward on the growing sequence (no decode path)."""
    seq = np.zeros((1, 32), np.int32)
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        logits, _, _ = fwd(cfg, params, jnp.asarray(seq), init_cache(cfg, 1, 32, jnp.float32),
                           n_new=jnp.asarray([t]), last_only=True)
        seq[0, t] = int(jnp.argmax(logits[0]))
    return list(seq[0, len(prompt): len(prompt) + n])


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_generate_ragged_batch_equals_one_by_one(name):
    cfg = preset(name)
    params = init_params(cfg, jax.random.key(4))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [30]]
    out = generate(cfg, params, prompts, max_new_tokens=[6, 4, 7], stop_tokens=())
    assert list(out.lengths) == [6, 4, 7]
    for b, p in enumerate(prompts):
        n = out.lengths[b]
        assert list(out.tokens[b, :n]) == greedy_reference(cfg, params, p, n)
        assert np.all(out.tokens[b, n:] == cfg.pad_token_id)


def test_generate_stops_at_stop_token():
    cfg = preset("tiny-llama")
    params = init_params(cfg, jax.random.key(5))
    free = generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=8, stop_tokens=())
    stop = int(free.tokens[0, 2])  # the third token of sequence 0 becomes a stop token
    out = generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=8, stop_tokens=(stop,))
    first = int(np.argmax(free.tokens[0] == stop))
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    hits = np.flatnonzero(free.tokens[1] == stop)
    assert out.lengths[1] == (hits[0] + 1 if len(hits) else 8)


def test_sampling_controls():
    cfg = preset("tiny-llama-gqa")
    params = init_params(cfg, jax.random.key(6))
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    greedy = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=()).tokens
    top1 = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=(),
                    sampling=SamplingConfig(temperature=1.0, top_k=1), seed=1).tokens
    np.testing.assert_array_equal(top1, greedy)
    nucleus = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=(),
                       sampling=SamplingConfig(temperature=1.0, top_p=1e-6), seed=2).tokens
    np.testing.assert_array_equal(nucleus, greedy)
    hot = SamplingConfig(temperature=5.0)
    a = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=(), sampling=hot, seed=3).tokens
    b = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=(), sampling=hot, seed=3).tokens
    c = generate(cfg, params, prompts, max_new_tokens=10, stop_tokens=(), sampling=hot, seed=4).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_oracle_mlp_union_equals_dense():
    """ReLU: the batch union of active neurons through the selective kernels is the dense MLP exactly."""
    cfg = preset("tiny-opt")
    params = init_params(cfg, jax.random.key(7))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    dense = generate(cfg, params, prompts, max_new_tokens=12, stop_tokens=())
    oracle = generate(cfg, params, prompts, max_new_tokens=12, stop_tokens=(), sparsity=SparsityConfig(mlp="oracle"))
    np.testing.assert_array_equal(oracle.tokens, dense.tokens)


def test_plan_runs_dense_layers_apart_and_everything_selected_is_dense():
    cfg = preset("tiny-llama-gqa")  # 3 layers, K = 2
    half = SparsityConfig(attn="router", attn_density=0.5, mlp="random", mlp_k=64)
    assert plan(half, cfg, batch=4) == [Segment(0, 1, None, None), Segment(1, 3, 1, 64)]
    full = SparsityConfig(attn="random", attn_density=1.0, mlp="random", mlp_k=cfg.mlp_dim, dense_layers=())
    assert plan(full, cfg, batch=4) == [Segment(0, 3, None, None)]
    router_mlp = SparsityConfig(mlp="router", mlp_k=(160, 16, 32))
    assert plan(router_mlp, cfg, batch=2) == [Segment(0, 1, None, None), Segment(1, 3, None, 64)]


def test_top_slots_ranks_without_sorting():
    scores = jax.random.normal(jax.random.key(12), (5, 9))
    scores = scores.at[1, 3].set(scores[1, 7])  # a tie: broken by the smaller id
    for count in (0, 1, 4, 9):
        got = np.asarray(_top_slots(scores, jnp.int32(count), 9))
        want = np.argsort(-np.asarray(scores), axis=-1, kind="stable")
        np.testing.assert_array_equal(got[:, :count], want[:, :count])
        assert np.all(got[:, count:] == -1)


def test_sparse_decode_changes_logits_and_keeps_dense_layers():
    cfg = preset("tiny-llama")
    params = init_params(cfg, jax.random.key(8))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 6)))
    _, cache, _ = forward(cfg, params, tokens, init_cache(cfg, 2, 16, jnp.float32))
    step = tokens[:, :1]
    dense, _, _ = forward(cfg, params, step, cache)
    half = SparsityConfig(attn="oracle", attn_density=0.5)
    sparse, _, _ = forward(cfg, params, step, cache, sparsity=half)
    assert float(jnp.max(jnp.abs(sparse - dense))) > 1e-3
    all_dense = SparsityConfig(attn="oracle", attn_density=0.5, dense_layers=tuple(range(cfg.n_layers)))
    same, _, _ = forward(cfg, params, step, cache, sparsity=all_dense)
    np.testing.assert_allclose(np.asarray(same), np.asarray(dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-70b", "opt-66b", "opt-350m", "smollm2-135m"])
def test_real_sizes_trace(name):
    """Real shapes through init and a decode step, at no memory cost (jax.eval_shape)."""
    cfg = preset(name)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16))
    assert params["layers"]["w_up"].shape == (cfg.n_layers, cfg.mlp_dim, cfg.dim)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    cache = jax.eval_shape(lambda: init_cache(cfg, 4, 256, jnp.bfloat16))
    Z = cache.page_size
    assert cache.k.shape == (cfg.n_layers, 4 * 256 // Z, cfg.n_kv_heads, Z, cfg.head_dim)
    assert cache.page_table.shape == (4, 256 // Z) and cache.max_len == 256
    assert cache_bytes(cfg, 4, 256) == 2 * cache.k.size * 2
    logits, new_cache, _ = jax.eval_shape(
        lambda p, c: forward(cfg, p, jnp.zeros((4, 1), jnp.int32), c), params, cache)
    assert logits.shape == (4, 1, cfg.vocab_size) and logits.dtype == jnp.float32
    assert new_cache.k.shape == cache.k.shape


def _scan_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["jaxpr"].jaxpr
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _scan_bodies(sub)


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested jaxprs included, Pallas kernel bodies not."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from _eqns(sub)


def _decode_step_jaxpr(monkeypatch, cfg, B):
    """The jaxpr of one decode step of B sequences, traced (not run) as on a GPU, where the projections take
    the Pallas kernels (the CPU's fallback paths make their own masks); and its layer-scan bodies."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: init_cache(cfg, B, 256, jnp.bfloat16))
    jaxpr = jax.make_jaxpr(lambda p, c: forward(cfg, p, jnp.zeros((B, 1), jnp.int32), c))(params, cache).jaxpr
    bodies = list(_scan_bodies(jaxpr))
    assert bodies
    return jaxpr, bodies


def _iota_sizes(jaxpr) -> set:
    return {e.params["shape"][0] for e in _eqns(jaxpr) if e.primitive.name == "iota" and len(e.params["shape"]) == 1}


def _int_adds(jaxpr, shape) -> int:
    return sum(e.primitive.name == "add" and e.outvars[0].aval.shape == shape and e.outvars[0].aval.dtype == jnp.int32
               for e in _eqns(jaxpr))


def test_decode_step_makes_its_every_row_indices_outside_the_layer_loop(monkeypatch):
    """The dense decode projections select every row of wqkv, wo and the MLP: those index arrays are made once
    per step, not as an iota kernel per layer inside the layer scan."""
    cfg = preset("llama-3-8b")
    jaxpr, bodies = _decode_step_jaxpr(monkeypatch, cfg, 4)
    every_row = {(cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.mlp_dim}
    for body in bodies:
        assert not _iota_sizes(body) & every_row
    assert every_row <= _iota_sizes(jaxpr)  # made once, outside


def test_decode_step_adds_the_sequence_lengths_outside_the_layer_loop(monkeypatch):
    """The attention's lengths (cached tokens after the step, [B]) are added once per step, not per layer
    inside the layer scan, where XLA leaves the add as a kernel of its own in every layer."""
    B = 5
    jaxpr, bodies = _decode_step_jaxpr(monkeypatch, preset("llama-3-8b"), B)
    assert all(_int_adds(body, (B,)) == 0 for body in bodies)
    assert _int_adds(jaxpr, (B,)) >= 1  # made once, outside


def test_bad_inputs_are_named():
    cfg = preset("tiny-llama")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="no prompts"):
        generate(cfg, params, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(cfg, params, [[1], []])
    with pytest.raises(ValueError, match="cache holds 16"):
        generate(cfg, params, [[1] * 12], max_new_tokens=8, max_len=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(cfg, params, [[1, cfg.vocab_size]])
    with pytest.raises(ValueError, match="prompt 0: token id 1.5 .* is not an integer"):
        generate(cfg, params, [[1.5, 2]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cfg, params, [[1]], max_new_tokens=0)
    with pytest.raises(KeyError, match="unknown model preset 'llama-9'"):
        preset("llama-9")
    with pytest.raises(ValueError, match="density"):
        SparsityConfig(attn="random", attn_density=1.5)
    with pytest.raises(ValueError, match="has no attn router"):
        generate(cfg, params, [[1, 2]], max_new_tokens=4, sparsity=SparsityConfig(attn="router", attn_density=0.5))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("activation,gated", [("relu", True), ("gelu", True), ("silu", False)])
def test_mlp_activations_decode_cannot_compute_are_refused(activation, gated):
    """Decode steps run the MLP through the selective GEMM, whose gate is silu and whose ungated activations
    are relu and gelu: a config asking for another was accepted, and its decode steps silently computed a
    different MLP than its prefill (a gated relu model's logits 0.8 apart)."""
    with pytest.raises(ValueError, match="MLP"):
        preset("tiny-llama").replace(activation=activation, gated_mlp=gated)


def test_flax_module_applies_forward():
    from polar_jax.model import PolarLM

    cfg = preset("tiny-opt-350m")
    module = PolarLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, cfg.vocab_size, (2, 5)))
    cache = init_cache(cfg, 2, 16, jnp.float32)
    variables = module.init(jax.random.key(11), tokens, cache)
    logits, _, _ = module.apply(variables, tokens, cache)
    ref, _, _ = forward(cfg, variables["params"]["weights"], tokens, cache)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
    assert float(jnp.std(logits)) > 0.1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt-350m"])
def test_both_routers_read_the_attention_norm_output(monkeypatch, name):
    """Collection records the attention-norm output as the router input, and training and calibration fit
    the MLP router to it; decoding fed the MLP router the MLP-norm output instead (after the attention's
    residual add). Both routers must see the same [B, D] rows, layer by layer (post-norm OPT: the layer input)."""
    import polar_jax.model as model
    from training import routers as rt

    cfg = preset(name)
    params = init_params(cfg, jax.random.key(3))
    k1, k2 = jax.random.split(jax.random.key(4))
    params["routers"] = {"attn": rt.init_attn(cfg, k1), "mlp": rt.init_mlp(cfg, k2, hidden=16)}
    seen = {"attn": {}, "mlp": {}}

    def spy(kind, fn, h_at):
        def wrapped(*args, **kw):
            jax.debug.callback(lambda l, h: seen[kind].__setitem__(int(l), np.asarray(h)), args[2], args[h_at])
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(model, "attention_heads", spy("attn", model.attention_heads, 5))
    monkeypatch.setattr(model, "mlp_neurons", spy("mlp", model.mlp_neurons, 5))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 5)))
    _, cache, _ = forward(cfg, params, tokens, init_cache(cfg, 2, 16, jnp.float32))
    sp = SparsityConfig(attn="router", attn_density=0.5, mlp="router", mlp_k=16)
    forward(cfg, params, tokens[:, :1], cache, sparsity=sp)
    jax.effects_barrier()
    assert sorted(seen["attn"]) == sorted(seen["mlp"]) and 1 in seen["mlp"]
    for l in seen["attn"]:
        np.testing.assert_array_equal(seen["mlp"][l], seen["attn"][l], err_msg=f"layer {l}")


def test_a_calibrated_k_table_follows_the_real_rows_not_the_padding(monkeypatch):
    """The engine pads decode batches to buckets (a lone request runs in a batch of 4): the table entry must
    follow the rows that are real, on the device, or a lone request gets a larger batch's (smaller) k."""
    import polar_jax.model as model
    from training import routers as rt

    cfg = preset("tiny-opt")
    params = init_params(cfg, jax.random.key(5))
    params["routers"] = {"mlp": rt.init_mlp(cfg, jax.random.key(6), hidden=16)}
    counts = {}

    def spy(*args, **kw):
        jax.debug.callback(lambda l, n: counts.__setitem__(int(l), int(n)), args[2], args[3])
        return mlp_neurons(*args, **kw)

    mlp_neurons = model.mlp_neurons
    monkeypatch.setattr(model, "mlp_neurons", spy)
    sp = SparsityConfig(mlp="router", mlp_k_table=((1, (512, 384, 256)), (4, (512, 128, 128))))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (4, 3)))
    _, cache, _ = forward(cfg, params, tokens, init_cache(cfg, 4, 16, jnp.float32))
    step = jax.jit(lambda c, n_new: forward(cfg, params, tokens[:, :1], c, n_new=n_new, sparsity=sp)[0])
    for n_new, want in [([1, 0, 0, 0], (384, 256)), ([1, 1, 0, 0], (384, 256)), ([1, 1, 1, 1], (128, 128))]:
        counts.clear()
        jax.block_until_ready(step(cache, jnp.asarray(n_new, jnp.int32)))
        jax.effects_barrier()
        assert (counts[1], counts[2]) == want, (n_new, counts)


def test_a_table_layer_that_keeps_every_neuron_at_one_row_is_still_sparse_at_more():
    """calibrate writes F where no k < F reaches the recall (typically at batch 1, where a token's top-k must
    cover all its active neurons); a larger batch's smaller k must still apply in that layer: it ran dense at
    every batch size. Four real rows: the same logits as the batch-4 entry given as mlp_k."""
    from training import routers as rt

    cfg = preset("tiny-opt")
    F = cfg.mlp_dim
    params = init_params(cfg, jax.random.key(5))
    params["routers"] = {"mlp": rt.init_mlp(cfg, jax.random.key(6), hidden=16)}
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (4, 3)))
    _, cache, _ = forward(cfg, params, tokens, init_cache(cfg, 4, 16, jnp.float32))
    table = SparsityConfig(mlp="router", mlp_k_table=((1, (F, F, F)), (4, (F, 8, 8))))
    fixed = SparsityConfig(mlp="router", mlp_k=(F, 8, 8))
    dense = forward(cfg, params, tokens[:, :1], cache)[0]
    want = forward(cfg, params, tokens[:, :1], cache, sparsity=fixed)[0]
    got = forward(cfg, params, tokens[:, :1], cache, sparsity=table)[0]
    assert not np.allclose(want, dense, atol=1e-4)  # 8 of F neurons per token change the output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

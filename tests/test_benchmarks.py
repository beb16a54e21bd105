"""The benchmarks' arithmetic (bytes per step, KV bytes, density labels), ceiling warnings and result files.

CPU only and fast: parameter shapes come from jax.eval_shape, nothing large is allocated.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, generate
from polar_jax import SparsityConfig, init_params, preset
from polar_jax.params import param_shapes


def _shape_params(cfg):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16))


def _expected_weight_bytes(cfg, B):
    """From the parameter contract: all matrices once; B rows of embed (untied) / pos_embed; tied embed whole."""
    shapes = param_shapes(cfg)
    flat = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    total = sum(math.prod(s) for s in flat)
    V, E = shapes["embed"]
    if not cfg.tie_embeddings:
        total += B * E - V * E
    if "pos_embed" in shapes:
        P, D = shapes["pos_embed"]
        total += B * D - P * D
    return 2 * total


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "smollm2-135m", "opt-6.7b", "tiny-opt-350m"])
@pytest.mark.parametrize("B", [1, 64])
def test_step_bytes_weights_match_param_shapes(name, B):
    cfg = preset(name)
    params = _shape_params(cfg)
    kv = generate.kv_bytes(cfg, B, 100, np.full(cfg.n_layers, cfg.n_kv_heads))
    assert generate.step_bytes(cfg, params, B, 100, None) == _expected_weight_bytes(cfg, B) + kv


@pytest.mark.parametrize("name, B, ctx", [("llama-2-7b", 16, 2048), ("llama-3-8b", 48, 2048), ("opt-6.7b", 8, 300)])
def test_read_chain_phases_add_up_to_the_step(name, B, ctx):
    """probe_read_chain's phases (one layer's bytes, times L, plus the LM head) are the step's bytes: within the
    norms, biases and B embedding rows the probe leaves out (under 0.1%)."""
    from benchmarks import probe_read_chain
    cfg = preset(name)
    phases = probe_read_chain.phase_bytes(name, B, ctx)
    probe = cfg.n_layers * sum(phases.values()) + cfg.vocab_size * cfg.dim * 2
    step = generate.step_bytes(cfg, _shape_params(cfg), B, ctx, None)
    assert phases["kv_cache"] * cfg.n_layers == generate.kv_bytes(cfg, B, ctx, np.full(cfg.n_layers, cfg.n_kv_heads))
    assert abs(probe - step) / step < 1e-3, (probe, step)


@pytest.mark.parametrize("name, n_params", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248)])
def test_untied_lm_head_counted_once(name, n_params):
    """Published parameter counts (embed and lm_head each once); a step reads B = 16 rows of embed."""
    cfg = preset(name)
    B = 16
    V, E = cfg.vocab_size, cfg.embed_dim
    expected = 2 * (n_params - V * E + B * E)
    assert generate.weight_bytes(cfg, _shape_params(cfg), B) == expected


def test_kv_bytes_sparse_heads():
    """llama-3-8b at 0.3: layer 0 dense (8 heads), the other 31 layers keep round(0.3 * 8) = 2."""
    cfg = preset("llama-3-8b")
    sp = SparsityConfig(attn="random", attn_density=0.3)
    kept = generate.heads_kept(cfg, sp)
    assert kept.tolist() == [8] + [2] * 31
    B, ctx = 16, 2048
    assert generate.kv_bytes(cfg, B, ctx, kept) == 2 * B * (8 + 31 * 2) * (ctx + 1) * 128 * 2
    dense = generate.kv_bytes(cfg, B, ctx, generate.heads_kept(cfg, None))
    assert dense == 2 * 32 * B * 8 * (ctx + 1) * 128 * 2
    params = _shape_params(cfg)
    with_routers = dict(params, routers={"attn": {"w": jax.ShapeDtypeStruct((32, 4096, 8), jnp.bfloat16)}})
    diff = generate.step_bytes(cfg, with_routers, B, ctx, sp) - generate.step_bytes(cfg, params, B, ctx, sp)
    assert diff == 0  # random selection reads no router
    sp_router = SparsityConfig(attn="router", attn_density=0.3)
    diff = generate.step_bytes(cfg, with_routers, B, ctx, sp_router) - generate.step_bytes(cfg, params, B, ctx, sp)
    assert diff == 32 * 4096 * 8 * 2


@pytest.mark.parametrize("name, requested, kept, density", [
    ("llama-3-8b", 0.3, "2 of 8", 0.25), ("llama-3-8b", 0.5, "4 of 8", 0.5),
    ("llama-2-7b", 0.3, "10 of 32", 10 / 32), ("smollm2-135m", 0.5, "2 of 3", 2 / 3),
])
def test_density_labels_say_what_ran(name, requested, kept, density):
    cfg = preset(name)
    labels = generate.density_labels(cfg, SparsityConfig(attn="random", attn_density=requested), requested)
    assert labels["density_requested"] == requested
    assert labels["kv_heads_kept"] == kept
    assert labels["density"] == pytest.approx(density)
    K, L = cfg.n_kv_heads, cfg.n_layers
    assert labels["density_all_layers"] == pytest.approx((K + (L - 1) * density * K) / (K * L))
    dense = generate.density_labels(cfg, None, 1.0)
    assert (dense["kv_heads_kept"], dense["density"]) == (f"{K} of {K}", 1.0)


def test_check_ceiling_warns_above_one(capsys):
    recs = [{"name": "a", "frac": 0.97}, {"name": "b", "frac": 1.04}, {"name": "c", "frac": float("nan")}]
    warnings = common.check_ceiling(recs, ["frac"], lambda r: r["name"])
    assert len(warnings) == 1 and warnings[0].startswith("b: frac = 1.040")
    assert "CEILING IS WRONG" in capsys.readouterr().err


def test_write_results_header_and_cpu_refusal(tmp_path):
    meta = dict(common.metadata("python -m benchmarks.x --out D"), **common.ceiling_meta(
        {"read_bw": 3.16e12, "copy_bw": 3.01e12, "read_variants": {"f32 sum": 3.16e12}}),
        clocks=["wall: host-timed"], warnings=["b: above the ceiling"])
    common.write_results("x", meta, [{"a": 1.5}], ["a"], out_dir=tmp_path)
    md = (tmp_path / "x.md").read_text()
    for part in (common.device_name(), meta["date"], "`python -m benchmarks.x --out D`",
                 "streaming-read bandwidth", "3.160 TB/s", "Copy bandwidth 3.010 TB/s", "Clock: wall",
                 "**WARNING: b: above the ceiling**", "| 1.5 |"):
        assert part in md
    assert json.loads((tmp_path / "x.json").read_text())["meta"]["read_bw_TBps"] == pytest.approx(3.16)
    assert jax.default_backend() == "cpu"
    with pytest.raises(SystemExit, match="not writing cpu figures"):
        common.write_results("x", meta, [], ["a"])


def test_require_gpu_refuses_cpu_at_once():
    with pytest.raises(SystemExit, match="--allow-cpu"):
        common.require_gpu("benchmarks.kernels", allow_cpu=False)
    common.require_gpu("benchmarks.kernels", allow_cpu=True)


@pytest.mark.parametrize("set_bytes", [1e6, 20e6, 134e6, 2.1e9, 30e9])
@pytest.mark.parametrize("est_ms", [0.005, 0.03, 0.2, 5.0])
def test_attention_chain_rotates_cache_sets(set_bytes, est_ms):
    """No call reads the cache set of the call before it (within a chain or across back-to-back chains), and
    the sets rotated through hold several times the L2 wherever memory allows."""
    from benchmarks import bench_attention as ba
    n_sets = ba.n_cache_sets(set_bytes)
    n = ba.chain_len(est_ms, n_sets)
    assert n_sets >= 2 and n >= ba.CHAIN
    assert n_sets <= ba.MAX_SETS
    if ba.L2_ROTATION * common.L2_BYTES <= min(ba.MAX_SETS * set_bytes, ba.SETS_BYTES):
        assert n_sets * set_bytes >= ba.L2_ROTATION * common.L2_BYTES
    # What the jitted chain does, traced on tiny stand-ins: which set each call reads, over two chains.
    sets = [(jnp.full((1,), s, jnp.float32), jnp.zeros((1,))) for s in range(n_sets)]
    chain = ba._chain(lambda q, k, v, lengths, h: k)
    used = [int(o[0]) for _ in range(2) for o in chain(sets, [jnp.zeros(1)] * n, [None] * n, jnp.zeros(1))]
    assert all(a != b for a, b in zip(used, used[1:])), used
    assert set(used) == set(range(n_sets))


def test_attention_chain_refuses_back_to_back_reuse():
    from benchmarks import bench_attention as ba
    sets = [(jnp.zeros(1), jnp.zeros(1))] * 2
    with pytest.raises(ValueError, match="back to back"):
        ba._chain(lambda q, k, v, n, h: k)(sets, [jnp.zeros(1)] * 3, [None] * 3, jnp.zeros(1))


def test_mlp_kernel_clock_never_falls_back_to_wall(capsys):
    """Without a GPU trace the kernel clock is NaN and the reason is kept; the wall clock is still measured."""
    from benchmarks import bench_mlp
    unavailable = set()
    fn = jax.jit(lambda x: x * 2.0)
    ms_kernel, ms_wall, per = bench_mlp._measure(fn, [(jnp.ones(8),)], unavailable=unavailable)
    assert math.isnan(ms_kernel) and per == {}
    assert ms_wall > 0
    assert unavailable == {"no GPU kernels in the profiler trace (backend cpu)"}
    meta = bench_mlp.clock_meta(unavailable)
    assert meta["kernel_clock"].startswith("unavailable: no GPU kernels")
    assert meta["clocks"][0].startswith("kernel: UNAVAILABLE") and meta["clocks"][1].startswith("wall:")
    assert "kernel clock unavailable" in capsys.readouterr().out
    assert bench_mlp.clock_meta(set())["kernel_clock"] == "profiler"


@pytest.mark.parametrize("module", ["kernels", "bench_attention", "bench_mlp", "generate", "profile_step",
                                    "profile_loglik"])
def test_gpu_benchmarks_refuse_cpu_at_once(module, monkeypatch, capsys):
    """On CPU each GPU benchmark exits at once (no measuring) with one line naming --allow-cpu."""
    import importlib
    import time
    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr("sys.argv", [module])
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main() if module not in ("generate", "profile_step", "profile_loglik") else main([])
    assert time.perf_counter() - t0 < 5
    assert "measures GPU kernels" in str(exc.value) and "--allow-cpu" in str(exc.value)
    assert capsys.readouterr().out == ""


def test_profile_loglik_requests_share_contexts_per_question():
    """The probe's requests: `choices` per question with one shared context, lengths inside the given ranges."""
    from benchmarks.profile_loglik import make_requests

    reqs = make_requests(1000, 5, 3, (4, 9), (1, 6), seed=1)
    assert len(reqs) == 15 and len({c for c, _ in reqs}) == 5
    assert all(reqs[3 * q][0] == reqs[3 * q + j][0] for q in range(5) for j in range(3))
    assert all(4 <= len(c) <= 9 and 1 <= len(x) <= 6 for c, x in reqs)


def test_random_cache_fills_kv_and_sets_lengths():
    """Whatever the cache layout: every floating-point buffer random (distinct per buffer), lengths = ctx."""
    cfg = preset("tiny-llama-gqa")
    cache = generate.random_cache(cfg, 3, 20)
    assert cache.lengths.tolist() == [20, 20, 20]
    floats = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(cache)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) >= 2
    for x in floats:
        assert np.all(np.isfinite(x)) and 0.5 < x.std() < 2
    assert not np.array_equal(floats[0], floats[1])


def test_fill_random_writes_in_place():
    """The fill reuses its donated buffer: nothing the size of the buffer is allocated beside it (a fill that
    built a new array ran an H200 out of memory at llama-2-7b B = 64), and every leading index is written."""
    x = jnp.zeros((128, 64, 32), jnp.bfloat16)
    m = generate.fill_random.lower(x, jax.random.key(0)).compile().memory_analysis()
    assert m.alias_size_in_bytes == x.nbytes
    assert m.temp_size_in_bytes < x.nbytes / 4
    y = np.asarray(generate.fill_random(x, jax.random.key(0)), np.float32)
    assert all(0.5 < y[i].std() < 2 for i in range(128))
    assert not np.array_equal(y[0], y[1])


def test_mlp_fused_flag_runs_on_cpu(monkeypatch, tmp_path):
    """`bench_mlp --fused --allow-cpu` at tiny shapes: fused, two-kernel and XLA rows, both chains agreeing."""
    from benchmarks import bench_mlp
    monkeypatch.setattr(bench_mlp, "FUSED_CASES", [("relu", 64, 256, 3, 0.5, 8.0), ("gated", 48, 160, 5, 0.3, 2.6)])
    monkeypatch.setattr(bench_mlp, "CHAIN", 2)
    monkeypatch.setattr(common, "measure_ceiling", lambda: {"read_bw": 1e11, "copy_bw": 1e11,
                                                           "read_variants": {"f32 sum": 1e11}})
    monkeypatch.setattr("sys.argv", ["bench_mlp", "--fused", "--allow-cpu", "--out", str(tmp_path)])
    assert bench_mlp.main() == 0
    records = json.loads((tmp_path / "kernels_mlp_fused.json").read_text())["records"]
    assert [(r["variant"], r["D"], r["B"], r["count"]) for r in records] == [("relu", 64, 3, 128), ("gated", 48, 5, 128)]
    for r in records:
        for path in ("fused", "two_kernel", "xla"):
            assert r[f"ms_{path}_wall"] > 0 and math.isnan(r[f"ms_{path}_kernel"])  # no GPU trace on CPU
        assert r["speedup_fused_vs_two_kernel_wall"] == pytest.approx(r["ms_two_kernel_wall"] / r["ms_fused_wall"])
        assert r["fused_rel_diff_vs_two_kernel"] < 1e-2
    assert "| relu | 64 | 256 | 3 |" in (tmp_path / "kernels_mlp_fused.md").read_text()


def test_mlp_fused_tune_flag_runs_on_cpu(monkeypatch, tmp_path):
    """`--fused-tune`: the candidates are timed, the winner lands in OUT/tuned_fused.json and the user
    cache, and the --fused run that follows uses it."""
    from benchmarks import bench_mlp
    from pallas_kernels import autotune
    from pallas_kernels.selective_gemm import fused
    monkeypatch.setenv("POLAR_TUNE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(autotune.KERNELS, "selective_mlp_fused", dataclasses.replace(
        autotune.KERNELS["selective_mlp_fused"], candidates=lambda **sc: fused.fused_candidates(**sc)[:2]))
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_files", {})
    monkeypatch.setattr(bench_mlp, "FUSED_CASES", [("gated", 48, 160, 5, 0.3, 2.6)])
    monkeypatch.setattr(bench_mlp, "CHAIN", 2)
    monkeypatch.setattr(common, "measure_ceiling", lambda: {"read_bw": 1e11, "copy_bw": 1e11,
                                                           "read_variants": {"f32 sum": 1e11}})
    monkeypatch.setattr("sys.argv", ["bench_mlp", "--fused-tune", "--allow-cpu", "--out", str(tmp_path)])
    assert bench_mlp.main() == 0
    table = json.loads((tmp_path / "tuned_fused.json").read_text())
    [(key, entry)] = table["entries"].items()
    assert key.startswith("selective_mlp_fused|B=6,D=48,count=128,gated=1") and len(entry["timings"]) == 2
    assert autotune.user_file(autotune.device_kind()).exists()
    [rec] = json.loads((tmp_path / "kernels_mlp_fused.json").read_text())["records"]
    assert rec["fused_config"] == entry["config"]


def test_replay_padding_counts_each_rules_padding(tmp_path):
    """16 prompts of 2,048 tokens, one output each: two full chunks a step. [rows, T] buckets fit them exactly;
    packing at a 4,096-token budget pads 4,096 tokens to the 5,056 capacity (plus 64 riders per step); the
    default budget packs 4,032 tokens a step into the 4,032 capacity, riders included in its 4,096 rows."""
    from benchmarks import replay_padding

    replay_padding.main(["--requests", "16", "--prompt-len", "2048,2048", "--output-len", "1,1", "--out",
                         str(tmp_path)])
    rows = {r["rule"]: r for r in json.loads((tmp_path / "replay_padding.json").read_text())["records"]}
    assert all(r["real_tokens"] == 16 * 2048 for r in rows.values())
    old, packed, lowered = rows["[rows, T] buckets"], rows["packed, 2 x chunk"], rows["packed"]
    assert old["prefill_steps"] == 8 and old["padded_tokens"] == old["gemm_rows"] == 16 * 2048
    assert packed["prefill_steps"] == 8 and packed["padded_tokens"] == 8 * 5056
    assert packed["gemm_rows"] == 8 * (5056 + 64)
    # Eight full steps of 4,032 tokens in 4,096 rows each, then 512 tokens in the 576 capacity (640 rows).
    assert lowered["max_num_batched_tokens"] == 4032 and lowered["gemm_rows"] == 8 * 4096 + 640


def test_compare_outputs_finds_where_runs_fork():
    """serve_offline's small-pool check: identical requests, the shared part of each output, the log-prob
    differences before the fork and the gap at it."""
    from benchmarks.serve_offline import compare_outputs

    want = {"a": ([5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4]), "b": ([1, 2], [-1.0, -2.0]),
            "c": ([9, 9, 9, 9], [-0.5, -0.5, -0.5, -0.5])}
    same = compare_outputs(want, want)
    assert same["identical_to_unconstrained"] and same["identical_requests"] == 3 and same["shared_prefix"] == 1
    got = {"a": ([5, 6, 3, 3], [-0.1, -0.25, -0.31, -9.0]), "b": ([1, 2], [-1.0, -2.0]),
           "c": ([4, 9, 9, 9], [-0.9, -0.5, -0.5, -0.5])}
    r = compare_outputs(got, want)
    assert not r["identical_to_unconstrained"] and r["identical_requests"] == 1
    assert r["shared_prefix"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert r["prefix_logprob_diff_max"] == pytest.approx(0.05)  # a's second token; nothing after a fork counts
    assert r["fork_logprob_gap_max"] == pytest.approx(0.4) and r["fork_logprob_gap_median"] == pytest.approx(0.205)


def test_serve_offline_and_http_engine_reference_run_on_cpu(monkeypatch, tmp_path):
    """The offline benchmark in batch-invariant mode with a sampled run (top-p) and a small pool (outputs
    identical to the unconstrained run) and the HTTP benchmark's engine reference, at tiny shapes on CPU (measured ceilings stubbed)."""
    import json

    import benchmarks.serve_http_engine as she
    import benchmarks.serve_offline as so

    monkeypatch.setattr(so, "matmul_rate", lambda dtype=None: 1e12)
    monkeypatch.setattr(so, "measure_ceiling", lambda: {"read_bw": 1e11, "copy_bw": 1e11, "read_variants": {}})
    assert so.main(["--allow-cpu", "--models", "tiny-llama-gqa", "--modes", "dense", "--requests", "12",
                    "--prompt-len", "8,40", "--output-len", "4,16", "--max-model-len", "64", "--max-num-seqs", "4",
                    "--prefill-chunk", "16", "--pool-fraction", "0.25", "--batch-invariant", "--top-p", "0.9",
                    "--out", str(tmp_path), "--name", "inv"]) == 0
    records = json.loads((tmp_path / "inv.json").read_text())["records"]
    # The engine's warm-up compiled every program the run met: nothing was traced or compiled while timed.
    assert all(r["timed_backend_compiles"] == 0 and r["timed_traces"] == 0 for r in records)
    sampled, pool = records[1:]
    assert sampled["mode"] == "dense, top-p 0.9, batch-invariant" and sampled["speedup"] > 0
    assert sampled["output_tokens"] == records[0]["output_tokens"]
    assert pool["mode"] == "dense, pool 25%, batch-invariant" and pool["preemptions"] > 0
    assert pool["identical_requests"] == 12 and pool["prefix_logprob_diff_max"] == 0
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"prompts": [[5, 6, 7] * 7, [12, 13, 14] * 5], "outs": [5, 3]}))
    assert she.main(["--allow-cpu", "--model", "tiny-llama-gqa", "--workload", str(w), "--max-num-seqs", "4",
                     "--max-model-len", "64", "--prefill-chunk", "16", "--ref-context", "20", "--batches", "1,4",
                     "--out", str(tmp_path / "engine.json")]) == 0
    assert json.loads((tmp_path / "engine.json").read_text())["offline"]["output_tokens"] == 8


def test_generate_cases_parse_and_refusals():
    import argparse

    assert generate.parse_cases("llama-3-8b:48:2048, llama-2-7b:16:512") == [("llama-3-8b", 48, 2048),
                                                                           ("llama-2-7b", 16, 512)]
    for bad in ("llama-3-8b:48", "llama-3-8b:x:2048", "llama-3-8b:0:2048"):
        with pytest.raises(argparse.ArgumentTypeError, match="a case is MODEL:B:CTX"):
            generate.parse_cases(bad)


def test_generate_skips_a_case_that_runs_out_of_memory(monkeypatch, capsys):
    """A case whose step runs out of GPU memory is reported and skipped; the other cases still run, each
    with a cache of exactly ctx positions (the capacity `polar tune --ctx` tunes for) holding ctx - 1."""
    real, seen = generate.time_steps, []

    def time_steps(step, params, cache, tokens, **kw):
        seen.append((tokens.shape[0], cache.page_table.shape[1] * cache.page_size, int(cache.lengths[0])))
        if tokens.shape[0] == 3:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB")
        return real(step, params, cache, tokens, inner=1, reps=1)

    monkeypatch.setattr(generate, "time_steps", time_steps)
    records = generate.run_cases([("tiny-llama-gqa", 3, 64), ("tiny-llama-gqa", 2, 64)], [("dense", 1.0)], 1e12, None)
    assert [(r["B"], r["mode"]) for r in records] == [(2, "dense")]
    assert "skip tiny-llama-gqa B=3 ctx=64 dense: out of GPU memory" in capsys.readouterr().out
    assert seen == [(3, 64, 63), (2, 64, 63)]


def test_time_steps_gives_every_timed_step_its_own_key_made_before_the_clock(monkeypatch):
    """Each timed step gets a distinct key (sparse random modes draw fresh heads every step), and no key is
    derived between the timed steps (a fold_in there is a dispatch the benchmark would time)."""
    import time

    timing, keys, real_clock = [], [], time.perf_counter

    def step(params, cache, tokens, key):
        if timing:
            keys.append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
        return tokens + 1, cache

    def clock():
        timing.append(True)
        return real_clock()

    def guard(real):
        def derive(*a, **k):
            if timing:
                raise AssertionError("a key was derived between timed steps")
            return real(*a, **k)
        return derive

    monkeypatch.setattr(generate.time, "perf_counter", clock)
    for name in ("fold_in", "split"):
        monkeypatch.setattr(jax.random, name, guard(getattr(jax.random, name)))
    generate.time_steps(step, None, None, jnp.zeros((2,), jnp.int32), inner=3, reps=2)
    assert len(keys) == 6 and len(set(keys)) == 6


def test_print_kernel_groups_sums_time_and_launches_per_group(capsys):
    from benchmarks.profile_step import print_kernel_groups

    print_kernel_groups({"loop_add_fusion.1": 1000.0, "loop_add_fusion_2": 3000.0, "selective_up": 500.0}, top=5,
                        launches={"loop_add_fusion.1": 2.0, "loop_add_fusion_2": 1.0, "selective_up": 4.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["4.0", "us", "88.9%", "2", "names", "3", "launches", "loop_add_fusion"]
    assert lines[1].split() == ["0.5", "us", "11.1%", "1", "names", "4", "launches", "selective_up"]


_PTX_PREFETCHES = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from benchmarks import probe_l2_prefetch as probe
out = {}
for K, at_start in [(0, False), (2, False), (4, True)]:
    consts = dict(R=3051, RN=2000, P=264, K=K, AT_START=at_start, W=probe.W, LINE=probe.LINE)
    sig = {"prev_ptr": "*fp32", "x_ptr": "*bf16", "nxt_ptr": "*bf16", "out_ptr": "*fp32", **{c: "constexpr" for c in consts}}
    src = triton.compiler.ASTSource(fn=probe._triton_kernel(), signature=sig, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    out[f"{K},{at_start}"] = ptx.count("prefetch.global.L2::evict_last")
print(json.dumps(out))
"""


def test_l2_prefetch_probe_emits_its_prefetches():
    """probe_l2_prefetch's Triton kernel, compiled to PTX for an H100 on this CPU machine (in a fresh process:
    the kernel tests import Triton in interpreter mode): K rows of 16 KB are K * 128 line prefetches a
    program, K per thread at 4 warps, none without; each a fire-and-forget
    `prefetch.global.L2::evict_last`, not dropped as dead code (its result feeds the stored sum)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTX_PREFETCHES], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"0,False": 0, "2,False": 2, "4,True": 4}


def test_sampler_cost_times_the_engines_sampler_variants(tmp_path):
    """benchmarks.sampler_cost calls the engine's own sampler program (its signature is the engine's) in the
    variants it runs under traffic, and writes one record each."""
    from benchmarks import sampler_cost

    sampler_cost.main(["--vocab", "50", "--batch", "3", "--allow-cpu", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "sampler_cost.json").read_text())["records"]
    assert [(r["vocab"], r["batch"], r["filtered"], r["top"], r["penalty_tokens"]) for r in records] == \
        [(50, 3, False, 1, 0), (50, 3, False, 20, 0), (50, 3, True, 1, 0), (50, 3, True, 20, 0),
         (50, 3, False, 1, sampler_cost.PENALTY_TOKENS)]
    assert all(r["us"] > 0 for r in records)


def test_probe_sampler_filter_times_each_filter_after_checking_they_agree(tmp_path, monkeypatch):
    """benchmarks.probe_sampler_filter writes one record per variant and size; it refuses to time filters that
    keep different tokens (here: a search that keeps every token)."""
    from benchmarks import probe_sampler_filter as probe

    probe.main(["--vocab", "300", "--batch", "3", "--allow-cpu", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "probe_sampler_filter.json").read_text())["records"]
    assert [r["variant"] for r in records] == list(probe.VARIANTS)
    assert all(r["us"] > 0 and r["vocab"] == 300 and r["batch"] == 3 for r in records)
    monkeypatch.setitem(probe.VARIANTS, "search", lambda z, *_: z)
    with pytest.raises(SystemExit, match="the filters keep different tokens"):
        probe.main(["--vocab", "300", "--batch", "3", "--allow-cpu", "--out", str(tmp_path)])


def test_host_step_splits_each_step_into_its_parts(tmp_path):
    """benchmarks.host_step writes a device and a stub row per batch; the parts add up to the step (host_ms is
    the wall time less the wait), and the stub row launched no program (no wait to speak of)."""
    from benchmarks import host_step

    host_step.main(["--model", "tiny-llama", "--batch", "3", "--ctx", "9", "--steps", "6", "--dtype", "float32",
                    "--allow-cpu", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "host_step.json").read_text())["records"]
    assert [(r["mode"], r["batch"], r["ctx"], r["steps"]) for r in records] == [("device", 3, 9, 6), ("stub", 3, 9, 6)]
    for r in records:
        assert r["schedule_ms"] > 0 and r["launch_ms"] > 0 and r["finish_ms"] > 0 and r["wait_ms"] >= 0
        assert r["host_ms"] == pytest.approx(r["ms_per_step"] - r["wait_ms"])
        assert r["schedule_ms"] + r["launch_ms"] + r["finish_ms"] <= r["host_ms"] * 1.05

"""Offline serving benchmark: the engine on workload W, all requests submitted at once (GPU).

W: `--requests` requests (default 512) with prompt lengths uniform in [128, 2048] and output lengths uniform
in [64, 512] (`--prompt-len`, `--output-len`), fixed seed, ignore_eos, greedy. For each model shape (random
weights, bf16 or `--dtype`) and mode (dense, random 50% of heads, router 50% of heads) it reports output tokens/s,
requests/s, the mean decode batch, peak KV pages in use, preemptions, and W's roofline time from the engine's
own step log: each decode step's bytes (weights once, routers in use, the kept heads' KV of every sequence)
over the streaming-read bandwidth, plus each prefill's FLOPs over the matmul rate (of --dtype), both measured in the
same run.

`--chunk-sweep 512,1024` runs dense W again at those prefill chunk sizes. `--pool-fraction 0.25` sizes the
page pool to a quarter of W's peak demand (preemption by recompute) and compares its greedy outputs with
the unconstrained run's (`compare_outputs`: identical requests, shared prefixes, log-prob differences).
In bf16, which rows share a step moves results in the last bits, and near-tied greedy choices flip.
`--batch-invariant` runs every engine of the benchmark in the engine's batch-invariant mode (dense only),
where outputs must be identical; `--dtype float32` makes the rounding smaller instead.
`--top-p 0.9` also runs dense W sampled (temperature 0.7, that top-p): what the sampler's cut-offs cost end
to end. `--step-check B,CTX` also times pure decode steps inside the engine against the static step benchmark
(benchmarks/generate.py's make_step) at batch B and context CTX.

    python -m benchmarks.serve_offline --out benchmarks/results
    python -m benchmarks.serve_offline --models llama-2-7b --modes dense --requests 64 --prompt-len 2048,2048 \
        --output-len 1,1 --name serve_offline_prefill      # prefill only: 64 prompts of 2,048 tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, add_device_args, ceiling_meta, check_out_dir, measure_ceiling, metadata, \
    require_gpu, time_fn, write_results
from benchmarks.generate import make_step, random_cache, time_steps, random_routers, router_bytes, weight_bytes
from polar_jax import SamplingParams, SparsityConfig, init_params, preset
from polar_jax.cache import PAGE_SIZE, pages_for
from polar_jax.engine.llm_engine import PREFILL_CHUNK, LLMEngine
from polar_jax.model import PREFILL_COMPILER_OPTIONS

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
SAMPLED_TEMPERATURE = 0.7  # of --top-p's run
MODES = {"dense": None, "random-0.5": SparsityConfig(attn="random", attn_density=0.5),
         "router-0.5": SparsityConfig(attn="router", attn_density=0.5)}


def workload(n: int, vocab: int, seed: int = 0, prompt=(128, 2048), output=(64, 512)):
    rng = np.random.default_rng(seed)
    p_len = rng.integers(prompt[0], prompt[1] + 1, n)
    o_len = rng.integers(output[0], output[1] + 1, n)
    prompts = [rng.integers(3, vocab, p).tolist() for p in p_len]
    return prompts, o_len.tolist()


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def matmul_rate(dtype=jnp.bfloat16) -> float:
    """Measured matmul FLOP/s in dtype (8192^3, f32 accumulation; f32 at the default matmul precision in
    force): the best of three timings under XLA's default GEMM choice and under cuBLAS only
    (PREFILL_COMPILER_OPTIONS), so that neither a slow pick nor a cold clock lowers the ceiling."""
    n = 8192
    xs = [(jax.random.normal(jax.random.key(i), (n, n), dtype), jax.random.normal(jax.random.key(i + 9), (n, n), dtype))
          for i in range(2)]

    def mm(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)

    fns = [jax.jit(mm), jax.jit(mm, compiler_options=PREFILL_COMPILER_OPTIONS)]
    ms = min(time_fn(fn, xs, inner=5, reps=7) for _ in range(3) for fn in fns)
    return 2 * n ** 3 / (ms * 1e-3)


def matmul_params(params: dict) -> int:
    """Parameters a token multiplies (every layer matrix and the LM head)."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(params["layers"]) if x.ndim == 3)
    head = params.get("lm_head", params["embed"])
    return n + head.size


def step_rooflines(cfg, params, sp, log, read_bw: float, mm_rate: float) -> list[tuple[float, float]]:
    """(decode seconds, prefill seconds) at the roofline for each logged step."""
    kept = np.full(cfg.n_layers, cfg.n_kv_heads) if sp is None else sp.head_counts(cfg)
    kv_per_pos = 2 * int(kept.sum()) * cfg.head_dim * params["embed"].dtype.itemsize  # K, V, kept heads, all layers
    r_bytes = router_bytes(params, sp)
    mm = matmul_params(params)
    out = []
    for s in log:
        decode_s = prefill_s = 0.0
        if s.decode_rows:
            decode_s = (weight_bytes(cfg, params, s.decode_rows) + r_bytes + kv_per_pos * s.context_tokens) / read_bw
        if s.prefill_tokens:
            flops = 2 * mm * s.prefill_tokens + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * s.prefill_context
            prefill_s = flops / mm_rate
        out.append((decode_s, prefill_s))
    return out


def time_split(log, roof: list[tuple[float, float]], step_wall: list[float]) -> dict:
    """Where the wall time went: the host's own work per step (not blocked on the device; with one step in
    flight it overlaps the device's), and the roofline fraction of decode-only steps and of steps that also
    prefill (each step's seconds from the engine's log)."""
    dec = [i for i, s in enumerate(log) if not s.prefill_tokens]
    pre = [i for i, s in enumerate(log) if s.prefill_tokens]

    def frac(idx):
        wall = sum(step_wall[i] for i in idx)
        return sum(sum(roof[i]) for i in idx) / wall if wall else float("nan")

    return {"host_ms_per_step": 1e3 * (sum(step_wall) - sum(s.wait_seconds for s in log)) / max(len(log), 1),
            "decode_steps": len(dec), "decode_steps_s": sum(step_wall[i] for i in dec), "decode_steps_eff": frac(dec),
            "prefill_steps": len(pre), "prefill_steps_s": sum(step_wall[i] for i in pre),
            "prefill_steps_eff": frac(pre)}


def roofline_seconds(roof: list[tuple[float, float]]) -> dict:
    decode_s, prefill_s = sum(r[0] for r in roof), sum(r[1] for r in roof)
    return {"roofline_s": decode_s + prefill_s, "roofline_decode_s": decode_s, "roofline_prefill_s": prefill_s}


# Compilations seen by jax (monitoring events), counted so a run can say how many fell inside its timed loop.
COMPILES = {"backend_compiles": 0, "backend_compile_s": 0.0, "traces": 0}


def _count_compiles(name: str, secs: float, **_) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        COMPILES["backend_compiles"] += 1
        COMPILES["backend_compile_s"] += secs
    elif name == "/jax/core/compile/jaxpr_trace_duration":
        COMPILES["traces"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def run_workload(cfg, params, sp, prompts, outs, *, logprobs: bool = False, top_p: float | None = None,
                 **engine_kw) -> tuple[dict, list, list]:
    """W through an LLMEngine(cfg, params, sparsity=sp, **engine_kw), greedy (or, with top_p, sampled at
    temperature SAMPLED_TEMPERATURE with that top-p, seeded by request), ignore_eos (logprobs: record each
    output token's, for compare_outputs): (record with the outputs under "tokens", series per step, step log)."""
    eng = LLMEngine(cfg, params, None, sparsity=sp, progress=True, **engine_kw)
    eng.runner.record = True
    bm = eng.scheduler.block_manager
    for i, (p, o) in enumerate(zip(prompts, outs)):
        sampling = {} if top_p is None else {"temperature": SAMPLED_TEMPERATURE, "top_p": top_p, "seed": i}
        eng.add_request(f"w{i}", p, SamplingParams(**({"temperature": 0} | sampling), max_tokens=o, ignore_eos=True,
                                                   logprobs=logprobs))
    results, peak_pages, preempt = {}, 0, 0
    before = dict(COMPILES)
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                results[out.request_id] = out
                preempt += out.num_preemptions
        peak_pages = max(peak_pages, bm.num_usable_pages - bm.num_free_pages)
    wall = time.perf_counter() - t0
    # Programs compiled (or traced) inside the timed loop, after the engine's compile_all: 0 when the warm-up
    # covered every shape the run met.
    timed = {f"timed_{k}": COMPILES[k] - before[k] for k in COMPILES}
    log = eng.runner.log
    n_out = sum(len(r.token_ids) for r in results.values())
    decode_steps = [s for s in log if s.decode_rows]
    rec = {"prefill_chunk": eng.config.prefill_chunk, "requests": len(results), "output_tokens": n_out, "wall_s": wall,
           "output_tok_s": n_out / wall, "req_s": len(results) / wall, "steps": len(log),
           "mean_decode_batch": statistics.mean(s.decode_rows for s in decode_steps) if decode_steps else 0.0,
           "peak_pages": peak_pages, "pool_pages": bm.num_usable_pages, "preemptions": preempt,
           "compile_s": eng.compile_s, "max_num_batched_tokens": eng.config.max_num_batched_tokens, **timed}
    # Per device step (the log's seconds: from one step's results to the next's, one step in flight).
    t_done = np.cumsum([s.seconds for s in log]).tolist()
    series = [(t, s.decode_rows, s.decode_rows + s.prefill_tokens, s.seconds) for t, s in zip(t_done, log)]
    return rec | {"tokens": {k: (v.token_ids, v.logprobs) for k, v in results.items()}}, series, log


def measured_run(cfg, params, sp, prompts, outs, args, read_bw: float, mm_rate: float, num_pages=None, chunk=None,
                 top_p=None):
    """run_workload with the engine settings of args (chunk: another prefill chunk; num_pages: another pool;
    top_p: sampled) plus W's roofline and where the time went: (record, tokens per request, series)."""
    rec, ser, log = run_workload(cfg, params, sp, prompts, outs, logprobs=bool(args.pool_fraction), top_p=top_p,
                                 max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 batch_invariant=args.batch_invariant, prefill_chunk=chunk or args.prefill_chunk,
                                 num_pages=num_pages)
    tokens = rec.pop("tokens")
    roof = step_rooflines(cfg, params, sp, log, read_bw, mm_rate)
    rec |= roofline_seconds(roof) | time_split(log, roof, [s[3] for s in ser])
    rec["efficiency"] = rec["roofline_s"] / rec["wall_s"]
    return rec, tokens, ser


def compare_outputs(got: dict, want: dict) -> dict:
    """How a run's greedy outputs match a reference run's, per request {id: (token ids, logprobs)}: requests
    identical; the mean fraction of each output before its first differing token; over the tokens both runs
    share (before that point), the largest |log-prob difference| (rounding: ~1e-2 in bf16; a wrong KV cache
    after a preemption shows far more); at each first difference, |log-prob of the reference's token - of
    this run's|: near 0 when the two runs faced a near-tie, as rounding makes them."""
    shared, prefix_diff, fork_gap = [], [0.0], []
    for rid, (ref_tok, ref_lp) in want.items():
        tok, lp = got[rid]
        n = next((j for j, (a, b) in enumerate(zip(ref_tok, tok)) if a != b), min(len(ref_tok), len(tok)))
        shared.append(n / max(len(ref_tok), 1))
        prefix_diff += [abs(a - b) for a, b in zip(ref_lp[:n], lp[:n])]
        if n < min(len(ref_tok), len(tok)):
            fork_gap.append(abs(ref_lp[n] - lp[n]))
    return {"identical_to_unconstrained": len(fork_gap) == 0 and all(x == 1 for x in shared),
            "identical_requests": sum(x == 1 for x in shared), "shared_prefix": statistics.mean(shared),
            "prefix_logprob_diff_max": max(prefix_diff),
            "fork_logprob_gap_median": statistics.median(fork_gap) if fork_gap else 0.0,
            "fork_logprob_gap_max": max(fork_gap, default=0.0)}


def step_check(cfg, params, sp, B: int, ctx: int, args) -> dict:
    """ms per pure decode step inside the engine vs the static step (same batch, context, sparsity)."""
    room = min(64, cfg.max_positions - ctx)  # decode steps the check runs: 3 + 5 * 8 (fewer on tiny models)
    eng = LLMEngine(cfg, params, None, sparsity=sp, max_num_seqs=B, max_model_len=ctx + room,
                    prefill_chunk=args.prefill_chunk, progress=False,
                    num_pages=B * pages_for(ctx + room, PAGE_SIZE) + 1)  # B sequences exactly: room for the static cache
    rng = np.random.default_rng(1)
    for i in range(B):
        eng.add_request(f"s{i}", rng.integers(3, cfg.vocab_size, ctx).tolist(),
                        SamplingParams(temperature=0, max_tokens=room, ignore_eos=True))
    while any(s.needs_prefill for s in eng.scheduler.running) or eng.scheduler.num_waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(8):
            eng.step()
        times.append((time.perf_counter() - t0) / 8 * 1e3)
    del eng  # its page pool, before the static cache is allocated
    static_ms, _ = time_steps(make_step(cfg, sp), params, random_cache(cfg, B, ctx, room=room),
                              jnp.zeros((B,), jnp.int32))  # the engine's capacity (ctx + room), so both take one config
    engine_ms = statistics.median(times)
    return {"B": B, "ctx": ctx, "engine_ms_per_step": engine_ms, "static_ms_per_step": static_ms,
            "engine_over_static": engine_ms / static_ms}


def plot(series_by_run: dict, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, series in series_by_run.items():
        t = np.array([s[0] for s in series])
        a1.plot(t, [s[1] for s in series], label=name, lw=0.8)
        tok = np.array([s[1] for s in series], float)  # output tokens this step (one per decode row)
        dt = np.array([s[3] for s in series])
        k = max(1, min(20, len(series)))  # "same" convolution keeps the length only when k <= len
        a2.plot(t, np.convolve(tok, np.ones(k), "same") / np.maximum(np.convolve(dt, np.ones(k), "same"), 1e-9),
                label=name, lw=0.8)
    a1.set_ylabel("decode batch")
    a2.set_ylabel("output tokens/s (20-step window)")
    a2.set_xlabel("seconds since submission")
    a1.legend(fontsize=7)
    fig.suptitle(f"serve_offline on {meta['device']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-2-7b,llama-3-8b", help="comma-separated model presets")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--requests", type=int, default=512, help="requests in W (default 512)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="decode batch at most (default 64)")
    ap.add_argument("--max-num-batched-tokens", type=int,
                    help="tokens per step, decode and prefill together (default: the engine's, the largest "
                         "packed capacity within 2 x prefill chunk: 4,032 for 2,048 and 64 sequences)")
    ap.add_argument("--max-model-len", type=int, default=2048 + 512)
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                    help=f"prompt tokens per sequence per step (default: the engine's, {PREFILL_CHUNK})")
    ap.add_argument("--chunk-sweep", default=None,
                    help="comma-separated prefill chunk sizes: dense W again at each (larger chunks prefill in "
                         "fewer steps, each of which reads the weights again)")
    ap.add_argument("--pool-fraction", type=float, default=None,
                    help="also run dense W with a page pool of this fraction of its peak demand (e.g. 0.25)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                    help="weights and KV (default bfloat16); float32 runs every matmul at full f32 precision "
                         "(not TF32), for checks that outputs are identical across runs")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="engines in batch-invariant mode (LLMEngine(batch_invariant=True): one dense program "
                         "for every step, outputs independent of the batch; default budget 512 tokens)")
    ap.add_argument("--top-p", type=float, default=None,
                    help=f"also run dense W sampled at temperature {SAMPLED_TEMPERATURE} with this top-p (each request "
                         "seeded): the sampler's top-p cut-off in every step; speedup: greedy dense wall / its wall")
    ap.add_argument("--step-check", default=None, help="B,CTX: engine decode step vs the static step")
    ap.add_argument("--prompt-len", default="128,2048", help="LO,HI: prompt lengths uniform in [LO, HI]")
    ap.add_argument("--output-len", default="64,512", help="LO,HI: output lengths uniform in [LO, HI]")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="serve_offline",
                    help="result files' stem: OUT/NAME.{json,md,png}, OUT/NAME_steps.* (default serve_offline)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.step_check and args.dtype != "bfloat16":
        ap.error("--step-check compares with the static step benchmark, which runs bf16 only")
    if args.batch_invariant and (set(args.modes.split(",")) != {"dense"} or args.step_check):
        ap.error("--batch-invariant runs dense only: pass --modes dense and no --step-check")
    require_gpu("benchmarks.serve_offline", args.allow_cpu)
    check_out_dir(args.out)
    command = "python -m benchmarks.serve_offline " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = metadata(command)
    ceiling = measure_ceiling()
    dtype = DTYPES[args.dtype]
    if dtype == jnp.float32:
        jax.config.update("jax_default_matmul_precision", "highest")
    mm_rate = matmul_rate(dtype)
    print(f"{args.dtype} matmul rate {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    meta |= ceiling_meta(ceiling) | {"matmul_TFLOPs": mm_rate / 1e12, "requests": args.requests,
                                     "max_num_seqs": args.max_num_seqs,
                                     "max_num_batched_tokens": args.max_num_batched_tokens,
                                     "prefill_chunk": args.prefill_chunk, "dtype": args.dtype,
                                     "batch_invariant": args.batch_invariant}
    meta["ceiling"] = (f"prefill FLOPs over the {args.dtype} matmul rate measured in the same run ({mm_rate / 1e12:.0f} "
                       f"TFLOP/s); decode bytes over the {meta['ceiling']}")
    records, series, checks = [], {}, []
    tag = ", batch-invariant" if args.batch_invariant else ""
    for name in args.models.split(","):
        cfg = preset(name)
        params = jax.jit(lambda k: init_params(cfg, k, dtype))(jax.random.key(0))
        params["routers"] = random_routers(cfg, jax.random.key(5))
        prompts, outs = workload(args.requests, cfg.vocab_size, prompt=_pair(args.prompt_len),
                                 output=_pair(args.output_len))
        dense_tokens, peak, dense_rec = None, None, None
        for mode in args.modes.split(","):
            sp = MODES[mode]
            print(f"== {name} {mode}: {args.requests} requests", flush=True)
            rec, tokens, ser = measured_run(cfg, params, sp, prompts, outs, args, ceiling["read_bw"], mm_rate)
            if mode == "dense":
                dense_tokens, peak, dense_rec = tokens, rec["peak_pages"], rec
            elif dense_rec is not None:
                rec["speedup"] = dense_rec["wall_s"] / rec["wall_s"]
                rec["bound_speedup"] = dense_rec["roofline_s"] / rec["roofline_s"]
                rec["frac_of_bound"] = rec["speedup"] / rec["bound_speedup"]
            records.append({"model": name, "mode": mode + tag, **rec})
            series[f"{name} {mode}"] = ser
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in records[-1].items()}, flush=True)
        for chunk in [int(c) for c in args.chunk_sweep.split(",")] if args.chunk_sweep else []:
            print(f"== {name} dense, prefill chunk {chunk}", flush=True)
            rec, _, ser = measured_run(cfg, params, None, prompts, outs, args, ceiling["read_bw"], mm_rate,
                                       chunk=chunk)
            records.append({"model": name, "mode": f"dense, chunk {chunk}{tag}", **rec})
            series[f"{name} dense chunk {chunk}"] = ser
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in records[-1].items()}, flush=True)
        if args.top_p is not None:
            print(f"== {name} dense, temperature {SAMPLED_TEMPERATURE}, top-p {args.top_p}", flush=True)
            rec, _, ser = measured_run(cfg, params, None, prompts, outs, args, ceiling["read_bw"], mm_rate,
                                       top_p=args.top_p)
            if dense_rec is not None:
                rec["speedup"] = dense_rec["wall_s"] / rec["wall_s"]  # under 1: what sampling costs
            records.append({"model": name, "mode": f"dense, top-p {args.top_p}{tag}", **rec})
            series[f"{name} dense top-p"] = ser
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in records[-1].items()}, flush=True)
        if args.pool_fraction and dense_tokens is not None:
            pages = max(2, int(args.pool_fraction * peak)) + 1
            print(f"== {name} dense, pool of {pages - 1} pages ({args.pool_fraction:.0%} of the peak {peak})",
                  flush=True)
            rec, tokens, ser = measured_run(cfg, params, None, prompts, outs, args, ceiling["read_bw"], mm_rate,
                                            num_pages=pages)
            rec |= compare_outputs(tokens, dense_tokens)
            records.append({"model": name, "mode": f"dense, pool {args.pool_fraction:.0%}{tag}", **rec})
            series[f"{name} dense small pool"] = ser
        if args.step_check:
            B, ctx = (int(x) for x in args.step_check.split(","))
            for mode in ("dense", "random-0.5"):
                checks.append({"model": name, "mode": mode, **step_check(cfg, params, MODES[mode], B, ctx, args)})
                print(checks[-1], flush=True)
        del params
    cols = ["model", "mode", "prefill_chunk", "requests", "output_tokens", "wall_s", "output_tok_s", "req_s",
            "mean_decode_batch", "peak_pages", "pool_pages", "preemptions", "roofline_s", "efficiency", "speedup",
            "bound_speedup", "frac_of_bound", "identical_to_unconstrained", "identical_requests", "shared_prefix",
            "prefix_logprob_diff_max", "fork_logprob_gap_median", "fork_logprob_gap_max", "host_ms_per_step",
            "decode_steps_eff", "prefill_steps_eff", "timed_backend_compiles", "timed_backend_compile_s"]
    write_results(args.name, meta, records, cols, args.out)
    if checks:
        write_results(f"{args.name}_steps", meta, checks, list(checks[0]), args.out)
    plot(series, Path(args.out) / f"{args.name}.png", meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

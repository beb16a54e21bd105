"""What a mixed step costs against a prefill step beside a decode step: the engine's programs, timed alone.

    python -m benchmarks.probe_mixed_step [--model llama-3-8b] [--riders 64] [--ctx 1024] [--tokens 2048]
                                          [--mode dense] [--compile-all] [--profile]

Builds the engine's ModelRunner (random bf16 weights; dense, or --mode random-0.5 / router-0.5 with random
routers, as benchmarks.serve_offline runs them) and times its model programs (without the
sampler, a program of its own since 2026-11-26), at the same inputs:
- `decode`: the decode program, --riders sequences of --ctx cached tokens;
- `mixed, no riders`: the mixed program prefilling one chunk of --tokens (packed into the smallest capacity
  that holds it; its decode rows all padding),
  which is what a prefill step costs;
- `mixed, riders`: the same chunk with the --riders sequences riding along.
A mixed step pays off when `mixed, riders` < `mixed, no riders` + `decode`. Each program's first call
(compilation included) is timed too; --compile-all times the runner's whole `compile_all`, one line per
program. Prints ms per step; writes nothing unless --out is given (JSON).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from benchmarks.generate import random_routers
from benchmarks.profile_step import print_kernel_groups
from benchmarks.serve_offline import MODES
from polar_jax import init_params, preset
from polar_jax.engine import model_runner as mr
from polar_jax.engine.llm_engine import LLMEngine


def _timed(fn, state, n):
    """(first call's seconds, median of the next n calls' seconds, state): fn(state) -> state."""
    t0 = time.perf_counter()
    state = jax.block_until_ready(fn(state))
    first, times = time.perf_counter() - t0, []
    for _ in range(n):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), state


def print_memory(compiled, pool) -> None:
    """A compiled program's memory analysis (GiB) and the copy instructions of its optimized HLO, largest
    first: a copy of the KV pool's shape means a cache write that did not stay in place."""
    m = compiled.memory_analysis()
    gib = lambda n: f"{n / 2 ** 30:.2f} GiB"  # noqa: E731
    print(f"memory: arguments {gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)}, aliased "
          f"{gib(m.alias_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}; KV pool {gib(pool.nbytes)} each "
          f"of k and v", flush=True)
    pool_shape = ",".join(map(str, pool.shape))
    copies = collections.Counter()
    for line in compiled.as_text().splitlines():
        m_ = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (copy|copy-start)\(", line)
        if m_:
            copies[f"{m_.group(1)}[{m_.group(2)}]" + (" (the KV pool's shape)" if m_.group(2) == pool_shape else "")] += 1
    print(f"copies in the optimized HLO: {sum(copies.values())}", flush=True)
    for shape, n in copies.most_common(12):
        print(f"   {n:4d} x {shape}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--riders", type=int, default=64, help="decode rows (the engine's max_num_seqs)")
    ap.add_argument("--ctx", type=int, default=1024, help="cached tokens of each decode row")
    ap.add_argument("--tokens", type=int, default=2048, help="prefill chunk length (one row)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mode", choices=list(MODES), default="dense", help="sparsity, as serve_offline's modes")
    ap.add_argument("--compile-all", action="store_true", help="also time compile_all, program by program")
    ap.add_argument("--memory", action="store_true",
                    help="also print the mixed program's memory analysis and the copies in its optimized HLO")
    ap.add_argument("--hlo", type=Path, help="write the mixed program's optimized HLO text here")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU kernels of a mixed step with and without riders (profiler trace)")
    ap.add_argument("--out", type=Path)
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_mixed_step", args.allow_cpu)
    cfg = preset(args.model)
    params = jax.jit(lambda k: init_params(cfg, k, "bfloat16"))(jax.random.key(0))
    params["routers"] = random_routers(cfg, jax.random.key(5))
    sp = MODES[args.mode]
    R, T = args.riders, args.tokens
    eng = LLMEngine(cfg, params, None, sparsity=sp, max_num_seqs=R,
                    max_model_len=min(max(args.ctx + 1, T) + 64, cfg.max_positions), prefill_chunk=T, compile=False,
                    progress=False)
    run = eng.runner
    Z, M = run.page_size, run.M
    need = R * mr.pages_for(args.ctx + 1, Z) + mr.pages_for(T, Z) + 1
    if need > run.num_pages:
        sys.exit(f"needs {need} pages, the pool has {run.num_pages}: lower --riders or --ctx")
    rng = np.random.default_rng(0)

    # Decode rows: R sequences of ctx tokens on their own pages (page 0 is the padding rows' scratch page).
    per = mr.pages_for(args.ctx + 1, Z)
    d_table = np.zeros((R, M), np.int32)
    d_table[:, :per] = 1 + np.arange(R * per).reshape(R, per)
    d_args = (rng.integers(0, cfg.vocab_size, R).astype(np.int32), np.arange(R, dtype=np.int32), d_table,
              np.full(R, args.ctx, np.int32), np.ones(R, bool), None, np.uint32(0), np.int32(1))
    pad_args = run._decode_args([], R)[0]
    # One prefill chunk of T tokens from position 0 on the pages after the decode rows', packed into the
    # smallest capacity S that holds it (as the engine packs a step's chunks).
    S, C = run.buckets.prefill_size(T), run.buckets.chunks
    p_table = np.zeros((C, M), np.int32)
    p_table[0, :mr.pages_for(T, Z)] = 1 + R * per + np.arange(mr.pages_for(T, Z))
    tokens = np.zeros(S, np.int32)
    tokens[:T] = rng.integers(0, cfg.vocab_size, T)
    n_new = np.zeros(C, np.int32)
    n_new[0] = T
    p_args = (tokens, p_table, np.zeros(C, np.int32), np.zeros(C, np.int32), n_new)
    print(f"one chunk of {T} tokens packed into {S} (+ {R} decode rows in the GEMMs)", flush=True)

    def decode(state):
        return (*mr._DECODE(cfg, sp, params, *state, *d_args)[:2], state[2])  # the model program, no sampler

    def mixed(riders):
        return lambda state: (*mr._MIXED(cfg, sp, run._max_new(S), params, *state, *riders, *p_args)[:2], state[2])

    state = (run.k, run.v, run.last)
    if args.memory or args.hlo:
        compiled = mr._MIXED.lower(cfg, sp, run._max_new(S), params, *state, *d_args, *p_args).compile()
        if args.memory:
            print_memory(compiled, run.k)
        if args.hlo:
            args.hlo.write_text(compiled.as_text())
    rows = []
    for name, fn in [("decode", decode), ("mixed, no riders", mixed(pad_args)), ("mixed, riders", mixed(d_args))]:
        first, med, state = _timed(fn, state, args.iters)
        rows.append({"program": name, "first_call_s": first, "ms": 1e3 * med})
        print(f"{name:18s} first call {first:7.2f} s   step {1e3 * med:8.2f} ms", flush=True)
    by = {r["program"]: r["ms"] for r in rows}
    print(f"mixed with riders {by['mixed, riders']:.2f} ms against prefill + decode "
          f"{by['mixed, no riders'] + by['decode']:.2f} ms", flush=True)
    if args.profile:
        for name, riders in [("mixed, no riders", pad_args), ("mixed, riders", d_args)]:
            box = [state]

            def once(riders=riders):
                box[0] = mixed(riders)(box[0])
                return box[0]
            kernels, span = device_profile(once, [()], calls=3)
            state = box[0]
            print(f"== {name}: device span {span / 1e3:.0f} us/step, kernels {sum(kernels.values()) / 1e3:.0f} us",
                  flush=True)
            print_kernel_groups(kernels, top=20)
    run.k, run.v, run.last = state
    compile_rows = []
    if args.compile_all:
        t_last = [time.perf_counter()]

        def progress(i, n):
            now = time.perf_counter()
            compile_rows.append(now - t_last[0])
            print(f"compile_all program {i}/{n}: {now - t_last[0]:.2f} s", flush=True)
            t_last[0] = now
        total = run.compile_all(progress)
        print(f"compile_all: {total:.1f} s for {len(compile_rows)} programs", flush=True)
    if args.out:
        meta = common.metadata("python -m benchmarks.probe_mixed_step " + " ".join(argv or sys.argv[1:]))
        args.out.write_text(json.dumps({"meta": meta, "records": rows, "compile_all_s": compile_rows}, indent=1))


if __name__ == "__main__":
    main()

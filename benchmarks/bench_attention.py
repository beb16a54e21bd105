"""Selective-head decode attention benchmark: decode_attention (the public function) vs dense and XLA.

Each case times a jitted chain of calls, call i on cache set i % n_sets, its own q and its own random
head selection per sequence, so no two calls are identical (XLA cannot merge them). The chain length is
a multiple of n_sets >= 2, so the last call of a chain and the first of the next use different sets too:
no call reads the inputs of the call before it, and the sets together hold at least L2_ROTATION times the
L2 (50 MB), so nothing a call reads was left in L2 by the previous one. The chain is 4 calls or more (up
to 16, rounded up to a multiple of n_sets) for calls under ~0.1 ms, so that the host's dispatch of the
jitted chain stays off the critical path.
fp16, H = 128, every length = S. Clock: wall (host-timed pipelined chains; no profiler clock here).
Reported per call:

  ms_wall             decode_attention at this density (our dense path, head_idx=None, at every head)
  GBps_wall, frac_read_bw_wall
                      bytes that must move (the K and V slabs of the selected heads over all valid
                      positions + q + o) / ms_wall, and that over the measured streaming-read bandwidth
                      (the ceiling; see benchmarks/common.py)
  speedup_vs_dense_wall  our dense (all heads) / ms_wall
  speedup_vs_xla_wall    XLA dense (the jnp reference under jit, every head) / ms_wall
  kv_heads_kept, density  what ran: selected KV heads per sequence ("2 of 8") and count / K (the count is
                      rounded from the nominal density, at least 1)
  ideal               1 / density

`python -m benchmarks.bench_attention` runs the sweep and writes results/kernels_attention.{json,md};
`--tune` times candidate kernel configurations at a few shapes (the heuristic in
pallas_kernels/decode_attention/triton.py comes from it) and writes results/tune_attention.json;
`--check` compares the compiled kernel with the reference; `--quick` runs a handful of cases.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.shapes import ATTN_BATCHES, ATTN_CONTEXTS, ATTN_DENSITIES, ATTN_HEADS
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention import triton as tk

H = 128
DTYPE = jnp.float16
CHAIN = 4              # attention calls per timed jit call (at least)
MAX_CHAIN = 16         # for short calls
SETS_BYTES = 24e9      # at most this much memory for the rotated cache sets (but always 2 sets)
L2_ROTATION = 4        # the rotated sets hold at least this many times the L2 (where MAX_SETS allow)
MAX_SETS = 8           # benchmark caches are >= 134 MB, so 2 sets already hold 5x the L2
COLUMNS = ["variant", "N", "K", "B", "S", "kv_heads_kept", "density", "splits", "sets_over_L2", "ms_wall", "GBps_wall",
           "frac_read_bw_wall", "speedup_vs_dense_wall", "speedup_vs_xla_wall", "ideal"]
CLOCKS = ["wall: host-timed pipelined chains of calls, per call (`*_wall` columns; no profiler clock here)"]


def head_counts(K: int) -> list[int]:
    """Selected KV heads per sequence for the nominal densities (at least 1); for K = 8 also 3 (~40%)."""
    counts = {max(1, int(round(d * K))) for d in ATTN_DENSITIES}
    if K == 8:
        counts |= {3}
    return sorted(counts)


def _cache_bytes(B, K, S):
    return 2 * B * K * S * H * jnp.dtype(DTYPE).itemsize


def _bytes(B, N, K, S, count):
    item = jnp.dtype(DTYPE).itemsize
    return 2 * B * count * S * H * item + 2 * B * N * H * item


def n_cache_sets(set_bytes: float) -> int:
    """Cache sets to rotate through: >= 2, together >= L2_ROTATION x L2 where MAX_SETS and SETS_BYTES allow
    (the record's sets_over_L2 says what was reached)."""
    want = max(2, int(np.ceil(L2_ROTATION * common.L2_BYTES / set_bytes)))
    return max(2, min(want, MAX_SETS, int(SETS_BYTES // set_bytes)))


def chain_len(est_ms: float, n_sets: int) -> int:
    """Calls per timed chain: >= ~0.4 ms of device work per jit dispatch, CHAIN to MAX_CHAIN, rounded up to a
    multiple of n_sets so consecutive chains never start on the set the previous one ended with."""
    n = int(np.clip(np.ceil(0.4 / max(est_ms, 1e-4)), CHAIN, MAX_CHAIN))
    return int(np.ceil(n / n_sets)) * n_sets


def _cache_sets(B, K, S, key):
    n_sets = n_cache_sets(_cache_bytes(B, K, S))
    make = jax.jit(lambda k: jax.random.uniform(k, (B, K, S, H), DTYPE, -1.0, 1.0))
    sets = []
    for s in range(n_sets):
        k1, k2 = jax.random.split(jax.random.fold_in(key, s))
        sets.append((make(k1), make(k2)))
    return sets


def _selections(B, K, count, key, n):
    """n draws of [B, count] distinct random KV heads per sequence."""
    out = []
    for i in range(n):
        u = jax.random.uniform(jax.random.fold_in(key, i), (B, K))
        out.append(jnp.argsort(u, axis=1)[:, :count].astype(jnp.int32))
    return out


def _chain(call):
    """jit(sets, qs, hidxs) -> len(qs) outputs; call i uses cache set i % n_sets, qs[i] and hidxs[i]."""
    def run(sets, qs, hidxs, lengths):
        if len(qs) % len(sets):
            raise ValueError(f"chain of {len(qs)} calls over {len(sets)} cache sets would reuse a set back to back")
        return [call(qs[i], *sets[i % len(sets)], lengths, hidxs[i]) for i in range(len(qs))]
    return jax.jit(run)


def _time(fn, sets, qs, hidxs, lengths, est_ms):
    n = len(qs)
    inner = int(np.clip(30.0 / max(est_ms * n, 1e-3), 1, 10))
    return common.time_fn(fn, [(sets, qs, hidxs, lengths)], inner=inner, reps=7, warmup=2) / n


def run(read_bw: float, quick: bool = False) -> list[dict]:
    """One record per (N, K, B, S, count); see the module docstring for the fields. read_bw: the ceiling."""
    heads, batches, contexts = ATTN_HEADS, ATTN_BATCHES, ATTN_CONTEXTS
    if quick:
        heads, batches, contexts = [(32, 32), (32, 8)], (16, 64), (2048,)
    records = []
    key = jax.random.key(0)
    device_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16 << 30)
    for N, K in heads:
        variant = "mha" if N == K else "gqa"
        counts = head_counts(K)
        if quick:
            counts = [c for c in counts if c in (max(1, round(0.3 * K)), 2, K)]
        for S in contexts:
            for B in batches:
                if 2 * _cache_bytes(B, K, S) > 0.8 * device_bytes:
                    print(f"# skip {variant} N={N} K={K} B={B} S={S}: two cache sets of "
                          f"{_cache_bytes(B, K, S) / 1e9:.0f} GB exceed 80% of device memory",
                          flush=True)
                    continue
                t0 = time.perf_counter()
                ck = jax.random.fold_in(key, N * 100003 + K * 1009 + B * 17 + S)
                sets = _cache_sets(B, K, S, ck)
                lengths = jnp.full((B,), S, jnp.int32)
                qs = [jax.random.normal(jax.random.fold_in(ck, 1000 + i), (B, N, H), jnp.float32).astype(DTYPE)
                      for i in range(MAX_CHAIN + len(sets))]
                est = _bytes(B, N, K, S, K) / 3.5e12 * 1e3
                n_dense = chain_len(est, len(sets))
                none = [None] * n_dense
                ms_xla = _time(_chain(lambda q, k, v, n, h: decode_attention(q, k, v, n, impl="xla")),
                               sets, qs[:n_dense], none, lengths, est)
                ms_dense = _time(_chain(lambda q, k, v, n, h: decode_attention(q, k, v, n)),
                                 sets, qs[:n_dense], none, lengths, est)
                for count in counts:
                    if count == K:
                        ms, n = ms_dense, n_dense
                    else:
                        n = chain_len(est * count / K, len(sets))
                        hidxs = _selections(B, K, count, jax.random.fold_in(ck, count), n)
                        ms = _time(_chain(lambda q, k, v, n, h: decode_attention(q, k, v, n, h)),
                                   sets, qs[:n], hidxs, lengths, est * count / K)
                    gbps = _bytes(B, N, K, S, count) / (ms * 1e-3) / 1e9
                    cfg = tk.attention_config(B, N, K, S, H, count, DTYPE)
                    rec = dict(kernel="decode_attention", variant=variant, B=B, N=N, K=K, H=H, S=S, count=count,
                               kv_heads_kept=f"{count} of {K}", density=count / K, splits=cfg.splits,
                               block_s=cfg.block_s, cache_sets=len(sets), chain=n,
                               sets_over_L2=len(sets) * _cache_bytes(B, K, S) / common.L2_BYTES, ms_wall=ms,
                               ms_dense_wall=ms_dense, ms_xla_wall=ms_xla, GBps_wall=gbps,
                               frac_read_bw_wall=gbps * 1e9 / read_bw, speedup_vs_dense_wall=ms_dense / ms,
                               speedup_vs_xla_wall=ms_xla / ms, ideal=K / count)
                    records.append(rec)
                    print(" ".join(f"{c}={rec[c]:.4g}" if isinstance(rec[c], float) else f"{c}={rec[c]}"
                                   for c in COLUMNS), flush=True)
                del sets
                print(f"# {variant} N={N} K={K} B={B} S={S}: {time.perf_counter() - t0:.1f}s", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------
# tuning: candidate kernel configurations at a few shapes

TUNE_CASES = [  # N, K, B, S, count (None: dense path)
    (32, 8, 64, 2048, 2),
    (32, 32, 16, 2048, 10),
    (32, 32, 64, 2048, 10),
    (32, 32, 16, 2048, None),
    (32, 8, 16, 2048, 2),
    (32, 32, 16, 8192, 3),
    (32, 8, 64, 2048, None),
]


def tune(read_bw: float, budget_s: float = 200.0, on_case=None) -> list[dict]:
    """Time each case's candidates (wall clock); budget_s shared equally by the cases. For the best split
    config, also time the split kernel alone (no combine launch) to show what the combine costs.
    on_case(results so far) is called after each case (to write the file as it grows)."""
    key = jax.random.key(1)
    results = []
    for N, K, B, S, count in TUNE_CASES:
        t_start = time.perf_counter()
        case_budget = budget_s / len(TUNE_CASES)
        ck = jax.random.fold_in(key, N + K + B + S)
        sets = _cache_sets(B, K, S, ck)
        n = chain_len(1.0, len(sets))  # CHAIN rounded up to a multiple of the sets
        lengths = jnp.full((B,), S, jnp.int32)
        qs = [jax.random.normal(jax.random.fold_in(ck, i), (B, N, H), jnp.float32).astype(DTYPE) for i in range(n)]
        C = K if count is None else count
        hidxs = [None] * n if count is None else _selections(B, K, count, ck, n)
        nbytes = _bytes(B, N, K, S, C)
        est = nbytes / 3.5e12 * 1e3
        rows = []

        def measure(cfg, partials=False):
            def call(q, k, v, n, h, cfg=cfg):
                return tk.decode_attention(q, k[None], v[None], n, h, layer=0, config=cfg, _partials_only=partials)
            try:
                ms = _time(_chain(call), sets, qs, hidxs, lengths, est)
            except Exception as e:  # noqa: BLE001  (a config Triton rejects: report and go on)
                print(f"N={N} K={K} B={B} S={S} C={C} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                return None
            gbps = nbytes / (ms * 1e-3) / 1e9
            r = dict(N=N, K=K, B=B, S=S, count=C, cfg=str(cfg), partials_only=partials, ms_wall=ms, GBps_wall=gbps,
                     frac_read_bw_wall=gbps * 1e9 / read_bw)
            print(f"N={N} K={K} B={B} S={S} C={C} {cfg}{' [split kernel only]' if partials else ''}: "
                  f"{ms * 1e3:.1f} us {gbps:.0f} GB/s", flush=True)
            if not partials:
                rows.append((r, cfg))
            results.append(r)
            return ms

        for cfg in tk.attention_candidates(B, N, K, S, H, C, DTYPE):
            if time.perf_counter() - t_start > case_budget:
                print(f"# budget: stopped before {cfg}", flush=True)
                break
            measure(cfg)
        split = [rc for rc in rows if rc[1].splits > 1]
        if split:
            measure(min(split, key=lambda rc: rc[0]["ms_wall"])[1], partials=True)
        rows.sort(key=lambda rc: rc[0]["ms_wall"])
        if rows:
            print(f"## best N={N} K={K} B={B} S={S} C={C}: {rows[0][0]['cfg']} {rows[0][0]['ms_wall'] * 1e3:.1f} us "
                  f"{rows[0][0]['GBps_wall']:.0f} GB/s; heuristic {tk.attention_heuristic(B, N, K, S, H, C, DTYPE)}",
                  flush=True)
        if on_case:
            on_case(results)
        sets = None  # frees this case's caches before the next case allocates its own
    return results


# ---------------------------------------------------------------------------------------------------
# correctness of the compiled kernel at benchmark-like shapes

CHECK_CASES = [  # N, K, B, S, H, dtype, C, config
    (32, 32, 8, 1000, 128, jnp.float16, 10, None),
    (32, 32, 64, 2048, 128, jnp.float16, None, None),
    (32, 8, 8, 777, 80, jnp.float16, 2, None),
    (32, 8, 3, 4096, 128, jnp.float16, 3, None),
    (28, 4, 5, 300, 96, jnp.bfloat16, 3, None),
    (16, 16, 4, 500, 64, jnp.float16, 5, tk.AttentionConfig(block_s=32, splits=4)),
    (16, 16, 4, 500, 128, jnp.float16, 5, tk.AttentionConfig(block_s=32, splits=2, use_dot=False)),
    (16, 16, 4, 500, 80, jnp.float32, None, tk.AttentionConfig(block_s=32, splits=1, use_dot=False)),
]


def check(cases=CHECK_CASES) -> bool:
    """Compiled kernel vs the f32 reference (fresh random inputs, ragged lengths, -1 slots); True if all pass."""
    from tests.tolerances import REL_TOL, rel_error
    all_ok = True
    key = jax.random.key(7)
    for N, K, B, S, Hd, dtype, C, cfg in cases:
        ks = jax.random.split(jax.random.fold_in(key, N * K + B + S + Hd), 6)
        L = 2
        k = jax.random.normal(ks[0], (L, B, K, S, Hd), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[1], (L, B, K, S, Hd), jnp.float32).astype(dtype)
        if cfg is None:
            fn = jax.jit(lambda q, k, v, n, h: decode_attention(q, k, v, n, h, layer=jnp.int32(1), impl="triton"))
        else:
            fn = jax.jit(lambda q, k, v, n, h, cfg=cfg: tk.decode_attention(q, k, v, n, h, layer=jnp.int32(1),
                                                                            config=cfg))
        for draw in range(2):
            kd = jax.random.fold_in(ks[2], draw)
            q = jax.random.normal(kd, (B, N, Hd), jnp.float32).astype(dtype)
            lengths = jax.random.randint(jax.random.fold_in(kd, 1), (B,), 0, S + 1).at[0].set(S)
            lengths = lengths.at[B - 1].set(0 if draw == 0 else 1).astype(jnp.int32)
            hidx = None
            if C is not None:
                hidx = _selections(B, K, C, jax.random.fold_in(kd, 2), 1)[0]
                hidx = hidx.at[B // 2, 0].set(-1).at[0, C - 1].set(-1)
            o = fn(q, k, v, lengths, hidx)
            ref = decode_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             lengths, hidx, layer=1)
            err = rel_error(o, ref)
            zero_ok = bool(np.all(np.asarray(o, np.float32)[np.asarray(ref) == 0] == 0))
            ok = err <= REL_TOL[jnp.dtype(dtype).name] and zero_ok
            print(f"check N={N} K={K} B={B} S={S} H={Hd} {jnp.dtype(dtype).name} C={C} {cfg}: rel err {err:.2e} "
                  f"zeros {'ok' if zero_ok else 'WRONG'} ({'ok' if ok else 'FAIL'})", flush=True)
            all_ok &= ok
    return all_ok


def _label(r: dict) -> str:
    return f"{r.get('variant', '')} N={r['N']} K={r['K']} B={r['B']} S={r['S']} count={r['count']} {r.get('cfg', '')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-budget", type=float, default=200.0, help="seconds for the tuning sweep")
    ap.add_argument("--check", action="store_true", help="only compare the kernel with the reference")
    ap.add_argument("--out", default=str(common.RESULTS), help="result folder (default benchmarks/results)")
    common.add_device_args(ap)
    args = ap.parse_args()
    common.require_gpu("benchmarks.bench_attention", args.allow_cpu)
    if args.check:
        return 0 if check() else 1
    common.check_out_dir(Path(args.out))
    ceiling = common.measure_ceiling()
    flags = " --quick" * args.quick + (f" --tune --tune-budget {args.tune_budget:g}" if args.tune else "")
    meta = dict(common.metadata("python -m benchmarks.bench_attention" + flags), **common.ceiling_meta(ceiling),
                clocks=CLOCKS)
    if args.tune:
        columns = ["N", "K", "B", "S", "count", "cfg", "partials_only", "ms_wall", "GBps_wall", "frac_read_bw_wall"]
        def write(recs, echo=True, **kw):
            common.write_results("tune_attention", dict(meta, **kw), recs, columns, Path(args.out), echo=echo)

        records = tune(ceiling["read_bw"], args.tune_budget, on_case=lambda recs: write(recs, partial=True, echo=False))
        warnings = common.check_ceiling(records, ["frac_read_bw_wall"], _label)
        write(records, warnings=warnings)
        return 3 if warnings else 0
    records = run(ceiling["read_bw"], quick=args.quick)
    warnings = common.check_ceiling(records, ["frac_read_bw_wall"], _label)
    common.write_results("kernels_attention", dict(meta, warnings=warnings), records, COLUMNS, out_dir=Path(args.out))
    return 3 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())

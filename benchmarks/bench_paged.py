"""Paged attention kernels on the GPU: paged decode vs the contiguous kernel, and paged chunked prefill.

Decode (B = 64, S = 2048, H = 128, MHA 32/32 and GQA 32/8, fp16 and bf16, every length = S): per page
size Z in PAGE_SIZES, the paged kernel dense (head_idx=None) and selective (~30% of KV heads per
sequence, a fresh random choice per call), against the contiguous decode_attention kernel (dense) on
the same data volume. Each sequence's pages are a random permutation of the pool (a fragmented pool, as
a serving engine leaves it). Reported per row:
  ms, GBps, frac_read_bw   time per call; bytes that must move (selected K/V slabs + q + o) / ms, and
                           that over the measured streaming-read bandwidth (a large jnp.sum)
  vs_contiguous            contiguous dense ms / paged dense ms (paged dense rows; the target is >= 0.95)
  speedup_vs_dense         paged dense ms / ms (selective rows; ideal = K / count)

Prefill (llama-2-7b shape: N = K = 32, H = 128, bf16; chunks of T = 512 new tokens at positions
1536..2047 of a 2048-token context, B = 1..8): paged_prefill_attention (Triton kernel, per page size),
its XLA fallback (impl="xla"), and cuDNN through jax.nn.dot_product_attention(implementation="cudnn")
on contiguous [B, S, K, H] K/V. cuDNN's causal mask is top-left aligned (query t sees keys <= t), which
is not the chunk's mask (query t sees keys <= 1536 + t), so cuDNN runs (a) unmasked over all 2048 keys,
its own FLOPs counted (4 N H T S: ~14% more than the chunk's causal work), and (b) with the chunk's mask
as an additive bias [1, 1, T, S] where the cuDNN path accepts it. Reported: ms, TFLOPs (the FLOPs each
variant performs: causal 4 N H sum_t (start + t + 1) for ours and the XLA reference) and frac_matmul
(TFLOPs over the bf16 matmul rate measured in the same run).

Timing: a jitted chain of calls on distinct inputs (input sets rotated so nothing stays in L2),
block_until_ready, median of several repeats (benchmarks.common.time_fn), divided by the chain length.

  python -m benchmarks.bench_paged [--out DIR] [--quick | --tune]
(--tune: time candidate configs of both kernels at one shape each, heuristic's first, ~3 min, into
DIR/tune_paged.json) writes DIR/kernels_paged_decode.{json,md} and DIR/kernels_paged_prefill.{json,md} (default
benchmarks/results) and prints both tables. About 2-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.bench_attention import _selections
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention import triton as dk
from pallas_kernels.paged_attention import paged_decode_attention
from pallas_kernels.paged_attention import triton as pk
from pallas_kernels.prefill_attention import paged_prefill_attention
from pallas_kernels.prefill_attention import triton as fk

H = 128
PAGE_SIZES = (16, 32, 64)
DECODE_B, DECODE_S = 64, 2048
DECODE_HEADS = [(32, 32), (32, 8)]
DECODE_DTYPES = (jnp.float16, jnp.bfloat16)
DENSITY = 0.3
CHAIN = 4                # calls per timed jit dispatch (decode)
N_SETS = 3               # input sets rotated through the chain
PREFILL_N = PREFILL_K = 32
PREFILL_T, PREFILL_CONTEXT = 512, 2048
PREFILL_BATCHES = (1, 2, 4, 8)
PREFILL_CHAIN = 8

DECODE_COLUMNS = ["variant", "dtype", "impl", "Z", "count", "ms", "GBps", "frac_read_bw", "vs_contiguous",
                  "speedup_vs_dense", "ideal", "block_s", "splits"]
PREFILL_COLUMNS = ["impl", "Z", "B", "T", "context", "ms", "TFLOPs", "frac_matmul", "vs_ours"]


# ---------------------------------------------------------------------------------------------------
# hardware yardsticks measured in the same run

def matmul_rate(n: int = 8192) -> float:
    """bf16 matmul FLOP/s of an n x n x n product (f32 accumulation), chains of 4 on rotated inputs."""
    keys = jax.random.split(jax.random.key(7), 4)
    mats = [jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in keys]
    chain = jax.jit(lambda a, b, c, d: [a @ b, b @ c, c @ d, d @ a])
    ms = common.time_fn(chain, [tuple(mats)], inner=5, reps=7) / 4
    return 2 * n ** 3 / (ms * 1e-3)


def _chain(call, n):
    """jit(args_list) -> n outputs, call i on args_list[i] (distinct inputs; XLA cannot merge calls)."""
    return jax.jit(lambda args: [call(*args[i]) for i in range(n)])


def _time(call, arg_list):
    n = len(arg_list)
    return common.time_fn(_chain(call, n), [(arg_list,)], inner=5, reps=9, warmup=2) / n


# ---------------------------------------------------------------------------------------------------
# decode

def _pool(P, K, Z, dtype, key):
    return jax.random.uniform(key, (P, K, Z, H), jnp.float32, -1.0, 1.0).astype(dtype)


def _scattered_table(B, M, P, key):
    """[B, M]: every sequence's pages are distinct, drawn from a random permutation of pages 1..P-1."""
    return (jax.random.permutation(key, P - 1)[:B * M] + 1).reshape(B, M).astype(jnp.int32)


def run_decode(read_bw: float, dtypes) -> list[dict]:
    B, S = DECODE_B, DECODE_S
    lengths = jnp.full((B,), S, jnp.int32)
    records = []
    key = jax.random.key(0)
    for N, K in DECODE_HEADS:
        variant = "mha" if N == K else "gqa"
        count = max(1, round(DENSITY * K))
        for dtype in dtypes:
            t0 = time.perf_counter()
            item = jnp.dtype(dtype).itemsize
            ck = jax.random.fold_in(key, N * 1000 + K)

            def nbytes(c):
                return 2 * B * c * S * H * item + 2 * B * N * H * item

            qs = [jax.random.normal(jax.random.fold_in(ck, i), (B, N, H), jnp.float32).astype(dtype)
                  for i in range(CHAIN)]

            def record(impl, Z, c, ms, cfg, **extra):
                gbps = nbytes(c) / (ms * 1e-3) / 1e9
                rec = dict(kernel="paged_decode", variant=variant, dtype=jnp.dtype(dtype).name, impl=impl, Z=Z,
                           B=B, N=N, K=K, H=H, S=S, count=c, ms=ms, GBps=gbps, frac_read_bw=gbps * 1e9 / read_bw,
                           block_s=cfg.block_s, splits=cfg.splits, **extra)
                records.append(rec)
                print(" ".join(f"{k}={rec[k]:.4g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
                               for k in DECODE_COLUMNS if k in rec), flush=True)

            # contiguous kernel, dense
            make = jax.jit(lambda k: jax.random.uniform(k, (B, K, S, H), jnp.float32, -1.0, 1.0).astype(dtype))
            sets = [(make(jax.random.fold_in(ck, 100 + 2 * s)), make(jax.random.fold_in(ck, 101 + 2 * s)))
                    for s in range(N_SETS)]
            args = [(qs[i],) + sets[i % N_SETS] for i in range(CHAIN)]
            ms_contig = _time(lambda q, k, v: decode_attention(q, k, v, lengths), args)
            record("contiguous", None, K, ms_contig, dk.attention_config(B, N, K, S, H, K, dtype))
            del sets, args

            for Z in PAGE_SIZES:
                M = S // Z
                P = B * M + 1
                zk = jax.random.fold_in(ck, Z)
                sets = [(_pool(P, K, Z, dtype, jax.random.fold_in(zk, 2 * s)),
                         _pool(P, K, Z, dtype, jax.random.fold_in(zk, 2 * s + 1)),
                         _scattered_table(B, M, P, jax.random.fold_in(zk, 50 + s))) for s in range(N_SETS)]
                args = [(qs[i],) + sets[i % N_SETS] for i in range(CHAIN)]
                ms_dense = _time(lambda q, k, v, t: paged_decode_attention(q, k, v, lengths, t), args)
                record("paged", Z, K, ms_dense, pk.paged_attention_config(B, N, K, S, H, K, Z, dtype),
                       vs_contiguous=ms_contig / ms_dense)
                hidxs = _selections(B, K, count, jax.random.fold_in(zk, 99), CHAIN)
                args = [a + (h,) for a, h in zip(args, hidxs)]
                ms_sel = _time(lambda q, k, v, t, h: paged_decode_attention(q, k, v, lengths, t, h), args)
                record("paged_selective", Z, count, ms_sel,
                       pk.paged_attention_config(B, N, K, S, H, count, Z, dtype),
                       speedup_vs_dense=ms_dense / ms_sel, ideal=K / count)
                del sets, args
            print(f"# decode {variant} {jnp.dtype(dtype).name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------
# prefill

def _causal_flops(B, T, start):
    """4 N H sum_t (start + t + 1): QK^T and PV over the visible positions of every query."""
    return 4 * PREFILL_N * H * B * (T * (start + 1) + T * (T - 1) // 2)


def run_prefill(mm_rate: float, batches) -> list[dict]:
    N, K, T, S = PREFILL_N, PREFILL_K, PREFILL_T, PREFILL_CONTEXT
    start = S - T
    dtype = jnp.bfloat16
    records = []
    key = jax.random.key(1)
    for B in batches:
        t0 = time.perf_counter()
        bk = jax.random.fold_in(key, B)
        starts = jnp.full((B,), start, jnp.int32)
        n_new = jnp.full((B,), T, jnp.int32)
        qs = [jax.random.normal(jax.random.fold_in(bk, i), (B, T, N, H), jnp.float32).astype(dtype)
              for i in range(PREFILL_CHAIN)]
        flops = _causal_flops(B, T, start)
        ours = {}

        def record(impl, Z, ms, fl, **extra):
            tf = fl / (ms * 1e-3) / 1e12
            rec = dict(kernel="paged_prefill", impl=impl, Z=Z, B=B, N=N, K=K, H=H, T=T, context=S, ms=ms,
                       TFLOPs=tf, frac_matmul=tf * 1e12 / mm_rate, **extra)
            records.append(rec)
            print(" ".join(f"{k}={rec[k]:.4g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
                           for k in PREFILL_COLUMNS if k in rec), flush=True)

        for Z in PAGE_SIZES:
            M = S // Z
            P = B * M + 1
            zk = jax.random.fold_in(bk, Z)
            sets = [(_pool(P, K, Z, dtype, jax.random.fold_in(zk, 2 * s)),
                     _pool(P, K, Z, dtype, jax.random.fold_in(zk, 2 * s + 1)),
                     _scattered_table(B, M, P, jax.random.fold_in(zk, 50 + s))) for s in range(N_SETS)]
            args = [(qs[i],) + sets[i % N_SETS] for i in range(PREFILL_CHAIN)]
            cfg = fk.prefill_config(B, T, N, K, H, Z, dtype)
            ms = _time(lambda q, k, v, t: paged_prefill_attention(q, k, v, t, starts, n_new), args)
            ours[Z] = ms
            record("paged_triton", Z, ms, flops, block_t=cfg.block_t, block_s=cfg.block_s)
            if Z == PAGE_SIZES[0]:
                ms = _time(lambda q, k, v, t: paged_prefill_attention(q, k, v, t, starts, n_new, impl="xla"), args)
                record("paged_xla", Z, ms, flops)
            del sets, args

        make = jax.jit(lambda k: jax.random.uniform(k, (B, S, K, H), jnp.float32, -1.0, 1.0).astype(dtype))
        sets = [(make(jax.random.fold_in(bk, 200 + 2 * s)), make(jax.random.fold_in(bk, 201 + 2 * s)))
                for s in range(N_SETS)]
        args = [(qs[i],) + sets[i % N_SETS] for i in range(PREFILL_CHAIN)]
        try:
            ms = _time(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), args)
            record("cudnn_unmasked", None, ms, 4 * N * H * B * T * S)
        except Exception as e:  # noqa: BLE001  (report and go on: the other rows still stand)
            print(f"# cudnn unmasked failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        visible = jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None]                # [T, S]
        bias = jnp.where(visible, 0.0, -1e9).astype(dtype)[None, None]                    # [1, 1, T, S]
        try:
            ms = _time(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias, implementation="cudnn"), args)
            record("cudnn_bias_mask", None, ms, 4 * N * H * B * T * S)
        except Exception as e:  # noqa: BLE001
            print(f"# cudnn with bias mask failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        del sets, args
        for rec in records:  # our best page size / theirs
            if rec["B"] == B and rec["impl"] != "paged_triton":
                rec["vs_ours"] = min(ours.values()) / rec["ms"]
        print(f"# prefill B={B}: {time.perf_counter() - t0:.1f}s", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------
# tuning (--tune): candidate kernel configurations at one decode and one prefill shape

def _prefill_candidates(B, T, N, K, Z):
    base = fk.prefill_config(B, T, N, K, H, Z, jnp.bfloat16)
    GP = 1 << max(0, (N // K - 1).bit_length())
    out = [base]
    for rows in (64, 128):
        for bs in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                c = fk.PrefillConfig(block_t=max(1, rows // GP), block_s=bs, num_warps=warps, num_stages=stages)
                if c not in out:
                    out.append(c)
    return out


def tune(read_bw: float, mm_rate: float, budget_s: float = 150.0) -> list[dict]:
    """Time the heuristic's config (first row) and candidates; stops adding candidates past budget_s."""
    records = []
    t_start = time.perf_counter()
    key = jax.random.key(2)
    B, S, Z, dtype = DECODE_B, DECODE_S, 16, jnp.float16
    M, item = S // Z, 2
    for N, K, C in ((32, 32, 32), (32, 8, 8), (32, 32, max(1, round(DENSITY * 32)))):
        P = B * M + 1
        ck = jax.random.fold_in(key, N + K + C)
        sets = [(_pool(P, K, Z, dtype, jax.random.fold_in(ck, 2 * s)),
                 _pool(P, K, Z, dtype, jax.random.fold_in(ck, 2 * s + 1)),
                 _scattered_table(B, M, P, jax.random.fold_in(ck, 50 + s))) for s in range(N_SETS)]
        qs = [jax.random.normal(jax.random.fold_in(ck, 9 + i), (B, N, H), jnp.float32).astype(dtype)
              for i in range(CHAIN)]
        hidxs = _selections(B, K, C, jax.random.fold_in(ck, 99), CHAIN) if C < K else [None] * CHAIN
        args = [(qs[i],) + sets[i % N_SETS] + (hidxs[i],) for i in range(CHAIN)]
        lengths = jnp.full((B,), S, jnp.int32)
        for cfg in pk.paged_attention_candidates(B, N, K, S, H, C, Z, dtype):
            if time.perf_counter() - t_start > budget_s / 2:
                break
            call = (lambda q, k, v, t, h, cfg=cfg: pk.paged_decode_attention(
                q, k[None], v[None], lengths, t, h, layer=0, config=cfg))
            try:
                ms = _time(call, args)
            except Exception as e:  # noqa: BLE001  (a config Triton rejects: report, go on)
                print(f"# {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            gbps = (2 * B * C * S * H * item + 2 * B * N * H * item) / (ms * 1e-3) / 1e9
            rec = dict(kernel="paged_decode", N=N, K=K, C=C, Z=Z, ms=ms, frac_read_bw=gbps * 1e9 / read_bw,
                       **dataclasses.asdict(cfg))
            records.append(rec)
            print(rec, flush=True)
        del sets, args
    Bp, T, N, K = 4, PREFILL_T, PREFILL_N, PREFILL_K
    start = PREFILL_CONTEXT - T
    P = Bp * (PREFILL_CONTEXT // Z) + 1
    sets = [(_pool(P, K, Z, jnp.bfloat16, jax.random.fold_in(key, 300 + 2 * s)),
             _pool(P, K, Z, jnp.bfloat16, jax.random.fold_in(key, 301 + 2 * s)),
             _scattered_table(Bp, PREFILL_CONTEXT // Z, P, jax.random.fold_in(key, 350 + s))) for s in range(N_SETS)]
    qs = [jax.random.normal(jax.random.fold_in(key, 400 + i), (Bp, T, N, H), jnp.float32).astype(jnp.bfloat16)
          for i in range(PREFILL_CHAIN)]
    args = [(qs[i],) + sets[i % N_SETS] for i in range(PREFILL_CHAIN)]
    starts, n_new = jnp.full((Bp,), start, jnp.int32), jnp.full((Bp,), T, jnp.int32)
    for cfg in _prefill_candidates(Bp, T, N, K, Z):
        if time.perf_counter() - t_start > budget_s:
            break
        call = (lambda q, k, v, t, cfg=cfg: fk.paged_prefill_attention(
            q, k[None], v[None], t, starts, n_new, layer=0, config=cfg))
        try:
            ms = _time(call, args)
        except Exception as e:  # noqa: BLE001
            print(f"# {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        tf = _causal_flops(Bp, T, start) / (ms * 1e-3) / 1e12
        rec = dict(kernel="paged_prefill", B=Bp, N=N, K=K, Z=Z, ms=ms, TFLOPs=tf, frac_matmul=tf * 1e12 / mm_rate,
                   **dataclasses.asdict(cfg))
        records.append(rec)
        print(rec, flush=True)
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="fp16 decode only, prefill at B = 1 and 8")
    ap.add_argument("--tune", action="store_true", help="only time candidate kernel configs (first: heuristic)")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("bench_paged needs a CUDA GPU (the Triton kernels are compiled for it)")
    t0 = time.perf_counter()
    ceiling = common.measure_ceiling()
    read_bw = ceiling["read_bw"]
    mm = matmul_rate()
    print(f"read bandwidth {read_bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s on "
          f"{common.device_name()}", flush=True)
    if args.tune:
        recs = tune(read_bw, mm)
        meta = common.metadata("python -m benchmarks.bench_paged --tune")
        out = Path(args.out) if args.out else common.RESULTS
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune_paged.json").write_text(json.dumps({"meta": meta, "records": recs}, indent=1))
        return
    dec = run_decode(read_bw, DECODE_DTYPES[:1] if args.quick else DECODE_DTYPES)
    pre = run_prefill(mm, (1, 8) if args.quick else PREFILL_BATCHES)
    meta = common.metadata("python -m benchmarks.bench_paged" + (" --quick" if args.quick else ""))
    meta.update(common.ceiling_meta(ceiling), matmul_bf16_TFLOPs=mm / 1e12)
    kw = {"out_dir": Path(args.out)} if args.out else {}
    common.write_results("kernels_paged_decode", meta, dec, DECODE_COLUMNS, **kw)
    common.write_results("kernels_paged_prefill", meta, pre, PREFILL_COLUMNS, **kw)
    for Z in PAGE_SIZES:  # the page-size choice at a glance
        rows = [r for r in dec if r["Z"] == Z and r["impl"] == "paged"]
        sel = [r for r in dec if r["Z"] == Z and r["impl"] == "paged_selective"]
        pf = [r for r in pre if r["Z"] == Z]
        print(f"Z={Z}: paged/contiguous speed {np.mean([r['vs_contiguous'] for r in rows]):.3f} (mean), "
              f"selective speedup {np.mean([r['speedup_vs_dense'] for r in sel]):.2f}x, "
              f"prefill {np.mean([r['TFLOPs'] for r in pf]):.0f} TFLOP/s", flush=True)
    print(f"# total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Probe: does prefetching the next kernel's first bytes into L2 shorten a chain of dependent streaming kernels?

    python -m benchmarks.probe_l2_prefetch [--out OUT.json]      (a CUDA GPU, jax-triton and triton)

The decode step is a chain of dependent kernels, each reading a phase's weights once; each loses a few µs to
its ramp (first loads at HBM latency, the pipeline filling) and its tail (programs ending unevenly), and a
grid barrier in their place gains nothing (NOTES, fourteenth session: the fused MLP). Weights never depend on
the kernel ahead, so that kernel could start loading them. Pallas cannot say so (no prefetch, no pointers
for inline PTX); Triton can: `prefetch.global.L2::evict_last` on the addresses a later kernel reads first.

Stand-ins for the phases: a [rows, 8192] bf16 array per kernel (16 KB rows), P programs (two per SM) each
summing an equal share of its rows, and a scalar from the kernel ahead added to its output, so the kernels
of a chain depend on each other as a step's do. Eight arrays of `--mb` MB each in a chain, so no array is
left in L2 by the one before. Variants, wall clock per kernel (autotune.time_fn; inputs rotated):
  - Pallas-Triton: the same kernel written in Pallas (what our kernels are; XLA launches these with
    programmatic dependent launch);
  - jax-triton, no prefetch: the same kernel in Triton's language through jax_triton.triton_call;
  - jax-triton, prefetch at the end / at the start: each program issues `prefetch.global.L2::evict_last` for
    the first K rows that the program of the same number in the next kernel reads (fire and forget), after
    its own rows or before them.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.selective_gemm.fused import sm_count

W = 8192          # elements per row: 16 KB of bf16
LINE = 128        # bytes per prefetch (an L2 line)
CHAIN = 8         # kernels (and arrays) per chain


def _share(R: int, P: int, p):
    return p * R // P, (p + 1) * R // P


def _pallas_kernel(prev_ref, x_ref, o_ref, *, R: int, P: int):
    p = pl.program_id(0)
    lo, hi = _share(R, P, p)

    def body(r, acc):
        return acc + plgpu.load(x_ref.at[r, :]).astype(jnp.float32)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((W,), jnp.float32))
    plgpu.store(o_ref.at[pl.ds(p, 1)], jnp.sum(acc) + plgpu.load(prev_ref.at[pl.ds(0, 1)]))


def pallas_read(prev, x, P: int):
    R = x.shape[0]
    return pl.pallas_call(functools.partial(_pallas_kernel, R=R, P=P), out_shape=jax.ShapeDtypeStruct((P,), jnp.float32),
                          grid=(P,), compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
                          name="probe_read")(prev, x)


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch(nxt_ptr, p, RN: tl.constexpr, P: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
                 LINE: tl.constexpr):
        lo = p * RN // P
        offs = tl.arange(0, K * (W * 2 // LINE)) * (LINE // 2)          # one address per 128-byte line
        ptrs = nxt_ptr + lo.to(tl.int64) * W + offs
        done = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                         dtype=tl.int32, is_pure=False, pack=1)
        return tl.sum(done, axis=0)

    @triton.jit
    def kernel(prev_ptr, x_ptr, nxt_ptr, out_ptr, R: tl.constexpr, RN: tl.constexpr, P: tl.constexpr,
               K: tl.constexpr, AT_START: tl.constexpr, W: tl.constexpr, LINE: tl.constexpr):
        p = tl.program_id(0)
        lo = p * R // P
        hi = (p + 1) * R // P
        cols = tl.arange(0, W)
        extra = tl.full([], 0, tl.int32)
        if K > 0 and AT_START:
            extra += prefetch(nxt_ptr, p, RN, P, K, W, LINE)
        acc = tl.zeros([W], dtype=tl.float32)
        for r in range(lo, hi):
            acc += tl.load(x_ptr + r.to(tl.int64) * W + cols).to(tl.float32)
        if K > 0 and not AT_START:
            extra += prefetch(nxt_ptr, p, RN, P, K, W, LINE)
        tl.store(out_ptr + p, tl.sum(acc, axis=0) + tl.load(prev_ptr) + extra.to(tl.float32))

    return kernel


def triton_read(prev, x, nxt, P: int, K: int, at_start: bool):
    import jax_triton as jt
    return jt.triton_call(prev, x, nxt, kernel=_triton_kernel(), out_shape=jax.ShapeDtypeStruct((P,), jnp.float32),
                          grid=(P,), num_warps=4, num_stages=4, name="probe_read_jt", R=x.shape[0], RN=nxt.shape[0],
                          P=P, K=K, AT_START=at_start, W=W, LINE=LINE)


def chain(read, xs):
    """CHAIN dependent reads, kernel i also told about array i + 1 (the next kernel's)."""
    out = jnp.zeros((1,), jnp.float32)
    for i, x in enumerate(xs):
        out = read(out[:1], x, xs[(i + 1) % len(xs)])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[50.0, 117.0], help="MB per array (a phase's bytes)")
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_l2_prefetch", False)
    P = 2 * sm_count()
    ceiling = common.measure_ceiling()
    read_bw = ceiling["read_bw"]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {P} programs, read ceiling "
          f"{read_bw / 1e12:.3f} TB/s")
    records = []
    for mb in args.mb:
        R = int(mb * 1e6) // (W * 2)
        key = jax.random.key(int(mb))
        sets = [tuple(jax.random.normal(k, (R, W), jnp.float32).astype(jnp.bfloat16)
                      for k in jax.random.split(jax.random.fold_in(key, s), CHAIN)) for s in range(2)]
        variants = {"pallas-triton": lambda prev, x, nxt: pallas_read(prev, x, P),
                    "jax-triton, no prefetch": functools.partial(triton_read, P=P, K=0, at_start=False)}
        for K in (1, 2, 4):
            variants[f"jax-triton, prefetch {K} rows at the end"] = functools.partial(triton_read, P=P, K=K,
                                                                                      at_start=False)
        for K in (2, 4):
            variants[f"jax-triton, prefetch {K} rows at the start"] = functools.partial(triton_read, P=P, K=K,
                                                                                        at_start=True)
        print(f"== {CHAIN} kernels of {R * W * 2 / 1e6:.1f} MB each")
        ref = None
        for name, read in variants.items():
            fn = jax.jit(lambda *xs, _r=read: chain(_r, xs))
            out = fn(*sets[0])
            ref = out if ref is None else ref
            same = bool(jnp.allclose(out, ref, rtol=1e-3))
            us = autotune.time_fn(fn, sets) * 1e3 / CHAIN
            frac = R * W * 2 / (us * 1e-6) / read_bw
            print(f"  {name:<44s} {us:8.1f} us a kernel  {frac:.3f} of the read ceiling"
                  + ("" if same else "  RESULT DIFFERS"))
            records.append({"mb": R * W * 2 / 1e6, "variant": name, "us_per_kernel": us, "read_fraction": frac,
                            "same_result": same})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**common.metadata("python -m benchmarks.probe_l2_prefetch"), **common.ceiling_meta(ceiling),
                       "programs": P, "chain": CHAIN, "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()

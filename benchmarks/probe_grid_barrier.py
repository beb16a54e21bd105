"""Probe: would a layer-persistent kernel (phases joined by grid barriers) beat one kernel per projection?

    python -m benchmarks.probe_grid_barrier [--out OUT.json]

The dense decode step loses ~4 µs per kernel above its bytes (logs/probe_gemm_size.log), ten kernels a layer.
One kernel per layer would replace those boundaries by grid barriers. Before writing one, this times the
boundaries alone, with streaming reads that stand in for the projections (each program sums its share of a
[rows, 8192] bf16 array; no GEMM, so only the memory system and the synchronisation are measured):

  - empty kernels chained in one jit (M = 1 and 65): the cost of one kernel boundary with no bytes;
  - one kernel passing N = 1 and 65 grid barriers (atomic counter, every program resident): one barrier;
  - one layer's reads at llama-3-8b's sizes (q/k/v 50 MB, K/V cache at B = 16 x 2,048 positions 134 MB, output
    33.5 MB, gate/up 235 MB, down 117 MB): five kernels in a row; one kernel with a barrier between the
    phases; one kernel without the barriers (the bound: the same reads, no synchronisation); and the whole
    layer's bytes as one read.

Wall clock per call (autotune.time_fn: 20 calls back to back, median of 15), inputs rotated through more than
the L2. Programs: one or two per SM (all resident, as the barrier requires: RUNS), each streaming 16 KB rows, one, two
or four rows per loop step.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.common import check_backend
from pallas_kernels.selective_gemm.fused import sm_count

W = 8192  # elements per row (16 KB of bf16): one load per loop step
# (programs per SM, rows per loop step): a barrier kernel whose programs are not all resident never ends, and
# 4 rows a step with 2 programs per SM did not end in a first run (its registers leave room for fewer programs)
RUNS = [(1, (1, 2, 4)), (2, (1, 2))]
LAYER_MB = {"qkv": 50.3, "kv_cache": 134.2, "o": 33.6, "gate_up": 234.9, "down": 117.4}  # llama-3-8b, B = 16


def _wait_all(cnt_ref, target: float):
    """Grid barrier number target / P: add this program's arrival, spin until every program has arrived."""
    plgpu.debug_barrier()
    arrived = plgpu.atomic_add(cnt_ref, (0, 0), 1.0) + 1.0
    lax.while_loop(lambda v: v < target, lambda v: plgpu.atomic_add(cnt_ref, (0, 0), 0.0), arrived)
    plgpu.debug_barrier()


def _phases_kernel(*refs, n_phases: int, per: tuple, P: int, barrier: bool, extra_barriers: int, U: int):
    xs, (cnt_in, out_ref, cnt_ref) = refs[:n_phases], refs[n_phases:]
    del cnt_in
    p = pl.program_id(0)
    acc = jnp.zeros((U, W), jnp.float32)
    waits = 0
    for a, x_ref in enumerate(xs):
        if a and barrier:
            waits += 1
            _wait_all(cnt_ref, float(waits * P))
        step = lambda i, acc, x_ref=x_ref: acc + x_ref[pl.ds(i * U, U), :].astype(jnp.float32)
        acc = lax.fori_loop(p * (per[a] // U), (p + 1) * (per[a] // U), step, acc)

    def spin(i, c):
        _wait_all(cnt_ref, ((waits + i + 1) * P).astype(jnp.float32))
        return c

    if extra_barriers:
        lax.fori_loop(0, extra_barriers, spin, 0)
    out_ref[p] = acc.sum(0)


def phases(xs, P: int, *, barrier: bool, extra_barriers: int = 0, unroll: int = 1, num_warps: int = 8,
           interpret=None):
    """out [P, W] f32: program p's sum of its rows of every x in xs ([P * per, W] each, per a multiple of
    `unroll`, the rows loaded per loop step), the phases one after another in one launch, joined by grid
    barriers if `barrier` (then every program must be resident)."""
    interpret = check_backend(interpret)
    per = tuple(x.shape[0] // P for x in xs)
    kernel = functools.partial(_phases_kernel, n_phases=len(xs), per=per, P=P, barrier=barrier,
                               extra_barriers=extra_barriers, U=unroll)
    out, _ = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((P, W), jnp.float32), jax.ShapeDtypeStruct((1, 1), jnp.float32)],
        grid=(P,),
        input_output_aliases={len(xs): 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="probe_phases",
    )(*xs, jnp.zeros((1, 1), jnp.float32))
    return out


def _rows(mb: float, P: int) -> int:
    """Rows of a ~mb MB array: a multiple of 4 per program (any unroll divides it)."""
    return max(1, round(mb * 1e6 / (2 * W) / P / 4)) * 4 * P


def _arrays(mbs, P, n_sets, key):
    sets = []
    for s in range(n_sets):
        ks = jax.random.split(jax.random.fold_in(key, s), len(mbs))
        sets.append(tuple(jax.random.normal(k, (_rows(mb, P), W), jnp.float32).astype(jnp.bfloat16)
                          for k, mb in zip(ks, mbs)))
    return sets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_grid_barrier", False)
    sms = sm_count()
    ceiling = common.measure_ceiling()
    read_bw = ceiling["read_bw"]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {sms} SMs, read ceiling {read_bw / 1e12:.3f} TB/s")
    key = jax.random.key(0)
    records = []

    def timed(name, fn, sets, nbytes, **extra):
        ms = autotune.time_fn(jax.jit(fn), sets)
        frac = nbytes / (ms * 1e-3) / read_bw if nbytes else None
        print(f"  {name:<48s} {ms * 1e3:9.1f} us" + (f"  {frac:.3f} of the read ceiling" if frac else ""))
        records.append({"case": name, "us": ms * 1e3, "bytes": nbytes, "read_fraction": frac, **extra})
        return ms * 1e3

    for per_sm, unrolls in RUNS:
        P = per_sm * sms
        print(f"== {P} programs ({per_sm} per SM)")
        tiny = _arrays([0.0], P, 1, key)              # one row per program
        # an empty kernel boundary: M tiny kernels in a chain (each reads the previous one's output)
        def chain(x, M):
            out = phases((x,), P, barrier=False)
            for _ in range(M - 1):
                out = phases((out,), P, barrier=False)
            return out
        t1 = timed("empty kernels: chain of 1", functools.partial(chain, M=1), tiny, 0, programs=P)
        t65 = timed("empty kernels: chain of 65", functools.partial(chain, M=65), tiny, 0, programs=P)
        print(f"  -> one kernel boundary: {(t65 - t1) / 64:.2f} us")
        b1 = timed("one kernel, 1 grid barrier", lambda x: phases((x,), P, barrier=True, extra_barriers=1), tiny, 0,
                   programs=P)
        b65 = timed("one kernel, 65 grid barriers", lambda x: phases((x,), P, barrier=True, extra_barriers=65), tiny,
                    0, programs=P)
        print(f"  -> one grid barrier: {(b65 - b1) / 64:.2f} us")
        records.append({"case": "derived", "programs": P, "kernel_boundary_us": (t65 - t1) / 64,
                        "grid_barrier_us": (b65 - b1) / 64})

        mbs = list(LAYER_MB.values())
        sets = _arrays(mbs, P, 2, key)
        nbytes = sum(x.size * 2 for x in sets[0])
        whole = _arrays([nbytes / 1e6], P, 2, key)
        for U in unrolls:
            print(f"  -- {U} rows per loop step")
            run = functools.partial(phases, P=P, unroll=U)
            kw = dict(programs=P, unroll=U)
            k5 = timed("layer reads: 5 kernels", lambda *xs: tuple(run((x,), barrier=False) for x in xs), sets,
                       nbytes, **kw)
            kb = timed("layer reads: 1 kernel, 4 grid barriers", lambda *xs: run(xs, barrier=True), sets, nbytes, **kw)
            kn = timed("layer reads: 1 kernel, no barrier", lambda *xs: run(xs, barrier=False), sets, nbytes, **kw)
            k1 = timed("layer bytes as one read", lambda x: run((x,), barrier=False), whole, whole[0][0].size * 2, **kw)
            print(f"  -> barriers instead of kernel boundaries: {k5 / kb:.3f}x; the bound without barriers"
                  f" {k5 / kn:.3f}x; one read {k5 / k1:.3f}x")
            records.append({"case": "derived", **kw, "speedup_barriers": k5 / kb, "speedup_no_barrier": k5 / kn,
                            "speedup_one_read": k5 / k1})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**common.metadata("python -m benchmarks.probe_grid_barrier"), **common.ceiling_meta(ceiling),
                       "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()

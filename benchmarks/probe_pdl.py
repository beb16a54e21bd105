"""Probe: does programmatic dependent launch (PDL) reach our Pallas kernels, and what does an early trigger save?

    python -m benchmarks.probe_pdl [--out OUT.json]

On Hopper, XLA can launch a kernel with programmatic stream serialization: the kernel starts before the one
ahead of it has ended and waits (`griddepcontrol.wait`) before it reads anything, and the kernel ahead may
let it start early (`griddepcontrol.launch_dependents`). XLA's own GEMM fusions trigger early; whether our
Pallas custom calls are launched that way depends on XLA's Triton pipeline (`xla_gpu_enable_pdl`). This probe
times the same streaming-read kernels as benchmarks.probe_grid_barrier (each program sums its rows of a
[rows, 8192] bf16 array), chained, with and without a `launch_dependents` issued by every thread at the start
of each kernel (inline PTX): empty kernels (one row per program) and one llama-3-8b layer's reads at B = 16 as
five kernels; and, from a profiler trace of the chain, whether each kernel starts before the one ahead has
ended (it can only if it was launched with PDL).

The trigger is safe whatever XLA does: a kernel launched with PDL still waits for the whole kernel ahead
(and its memory) at its `griddepcontrol.wait`, and one launched without it ignores the trigger.
Run it twice, with XLA_FLAGS=--xla_gpu_enable_pdl=false the second time, to see what PDL itself does.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks import common
from benchmarks.bench_mlp import gpu_kernel_events
from benchmarks.probe_grid_barrier import LAYER_MB
from pallas_kernels import autotune
from pallas_kernels.common import check_backend
from pallas_kernels.selective_gemm.fused import sm_count

W = 8192


def trigger_dependents(x):
    """x (an f32 array), after every thread has issued `griddepcontrol.launch_dependents` (the value carries the
    asm so that it is not removed as unused)."""
    [out] = plgpu.elementwise_inline_asm("griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[x],
                                         constraints="=r,r", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return out


def _sum_kernel(x_ref, o_ref, *, per: int, trigger: bool):
    p = pl.program_id(0)
    acc = jnp.zeros((1, W), jnp.float32)
    if trigger:
        acc = trigger_dependents(acc)
    step = lambda i, acc: acc + x_ref[pl.ds(i, 1), :].astype(jnp.float32)
    acc = lax.fori_loop(p * per, (p + 1) * per, step, acc)
    o_ref[pl.ds(p, 1), :] = acc


def row_sums(x, P: int, *, trigger: bool, interpret=None):
    """out [P, W] f32: program p's sum of its rows of x [P * per, W]."""
    interpret = check_backend(interpret)
    return pl.pallas_call(
        functools.partial(_sum_kernel, per=x.shape[0] // P, trigger=trigger),
        out_shape=jax.ShapeDtypeStruct((P, W), jnp.float32), grid=(P,), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1), name="probe_pdl_sum")(x)


def _rows(mb: float, P: int) -> int:
    return max(1, round(mb * 1e6 / (2 * W) / P)) * P


def _arrays(mbs, P, n_sets, key):
    return [tuple(jax.random.normal(jax.random.fold_in(key, 10 * s + i), (_rows(mb, P), W), jnp.float32)
                  .astype(jnp.bfloat16) for i, mb in enumerate(mbs)) for s in range(n_sets)]


def kernel_gaps(fn, args) -> dict:
    """From a profiler trace of one call of fn: how the probe kernels follow each other on the GPU (start of
    one minus end of the one before, ns): overlapping kernels (a negative gap) were launched with PDL."""
    events = sorted((t, t + ns) for name, t, ns in gpu_kernel_events(fn, [args], calls=1) if "probe_pdl_sum" in name)
    gaps = [b[0] - a[1] for a, b in zip(events, events[1:])]
    if not gaps:
        return {"kernels": len(events)}
    return {"kernels": len(events), "overlapping": sum(g < 0 for g in gaps), "median_gap_ns": statistics.median(gaps),
            "min_gap_ns": min(gaps), "median_duration_ns": statistics.median(e - s for s, e in events)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_pdl", False)
    P = 2 * (sm_count() or 132)
    ceiling = common.measure_ceiling()
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS={flags!r}, {P} programs", flush=True)
    key = jax.random.key(0)
    records = []
    def timed(name, fn, sets, nbytes):
        ms = autotune.time_fn(jax.jit(fn), sets)
        frac = nbytes / (ms * 1e-3) / ceiling["read_bw"] if nbytes else None
        print(f"  {name:<52s} {ms * 1e3:9.1f} us" + (f"  {frac:.3f} of the read ceiling" if frac else ""),
              flush=True)
        records.append({"case": name, "us": ms * 1e3, "bytes": nbytes, "read_fraction": frac})
        return ms * 1e3

    tiny = _arrays([0.0], P, 2, key)
    sets = _arrays(list(LAYER_MB.values()), P, 2, key)
    nbytes = sum(x.size * 2 for x in sets[0])
    for trig in (False, True):
        label = "with" if trig else "without"
        run = functools.partial(row_sums, P=P, trigger=trig)

        def chain(x, M):
            out = run(x)
            for _ in range(M - 1):
                out = run(out)
            return out
        t1 = timed(f"empty kernels, chain of 1, {label} trigger", functools.partial(chain, M=1), tiny, 0)
        t65 = timed(f"empty kernels, chain of 65, {label} trigger", functools.partial(chain, M=65), tiny, 0)
        print(f"  -> one kernel boundary {label} the trigger: {(t65 - t1) / 64:.2f} us", flush=True)
        gaps = kernel_gaps(jax.jit(functools.partial(chain, M=65)), tiny[0])
        print(f"  -> the chain of 65 in a profiler trace: {gaps}", flush=True)
        records.append({"case": "derived", "trigger": trig, "kernel_boundary_us": (t65 - t1) / 64, **gaps})
        timed(f"layer reads, 5 kernels, {label} trigger", lambda *xs: tuple(run(x) for x in xs), sets, nbytes)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**common.metadata("python -m benchmarks.probe_pdl " + " ".join(argv or [])),
                       "xla_flags": flags, **common.ceiling_meta(ceiling), "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()

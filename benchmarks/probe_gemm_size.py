"""Probe: does a decode GEMM lose its bandwidth per call (start-up and tail) or per byte (how it reads)?

    python -m benchmarks.probe_gemm_size [--batch 16] [--dim 4096] [--rows 4096,6144,14336,28672,57344,131072]

Times y = x @ w.T for x [B, D] and w [F, D] (bf16) at growing F, through our row-gathering GEMM
(`selective_up` with every row selected, as the dense decode projections call it, the block sizes of this
device's tuned table or the heuristics) and through XLA's dot, on the kernel clock (profiler trace; two weight
sets rotated so no call reads the previous one's from L2). Prints µs per call and the weight bytes per second as
a fraction of the streaming-read ceiling measured in the same run. A fraction that climbs with F towards a
plateau means a fixed cost per call; the plateau is what the kernel's way of reading reaches.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from pallas_kernels.selective_gemm import selective_up


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rows", default="4096,6144,14336,28672,57344,131072")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_gemm_size", args.allow_cpu)

    ceiling, _ = common.read_bandwidth()
    B, D = args.batch, args.dim
    x = jax.random.normal(jax.random.key(1), (B, D), jnp.float32).astype(jnp.bfloat16)
    print(f"{jax.devices()[0].device_kind}: read ceiling {ceiling / 1e12:.3f} TB/s; B={B} D={D}")
    for F in (int(r) for r in args.rows.split(",")):
        ws = [jax.random.normal(jax.random.key(2 + i), (1, F, D), jnp.float32).astype(jnp.bfloat16) for i in range(2)]
        rows = jnp.arange(F, dtype=jnp.int32)
        ours = jax.jit(lambda x, w: selective_up(x, w, rows, F, activation="none", layer=0, impl="triton"))
        xla = jax.jit(lambda x, w: jnp.einsum("bd,fd->bf", x, w[0]))
        err = float(jnp.max(jnp.abs(ours(x, ws[0]).astype(jnp.float32) - xla(x, ws[0]).astype(jnp.float32))))
        line = [f"F={F:6d} ({F * D * 2 / 1e6:6.1f} MB, max |ours - xla| {err:.3g}):"]
        for name, fn in (("ours", ours), ("xla", xla)):
            kernels, _ = device_profile(fn, [(x, w) for w in ws], calls=10)
            us = sum(kernels.values()) / 1e3
            line.append(f"{name} {us:8.1f} us {F * D * 2 / (us * 1e-6) / ceiling:5.3f}")
        print("  ".join(line))
        del ws


if __name__ == "__main__":
    main()

"""What the prefill layer loop costs over stacked weights: timed variants of one loop, same inputs.

    python -m benchmarks.probe_layer_loop [--tokens 2048] [--layers 32] [--dim 4096] [--hidden 14336]

Each variant runs L layers of y = relu(x @ up[l].T) @ down[l] on T tokens, with up, down stacked as
[L, F, D] (the model's layout), and is timed at the same inputs:
- `scan_xs`: `lax.scan` over xs = arange(L) with the weights closed over (how polar_jax/model.py loops);
- `while_indvar`: `lax.while_loop` whose induction variable is the layer index;
- compiled with XLA's `xla_gpu_enable_dynamic_slice_fusion` (cuBLAS reading w[l] in place);
- `unrolled_static`: a Python loop over l slicing the stacked weights statically;
- `+ cublas_only`: compiled with `xla_gpu_enable_triton_gemm` off, so every GEMM is cuBLAS's (what the
  prefill programs do since, `polar_jax.model.PREFILL_COMPILER_OPTIONS`);
- `scan_pallas`: `lax.scan` calling our row-gathering GEMMs (selective_up / selective_down, every row
  selected, the stacked weights and the layer index passed in), as the decode step does;
- `unrolled_list`: a Python loop over L separate arrays (no slicing at all: what the loop could cost).
Prints ms per loop, the matmul TFLOP/s and the weight bytes read per second against the streaming-read
ceiling measured in the same run (small T, as in a decode step, is bound by those reads); writes nothing
unless --out is given (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels.selective_gemm import selective_down, selective_up

DS_FUSION = {"xla_gpu_enable_dynamic_slice_fusion": True}
CUBLAS_ONLY = {"xla_gpu_enable_triton_gemm": False}


def _layer(x, up, down):  # x [T, D], up/down [F, D] -> [T, D]
    h = jax.nn.relu(jnp.einsum("td,fd->tf", x, up))
    return (h @ down).astype(x.dtype)


def scan_xs(x, up, down):
    def body(x, l):
        return _layer(x, up[l], down[l]), None
    return jax.lax.scan(body, x, jnp.arange(up.shape[0], dtype=jnp.int32))[0]


def scan_pallas(x, up, down):
    """The decode path's way: our row-gathering GEMMs with every row selected, indexing w by layer."""
    rows = jnp.arange(up.shape[1], dtype=jnp.int32)

    def body(x, l):
        h = selective_up(x, up, rows, up.shape[1], activation="relu", layer=l, impl="triton")
        return selective_down(h, down, rows, up.shape[1], layer=l, impl="triton"), None
    return jax.lax.scan(body, x, jnp.arange(up.shape[0], dtype=jnp.int32))[0]


def while_indvar(x, up, down):
    def body(carry):
        l, x = carry
        return l + 1, _layer(x, up[l], down[l])
    return jax.lax.while_loop(lambda c: c[0] < up.shape[0], body, (jnp.int32(0), x))[1]


def unrolled_static(x, up, down):
    for l in range(up.shape[0]):
        x = _layer(x, up[l], down[l])
    return x


def unrolled_list(x, ups, downs):
    for up, down in zip(ups, downs):
        x = _layer(x, up, down)
    return x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_layer_loop", args.allow_cpu)

    T, L, D, F = args.tokens, args.layers, args.dim, args.hidden
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (T, D), jnp.bfloat16)
    up = (jax.random.normal(k[1], (L, F, D), jnp.float32) * D ** -0.5).astype(jnp.bfloat16)
    down = (jax.random.normal(k[2], (L, F, D), jnp.float32) * F ** -0.5).astype(jnp.bfloat16)
    ups, downs = [up[l] for l in range(L)], [down[l] for l in range(L)]
    flops = 2 * 2 * T * F * D * L
    weight_bytes = 2 * L * F * D * up.dtype.itemsize
    read_bw = common.measure_ceiling()["read_bw"]

    variants = {
        "scan_xs": (jax.jit(scan_xs), (x, up, down)),
        "scan_xs + cublas_only": (jax.jit(scan_xs, compiler_options=CUBLAS_ONLY), (x, up, down)),
        "scan_xs + ds_fusion": (jax.jit(scan_xs, compiler_options=DS_FUSION), (x, up, down)),
        "while_indvar + ds_fusion": (jax.jit(while_indvar, compiler_options=DS_FUSION), (x, up, down)),
        "unrolled_static": (jax.jit(unrolled_static), (x, up, down)),
        "unrolled_static + cublas_only": (jax.jit(unrolled_static, compiler_options=CUBLAS_ONLY), (x, up, down)),
        "scan_pallas": (jax.jit(scan_pallas), (x, up, down)),
        "unrolled_list": (jax.jit(unrolled_list), (x, ups, downs)),
    }
    reference = None
    records = []
    print(f"T={T} L={L} D={D} F={F} bf16, {common.device_name()}")
    for name, (fn, inputs) in variants.items():
        y = jax.block_until_ready(fn(*inputs)).astype(jnp.float32)
        reference = y if reference is None else reference
        err = float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))
        ms = common.time_fn(fn, [inputs], inner=5, reps=7, warmup=2)
        hlo = fn.lower(*inputs).compile().as_text()
        slices = hlo.count("dynamic-slice(")  # dynamic-slice instructions left in the optimised program
        frac = weight_bytes / (ms * 1e-3) / read_bw
        records.append({"variant": name, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                        "frac_read_bw": round(frac, 3), "rel_err_vs_scan_xs": err, "dynamic_slices_in_hlo": slices})
        print(f"{name:30s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  {frac:5.3f} of read bw  rel err {err:.1e}  "
              f"dynamic-slices {slices}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = common.metadata("python -m benchmarks.probe_layer_loop " + " ".join(argv or sys.argv[1:]))
        meta["read_bw_TBps"] = read_bw / 1e12
        args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()

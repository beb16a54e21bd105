"""Probe: does Triton 3.6 itself (through jax-triton) run the selective down projection faster than the same
kernel written in Pallas and compiled by XLA's Triton?

    python -m benchmarks.probe_down_jax_triton [--out OUT.json]

At bench_mlp's relu targets (D = 8192, 3,328 of 32,768 neurons, B = 16 and 128), on the kernel clock (profiler
trace, two weight sets rotated), times:
  pallas      pallas_kernels' selective_down with this device's config (tuned table or heuristics);
  raw         the same tiling (grid, blocks, split, warps) as a @triton.jit kernel called through
              jax_triton.triton_call, with `acc = tl.dot(h, w, acc)`, at the config's stages;
  raw_stage+1 the same with one stage more: Triton 3.6 gives the neuron-id load a stage of its own, so this
              keeps as many weight tiles buffered as the Pallas kernel (compiled for sm_90 here: 2 buffers of
              64 KB at 3 stages, 3 at 4; `tl.range(..., warp_specialize=True)` changed nothing, no
              warp-specialised region, as Hopper's pass wants TMA loads);
  xla         XLA's dot over the same rows copied out beforehand (a dense GEMM of the same size).
Each output is checked against an f32 reference before it is timed. Needs a CUDA GPU, triton and jax-triton
(`.whl/jt` on the GPU machine). Exploration only: nothing here is on a default path.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from pallas_kernels.selective_gemm import triton as T

import triton
import triton.language as tl


@triton.jit
def down_kernel(count_ptr, idx_ptr, h_ptr, w_ptr, y_ptr, B: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
    """y[s, b, d] = sum over this split's neuron blocks j of h[b, j] @ w[idx[j], d] (f32 partial sums)."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(1)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = offs_b < B
    count = tl.load(count_ptr)
    n_full = count // BLOCK_N
    n_blocks = tl.cdiv(count, BLOCK_N)
    per = tl.cdiv(n_blocks, SPLIT)
    lo = tl.minimum(s * per, n_blocks)
    hi = tl.minimum(lo + per, n_blocks)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j in range(lo, tl.minimum(hi, n_full)):
        ids = tl.load(idx_ptr + j * BLOCK_N + offs_n).to(tl.int64)
        ht = tl.load(h_ptr + offs_b[:, None] * C + (j * BLOCK_N + offs_n)[None, :], mask=in_b[:, None], other=0.0)
        wt = tl.load(w_ptr + ids[:, None] * D + offs_d[None, :])
        acc = tl.dot(ht, wt, acc)
    if (hi > n_full) & (lo <= n_full):  # the one block straddling `count`
        cols = n_full * BLOCK_N + offs_n
        live = cols < count
        ids = tl.load(idx_ptr + cols, mask=live, other=0).to(tl.int64)
        ht = tl.load(h_ptr + offs_b[:, None] * C + cols[None, :], mask=in_b[:, None] & live[None, :], other=0.0)
        wt = tl.load(w_ptr + ids[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
        acc = tl.dot(ht, wt, acc)
    tl.store(y_ptr + s * B * D + offs_b[:, None] * D + offs_d[None, :], acc, mask=in_b[:, None])


def raw_down(h, w, idx, count, cfg: T.DownConfig, stages: int):
    """y [B, D] = h @ w[0, idx] through down_kernel (w [1, F, D]); the split's partial sums added by XLA."""
    import jax_triton as jt
    B, C = h.shape
    D = w.shape[-1]
    y = jt.triton_call(
        jnp.reshape(jnp.asarray(count, jnp.int32), (1,)), idx, h, w, kernel=down_kernel,
        out_shape=jax.ShapeDtypeStruct((cfg.split, B, D), jnp.float32),
        grid=(triton.cdiv(D, cfg.block_d), cfg.split, triton.cdiv(B, cfg.block_b)), num_warps=cfg.num_warps,
        num_stages=stages, name="down_raw", B=B, D=D, C=C, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d, SPLIT=cfg.split)
    return y.sum(axis=0).astype(h.dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_down_jax_triton", False)
    ceiling, _ = common.read_bandwidth()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, triton {triton.__version__}: "
          f"read ceiling {ceiling / 1e12:.3f} TB/s")
    bf = jnp.bfloat16
    rows = []
    for B, D, n in ((16, 8192, 3328), (128, 8192, 3328)):
        F = 4 * n
        keys = jax.random.split(jax.random.key(B), 4)
        perm = jax.random.permutation(keys[0], F)[:n].astype(jnp.int32)
        ws = [(jax.random.normal(jax.random.fold_in(keys[1], s), (1, F, D), jnp.float32) * n ** -0.5).astype(bf)
              for s in range(2)]
        h = jax.random.normal(keys[2], (B, n), jnp.float32).astype(bf)
        ref = np.asarray(jnp.einsum("bn,nd->bd", h.astype(jnp.float32), jnp.take(ws[0][0], perm, axis=0).astype(jnp.float32)))
        cfg = T.down_config(B, D, n, dtype=bf)
        nbytes = n * D * 2
        fns = {"pallas": lambda h, w: T.selective_down(h, w, perm, n, layer=0, config=cfg),
               "raw": lambda h, w: raw_down(h, w, perm, n, cfg, cfg.num_stages),
               "raw_stage+1": lambda h, w: raw_down(h, w, perm, n, cfg, cfg.num_stages + 1)}
        row = dict(B=B, D=D, count=n, weight_mb=nbytes / 1e6, config=str(cfg))
        line = [f"B={B:3d} D={D} count={n} ({nbytes / 1e6:.1f} MB) {cfg}:"]
        for name, fn in fns.items():
            try:
                f = jax.jit(fn)
                out = np.asarray(f(h, ws[0]).astype(jnp.float32))
                rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                if not rel < 2e-2:
                    raise AssertionError(f"relative error {rel:.3g} against the f32 reference")
                us = sum(device_profile(f, [(h, w) for w in ws], calls=10)[0].values()) / 1e3
                row[name] = {"us": us, "frac": nbytes / (us * 1e-6) / ceiling, "rel_err": rel}
                line.append(f"{name} {us:6.1f} us {row[name]['frac']:.3f}")
            except Exception as e:  # noqa: BLE001  (a variant Triton declines is reported, the rest still run)
                row[name] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                line.append(f"{name} failed ({row[name]['failed'][:120]})")
        wg = [jnp.take(w[0], perm, axis=0) for w in ws]
        xla = jax.jit(lambda h, w: jnp.einsum("bn,nd->bd", h, w).astype(bf))
        us = sum(device_profile(xla, [(h, w) for w in wg], calls=10)[0].values()) / 1e3
        row["xla"] = {"us": us, "frac": nbytes / (us * 1e-6) / ceiling}
        line.append(f"xla {us:6.1f} us {row['xla']['frac']:.3f}")
        print("\n    ".join(line))
        rows.append(row)
        del ws, wg
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "triton": triton.__version__,
                       "ceiling": ceiling, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

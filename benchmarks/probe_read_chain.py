"""Probe: how close to the read ceiling can a decode step come if each of its phases were a perfect read?

    python -m benchmarks.probe_read_chain [--cases llama-3-8b:16:2048,...] [--out OUT.json]

The dense-step target is 92% of the read ceiling, the best of several XLA reductions over 2 GiB arrays
(benchmarks/common.py). A decode step cannot stream like that: each layer is a chain of dependent phases
(q/k/v, attention over the K/V cache, the output projection, gate/up, down), each one kernel at least, each
reading a few tens to a few hundred MB. This replaces every phase by XLA's own reduction over exactly that
phase's bytes (no arithmetic, no GEMM: the fastest reader we have) and times whole steps:

  - one reduction a phase: 5 kernels a layer in a dependent chain (each reduction's input is scaled by a
    number computed from the previous result, so XLA neither reorders nor merges them), then the LM head;
  - one reduction a layer: the layer's bytes as one array (the bound for a layer-persistent kernel whose
    phases cost nothing to join);
  - the selective MLP's targets (bench_mlp.FUSED_CASES): XLA's dense MLP, our two-kernel path, and the
    selected rows' bytes read as two chained reductions (up, then down: one kernel a phase) and as one (the
    bound for a fused kernel): the speedup over XLA dense each would give;
  - reductions of each phase's size alone, 16-64 of them chained over distinct arrays (one jitted call, so
    the host's dispatch is not timed): the rate one kernel of that size reaches.

Bytes per layer (bf16): q/k/v D * (N + 2K) * H, the K and V cache 2 * B * K * (ctx + 1) * H, output N * H * D,
gate/up 2 * D * F (ungated MLPs: D * F), down F * D; the LM head V * D once a step. The embedding rows and the
norms (a few KB) are left out. Wall clock per step (autotune.time_fn), the fraction divides by the ceiling
measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import bench_mlp, common
from pallas_kernels import autotune
from polar_jax.config import preset

DTYPE = jnp.bfloat16


def phase_bytes(model: str, B: int, ctx: int) -> dict[str, int]:
    """Bytes each phase of one layer reads in a dense bf16 decode step (module docstring)."""
    c = preset(model)
    D, N, K, H, F = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim
    up = (2 if c.gated_mlp else 1) * D * F
    return {"qkv": D * (N + 2 * K) * H * 2, "kv_cache": 2 * B * K * (ctx + 1) * H * 2, "o": N * H * D * 2,
            "gate_up": up * 2, "down": F * D * 2}


def _fill(nbytes: int, key) -> jax.Array:
    n = max(1024, nbytes // 2 // 1024 * 1024)
    return jax.random.normal(key, (n,), jnp.float32).astype(DTYPE)


def _read(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x's sum, after scaling x by a number (1) made from prev, so that it runs after prev's reduction."""
    one = (prev * 0 + 1).astype(x.dtype)
    return jnp.sum(x * one, dtype=jnp.float32)


def _chain(arrays: list) -> jax.Array:
    acc = jnp.zeros((), jnp.float32)
    for x in arrays:
        acc = acc + _read(x, acc)
    return acc


def _kernels(fn, arrays) -> int:
    """Kernels (fusions and custom calls) in the compiled step: to see that XLA kept one per reduction."""
    text = jax.jit(fn).lower(arrays).compile().as_text()
    entry = text[text.index("ENTRY"):].split("\n}")[0]
    return sum(1 for line in entry.splitlines() if " fusion(" in line or "custom-call(" in line)


def mlp_bounds(read_bw: float, scale: float) -> list[dict]:
    """Per target of bench_mlp.FUSED_CASES: per-MLP-call wall ms of XLA dense, our two-kernel path, and the
    selected bytes as two chained reductions and as one, with each one's speedup over XLA dense."""
    key = jax.random.key(5)
    interpret = jax.default_backend() != "gpu"
    records = []
    for variant, D, F, B, density, target in bench_mlp.FUSED_CASES:
        count = bench_mlp.neuron_count(density, F)
        if scale != 1.0:
            D, F, count = 128, 512, 64
        activation = "none" if variant == "gated" else "relu"
        wsets = bench_mlp._weights(variant, D, F, jax.random.fold_in(key, D + F))
        idxs = bench_mlp._idx_draws(F, count, jax.random.fold_in(key, count))
        x = jax.random.normal(jax.random.fold_in(key, B), (B, D), jnp.float32).astype(bench_mlp.DTYPE)
        chains = {"xla_dense": bench_mlp._chain(lambda x, w, idx: bench_mlp._xla_dense(x, w)),
                  "two_kernel": bench_mlp._chain(bench_mlp._public(count, activation, impl="triton",
                                                                   interpret=interpret))}
        ms = {k: autotune.time_fn(fn, [(x, wsets, idxs)], inner=5, reps=7, warmup=2) / bench_mlp.CHAIN
              for k, fn in chains.items()}
        del wsets
        up, down = count * D * 2 * (2 if variant == "gated" else 1), count * D * 2
        for name, phases in (("read_two_phases", (up, down)), ("read_one_phase", (up + down,))):
            arrays = [_fill(nb, jax.random.fold_in(key, 10 * i + j)) for i in range(bench_mlp.CHAIN)
                      for j, nb in enumerate(phases)]
            ms[name] = autotune.time_fn(jax.jit(_chain), [(arrays,)], inner=5, reps=7, warmup=2) / bench_mlp.CHAIN
            del arrays
        rec = dict(variant="mlp", mlp=variant, D=D, F=F, B=B, count=count, target_vs_xla=target,
                   bytes=up + down, **{f"ms_{k}": v for k, v in ms.items()},
                   **{f"speedup_{k}_vs_xla": ms["xla_dense"] / v for k, v in ms.items() if k != "xla_dense"},
                   read_fraction_two_kernel=(up + down) / (ms["two_kernel"] * 1e-3) / read_bw)
        print(f"== selective MLP {variant} D={D} B={B} count={count} (target {target}x XLA dense): XLA dense "
              f"{ms['xla_dense'] * 1e3:.1f} us; two-kernel {ms['two_kernel'] * 1e3:.1f} us "
              f"({rec['speedup_two_kernel_vs_xla']:.2f}x); the bytes as two chained reductions "
              f"{ms['read_two_phases'] * 1e3:.1f} us ({rec['speedup_read_two_phases_vs_xla']:.2f}x), as one "
              f"{ms['read_one_phase'] * 1e3:.1f} us ({rec['speedup_read_one_phase_vs_xla']:.2f}x)", flush=True)
        records.append(rec)
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="llama-2-7b:16:2048,llama-3-8b:16:2048,llama-3-8b:48:2048,"
                    "llama-3-8b:64:2048", help="model:batch:context, comma-separated (default: the targets')")
    ap.add_argument("--no-mlp", action="store_true", help="skip the selective MLP's targets")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every size by this (a CPU smoke run: 1e-4); figures then mean nothing")
    ap.add_argument("--out", help="also write the timings as JSON here")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_read_chain", args.allow_cpu)
    ceiling = common.measure_ceiling()
    read_bw = ceiling["read_bw"]
    key = jax.random.key(0)
    records = []

    def timed(name, fn, sets, nbytes, **extra):
        ms = autotune.time_fn(jax.jit(fn), sets, inner=5, reps=7, warmup=2)
        frac = nbytes / (ms * 1e-3) / read_bw
        print(f"  {name:<44s} {ms * 1e3:10.1f} us  {nbytes / 1e9:7.3f} GB  {frac:.3f} of the read ceiling",
              flush=True)
        records.append({"case": name, "us": ms * 1e3, "bytes": nbytes, "read_fraction": frac, **extra})
        return frac

    seen = set()
    for case in args.cases.split(","):
        model, B, ctx = case.split(":")
        B, ctx = int(B), int(ctx)
        cfg = preset(model)
        sizes = {k: int(v * args.scale) for k, v in phase_bytes(model, B, ctx).items()}
        head = int(cfg.vocab_size * cfg.dim * 2 * args.scale)
        print(f"== {model} B={B} ctx={ctx}: per layer " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in
                                                                   sizes.items()) + f"; LM head {head / 1e6:.0f} MB")
        for name, nb in sizes.items():  # kernels of one phase's size, chained
            if (name, nb) in seen:
                continue
            seen.add((name, nb))
            n = min(64, max(16, -(-int(8 * common.L2_BYTES) // max(nb, 1))))
            xs = [_fill(nb, jax.random.fold_in(key, i)) for i in range(n)]
            frac = timed(f"{n} reductions of {name}'s size, chained", _chain, [(xs,)], sum(x.nbytes for x in xs),
                         model=model, B=B, ctx=ctx, variant="single", phase=name, chained=n)
            print(f"    -> {xs[0].nbytes / frac / read_bw * 1e6:.1f} us a reduction (the read ceiling: "
                  f"{xs[0].nbytes / read_bw * 1e6:.1f})")
            del xs
        L = cfg.n_layers
        for variant, per_layer in (("phase", list(sizes.values())), ("layer", [sum(sizes.values())])):
            arrays = [_fill(nb, jax.random.fold_in(key, 100 + len(per_layer) * i + j)) for i in range(L)
                      for j, nb in enumerate(per_layer)]
            arrays.append(_fill(head, jax.random.fold_in(key, 99)))
            n_k = _kernels(_chain, arrays)
            timed(f"step, one reduction a {variant} ({n_k} kernels)", _chain, [(arrays,)],
                  sum(x.nbytes for x in arrays), model=model, B=B, ctx=ctx, variant=f"per_{variant}", kernels=n_k)
            del arrays
    if not args.no_mlp:
        records += mlp_bounds(read_bw, args.scale)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**common.metadata("python -m benchmarks.probe_read_chain " + " ".join(argv or [])),
                       **common.ceiling_meta(ceiling), "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()

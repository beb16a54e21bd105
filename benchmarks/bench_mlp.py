"""Sparse MLP kernel benchmark: selective_mlp (the public function) against XLA's dense MLP.

Each case times a jitted chain of CHAIN MLP calls (x <- x + mlp(x), as in the model's residual stream),
each call on a different (weight set, idx draw) pair, so launch overhead is amortised and neither the
weights nor the selected rows stay in L2 from one call to the next. Reported per call:

  ms                public function at this density (sparse kernels, or the dense path where faster)
  ms_sparse         the Triton kernels themselves (impl="triton"), also where the public function is dense
  GBps, frac_bw     bytes that must move (weights of the `count` selected neurons + x + y) / ms, and that
                    over the measured copy bandwidth
  speedup_vs_dense  our 100% path (the public function at count = F) / ms
  speedup_vs_xla    XLA's dense `act(x @ W1.T + b1) @ W2 + b2` (gated: silu(x@Wg.T) * (x@Wu.T) @ Wd) / ms
  ideal             1 / density = F / count

`python -m benchmarks.bench_mlp` runs the sweep and writes results/kernels_mlp.{json,md};
`--tune` times candidate block configurations of each kernel at a few shapes (the heuristics in
pallas_kernels/selective_gemm/triton.py come from it); `--quick` runs a handful of cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.shapes import MLP_BATCHES, MLP_DENSITIES, MLP_DIMS
from pallas_kernels.selective_gemm import api
from pallas_kernels.selective_gemm import triton as tk

CHAIN = 8          # MLP calls per timed jit call
N_WSETS = 2        # weight sets rotated through (each >= 256 MB, L2 is 60 MB)
GATED_F = {4096: 11008, 8192: 22016}
DTYPE = jnp.float16
COLUMNS = ["variant", "D", "F", "B", "density", "count", "path", "ms", "ms_sparse", "GBps", "frac_bw",
           "speedup_vs_dense", "speedup_vs_xla", "ideal"]


def mlp_width(variant: str, D: int) -> int:
    return GATED_F[D] if variant == "gated" else 4 * D


def neuron_count(density: float, F: int) -> int:
    """Selected neurons at a density: a multiple of 128 (per-layer k is), or F."""
    return F if density >= 1.0 else max(128, int(round(density * F / 128)) * 128)


def _weights(variant, D, F, key):
    """N_WSETS weight sets, each a dict of 2-D arrays (biases for relu: OPT-style)."""
    sets = []
    for s in range(N_WSETS):
        k = jax.random.split(jax.random.fold_in(key, s), 5)
        w = {"w_up": (jax.random.normal(k[0], (F, D), jnp.float32) * D ** -0.5).astype(DTYPE),
             "w_down": (jax.random.normal(k[1], (F, D), jnp.float32) * F ** -0.5).astype(DTYPE)}
        if variant == "gated":
            w["w_gate"] = (jax.random.normal(k[2], (F, D), jnp.float32) * D ** -0.5).astype(DTYPE)
        else:
            w["b_up"] = (0.02 * jax.random.normal(k[3], (F,), jnp.float32)).astype(DTYPE)
            w["b_down"] = (0.02 * jax.random.normal(k[4], (D,), jnp.float32)).astype(DTYPE)
        sets.append(jax.block_until_ready(w))
    return sets


def _idx_draws(F, count, key):
    """CHAIN sorted, duplicate-free draws of `count` neuron ids (the union of a batch comes sorted)."""
    keys = jax.random.split(key, CHAIN)
    return [jnp.sort(jax.random.permutation(k, F)[:count]).astype(jnp.int32) for k in keys]


def _chain(call):
    """jit(x, wsets, idxs) -> x after CHAIN residual steps x + call(x, wset_i, idx_i)."""
    def run(x, wsets, idxs):
        for i in range(CHAIN):
            x = x + call(x, wsets[i % N_WSETS], idxs[i % len(idxs)])
        return x
    return jax.jit(run)


def _public(count, activation, impl=None):
    def call(x, w, idx):
        return api.selective_mlp(x, w["w_up"], w["w_down"], idx, count, b_up=w.get("b_up"),
                                 b_down=w.get("b_down"), w_gate=w.get("w_gate"), activation=activation, impl=impl)
    return call


def _xla_dense(x, w):
    if "w_gate" in w:
        g = x @ w["w_gate"].T
        h = jax.nn.silu(g) * (x @ w["w_up"].T)
    else:
        h = jax.nn.relu(x @ w["w_up"].T + w["b_up"])
    y = h @ w["w_down"]
    return y + w["b_down"] if "b_down" in w else y


def _time_chain(fn, x, wsets, idxs, inner=10, reps=10):
    return common.time_fn(fn, [(x, wsets, idxs)], inner=inner, reps=reps, warmup=2) / CHAIN


def _bytes(variant, D, B, count):
    mats = 3 if variant == "gated" else 2
    return count * D * 2 * mats + 2 * B * D * 2


def run(copy_bw: float, quick: bool = False) -> list[dict]:
    """One record per (variant, D, B, density); see the module docstring for the fields."""
    cases = [(v, D) for v in ("relu", "gated") for D in MLP_DIMS]
    batches, densities = MLP_BATCHES, MLP_DENSITIES
    if quick:
        cases, batches, densities = [("relu", 8192), ("gated", 4096)], (16, 128), (0.1, 0.5, 1.0)
    records = []
    key = jax.random.key(0)
    for variant, D in cases:
        F = mlp_width(variant, D)
        activation = "none" if variant == "gated" else "relu"
        wsets = _weights(variant, D, F, jax.random.fold_in(key, D))
        xla = _chain(lambda x, w, idx: _xla_dense(x, w))
        for B in batches:
            x = jax.random.normal(jax.random.fold_in(key, B), (B, D), jnp.float32).astype(DTYPE)
            t0 = time.perf_counter()
            ms_xla = _time_chain(xla, x, wsets, [jnp.zeros((1,), jnp.int32)])
            all_idx = [jnp.arange(F, dtype=jnp.int32)]
            ms_full = _time_chain(_chain(_public(F, activation)), x, wsets, all_idx)
            for density in densities:
                count = neuron_count(density, F)
                idxs = all_idx if count == F else _idx_draws(F, count, jax.random.fold_in(key, count))
                dense = api.dense_is_faster(B, D, F, count)
                ms = ms_full if count == F else _time_chain(_chain(_public(count, activation)), x, wsets, idxs)
                ms_sparse = (_time_chain(_chain(_public(count, activation, impl="triton")), x, wsets, idxs)
                             if dense else ms)
                gbps = _bytes(variant, D, B, count) / (ms * 1e-3) / 1e9
                rec = dict(kernel="selective_mlp", variant=variant, B=B, D=D, F=F, density=density, count=count,
                           path="dense" if dense else "sparse", ms=ms, ms_sparse=ms_sparse, ms_xla=ms_xla,
                           ms_full=ms_full, GBps=gbps, frac_bw=gbps * 1e9 / copy_bw,
                           speedup_vs_dense=ms_full / ms, speedup_vs_xla=ms_xla / ms, ideal=F / count)
                records.append(rec)
                print(" ".join(f"{c}={rec[c]:.4g}" if isinstance(rec[c], float) else f"{c}={rec[c]}"
                               for c in COLUMNS), flush=True)
            print(f"# {variant} D={D} B={B}: {time.perf_counter() - t0:.1f}s", flush=True)
        del wsets
    return records


# ---------------------------------------------------------------------------------------------------
# tuning: candidate block configurations of each kernel alone

TUNE_CASES = [(8192, 16, 3328), (8192, 128, 3328), (4096, 16, 1664)]


def _up_candidates(B):
    bb = min(max(16, 1 << (B - 1).bit_length()), 128)
    C = tk.UpConfig
    out = [tk.up_config(B, 8192, 3328)]
    for bn, bk, w, s in [(16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 4, 6), (16, 256, 8, 4), (32, 256, 4, 4),
                         (32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 128, 8, 3)]:
        out.append(C(block_b=bb, block_n=bn, block_k=bk, num_warps=w, num_stages=s))
    if B > 64:
        out += [C(block_b=64, block_n=64, block_k=128, num_warps=4, num_stages=3)]
    return list(dict.fromkeys(out))


def _down_candidates(B):
    bb = min(max(16, 1 << (B - 1).bit_length()), 128)
    C = tk.DownConfig
    out = [tk.down_config(B, 8192, 3328)]
    for bn, bd, s, w, st in [(64, 64, 1, 4, 4), (128, 64, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4),
                             (64, 64, 2, 4, 4), (128, 32, 1, 4, 4), (32, 256, 4, 4, 4), (32, 64, 1, 4, 6),
                             (64, 128, 1, 8, 3), (64, 256, 2, 8, 3)]:
        out.append(C(block_b=bb, block_n=bn, block_d=bd, split=s, num_warps=w, num_stages=st))
    return list(dict.fromkeys(out))


def tune(copy_bw: float, out_path: str | None = None) -> list[dict]:
    key = jax.random.key(1)
    results = []
    by_D = {}
    for D, B, count in TUNE_CASES:
        F = 4 * D
        if D not in by_D:
            by_D.clear()
            k = jax.random.split(jax.random.fold_in(key, D), 2)
            by_D[D] = [jnp.stack([(jax.random.normal(jax.random.fold_in(k[i], s), (F, D), jnp.float32) * 0.01)
                                  .astype(DTYPE) for s in range(N_WSETS)]) for i in range(2)]  # [2, F, D] x2
        wu, wd = by_D[D]
        idxs = _idx_draws(F, count, jax.random.fold_in(key, count))
        x = jax.random.normal(jax.random.fold_in(key, B), (B, D), jnp.float32).astype(DTYPE)
        h = jax.random.normal(jax.random.fold_in(key, B + 1), (B, count), jnp.float32).astype(DTYPE)
        nbytes = count * D * 2

        for kind, cands in (("up", _up_candidates(B)), ("down", _down_candidates(B))):
            rows = []
            for cfg in cands:
                def run_chain(a, w, idxs, cfg=cfg, kind=kind):
                    for i in range(CHAIN):
                        lay = jnp.int32(i % N_WSETS)
                        if kind == "up":
                            o = tk.selective_up(a, w, idxs[i], count, layer=lay, config=cfg)
                            a = a + o[:, :1] * 1e-3
                        else:
                            o = tk.selective_down(a, w, idxs[i], count, layer=lay, config=cfg)
                            a = a + o[:, :1] * 1e-3
                    return a
                fn = jax.jit(run_chain)
                try:
                    ms = common.time_fn(fn, [((x if kind == "up" else h), (wu if kind == "up" else wd), idxs)],
                                        inner=10, reps=10, warmup=2) / CHAIN
                except Exception as e:  # noqa: BLE001  (a config Triton rejects: report and go on)
                    print(f"{kind} D={D} B={B} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(kind=kind, D=D, B=B, count=count, cfg=str(cfg), ms=ms, GBps=gbps,
                                 frac_bw=gbps * 1e9 / copy_bw))
                print(f"{kind} D={D} B={B} count={count} {cfg}: {ms * 1e3:.1f} us {gbps:.0f} GB/s", flush=True)
            rows.sort(key=lambda r: r["ms"])
            print(f"## best {kind} D={D} B={B}: {rows[0]['cfg'] if rows else None} "
                  f"{rows[0]['ms'] * 1e3 if rows else 0:.1f} us", flush=True)
            results += rows
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(results, f, indent=1)
    return results


def check() -> float:
    """Triton kernels vs the f32 reference at benchmark shapes (fresh random inputs); worst relative error."""
    from pallas_kernels.selective_gemm import reference
    from tests.tolerances import REL_TOL, rel_error
    worst = 0.0
    key = jax.random.key(7)
    for variant, D, B, count, C in [("relu", 8192, 16, 3328, 3328), ("relu", 8192, 128, 3000, 3328),
                                    ("gated", 4096, 1, 1111, 1152), ("gated", 4096, 256, 4096, 4096),
                                    ("relu", 4096, 64, 16384, 16384)]:
        F = mlp_width(variant, D)
        k = jax.random.split(jax.random.fold_in(key, B * D + count), 8)
        w = {"w_up": (jax.random.normal(k[0], (2, F, D)) * D ** -0.5).astype(DTYPE),
             "w_down": (jax.random.normal(k[1], (2, F, D)) * count ** -0.5).astype(DTYPE)}
        if variant == "gated":
            w["w_gate"] = (jax.random.normal(k[2], (2, F, D)) * D ** -0.5).astype(DTYPE)
        else:
            w["b_up"] = (0.1 * jax.random.normal(k[3], (2, F))).astype(DTYPE)
            w["b_down"] = (0.1 * jax.random.normal(k[4], (2, D))).astype(DTYPE)
        x = jax.random.normal(k[5], (B, D)).astype(DTYPE)
        idx = jax.random.permutation(k[6], F)[:C].astype(jnp.int32)
        act = "none" if variant == "gated" else "relu"
        f32 = {n: a.astype(jnp.float32) for n, a in w.items()}
        for impl in ("triton", "dense"):
            y = jax.jit(lambda x, w, idx, c: api.selective_mlp(
                x, w["w_up"], w["w_down"], idx, c, b_up=w.get("b_up"), b_down=w.get("b_down"),
                w_gate=w.get("w_gate"), activation=act, layer=jnp.int32(1), impl=impl))(x, w, idx, jnp.int32(count))
            ref = reference.selective_mlp(x.astype(jnp.float32), f32["w_up"], f32["w_down"], idx, count,
                                          b_up=f32.get("b_up"), b_down=f32.get("b_down"), w_gate=f32.get("w_gate"),
                                          activation=act, layer=1)
            err = rel_error(y, ref)
            worst = max(worst, err)
            print(f"check {impl} {variant} D={D} B={B} count={count} C={C}: rel err {err:.2e} "
                  f"({'ok' if err <= REL_TOL['float16'] else 'FAIL'})", flush=True)
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--check", action="store_true", help="only compare the kernels with the reference")
    ap.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    args = ap.parse_args()
    if args.check:
        check()
        return
    copy_bw = common.copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s on {common.device_name()}", flush=True)
    if args.tune:
        out = os.path.join(args.out, "tune_mlp.json") if args.out else None
        tune(copy_bw, out)
        return
    records = run(copy_bw, quick=args.quick)
    meta = common.metadata("python -m benchmarks.bench_mlp" + (" --quick" if args.quick else ""))
    meta["copy_bw_TBps"] = copy_bw / 1e12
    kw = {"out_dir": __import__("pathlib").Path(args.out)} if args.out else {}
    common.write_results("kernels_mlp", meta, records, COLUMNS, **kw)


if __name__ == "__main__":
    sys.exit(main())

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
`--tune` runs candidate block configurations of each kernel at a few shapes once each, between marker
kernels, for Nsight Compute (`ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,
dram__bytes_write.sum python -m benchmarks.bench_mlp --tune > log; python -m benchmarks.bench_mlp
--parse-ncu log`); the heuristics in pallas_kernels/selective_gemm/triton.py come from it.
`--quick` runs a handful of cases.
"""

from __future__ import annotations

import argparse
import json
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
# tuning: candidate block configurations of each kernel alone, timed by Nsight Compute (kernel time with
# cold caches) or, without it, by the chained host timing above.

U, Dn = tk.UpConfig, tk.DownConfig
TUNE = [  # kind, variant, D, B, count, config
    *[("up", "relu", 8192, 16, 3328, c) for c in [
        U(16, 16, 256, 1, 4, 4), U(16, 16, 256, 2, 4, 4), U(16, 16, 256, 2, 4, 5), U(16, 16, 128, 2, 4, 6),
        U(16, 32, 256, 2, 4, 4), U(16, 16, 256, 4, 4, 4), U(16, 32, 128, 2, 4, 5), U(16, 16, 512, 2, 4, 3)]],
    *[("up", "relu", 8192, 128, 3328, c) for c in [
        U(128, 32, 128, 1, 4, 4), U(128, 64, 64, 2, 4, 4), U(128, 64, 64, 4, 4, 4), U(128, 64, 128, 2, 4, 3),
        U(128, 128, 64, 4, 8, 3), U(64, 64, 128, 2, 4, 3), U(128, 32, 128, 2, 4, 4)]],
    *[("up", "relu", 4096, 16, 1664, c) for c in [
        U(16, 16, 128, 1, 4, 6), U(16, 16, 256, 2, 4, 4), U(16, 16, 128, 2, 4, 5), U(16, 16, 256, 4, 4, 4)]],
    *[("up", "gated", 8192, 16, 2304, c) for c in [U(16, 16, 256, 2, 4, 4), U(16, 16, 128, 2, 4, 5),
                                                    U(16, 16, 256, 1, 4, 4)]],
    *[("down", "relu", 8192, 16, 3328, c) for c in [
        Dn(16, 64, 64, 1, 4, 4), Dn(16, 64, 128, 2, 4, 4), Dn(16, 64, 128, 4, 4, 4), Dn(16, 32, 128, 4, 4, 5),
        Dn(16, 64, 256, 4, 4, 3), Dn(16, 128, 64, 2, 4, 3), Dn(16, 64, 64, 2, 4, 4), Dn(16, 32, 256, 8, 4, 4)]],
    *[("down", "relu", 8192, 128, 3328, c) for c in [
        Dn(128, 64, 128, 2, 4, 3), Dn(128, 64, 128, 1, 4, 3), Dn(128, 64, 64, 1, 4, 3), Dn(128, 32, 128, 2, 4, 4),
        Dn(128, 64, 256, 2, 8, 3), Dn(64, 64, 128, 1, 4, 3)]],
    *[("down", "relu", 4096, 16, 1664, c) for c in [
        Dn(16, 64, 64, 2, 4, 4), Dn(16, 64, 128, 4, 4, 4), Dn(16, 32, 64, 4, 4, 5), Dn(16, 64, 64, 1, 4, 4)]],
    *[(k, "relu", 8192, B, c, None) for k in ("mlp", "xla") for B in (16, 128) for c in (3328,)],
    *[(k, "gated", 4096, B, c, None) for k in ("mlp", "xla") for B in (16,) for c in (1152,)],
]


def _tune_inputs(kind, variant, D, B, count, key):
    F = mlp_width(variant, D)
    k = jax.random.split(key, 6)
    w = lambda i: (jax.random.normal(k[i], (N_WSETS, F, D), jnp.float32) * 0.01).astype(DTYPE)  # [2, F, D]
    idx = jnp.sort(jax.random.permutation(k[5], F)[:count]).astype(jnp.int32)
    if kind == "up":
        x = jax.random.normal(k[3], (B, D), jnp.float32).astype(DTYPE)
        return dict(x=x, w_up=w(0), w_gate=w(1) if variant == "gated" else None, idx=idx)
    if kind == "down":
        return dict(h=jax.random.normal(k[3], (B, count), jnp.float32).astype(DTYPE), w_down=w(0), idx=idx)
    x = jax.random.normal(k[3], (B, D), jnp.float32).astype(DTYPE)
    return dict(x=x, w_up=w(0), w_down=w(1), w_gate=w(2) if variant == "gated" else None, idx=idx)


def _tune_fn(kind, variant, count, cfg):
    act = "none" if variant == "gated" else "relu"
    if kind == "up":
        return lambda p, l: tk.selective_up(p["x"], p["w_up"], p["idx"], count, w_gate=p["w_gate"], layer=l,
                                            activation=act, config=cfg)
    if kind == "down":
        return lambda p, l: tk.selective_down(p["h"], p["w_down"], p["idx"], count, layer=l, config=cfg)
    if kind == "mlp":
        return lambda p, l: api.selective_mlp(p["x"], p["w_up"], p["w_down"], p["idx"], count, w_gate=p["w_gate"],
                                              layer=l, activation=act)
    def xla(p, l):
        w = {n: p[n][l] for n in ("w_up", "w_down", "w_gate") if p[n] is not None}
        return _xla_dense(p["x"], {**w, "b_up": jnp.zeros((), DTYPE)} if "w_gate" not in w else w)
    return xla


def _marker(i):
    """A trivial kernel named mark_<i>: it separates the cases in the Nsight Compute kernel list."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def k(o_ref):
        o_ref[...] = jnp.zeros((16,), jnp.float32)
    return pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name=f"mark_{i}",
                          interpret=jax.default_backend() == "cpu", compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))()


def profile(timed: bool):
    """Run each TUNE case once after warm-up, between markers (for `ncu`); with timed, also chain-time it."""
    key = jax.random.key(3)
    inputs = {}
    for i, (kind, variant, D, B, count, cfg) in enumerate(TUNE):
        ik = (kind, variant, D, B, count)
        if ik not in inputs:
            inputs.clear()
            inputs[ik] = _tune_inputs(kind, variant, D, B, count, jax.random.fold_in(key, i))
        p = inputs[ik]
        fn = jax.jit(_tune_fn(kind, variant, count, cfg))
        try:
            for l in range(2):
                jax.block_until_ready(fn(p, jnp.int32(l)))
        except Exception as e:  # noqa: BLE001  (a config Triton rejects: report and go on)
            print(f"case {i} {kind} {variant} D={D} B={B} count={count} {cfg}: FAILED {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)
            continue
        jax.block_until_ready(_marker(i))
        jax.block_until_ready(fn(p, jnp.int32(1)))
        msg = f"case {i} {kind} {variant} D={D} B={B} count={count} {cfg}"
        if timed:
            ms = common.time_fn(fn, [(p, jnp.int32(l)) for l in range(2)], inner=10, reps=10)
            msg += f": {ms * 1e3:.1f} us (host-timed, pipelined)"
        print(msg, flush=True)
    jax.block_until_ready(_marker(len(TUNE)))


def parse_ncu(path: str) -> None:
    """Sum kernel time and DRAM bytes between markers of an `ncu --csv --page raw` log; print per case."""
    import csv
    rows = [r for r in csv.DictReader(l for l in open(path) if l.startswith('"'))]
    rows = [r for r in rows if r.get("ID", "").isdigit()]
    case, acc = None, []
    out = []
    for r in rows + [{"Kernel Name": "mark_end"}]:
        name = r["Kernel Name"]
        if name.startswith("mark_"):
            if case is not None and acc:
                out.append((case, acc))
            case, acc = name[5:], []
            continue
        if case is not None:
            acc.append((name[:40], float(r["gpu__time_duration.sum"]), float(r["dram__bytes_read.sum"]),
                        float(r["dram__bytes_write.sum"])))
    for case, ks in out:
        first = ks
        t = sum(k[1] for k in first) * 1e-3
        rd = sum(k[2] for k in first) / 1e6
        wr = sum(k[3] for k in first) / 1e6
        parts = " + ".join(f"{k[0]} {k[1] * 1e-3:.1f}" for k in first)
        print(f"case {case}: {t:.1f} us, DRAM read {rd:.1f} MB write {wr:.1f} MB, "
              f"{(rd + wr) / max(t, 1e-9) * 1e3:.0f} GB/s  [{parts}]")


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
    ap.add_argument("--tune", action="store_true", help="time the TUNE configurations (run under ncu)")
    ap.add_argument("--timed", action="store_true", help="with --tune: also chain-time each configuration")
    ap.add_argument("--parse-ncu", default=None, help="summarise an ncu --csv --page raw log of --tune")
    ap.add_argument("--check", action="store_true", help="only compare the kernels with the reference")
    ap.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if args.parse_ncu:
        parse_ncu(args.parse_ncu)
        return
    if args.tune:
        profile(args.timed)
        return
    copy_bw = common.copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s on {common.device_name()}", flush=True)
    records = run(copy_bw, quick=args.quick)
    meta = common.metadata("python -m benchmarks.bench_mlp" + (" --quick" if args.quick else ""))
    meta["copy_bw_TBps"] = copy_bw / 1e12
    kw = {"out_dir": __import__("pathlib").Path(args.out)} if args.out else {}
    common.write_results("kernels_mlp", meta, records, COLUMNS, **kw)


if __name__ == "__main__":
    sys.exit(main())

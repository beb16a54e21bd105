"""Sparse MLP kernel benchmark: selective_mlp (the public function) against XLA's dense MLP.

Each case runs a jitted chain of CHAIN MLP calls (x <- x + mlp(x), as in the model's residual stream),
each call on a different (weight set, idx draw) pair (weight sets alternate, each >= 256 MB, and CHAIN is
even, so no call reads the weights of the call before it). Two clocks, both per MLP call, both reported,
every figure named by its clock (suffix _kernel or _wall):

  kernel   the sum of the GPU kernels' durations, read from a JAX profiler trace (it leaves out launch gaps
           between kernels, which CUDA graphs or a longer stream of work hide). Where no GPU trace can be
           read (no GPU, profiler error), the _kernel figures are NaN and the output and JSON say why:
           never replaced by the wall clock.
  wall     host-timed pipelined calls (benchmarks.common.time_fn): kernels plus the gaps between them

Record fields:
  density_requested, count, density
                    the nominal density, the neurons that ran (a multiple of 128, or F) and count / F
  ms_*              the public function at this density (sparse kernels, or the dense path where faster)
  ms_sparse_kernel  the Triton kernels themselves (impl="triton"), also where the public function is dense
  GBps_*, frac_read_bw_*
                    bytes that must move (weights of the `count` selected neurons + x + y) / ms, and that
                    over the measured streaming-read bandwidth (the ceiling; see benchmarks/common.py)
  speedup_vs_dense_*  our 100% path (the public function at count = F, i.e. the dense path) / ms
  speedup_vs_xla_*  XLA's dense `act(x @ W1.T + b1) @ W2 + b2` (gated: silu(x@Wg.T) * (x@Wu.T) @ Wd) / ms
  ideal             1 / density = F / count

`python -m benchmarks.bench_mlp` runs the sweep and writes results/kernels_mlp.{json,md};
`--tune` times candidate block configurations of each kernel alone at a few shapes (kernel time, with
the names and times of every kernel involved); the heuristics in pallas_kernels/selective_gemm/triton.py
come from it. `--quick` runs a handful of cases; `--check` compares the kernels with the reference at
benchmark shapes. `--fused` (a short run, results/kernels_mlp_fused.{json,md}) times the fused kernel
(impl="fused": up and down in one pass) beside the two-kernel path (impl="triton") and XLA's dense MLP
at issue 11's target shapes, both clocks, with the speedup each reaches and the target it is held to;
`--fused-tune` first times the fused kernel's candidate configs there (pallas_kernels.autotune).
(Nsight Compute crashed under JAX on the H200 here, hence the profiler trace.)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.shapes import MLP_BATCHES, MLP_DENSITIES, MLP_DIMS
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import api, fused
from pallas_kernels.selective_gemm import triton as tk

CHAIN = 8          # MLP calls per timed jit call
N_WSETS = 2        # weight sets rotated through (each >= 256 MB, L2 is 60 MB)
GATED_F = {4096: 11008, 8192: 22016}
DTYPE = jnp.float16
COLUMNS = ["variant", "D", "F", "B", "density_requested", "count", "density", "path", "ms_kernel", "ms_wall",
           "ms_sparse_kernel", "ms_xla_kernel", "ms_xla_wall", "frac_read_bw_kernel", "frac_read_bw_wall",
           "speedup_vs_dense_kernel", "speedup_vs_dense_wall", "speedup_vs_xla_kernel", "speedup_vs_xla_wall",
           "ideal"]
KERNEL_CLOCK = "kernel: sum of GPU kernel durations from a JAX profiler trace, per MLP call (`*_kernel` columns)"
WALL_CLOCK = "wall: host-timed pipelined chains of calls, per MLP call (`*_wall` columns)"


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


def _public(count, activation, impl=None, interpret=None):
    def call(x, w, idx):
        return api.selective_mlp(x, w["w_up"], w["w_down"], idx, count, b_up=w.get("b_up"),
                                 b_down=w.get("b_down"), w_gate=w.get("w_gate"), activation=activation, impl=impl,
                                 interpret=interpret)
    return call


def _xla_dense(x, w):
    if "w_gate" in w:
        g = x @ w["w_gate"].T
        h = jax.nn.silu(g) * (x @ w["w_up"].T)
    else:
        h = jax.nn.relu(x @ w["w_up"].T + w["b_up"])
    y = h @ w["w_down"]
    return y + w["b_down"] if "b_down" in w else y


def gpu_kernel_events(fn, arg_sets, calls: int = 2) -> list[tuple[str, int, int]]:
    """(name, start ns, duration ns) of every GPU kernel of `calls` calls of fn over arg_sets (after one warm-up
    call per set), from a profiler trace; memcpys left out. Empty when the trace holds no GPU kernels."""
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    try:
        out = None
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
    finally:
        jax.profiler.stop_trace()
    events = []
    for path in glob.glob(f"{d}/**/*.xplane.pb", recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events
                               if "memcpy" not in ev.name.lower()]
    shutil.rmtree(d, ignore_errors=True)
    return events


def device_profile(fn, arg_sets, calls: int = 2, launches: dict | None = None):
    """({kernel name: ns per fn call}, device span ns per fn call) of fn over arg_sets, from a profiler trace;
    `launches`, if given, is filled with {kernel name: launches per fn call}.

    An empty dict (and NaN span) when the trace holds no GPU kernels (no GPU)."""
    events = gpu_kernel_events(fn, arg_sets, calls)
    kernels = collections.defaultdict(float)
    for name, _, ns in events:
        kernels[name] += ns / calls
        if launches is not None:
            launches[name] = launches.get(name, 0) + 1 / calls
    if not events:
        return {}, float("nan")
    span = max(t + ns for _, t, ns in events) - min(t for _, t, _ in events)
    return dict(kernels), span / calls


def _measure(fn, arg_sets, wall=True, unavailable=None):
    """Per MLP call: (kernel ms, wall ms, {kernel: ms}) of a CHAIN-call jitted fn.

    Kernel ms is NaN when no GPU kernel can be read from a trace; the reason is added to the set
    `unavailable`. Wall ms is NaN unless `wall`."""
    nan = float("nan")
    try:
        kernels, _ = device_profile(fn, arg_sets)
        reason = None if kernels else f"no GPU kernels in the profiler trace (backend {jax.default_backend()})"
    except Exception as e:  # noqa: BLE001  (the profiler failing must not stop the wall clock; it is reported)
        kernels, reason = {}, f"profiler failed: {type(e).__name__}: {str(e)[:200]}"
    if reason and unavailable is not None:
        unavailable.add(reason)
    per = {k: v * 1e-6 / CHAIN for k, v in kernels.items()}
    ms_wall = common.time_fn(fn, arg_sets, inner=5, reps=7, warmup=1) / CHAIN if wall else nan
    return (sum(per.values()) if per else nan), ms_wall, per


def _bytes(variant, D, B, count):
    mats = 3 if variant == "gated" else 2
    return count * D * 2 * mats + 2 * B * D * 2


def run(read_bw: float, quick: bool = False, variants=("relu", "gated"), log_path: str | None = None,
        unavailable: set | None = None) -> list[dict]:
    """One record per (variant, D, B, density); see the module docstring for the fields. read_bw: the ceiling.

    log_path: also append each record to this file as a JSON line as soon as it is measured.
    unavailable: a set that collects why the kernel clock could not be read (if it could not).
    """
    unavailable = set() if unavailable is None else unavailable
    m = lambda *a, **kw: _measure(*a, unavailable=unavailable, **kw)  # noqa: E731
    cases = [(v, D) for v in variants for D in MLP_DIMS]
    batches, densities = MLP_BATCHES, MLP_DENSITIES
    if quick:
        cases = [c for c in [("relu", 8192), ("gated", 4096)] if c[0] in variants]
        batches, densities = (16, 128), (0.1, 0.5, 1.0)
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
            ms_xla, wall_xla, _ = m(xla, [(x, wsets, [jnp.zeros((1,), jnp.int32)])])
            all_idx = [jnp.arange(F, dtype=jnp.int32)]
            ms_full, wall_full, _ = m(_chain(_public(F, activation)), [(x, wsets, all_idx)])
            for density in densities:
                count = neuron_count(density, F)
                idxs = all_idx if count == F else _idx_draws(F, count, jax.random.fold_in(key, count))
                dense = api.dense_is_faster(B, D, F, count)
                if count == F:
                    ms, ms_wall = ms_full, wall_full
                else:
                    ms, ms_wall, _ = m(_chain(_public(count, activation)), [(x, wsets, idxs)])
                ms_sparse = ms
                if dense:
                    ms_sparse, _, _ = m(_chain(_public(count, activation, impl="triton")),
                                               [(x, wsets, idxs)], wall=False)
                nbytes = _bytes(variant, D, B, count)
                rec = dict(kernel="selective_mlp", variant=variant, B=B, D=D, F=F, density_requested=density,
                           count=count, density=count / F, path="dense" if dense else "sparse",
                           kernel_clock="profiler" if ms == ms else "unavailable", ms_kernel=ms, ms_wall=ms_wall,
                           ms_sparse_kernel=ms_sparse, ms_xla_kernel=ms_xla, ms_xla_wall=wall_xla,
                           ms_full_kernel=ms_full, ms_full_wall=wall_full, ideal=F / count,
                           read_bw_TBps=read_bw / 1e12)
                for clock in ("kernel", "wall"):
                    t = rec[f"ms_{clock}"] * 1e-3
                    rec[f"GBps_{clock}"] = nbytes / t / 1e9
                    rec[f"frac_read_bw_{clock}"] = nbytes / t / read_bw
                    rec[f"speedup_vs_dense_{clock}"] = rec[f"ms_full_{clock}"] / rec[f"ms_{clock}"]
                    rec[f"speedup_vs_xla_{clock}"] = rec[f"ms_xla_{clock}"] / rec[f"ms_{clock}"]
                records.append(rec)
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                print(" ".join(f"{c}={rec[c]:.4g}" if isinstance(rec[c], float) else f"{c}={rec[c]}"
                               for c in COLUMNS), flush=True)
            print(f"# {variant} D={D} B={B}: {time.perf_counter() - t0:.1f}s", flush=True)
        del wsets
    return records


# ---------------------------------------------------------------------------------------------------
# --fused: the fused kernel against the two-kernel path and XLA dense at issue 11's target shapes

# variant, D, F, B, density, issue 11's target speedup over XLA dense (wall-clock)
FUSED_CASES = [
    ("relu", 8192, 4 * 8192, 16, 0.1, 8.0),
    ("relu", 8192, 4 * 8192, 128, 0.1, 6.0),
    ("gated", 8192, GATED_F[8192], 48, 0.3, 2.6),
    ("gated", 4096, GATED_F[4096], 48, 0.3, 2.6),
]
FUSED_COLUMNS = ["variant", "D", "F", "B", "density", "count", "target_vs_xla", "ms_fused_wall", "ms_two_kernel_wall",
                 "ms_xla_wall", "speedup_fused_vs_xla_wall", "speedup_two_kernel_vs_xla_wall",
                 "speedup_fused_vs_two_kernel_wall", "ms_fused_kernel", "ms_two_kernel_kernel", "ms_xla_kernel",
                 "speedup_fused_vs_xla_kernel", "speedup_fused_vs_two_kernel_kernel", "frac_read_bw_fused_wall",
                 "ideal", "fused_rel_diff_vs_two_kernel"]


def run_fused(read_bw: float, log_path: str | None = None, unavailable: set | None = None) -> list[dict]:
    """One record per case of FUSED_CASES: fused, two-kernel and XLA dense, per MLP call on both clocks.

    Each record also names the kernels of each path with their kernel-clock ms (`kernels_*`), so the
    fused kernel's own time is visible beside the small XLA fusions around it.
    """
    unavailable = set() if unavailable is None else unavailable
    interpret = jax.default_backend() != "gpu"  # --allow-cpu: the Pallas kernels in the interpreter
    key = jax.random.key(1)
    records = []
    for variant, D, F, B, density, target in FUSED_CASES:
        t0 = time.perf_counter()
        activation = "none" if variant == "gated" else "relu"
        wsets = _weights(variant, D, F, jax.random.fold_in(key, D + F))
        count = neuron_count(density, F)
        idxs = _idx_draws(F, count, jax.random.fold_in(key, count))
        x = jax.random.normal(jax.random.fold_in(key, B), (B, D), jnp.float32).astype(DTYPE)
        args = [(x, wsets, idxs)]
        rec = dict(kernel="selective_mlp_fused", variant=variant, D=D, F=F, B=B, density=count / F, count=count,
                   target_vs_xla=target, ideal=F / count, read_bw_TBps=read_bw / 1e12,
                   fused_config=dataclasses.asdict(fused.fused_config(B, D, count, variant == "gated", DTYPE)))
        paths = {"xla": _chain(lambda x, w, idx: _xla_dense(x, w)),
                 "two_kernel": _chain(_public(count, activation, impl="triton", interpret=interpret)),
                 "fused": _chain(_public(count, activation, impl="fused", interpret=interpret))}
        outs = {}
        for name, fn in paths.items():
            rec[f"ms_{name}_kernel"], rec[f"ms_{name}_wall"], per = _measure(fn, args, unavailable=unavailable)
            rec[f"kernels_{name}"] = {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
            outs[name] = jnp.asarray(fn(*args[0]), jnp.float32)
        # The chains' results must agree (a fused kernel that drops or repeats an atomic add is fast and wrong).
        diff = jnp.linalg.norm(outs["fused"] - outs["two_kernel"]) / jnp.linalg.norm(outs["two_kernel"])
        rec["fused_rel_diff_vs_two_kernel"] = float(diff)
        if not rec["fused_rel_diff_vs_two_kernel"] <= 1e-2:
            print(f"!!!!!!!! WARNING: {_label(rec)}: the fused chain differs from the two-kernel chain by "
                  f"{rec['fused_rel_diff_vs_two_kernel']:.3g} (relative)", file=sys.stderr, flush=True)
        nbytes = _bytes(variant, D, B, count)
        for clock in ("kernel", "wall"):
            for name in ("fused", "two_kernel"):
                rec[f"speedup_{name}_vs_xla_{clock}"] = rec[f"ms_xla_{clock}"] / rec[f"ms_{name}_{clock}"]
            rec[f"speedup_fused_vs_two_kernel_{clock}"] = rec[f"ms_two_kernel_{clock}"] / rec[f"ms_fused_{clock}"]
            rec[f"frac_read_bw_fused_{clock}"] = nbytes / (rec[f"ms_fused_{clock}"] * 1e-3) / read_bw
        records.append(rec)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{c}={rec[c]:.4g}" if isinstance(rec[c], float) else f"{c}={rec[c]}" for c in FUSED_COLUMNS)
              + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
        del wsets
    return records


# ---------------------------------------------------------------------------------------------------
# tuning: candidate block configurations of each kernel alone (kernel time, every kernel named)

U, Dn = tk.UpConfig, tk.DownConfig  # U(block_b, block_n, block_k, split_k, warps, stages); Dn(b, n, d, split, ..)
TUNE = [  # kind, variant, D, B, count, config (None: the heuristic's)
    *[("up", "relu", 8192, 16, 3328, c) for c in [
        None, U(16, 16, 256, 1, 4, 4), U(16, 16, 256, 1, 4, 6), U(16, 16, 512, 1, 4, 4), U(16, 16, 256, 2, 4, 6),
        U(16, 32, 256, 2, 4, 4), U(16, 16, 128, 2, 4, 8), U(16, 16, 256, 1, 2, 6), U(16, 16, 256, 4, 4, 4)]],
    *[("up", "relu", 8192, 128, 3328, c) for c in [
        None, U(128, 32, 128, 1, 4, 4), U(128, 64, 64, 2, 4, 4), U(128, 64, 64, 1, 4, 5), U(128, 64, 128, 2, 8, 3),
        U(128, 128, 64, 2, 8, 3), U(64, 64, 128, 2, 4, 3)]],
    *[("up", "relu", 4096, 16, 1664, c) for c in [
        None, U(16, 16, 128, 1, 4, 6), U(16, 16, 256, 1, 4, 6), U(16, 16, 256, 2, 4, 4), U(16, 16, 128, 2, 4, 6)]],
    *[("up", "gated", 8192, 16, 2304, c) for c in [
        None, U(16, 16, 256, 1, 4, 4), U(16, 16, 256, 2, 4, 4), U(16, 16, 128, 2, 4, 6), U(16, 16, 256, 1, 4, 5)]],
    *[("up", "relu", 8192, 256, 3328, c) for c in [None, U(128, 128, 64, 2, 8, 3)]],
    *[("down", "relu", 8192, 16, 3328, c) for c in [
        None, Dn(16, 64, 128, 4, 4, 4), Dn(16, 64, 128, 2, 4, 4), Dn(16, 64, 64, 4, 4, 4), Dn(16, 64, 64, 2, 4, 5),
        Dn(16, 32, 128, 8, 4, 6), Dn(16, 128, 128, 4, 4, 3), Dn(16, 64, 256, 4, 4, 3), Dn(16, 64, 128, 1, 4, 4)]],
    *[("down", "relu", 8192, 128, 3328, c) for c in [
        None, Dn(128, 64, 128, 1, 4, 3), Dn(128, 64, 64, 1, 4, 3), Dn(128, 32, 128, 2, 4, 4), Dn(128, 64, 128, 4, 4, 3),
        Dn(128, 64, 256, 2, 8, 3), Dn(64, 64, 128, 2, 4, 3)]],
    *[("down", "relu", 4096, 16, 1664, c) for c in [
        None, Dn(16, 64, 64, 4, 4, 4), Dn(16, 32, 64, 4, 4, 6), Dn(16, 64, 64, 8, 4, 4), Dn(16, 64, 128, 4, 4, 4)]],
    *[("down", "relu", 8192, 256, 3328, c) for c in [None, Dn(128, 64, 128, 2, 4, 3)]],
    *[(k, v, D, B, c, None) for k in ("mlp", "xla") for v, D, B, c in
      [("relu", 8192, 16, 3328), ("relu", 8192, 128, 3328), ("gated", 4096, 16, 1152)]],
]

# The projections of a llama-2-7b decode step at batch 64 (every row selected): q/k/v (12288 rows),
# the gated MLP up (11008), the MLP down (11008) and the attention output (4096).
TUNE_DECODE = [
    *[("up", "relu", 4096, 64, 12288, c) for c in [
        None, U(64, 64, 64, 1, 4, 4), U(64, 64, 128, 1, 4, 3), U(64, 128, 64, 1, 8, 3), U(64, 32, 128, 1, 4, 4),
        U(64, 64, 64, 2, 4, 4), U(32, 64, 128, 1, 4, 4), U(64, 64, 256, 1, 8, 2), U(16, 64, 256, 1, 4, 4)]],
    *[("up", "gated", 4096, 64, 11008, c) for c in [
        None, U(64, 64, 64, 1, 4, 4), U(64, 32, 128, 1, 4, 4), U(64, 64, 128, 1, 4, 3), U(64, 128, 64, 1, 8, 3),
        U(32, 64, 128, 1, 4, 3)]],
    *[("down", "relu", 4096, 64, 11008, c) for c in [
        None, Dn(64, 64, 128, 1, 4, 3), Dn(64, 64, 128, 2, 4, 3), Dn(64, 64, 64, 2, 4, 4), Dn(64, 128, 128, 2, 8, 3),
        Dn(64, 32, 128, 4, 4, 4), Dn(64, 64, 256, 2, 8, 3), Dn(64, 128, 64, 4, 4, 3)]],
    *[("down", "relu", 4096, 64, 4096, c) for c in [
        None, Dn(64, 64, 128, 2, 4, 3), Dn(64, 64, 64, 4, 4, 4), Dn(64, 64, 128, 4, 4, 3), Dn(64, 32, 64, 8, 4, 4),
        Dn(64, 128, 128, 2, 8, 3)]],
]


def _tune_inputs(kind, variant, D, B, count, key):
    F = mlp_width(variant, D)
    k = jax.random.split(key, 6)
    w = lambda i: (jax.random.normal(k[i], (N_WSETS, F, D), jnp.float32) * 0.01).astype(DTYPE)  # [2, F, D]
    idxs = _idx_draws(F, count, k[5])
    x = jax.random.normal(k[3], (B, D), jnp.float32).astype(DTYPE)
    if kind == "up":
        return dict(x=x, w_up=w(0), w_gate=w(1) if variant == "gated" else None, idxs=idxs)
    if kind == "down":
        return dict(h=jax.random.normal(k[4], (B, count), jnp.float32).astype(DTYPE), w_down=w(0), idxs=idxs)
    return dict(x=x, w_up=w(0), w_down=w(1), w_gate=w(2) if variant == "gated" else None, idxs=idxs)


def _tune_chain(kind, variant, count, cfg):
    """jit(p) running CHAIN calls of one kernel (layer i % 2, idx draw i), each feeding the next."""
    act = "none" if variant == "gated" else "relu"

    def one(p, a, i):
        l, idx = jnp.int32(i % N_WSETS), p["idxs"][i]
        if kind == "up":
            o = tk.selective_up(a, p["w_up"], idx, count, w_gate=p["w_gate"], layer=l, activation=act, config=cfg)
            return a + o[:, :1] * 1e-3
        if kind == "down":
            return a + tk.selective_down(a, p["w_down"], idx, count, layer=l, config=cfg)[:, :1] * 1e-3
        if kind == "mlp":
            return a + api.selective_mlp(a, p["w_up"], p["w_down"], idx, count, w_gate=p["w_gate"], layer=l,
                                         activation=act)
        w = {n: p[n][i % N_WSETS] for n in ("w_up", "w_down", "w_gate") if p[n] is not None}
        return a + _xla_dense(a, w if "w_gate" in w else {**w, "b_up": jnp.zeros((), DTYPE)})

    def chain(p):
        a = p["h"] if kind == "down" else p["x"]
        for i in range(CHAIN):
            a = one(p, a, i)
        return a
    return jax.jit(chain)


def tune(cases=TUNE) -> None:
    """Print each configuration's kernel-clock time per call (profiler trace; NaN, said once, without one)."""
    unavailable = set()
    key = jax.random.key(3)
    inputs = {}
    for i, (kind, variant, D, B, count, cfg) in enumerate(cases):
        ik = (kind in ("mlp", "xla"), kind, variant, D, B, count)
        if ik not in inputs:
            inputs.clear()
            inputs[ik] = _tune_inputs(kind, variant, D, B, count, jax.random.fold_in(key, i))
        p = inputs[ik]
        if cfg is None and kind in ("up", "down"):
            cfg = (tk.up_heuristic if kind == "up" else tk.down_heuristic)(B, D, count)
            cfg_s = f"heuristic {cfg}"
        else:
            cfg_s = str(cfg)
        t0 = time.perf_counter()
        try:
            ms, _, per = _measure(_tune_chain(kind, variant, count, cfg), [(p,)], wall=False, unavailable=unavailable)
        except Exception as e:  # noqa: BLE001  (a config Triton rejects: report and go on)
            print(f"tune {kind} {variant} D={D} B={B} count={count} {cfg_s}: FAILED {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)
            continue
        parts = ", ".join(f"{k[:32]} {v * 1e3:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"tune {kind} {variant} D={D} B={B} count={count} {cfg_s}: {ms * 1e3:.1f} us kernel clock  "
              f"[{parts}]  ({time.perf_counter() - t0:.1f}s)", flush=True)
    for reason in sorted(unavailable):
        print(f"WARNING: kernel clock unavailable: {reason}", flush=True)


def check() -> bool:
    """Triton kernels vs the f32 reference at benchmark shapes (fresh random inputs); True if all pass."""
    from pallas_kernels.selective_gemm import reference
    from tests.tolerances import REL_TOL, rel_error
    all_ok = True
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
            ok = err <= REL_TOL["float16"]
            all_ok &= ok
            print(f"check {impl} {variant} D={D} B={B} count={count} C={C}: rel err {err:.2e} "
                  f"({'ok' if ok else 'FAIL'})", flush=True)
    return all_ok


def clock_meta(unavailable: set) -> dict:
    """The clocks lines of the result files; the kernel clock's absence and why, when it is absent."""
    if not unavailable:
        return {"clocks": [KERNEL_CLOCK, WALL_CLOCK], "kernel_clock": "profiler"}
    why = "; ".join(sorted(unavailable))
    print(f"WARNING: kernel clock unavailable ({why}): *_kernel figures are NaN, not replaced by wall time",
          flush=True)
    return {"clocks": [f"kernel: UNAVAILABLE ({why}); `*_kernel` columns are NaN", WALL_CLOCK],
            "kernel_clock": f"unavailable: {why}"}


def _label(r: dict) -> str:
    return f"{r['variant']} D={r['D']} B={r['B']} count={r['count']}"


def _finish(meta: dict, records: list[dict], out_dir: pathlib.Path) -> int:
    warnings = common.check_ceiling(records, ["frac_read_bw_kernel", "frac_read_bw_wall"], _label)
    common.write_results("kernels_mlp", dict(meta, warnings=warnings), records, COLUMNS, out_dir=out_dir)
    return 3 if warnings else 0


def tune_fused(out_dir: pathlib.Path) -> dict:
    """Time the fused kernel's candidate configs (pallas_kernels.autotune, wall clock) at each case's shape
    class; the winners go to the user cache (so this process's --fused run uses them) and, in the shipped
    table format, to OUT/tuned_fused.json. Returns the entries."""
    device = autotune.device_kind()
    entries = {}
    for variant, D, F, B, density, _ in FUSED_CASES:
        shape = dict(B=B, D=D, count=neuron_count(density, F), gated=variant == "gated", dtype=DTYPE)
        t0 = time.perf_counter()
        result = autotune.tune("selective_mlp_fused", shape)
        e = result["entry"]
        print(f"tune {result['key']}: best {result['best']} {e['ms'] * 1e3:.1f} us, heuristic "
              f"{(e['heuristic_ms'] or float('nan')) * 1e3:.1f} us ({time.perf_counter() - t0:.1f}s)", flush=True)
        entries[result["key"]] = e
    autotune.save(autotune.user_file(device), device, entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    autotune.write_table(out_dir / "tuned_fused.json", device, entries)
    return entries


def _run_fused_main(ceiling: dict, out_dir: pathlib.Path, tuned: bool, name: str) -> int:
    command = "python -m benchmarks.bench_mlp " + ("--fused-tune" if tuned else "--fused") + (
        f" --name {name}" if name != "kernels_mlp_fused" else "")
    meta = dict(common.metadata(command), **common.ceiling_meta(ceiling))
    meta["fused_configs"] = ("tuned by this run (tuned_fused.json)" if tuned else
                             "the tuned table / user cache entry where one exists, else fused_heuristic")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    unavailable = set()
    records = run_fused(ceiling["read_bw"], log_path=str(log), unavailable=unavailable)
    meta.update(clock_meta(unavailable))
    warnings = common.check_ceiling(records, ["frac_read_bw_fused_kernel", "frac_read_bw_fused_wall"], _label)
    common.write_results(name, dict(meta, warnings=warnings), records, FUSED_COLUMNS, out_dir=out_dir)
    return 3 if warnings else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="time the TUNE configurations of each kernel")
    ap.add_argument("--tune-decode", action="store_true",
                    help="time candidate configurations at the shapes of a llama-2-7b decode step (batch 64)")
    ap.add_argument("--check", action="store_true", help="only compare the kernels with the reference")
    ap.add_argument("--fused", action="store_true",
                    help="only the fused kernel vs the two-kernel path vs XLA dense at issue 11's target shapes "
                         "(a short run; writes kernels_mlp_fused.{json,md})")
    ap.add_argument("--fused-tune", action="store_true",
                    help="first time the fused kernel's candidate configs at those shapes (winners to the user "
                         "cache and OUT/tuned_fused.json), then run --fused with them")
    ap.add_argument("--name", default="kernels_mlp_fused",
                    help="--fused / --fused-tune: result file name (default kernels_mlp_fused; e.g. one per GPU)")
    ap.add_argument("--variant", choices=("relu", "gated"), default=None, help="only this variant")
    ap.add_argument("--out", default=str(common.RESULTS), help="result folder (default benchmarks/results)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="write kernels_mlp.{json,md} from the kernels_mlp.jsonl record logs of these folders")
    common.add_device_args(ap)
    args = ap.parse_args()
    out_dir = pathlib.Path(args.out)
    if args.merge:  # runs of --variant relu and --variant gated in separate device calls, one file
        metas, records = [], []
        for d in args.merge:
            metas.append(json.loads((pathlib.Path(d) / "meta.json").read_text()))
            records += [json.loads(line) for line in (pathlib.Path(d) / "kernels_mlp.jsonl").read_text().splitlines()]
        devices = {m["device"] for m in metas}
        if len(devices) > 1:
            sys.exit(f"error: the runs to merge were made on different devices ({', '.join(sorted(devices))})")
        meta = dict(metas[0], command=" && ".join(m["command"] for m in metas),
                    read_bw_TBps=min(m["read_bw_TBps"] for m in metas),
                    runs=[{k: m[k] for k in ("command", "date", "read_bw_TBps", "copy_bw_TBps", "kernel_clock")}
                          for m in metas])
        meta["clocks"] = metas[0]["clocks"] + [
            "merged runs, each record's frac_read_bw_* over its own run's ceiling (read_bw_TBps column of the "
            "JSON); the header gives the lowest"]
        return _finish(meta, records, out_dir)
    common.require_gpu("benchmarks.bench_mlp", args.allow_cpu)
    common.check_out_dir(out_dir)
    if args.check:
        return 0 if check() else 1
    if args.tune_decode:
        tune(TUNE_DECODE)
        return 0
    if args.tune:
        tune()
        return 0
    if args.fused_tune:
        tune_fused(out_dir)
    ceiling = common.measure_ceiling()
    if args.fused or args.fused_tune:
        return _run_fused_main(ceiling, out_dir, tuned=args.fused_tune, name=args.name)
    command = "python -m benchmarks.bench_mlp" + (" --quick" if args.quick else "") + (
        f" --variant {args.variant}" if args.variant else "")
    meta = dict(common.metadata(command), **common.ceiling_meta(ceiling))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "kernels_mlp.jsonl"
    log.unlink(missing_ok=True)
    variants = (args.variant,) if args.variant else ("relu", "gated")
    unavailable = set()
    records = run(ceiling["read_bw"], quick=args.quick, variants=variants, log_path=str(log), unavailable=unavailable)
    meta.update(clock_meta(unavailable))
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return _finish(meta, records, out_dir)


if __name__ == "__main__":
    sys.exit(main())

"""Probe: the jax-triton fused selective MLP (relaxed atomics) against the two-kernel path and XLA dense.

At issue 11's target shapes (bench_mlp.FUSED_CASES), each case: every candidate config of the jax-triton
kernel is checked against the two-kernel path (relative error) and timed on the wall clock; the fastest
then gets the kernel clock (profiler trace) beside the two-kernel path and XLA's dense MLP, as
`bench_mlp --fused` times them. Writes OUT/NAME.{json,md} (default probe_jax_triton_mlp).

    python -m benchmarks.probe_jax_triton_mlp --out OUT     # CUDA GPU with jax-triton and triton installed
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import bench_mlp as bm
from benchmarks import common
from pallas_kernels.selective_gemm import fused_jax_triton as fjt

COLUMNS = ["variant", "D", "F", "B", "count", "target_vs_xla", "ms_jt_wall", "ms_two_kernel_wall", "ms_xla_wall",
           "speedup_jt_vs_xla_wall", "speedup_two_kernel_vs_xla_wall", "speedup_jt_vs_two_kernel_wall",
           "ms_jt_kernel", "ms_two_kernel_kernel", "speedup_jt_vs_two_kernel_kernel", "frac_read_bw_jt_kernel",
           "frac_read_bw_two_kernel_kernel", "jt_rel_diff", "configs_timed", "best_config"]


def candidates(B: int, D: int) -> list[fjt.JtFusedConfig]:
    """Batch block x neuron block x (block_k, block_d) x stages, the likelier first (a case's time budget may
    cut the list); 8 warps for tiles of 64 x 64 and up."""
    bbs = [16] if B <= 16 else [32, 16, 64]
    bns = [32, 16, 64] if B <= 16 else [64, 128, 32]
    out = []
    for st in (4, 3):
        for bn in bns:
            for bb in bbs:
                for bk, bd in ((256, 128), (128, 128), (256, 256), (512, 64)):
                    out.append(fjt.JtFusedConfig(bb, bn, min(bk, D), min(bd, D), 8 if bb * bn >= 64 * 64 else 4, st))
    return out


def run(read_bw: float, budget_s: float) -> list[dict]:
    key = jax.random.key(1)
    records = []
    for variant, D, F, B, density, target in bm.FUSED_CASES:
        t_start = time.perf_counter()
        activation = "none" if variant == "gated" else "relu"
        wsets = bm._weights(variant, D, F, jax.random.fold_in(key, D + F))
        count = bm.neuron_count(density, F)
        idxs = bm._idx_draws(F, count, jax.random.fold_in(key, count))
        x = jax.random.normal(jax.random.fold_in(key, B), (B, D), jnp.float32).astype(bm.DTYPE)
        args = [(x, wsets, idxs)]
        rec = dict(variant=variant, D=D, F=F, B=B, count=count, target_vs_xla=target, read_bw_TBps=read_bw / 1e12)
        two = bm._chain(bm._public(count, activation, impl="triton"))
        ref = jnp.asarray(two(*args[0]), jnp.float32)

        def jt_chain(cfg):
            def call(x, w, idx):
                st = lambda a: None if a is None else a[None]
                return fjt.fused_mlp(x, st(w["w_up"]), st(w["w_down"]), idx, count, b_up=st(w.get("b_up")),
                                     b_down=st(w.get("b_down")), w_gate=st(w.get("w_gate")), activation=activation,
                                     layer=jnp.int32(0), config=cfg)
            return bm._chain(call)

        timings = []
        for cfg in candidates(B, D):
            if time.perf_counter() - t_start > budget_s:
                print(f"  the case's {budget_s:.0f} s are spent: {len(timings)} configs timed", flush=True)
                break
            try:
                fn = jt_chain(cfg)
                out = jnp.asarray(fn(*args[0]), jnp.float32)
                diff = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))  # runs it: a launch error shows here
            except Exception as e:  # noqa: BLE001  (a config Triton cannot compile is reported and skipped)
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            ms = common.time_fn(fn, args, inner=5, reps=5, warmup=1) / bm.CHAIN
            timings.append((ms, diff, cfg))
            print(f"  {variant} B={B} D={D} {cfg}: {ms * 1e3:.1f} us, rel diff {diff:.2e}", flush=True)
        good = [t for t in timings if t[1] <= 1e-2]
        if not good:
            print(f"!! {variant} B={B} D={D}: no config both ran and agreed with the two-kernel path", flush=True)
            records.append(dict(rec, configs_timed=len(timings)))
            continue
        _, diff, best = min(good, key=lambda t: t[0])
        paths = {"jt": jt_chain(best), "two_kernel": two, "xla": bm._chain(lambda x, w, idx: bm._xla_dense(x, w))}
        for name, fn in paths.items():
            rec[f"ms_{name}_kernel"], rec[f"ms_{name}_wall"], per = bm._measure(fn, args)
            rec[f"kernels_{name}"] = per
        nbytes = bm._bytes(variant, D, B, count)
        for name in ("jt", "two_kernel"):
            rec[f"speedup_{name}_vs_xla_wall"] = rec["ms_xla_wall"] / rec[f"ms_{name}_wall"]
            rec[f"frac_read_bw_{name}_kernel"] = nbytes / (rec[f"ms_{name}_kernel"] * 1e-3) / read_bw
        for clock in ("wall", "kernel"):
            rec[f"speedup_jt_vs_two_kernel_{clock}"] = rec[f"ms_two_kernel_{clock}"] / rec[f"ms_jt_{clock}"]
        rec.update(jt_rel_diff=diff, configs_timed=len(timings), best_config=dataclasses.asdict(best),
                   timings=[(ms, d, dataclasses.asdict(c)) for ms, d, c in timings])
        records.append(rec)
        print({k: v for k, v in rec.items() if k in COLUMNS}, flush=True)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(common.RESULTS), help="result folder (default benchmarks/results)")
    ap.add_argument("--name", default="probe_jax_triton_mlp", help="result file name (e.g. one per GPU)")
    ap.add_argument("--budget-s", type=float, default=90.0,
                    help="per case: stop timing new configs after this many seconds")
    args = ap.parse_args()
    common.require_gpu("benchmarks.probe_jax_triton_mlp", False)
    out_dir = pathlib.Path(args.out)
    common.check_out_dir(out_dir)
    ceiling = common.measure_ceiling()
    meta = dict(common.metadata("python -m benchmarks.probe_jax_triton_mlp" +
                                (f" --budget-s {args.budget_s:g}" if args.budget_s != 90.0 else "") +
                                (f" --name {args.name}" if args.name != "probe_jax_triton_mlp" else "")),
                **common.ceiling_meta(ceiling))
    meta["clocks"] = [bm.KERNEL_CLOCK, bm.WALL_CLOCK]
    records = run(ceiling["read_bw"], args.budget_s)
    common.write_results(args.name, meta, records, COLUMNS, out_dir=out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

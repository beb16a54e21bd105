"""Probe: do persistent programs (UpConfig.programs) take the fixed cost off the up projection?

    python -m benchmarks.probe_persistent_up [--out OUT.json]

At B = 16 a GEMM of our kernels pays about 4 us above its bytes at the read ceiling (logs/probe_gemm_size.log),
and the decode step runs ~330 kernels. One candidate cause is the schedule: one program per neuron block gives
1.5-3 waves of programs, and each program fills its pipeline anew. With `programs` set, a fixed number of
programs each stream an equal run of neuron blocks in one pipelined loop (no second wave, one pipeline fill per
program). Timed as `polar tune` times candidates (wall clock per call over chains of calls, output checked
against the first config's), the current config (tuned entry or heuristic) first; then the best persistent
config against it head to head (alternating rounds). Shapes: the llama decode projections that use the up
kernel (q/k/v, gate/up) at B = 16 and 64, and bench_mlp's D = 8192 target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

SHAPES = [
    dict(B=16, D=4096, count=6144, gated=0, dtype="bfloat16"),    # llama-3-8b q/k/v
    dict(B=16, D=4096, count=16384, gated=1, dtype="bfloat16"),   # llama-3-8b gate/up (14,336 rows)
    dict(B=16, D=4096, count=12288, gated=1, dtype="bfloat16"),   # llama-2-7b gate/up (11,008 rows)
    dict(B=16, D=8192, count=3328, gated=0, dtype="bfloat16"),    # bench_mlp's 10% target
    dict(B=64, D=4096, count=6144, gated=0, dtype="bfloat16"),
    dict(B=64, D=4096, count=16384, gated=1, dtype="bfloat16"),
]
SMALL = [(16, 256, 2, 6), (16, 256, 2, 4), (16, 128, 4, 6), (32, 256, 4, 4), (16, 512, 2, 3)]  # bn, bk, warps, st
LARGE = [(32, 128, 4, 4), (64, 64, 4, 5), (64, 128, 4, 3)]
PROGRAMS = (T.NUM_SMS, 2 * T.NUM_SMS)


def persistent_configs(shape: dict) -> list:
    bb = 16 if shape["B"] <= 16 else 64
    return [T.UpConfig(bb, bn, bk, 1, w, st, programs=p) for p in PROGRAMS
            for bn, bk, w, st in (SMALL if bb == 16 else LARGE)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_persistent_up", False)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    records = []
    for shape in SHAPES:
        current = T.up_config(shape["B"], shape["D"], shape["count"], bool(shape["gated"]), shape["dtype"])
        r = autotune.tune("selective_up", shape, max_candidates=0, extra=(current, *persistent_configs(shape)),
                          reps=7, inner=10, log=print)
        timings = r["entry"]["timings"]
        base = timings[0][1]
        print(f"selective_up {shape}")
        for cfg, ms in timings:
            rel = f"{base / ms:5.3f}x current" if ms else "failed"
            print(f"  {'%.1f us' % (ms * 1e3) if ms else '   -   '}  {rel}  {cfg}")
        done = [(T.UpConfig(**c), ms) for c, ms in timings[1:] if ms]
        h2h = None
        if done:
            best = min(done, key=lambda cm: cm[1])[0]
            a, b = autotune.head_to_head("selective_up", shape, [current, best], rounds=5)
            h2h = {"current_ms": a, "persistent_ms": b, "persistent": dataclasses.asdict(best)}
            print(f"  head to head: current {a * 1e3:.1f} us, best persistent {b * 1e3:.1f} us ({a / b:.3f}x)")
        records.append({"shape": shape, "current": dataclasses.asdict(current), "timings": timings,
                        "head_to_head": h2h})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "records": records}, fh,
                      indent=1)


if __name__ == "__main__":
    main()

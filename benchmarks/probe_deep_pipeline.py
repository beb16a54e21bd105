"""Probe: do deeper pipelines (more, smaller tiles in flight) speed up the selective GEMMs at bench_mlp's targets?

    python -m benchmarks.probe_deep_pipeline [--out OUT.json]

At B = 128 the down projection (128 x 128 tiles, 3 stages, one program of 8 warps per SM) moves about 25 GB/s
per SM, half the HBM ceiling in all, as if each SM had too few bytes in flight; the library GEMM that does the
same product in 27.6 µs keeps its stages busy with TMA and warp specialisation. The configs timed here keep
about the same shared memory but split it into more, smaller stages (K steps of 32-64 rows, 5-12 stages), at
the four targets of bench_mlp (D = 8192, 3,328 rows; B = 16 and 128, up and down). Timed as `polar tune` times
candidates (wall clock per call over chains of calls, split epilogues included, output checked against the
heuristic's), then the best against the heuristic head to head (alternating rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

U, Dn = T.UpConfig, T.DownConfig
CASES = [  # kernel, shape, deeper configs
    ("selective_up", dict(B=128, D=8192, count=3328, gated=0, dtype="bfloat16"),
     [U(128, 64, 32, 4, 4, 8), U(128, 64, 64, 4, 4, 6), U(128, 64, 64, 4, 8, 6), U(128, 128, 32, 4, 8, 8),
      U(128, 128, 64, 4, 8, 6), U(128, 64, 32, 4, 8, 12)]),
    ("selective_down", dict(B=128, D=8192, count=3328, dtype="bfloat16"),
     [Dn(128, 64, 128, 2, 8, 6), Dn(128, 64, 128, 2, 8, 5), Dn(128, 32, 128, 2, 8, 10), Dn(128, 32, 128, 2, 8, 12),
      Dn(128, 64, 128, 2, 4, 6), Dn(128, 64, 128, 4, 8, 6)]),
    ("selective_up", dict(B=16, D=8192, count=3328, gated=0, dtype="bfloat16"),
     [U(16, 16, 128, 1, 2, 10), U(16, 16, 128, 1, 4, 12), U(16, 32, 128, 1, 4, 8), U(16, 16, 64, 1, 2, 16)]),
    ("selective_down", dict(B=16, D=8192, count=3328, dtype="bfloat16"),
     [Dn(16, 64, 128, 4, 4, 6), Dn(16, 32, 128, 4, 4, 10), Dn(16, 128, 128, 4, 4, 5), Dn(16, 64, 128, 2, 4, 8),
      Dn(16, 32, 128, 2, 4, 12)]),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_deep_pipeline", False)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    records = []
    for kernel, shape, deeper in CASES:
        r = autotune.tune(kernel, shape, max_candidates=1, extra=tuple(deeper), reps=7, inner=10, log=print)
        timings = r["entry"]["timings"]
        base = timings[0][1]
        print(f"{kernel} {shape}")
        for cfg, ms in timings:
            rel = f"{base / ms:5.3f}x the heuristic" if ms else "failed"
            print(f"  {'%.1f us' % (ms * 1e3) if ms else '   -   '}  {rel}  {cfg}")
        cls = type(deeper[0])
        done = [(cls(**c), ms) for c, ms in timings[1:] if ms]
        h2h = None
        if done:
            heuristic = cls(**timings[0][0])
            best = min(done, key=lambda cm: cm[1])[0]
            a, b = autotune.head_to_head(kernel, shape, [heuristic, best], rounds=5)
            h2h = {"heuristic_ms": a, "deeper_ms": b, "deeper": dataclasses.asdict(best)}
            print(f"  head to head: heuristic {a * 1e3:.1f} us, best deeper {b * 1e3:.1f} us ({a / b:.3f}x)")
        records.append({"kernel": kernel, "shape": shape, "timings": timings, "head_to_head": h2h})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "records": records}, fh,
                      indent=1)


if __name__ == "__main__":
    main()

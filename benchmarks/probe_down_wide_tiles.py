"""Probe: do 256-column tiles help the B = 128 selective down projection once they fill the SMs?

    python -m benchmarks.probe_down_wide_tiles [--out OUT.json]

bench_mlp's B = 128 target (D = 8192, 3,328 selected rows) with the heuristic's config (128-row tiles of h and
w, 128 columns, split 2: 128 programs) against 256-column tiles, which halve the re-reads of h from L2 (each
program reads as many bytes of h as of w at 128 columns). The random search of probe_mlp_configs drew
256-column tiles only with splits that leave SMs idle (split 2 or 3: 64 or 96 programs); here splits of 4
(128 programs) and batch blocks of 64 are timed too. Timed as `polar tune` times candidates (wall clock per
call over chains of calls, the split's partial-sum epilogue included; output checked against the heuristic's).
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

SHAPE = dict(B=128, D=8192, count=3328, dtype="bfloat16")
WIDE = [T.DownConfig(128, 64, 256, 4, 8, 4), T.DownConfig(128, 64, 256, 4, 8, 3), T.DownConfig(128, 32, 256, 4, 8, 6),
        T.DownConfig(128, 128, 256, 2, 8, 2), T.DownConfig(128, 128, 256, 4, 8, 2), T.DownConfig(128, 64, 256, 2, 8, 4),
        T.DownConfig(64, 64, 256, 2, 8, 4), T.DownConfig(64, 128, 256, 2, 8, 2), T.DownConfig(64, 64, 256, 2, 4, 4)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the timings as JSON here")
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_down_wide_tiles", False)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: selective_down {SHAPE}")
    r = autotune.tune("selective_down", SHAPE, max_candidates=1, extra=tuple(WIDE), reps=7, inner=10, log=print)
    timings = r["entry"]["timings"]
    base = timings[0][1]
    for cfg, ms in timings:
        rel = f"{base / ms:5.3f}x the heuristic" if ms else "failed"
        print(f"  {'%.1f us' % (ms * 1e3) if ms else '   -   '}  {rel}  {cfg}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": SHAPE,
                       "timings": timings}, fh, indent=1)


if __name__ == "__main__":
    main()

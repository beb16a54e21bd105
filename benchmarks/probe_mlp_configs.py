"""Probe: a wide grid of selective_up / selective_down configs at bench_mlp's relu targets (D = 8192, 3,328
neurons = 10% of F, B = 16 and 128), each timed like `polar tune` times a candidate (autotune.measure: wall
clock per call over chains of calls on fresh inputs), in random order within a time budget per shape.

    python benchmarks/probe_mlp_configs.py OUT.json [SECONDS]
"""
import itertools
import random
import json
import sys
import time

import jax

from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

OUT = sys.argv[1]
BUDGET = float(sys.argv[2]) if len(sys.argv) > 2 else 400
t_start = time.time()


def fit(stage_bytes, want):
    return [s for s in want if s * stage_bytes <= (200 << 10)]


def up_grid(B, D, count, gated):
    out = [T.up_heuristic(B, D, count, gated)]
    bbs = [16] if B <= 16 else ([64, 128] if B > 64 else [32, 64])
    for bb, bn, bk, sk in itertools.product(bbs, [16, 32, 64], [64, 128, 256, 512], [1, 2, 3, 4, 6]):
        if bb >= 64 and bn == 16 or bb <= 32 and bn == 64 or bk == 512 and bb > 32:
            continue
        sb = (bb + bn * (2 if gated else 1)) * bk * 2
        for w in ([2, 4] if bb * bn <= 512 else [4, 8]):
            for st in fit(sb, [3, 4, 6]):
                out.append(T.UpConfig(bb, bn, bk, sk, w, st))
    return list(dict.fromkeys(out))


def down_grid(B, D, count):
    out = [T.down_heuristic(B, D, count)]
    bbs = [16] if B <= 16 else ([64, 128] if B > 64 else [32, 64])
    for bb, bn, bd, sp in itertools.product(bbs, [32, 64, 128], [64, 128, 256], [1, 2, 3, 4, 6, 8]):
        sb = (bb * bn + bn * bd) * 2
        for w in ([4] if bb * bd <= 4096 else [4, 8]):
            for st in fit(sb, [3, 4, 6]):
                out.append(T.DownConfig(bb, bn, bd, sp, w, st))
    return list(dict.fromkeys(out))


CASES = [("selective_up", dict(B=16, D=8192, count=3328, gated=False, dtype="bfloat16")),
         ("selective_down", dict(B=16, D=8192, count=3328, dtype="bfloat16")),
         ("selective_up", dict(B=128, D=8192, count=3328, gated=False, dtype="bfloat16")),
         ("selective_down", dict(B=128, D=8192, count=3328, dtype="bfloat16")),
         ]

results = []
for i, (kernel, shape) in enumerate(CASES):
    left = BUDGET - (time.time() - t_start)
    per_case = left / (len(CASES) - i)
    if kernel == "selective_up":
        grid = up_grid(shape["B"], shape["D"], shape["count"], shape["gated"])
    else:
        grid = down_grid(shape["B"], shape["D"], shape["count"])
    t_case = time.time()
    heur = grid[0]
    rest = grid[1:]
    random.Random(0).shuffle(rest)
    grid = [heur] + rest
    timings = []
    sc = autotune.KERNELS[kernel].bucket(**shape)
    first = []
    for cfg in grid:
        if time.time() - t_case > per_case:
            break
        try:
            ms, out = autotune.measure(autotune.KERNELS[kernel], cfg, sc, reps=5, inner=10,
                                       expect=first[0] if first else None)
            first.append(out)
        except Exception as e:  # noqa: BLE001
            print(f"skip {cfg}: {type(e).__name__}: {str(e)[:100]}")
            continue
        timings.append((cfg, ms))
    timings.sort(key=lambda c: c[1])
    hms = [ms for c, ms in timings if c == heur]
    nbytes = shape["count"] * shape["D"] * 2 * (2 if shape.get("gated") else 1)
    print(f"== {kernel} {shape}: {len(timings)} of {len(grid)} timed in {time.time() - t_case:.0f} s; "
          f"heuristic {hms[0] if hms else None} ms; {nbytes / 1e6:.1f} MB")
    for cfg, ms in timings[:8]:
        print(f"   {ms * 1e3:7.1f} us  {nbytes / ms / 1e9:6.2f} TB/s  {cfg}")
    results.append(dict(kernel=kernel, shape=shape, heuristic_ms=hms[0] if hms else None,
                        best=[[str(c), ms] for c, ms in timings[:20]]))
    json.dump(results, open(OUT, "w"), indent=1)
print("device", jax.devices()[0].device_kind, "total", round(time.time() - t_start), "s")

"""Probe: a wide grid of selective_up / selective_down configs at bench_mlp's relu targets (D = 8192, 3,328
neurons = 10% of F, B = 16 and 128), timed by `autotune.tune` as `polar tune` times its candidates (wall clock
per call over chains of calls on fresh inputs; a config whose output differs from the heuristic's is
skipped): the heuristic first, then at most PER_SHAPE others of the grid, drawn at random.

    python benchmarks/probe_mlp_configs.py OUT.json [PER_SHAPE]

(results/probe_mlp_configs.json came from the first version, git 35f08ff, which cut each shape by a time
budget instead and timed the heuristic at count 0.)
"""
import itertools
import json
import random
import sys

import jax

from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

OUT = sys.argv[1]
PER_SHAPE = int(sys.argv[2]) if len(sys.argv) > 2 else 150


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
for kernel, shape in CASES:
    grid = (up_grid(shape["B"], shape["D"], shape["count"], shape["gated"]) if kernel == "selective_up"
            else down_grid(shape["B"], shape["D"], shape["count"]))
    rest = grid[1:]
    random.Random(0).shuffle(rest)
    r = autotune.tune(kernel, shape, max_candidates=0, extra=(grid[0], *rest[:PER_SHAPE]), reps=5, inner=10)
    timings = sorted(((c, ms) for c, ms in r["entry"]["timings"] if ms is not None), key=lambda cm: cm[1])
    nbytes = shape["count"] * shape["D"] * 2 * (2 if shape.get("gated") else 1)
    print(f"== {kernel} {shape}: {len(timings)} of {1 + len(rest[:PER_SHAPE])} timed; heuristic "
          f"{r['entry']['heuristic_ms']} ms; {nbytes / 1e6:.1f} MB")
    for cfg, ms in timings[:8]:
        print(f"   {ms * 1e3:7.1f} us  {nbytes / ms / 1e9:6.2f} TB/s  {cfg}")
    results.append(dict(kernel=kernel, shape=shape, heuristic_ms=r["entry"]["heuristic_ms"], best=timings[:20]))
    json.dump(results, open(OUT, "w"), indent=1)
print("device", jax.devices()[0].device_kind)

"""Probe: the selective GEMMs' block-size heuristics of this tree against those of an earlier triton.py, A/B.

    git show REV:pallas_kernels/selective_gemm/triton.py > /tmp/triton_before.py
    python -m benchmarks.probe_heuristics_ab --baseline /tmp/triton_before.py [--out OUT.json] [--list]

The heuristics are what every shape without a tuned entry runs (other models, batches and densities than
the shipped tables hold). At the decode shapes of models that are not in the tables (llama-2-13b,
opt-6.7b at 10% and 30% MLP density), and at bench_mlp's D = 8192 targets, each shape class whose
heuristic config changed is timed head to head, old against new (pallas_kernels.autotune.head_to_head:
alternating rounds on the same inputs, median wall-clock ms per call). --list only prints the configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

import jax

from benchmarks import common
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T
from polar_jax.config import preset

BATCHES = (40, 64, 128)


def load_baseline(path: str):
    """The module at `path` (an earlier triton.py), imported without registering its tunables."""
    spec = importlib.util.spec_from_file_location("selective_gemm_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    register, autotune.register = autotune.register, (lambda t: None)
    try:
        spec.loader.exec_module(mod)
    finally:
        autotune.register = register
    return mod


def shapes() -> list[tuple[str, dict]]:
    """(kernel, shape class) of the decode projections of two untabled models, and of bench_mlp's targets."""
    out = []
    for name, densities in (("llama-2-13b", (1.0, 0.3)), ("opt-6.7b", (0.1, 0.3))):
        c = preset(name)
        for B in BATCHES:
            out.append(("selective_up", dict(B=B, D=c.dim, count=(c.n_heads + 2 * c.n_kv_heads) * c.head_dim, gated=False)))
            out.append(("selective_down", dict(B=B, D=c.dim, count=c.n_heads * c.head_dim)))
            for d in densities:
                n = round(d * c.mlp_dim)
                out.append(("selective_up", dict(B=B, D=c.dim, count=n, gated=c.gated_mlp)))
                out.append(("selective_down", dict(B=B, D=c.dim, count=n)))
    out += [("selective_up", dict(B=128, D=8192, count=3328, gated=False)), ("selective_down", dict(B=128, D=8192, count=3328)),
            ("selective_up", dict(B=48, D=8192, count=6656, gated=True)), ("selective_down", dict(B=48, D=8192, count=6656))]
    classes = {}
    for kernel, s in out:
        sc = autotune.KERNELS[kernel].bucket(**s, dtype="bfloat16")
        classes.setdefault(autotune.class_key(kernel, sc), (kernel, sc))
    return list(classes.values())


def heuristic(mod, kernel: str, sc: dict):
    if kernel == "selective_up":
        cfg = mod.up_heuristic(sc["B"], sc["D"], sc["count"], bool(sc["gated"]))
        return T.UpConfig(**dataclasses.asdict(cfg))
    return T.DownConfig(**dataclasses.asdict(mod.down_heuristic(sc["B"], sc["D"], sc["count"])))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="an earlier pallas_kernels/selective_gemm/triton.py")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--list", action="store_true", help="print the old and new configs only (no GPU needed)")
    ap.add_argument("--rounds", type=int, default=5)
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    base = load_baseline(args.baseline)
    if not args.list:
        common.require_gpu("benchmarks.probe_heuristics_ab", args.allow_cpu)
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for kernel, sc in shapes():
        old, new = heuristic(base, kernel, sc), heuristic(T, kernel, sc)
        key = autotune.class_key(kernel, sc)
        if old == new:
            print(f"{key}: unchanged")
            continue
        row = dict(key=key, old=dataclasses.asdict(old), new=dataclasses.asdict(new))
        if not args.list:
            row["ms_old"], row["ms_new"] = autotune.head_to_head(kernel, sc, (old, new), rounds=args.rounds)
            row["old_over_new"] = row["ms_old"] / row["ms_new"]
            print(f"{key}: old {row['ms_old'] * 1e3:7.1f} us  new {row['ms_new'] * 1e3:7.1f} us  "
                  f"old/new {row['old_over_new']:.3f}")
        else:
            print(f"{key}: changed")
        print(f"    old {old}\n    new {new}")
        rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

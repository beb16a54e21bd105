"""All kernel benchmarks in one run: selective-head decode attention and (where present) the sparse MLP.

Measures the device's copy bandwidth once, runs `benchmarks.bench_attention.run` and, if it imports,
`benchmarks.bench_mlp.run` with it, and writes results/kernels.{json,md} (every record, one table) and
one PNG per kernel: speedup over our dense path against density, a panel per case, a line per batch,
with the ideal 1/density dashed.

  python -m benchmarks.kernels [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import bench_attention, common

COLUMNS = ["kernel", "variant", "N", "K", "D", "F", "B", "S", "count", "density", "ms", "GBps", "frac_bw",
           "speedup_vs_dense", "speedup_vs_xla", "ideal"]


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per kernel: speedup_vs_dense vs density, a panel per case, a line per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_kernel = defaultdict(list)
    for r in records:
        by_kernel[r["kernel"]].append(r)
    for kernel, recs in by_kernel.items():
        if kernel == "decode_attention":
            case_of = lambda r: f"{r['variant']} N={r['N']} K={r['K']} S={r['S']}"  # noqa: E731
        else:
            case_of = lambda r: f"{r.get('variant', '')} D={r.get('D')} F={r.get('F')}"  # noqa: E731
        cases = defaultdict(list)
        for r in recs:
            cases[case_of(r)].append(r)
        n = len(cases)
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax, (case, rs) in zip(axes.flat, sorted(cases.items())):
            lines = defaultdict(list)
            for r in rs:
                lines[r["B"]].append((r["density"], r["speedup_vs_dense"]))
            for B, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"B={B}")
            ds = sorted({r["density"] for r in rs})
            ax.plot(ds, [1 / d for d in ds], "k--", lw=1, label="ideal 1/density")
            ax.set_title(case, fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("speedup vs our dense")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"kernels_{kernel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    args = ap.parse_args()
    out_dir = Path(args.out) if args.out else common.RESULTS
    copy_bw = common.copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s on {common.device_name()}", flush=True)
    records = bench_attention.run(copy_bw, quick=args.quick)
    try:
        bench_mlp = importlib.import_module("benchmarks.bench_mlp")
    except ImportError as e:
        print(f"# benchmarks.bench_mlp not importable ({e}); attention only", flush=True)
    else:
        records += bench_mlp.run(copy_bw, quick=args.quick)
    meta = common.metadata("python -m benchmarks.kernels" + (" --quick" if args.quick else ""))
    meta["copy_bw_TBps"] = copy_bw / 1e12
    common.write_results("kernels", meta, records, COLUMNS, out_dir=out_dir)
    for p in plot(records, out_dir):
        print(f"wrote {p}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

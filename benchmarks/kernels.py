"""All kernel benchmarks in one run: selective-head decode attention and (where present) the sparse MLP.

Measures the streaming-read bandwidth (the ceiling) and the copy bandwidth (information) once, runs
`benchmarks.bench_attention.run` and, if it imports, `benchmarks.bench_mlp.run` with it, and writes
results/kernels.{json,md} (every record, one table; every timed column names its clock: _wall for
host-timed chains, _kernel for profiler kernel time, measured for the MLP only) and one PNG per kernel:
speedup over our dense path against the density that ran, a panel per case, a line per batch, with the
ideal 1/density dashed.

  python -m benchmarks.kernels [--quick] [--out DIR] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import common

COLUMNS = ["kernel", "variant", "N", "K", "D", "F", "B", "S", "density_requested", "count", "density",
           "ms_kernel", "ms_wall", "frac_read_bw_kernel", "frac_read_bw_wall", "speedup_vs_dense_kernel",
           "speedup_vs_dense_wall", "speedup_vs_xla_kernel", "speedup_vs_xla_wall", "ideal"]
CLOCKS = ["decode_attention: wall only (host-timed pipelined chains; `*_kernel` columns empty)"]


def plot_clock(records: list[dict]) -> str:
    """The clock a kernel's plot shows: the kernel clock where every record has it, else wall (and says so)."""
    have = all(isinstance(r.get("speedup_vs_dense_kernel"), float) and r["speedup_vs_dense_kernel"] ==
               r["speedup_vs_dense_kernel"] for r in records)
    return "kernel" if have else "wall"


def plot(records: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """One PNG per kernel: speedup over our dense vs density run, a panel per case, a line per batch size;
    titled with the device, date, command and clock."""
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
        clock = plot_clock(recs)
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
                lines[r["B"]].append((r["density"], r[f"speedup_vs_dense_{clock}"]))
            for B, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"B={B}")
            ds = sorted({r["density"] for r in rs})
            ax.plot(ds, [1 / d for d in ds], "k--", lw=1, label="ideal 1/density")
            ax.set_title(case, fontsize=9)
            ax.set_xlabel("density (as run)")
            ax.set_ylabel(f"speedup vs our dense ({clock} clock)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{kernel}: {meta['device']}, {meta['date']}, `{meta['command']}`, {clock} clock "
                     f"({'profiler kernel time' if clock == 'kernel' else 'host-timed'})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"kernels_{kernel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(common.RESULTS), help="result folder (default benchmarks/results)")
    common.add_device_args(ap)
    args = ap.parse_args()
    common.require_gpu("benchmarks.kernels", args.allow_cpu)
    out_dir = Path(args.out)
    common.check_out_dir(out_dir)
    from benchmarks import bench_attention

    ceiling = common.measure_ceiling()
    meta = dict(common.metadata("python -m benchmarks.kernels" + (" --quick" if args.quick else "")),
                **common.ceiling_meta(ceiling))
    records = bench_attention.run(ceiling["read_bw"], quick=args.quick)
    clocks = list(CLOCKS)
    try:
        bench_mlp = importlib.import_module("benchmarks.bench_mlp")
    except ImportError as e:
        print(f"# benchmarks.bench_mlp not importable ({e}); attention only", flush=True)
    else:
        unavailable = set()
        records += bench_mlp.run(ceiling["read_bw"], quick=args.quick, unavailable=unavailable)
        mlp = bench_mlp.clock_meta(unavailable)
        clocks += [f"selective_mlp: {line}" for line in mlp["clocks"]]
        meta["kernel_clock_mlp"] = mlp["kernel_clock"]
    label = lambda r: f"{r['kernel']} {r.get('variant', '')} B={r['B']} count={r['count']}"  # noqa: E731
    warnings = common.check_ceiling(records, ["frac_read_bw_kernel", "frac_read_bw_wall"], label)
    meta = dict(meta, clocks=clocks, warnings=warnings)
    common.write_results("kernels", meta, records, COLUMNS, out_dir=out_dir)
    for p in plot(records, meta, out_dir):
        print(f"wrote {p}", flush=True)
    return 3 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())

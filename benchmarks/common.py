"""Shared benchmark helpers: GPU check, pipelined median timing, bandwidth ceiling, result files.

Timing: each sample dispatches `inner` calls back to back and blocks once, so launch latency overlaps
device work (as a serving loop would); the reported figure is the median over `reps` samples of the
per-call time. This is the wall clock (host-timed); benchmarks that also read kernel durations from a
profiler trace call that the kernel clock, and every table names the clock of each figure.

Ceiling: the streaming-READ bandwidth, the best of a few large reductions, four to a jitted program (a decode step or kernel only
has to read its weights and KV slabs; its writes are tiny). The copy bandwidth (read + write of an
elementwise pass) is measured too and reported as information only: read-only streaming is faster than
copy, so copy is not a ceiling. A figure above the read ceiling means the ceiling is wrong: `check_ceiling`
says so loudly and the benchmark exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.autotune import time_fn  # noqa: F401  (one timer for the benchmarks and the tuner)

RESULTS = Path(__file__).resolve().parent / "results"
L2_BYTES = 50e6  # H100 / H200 L2 (50 MB); inputs rotated through must exceed it several times


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run even without a GPU (kernels fall back to XLA: slow, figures meaningless; "
                         "results are written only with --out)")


def add_sampler_sizes_args(ap: argparse.ArgumentParser, vocab: str) -> None:
    """--vocab and --batch of the sampler benchmarks (`sampler_sizes` reads them)."""
    ap.add_argument("--vocab", default=vocab, help=f"vocabulary sizes (comma-separated; default {vocab})")
    ap.add_argument("--batch", default="16,64,256", help="rows per call (comma-separated; default 16,64,256)")


def sampler_sizes(args) -> tuple[list[int], list[int]]:
    """(vocabulary sizes, batches) from --vocab and --batch; exits naming them unless positive integers."""
    try:
        vocabs, batches = ([int(x) for x in s.split(",")] for s in (args.vocab, args.batch))
    except ValueError:
        vocabs = batches = [0]
    if min(vocabs + batches) < 1:
        sys.exit("error: --vocab and --batch take comma-separated positive integers")
    return vocabs, batches


def require_gpu(what: str, allow_cpu: bool) -> None:
    """Say at once that `what` is meant for a GPU; exit with one line unless allow_cpu."""
    backend = jax.default_backend()
    if backend == "gpu":
        return
    msg = (f"{what} measures GPU kernels, but JAX's backend here is {backend!r}: on it the Pallas kernels fall "
           f"back to XLA, runs take many minutes and the figures mean nothing.")
    if not allow_cpu:
        sys.exit(f"error: {msg} Run it on a GPU, or pass --allow-cpu to run it here anyway.")
    print(f"warning: {msg} Running anyway (--allow-cpu); results are written only to --out.", flush=True)


def default_stream_bytes() -> int:
    """Bytes per array of the bandwidth passes: 2 GiB on a GPU (far beyond L2), 64 MiB elsewhere."""
    return 2 << 30 if jax.default_backend() == "gpu" else 64 << 20


# Streaming-read variants: name -> (dtype, shape of an nbytes array given its element count, reduction).
_READ_VARIANTS = {
    "f32 sum": (jnp.float32, lambda n: (n,), lambda x: jnp.sum(x)),
    "bf16 sum, f32 accumulation": (jnp.bfloat16, lambda n: (n,), lambda x: jnp.sum(x, dtype=jnp.float32)),
    "f32 max": (jnp.float32, lambda n: (n,), lambda x: jnp.max(x)),
    "f32 row sums [n/8192, 8192]": (jnp.float32, lambda n: (n // 8192, 8192), lambda x: jnp.sum(x, axis=1)),
    "f32 column sums [n/8192, 8192]": (jnp.float32, lambda n: (n // 8192, 8192), lambda x: jnp.sum(x, axis=0)),
}


def read_bandwidth(nbytes: int | None = None) -> tuple[float, dict[str, float]]:
    """(best, {variant: bytes/s}) of streaming reductions, counting bytes read only.

    Each timed call reduces 4 arrays of nbytes / 2 in one jitted program (4 kernels back to back, or fewer
    if XLA merges them): separate calls of one reduction each ran ~1% slower than a chain of reductions
    inside one program (benchmarks/probe_read_chain.py found the faster pattern), and the ceiling must be
    the fastest read we know. Each array is far larger than the L2, so no reduction reads another's bytes
    from it.
    """
    nbytes = nbytes or default_stream_bytes()
    rates = {}
    for i, (name, (dtype, shape, reduce)) in enumerate(_READ_VARIANTS.items()):
        n = nbytes // 2 // jnp.dtype(dtype).itemsize
        xs = [jax.random.normal(jax.random.key(10 * i + j), shape(n), jnp.float32).astype(dtype) for j in range(4)]
        ms = time_fn(jax.jit(lambda *xs, reduce=reduce: [reduce(x) for x in xs]), [tuple(xs)], inner=10, reps=10)
        rates[name] = sum(x.size * x.dtype.itemsize for x in xs) / (ms * 1e-3)
        del xs
    return max(rates.values()), rates


def copy_bandwidth(nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = nbytes or default_stream_bytes()
    n = nbytes // 4
    xs = [jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda x: x * 1.0000001)  # a real elementwise pass: read n*4, write n*4
    ms = time_fn(copy, [(x,) for x in xs], inner=10, reps=10)
    del xs
    return 2 * n * 4 / (ms * 1e-3)


def measure_ceiling() -> dict:
    """The bandwidth ceiling of this run: {"read_bw": bytes/s (the ceiling), "copy_bw", "read_variants"}."""
    read_bw, variants = read_bandwidth()
    copy_bw = copy_bandwidth()
    best = max(variants, key=variants.get)
    print(f"ceiling: streaming-read bandwidth {read_bw / 1e12:.3f} TB/s (best of {len(variants)} reductions: "
          f"{best}); copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write, information only) on {device_name()}",
          flush=True)
    return {"read_bw": read_bw, "copy_bw": copy_bw, "read_variants": variants}


def ceiling_meta(ceiling: dict) -> dict:
    """What the result files say about the ceiling used."""
    return {
        "ceiling": "streaming-read bandwidth (best of several large reductions, four to a program; bytes read only)",
        "read_bw_TBps": ceiling["read_bw"] / 1e12,
        "read_variants_TBps": {k: v / 1e12 for k, v in ceiling["read_variants"].items()},
        "copy_bw_TBps": ceiling["copy_bw"] / 1e12,
        "copy_bw_note": "read + write of an elementwise pass; information only, not the ceiling",
    }


def check_ceiling(records: list[dict], fields: list[str], label) -> list[str]:
    """Loud warnings for every record whose fraction of the read ceiling (any of `fields`) exceeds 1.

    label(record) names the case. Returns the warnings (also printed to stderr).
    """
    warnings = []
    for r in records:
        for f in fields:
            v = r.get(f)
            if isinstance(v, float) and v > 1.0:
                warnings.append(f"{label(r)}: {f} = {v:.3f} > 1, above the streaming-read ceiling: "
                                f"THE CEILING IS WRONG (a faster read pattern exists)")
    for w in warnings:
        print(f"!!!!!!!! WARNING: {w}", file=sys.stderr, flush=True)
    return warnings


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", str(d))


def metadata(command: str) -> dict:
    return {
        "device": device_name(),
        "backend": jax.default_backend(),
        "command": command,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    """The lines above a table: device, date, command, ceiling, clocks, warnings."""
    lines = [f"{meta['device']} ({meta.get('backend', '?')}), jax {meta['jax']}, {meta['date']}", "",
             f"`{meta['command']}`", ""]
    if "read_bw_TBps" in meta:
        lines += [f"Ceiling: {meta['ceiling']}: {meta['read_bw_TBps']:.3f} TB/s; frac_* columns divide by it. "
                  f"Copy bandwidth {meta['copy_bw_TBps']:.3f} TB/s ({meta['copy_bw_note']}).", ""]
    for line in meta.get("clocks", []):
        lines += [f"Clock: {line}", ""]
    for w in meta.get("warnings", []):
        lines += [f"**WARNING: {w}**", ""]
    return lines


def check_out_dir(out_dir: Path) -> None:
    """Exit at once (before any measuring) if figures measured off a GPU would land in benchmarks/results."""
    backend = jax.default_backend()
    if backend != "gpu" and Path(out_dir).resolve() == RESULTS.resolve():
        sys.exit(f"error: not writing {backend} figures into {RESULTS} (GPU results only); pass --out DIR")


def write_results(name: str, meta: dict, records: list[dict], columns: list[str], out_dir: Path = RESULTS,
                  echo: bool = True) -> str:
    """Write NAME.json (meta + records) and NAME.md (header + table) whole, print the table (echo), return it.

    Refuses to write figures measured off a GPU into benchmarks/results.
    """
    out_dir = Path(out_dir)
    if meta.get("backend") != "gpu" and out_dir.resolve() == RESULTS.resolve():
        sys.exit(f"error: not writing {meta.get('backend')} figures into {RESULTS} (GPU results only); pass --out DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = markdown_table(records, columns)
    (out_dir / f"{name}.md").write_text("\n".join([f"# {name}", "", *header_lines(meta), table, ""]))
    if echo:
        print(table, flush=True)
    return table

"""Shared benchmark helpers: pipelined median timing, measured copy bandwidth, result files.

Timing: each sample dispatches `inner` calls back to back and blocks once, so launch latency overlaps
device work (as a serving loop would); the reported figure is the median over `reps` samples of the
per-call time. Inputs are rotated among `len(arg_sets)` copies so repeated calls do not hit in L2.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).resolve().parent / "results"


def time_fn(fn, arg_sets, *, inner: int = 20, reps: int = 15, warmup: int = 3) -> float:
    """Median per-call milliseconds of fn(*args), rotating over arg_sets (a list of arg tuples)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    xs = [jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda x: x * 1.0000001)  # a real elementwise pass: read n*4, write n*4
    ms = time_fn(copy, [(x,) for x in xs], inner=10, reps=10)
    del xs
    return 2 * nbytes / (ms * 1e-3)


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", str(d))


def metadata(command: str) -> dict:
    return {
        "device": device_name(),
        "command": command,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, meta: dict, records: list[dict], columns: list[str], out_dir: Path = RESULTS) -> str:
    """Write NAME.json (meta + records) and NAME.md (a table), print the table, return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = markdown_table(records, columns)
    header = f"# {name}\n\n{meta['device']}, jax {meta['jax']}, {meta['date']}\n\n`{meta['command']}`\n\n"
    (out_dir / f"{name}.md").write_text(header + table + "\n")
    print(table)
    sys.stdout.flush()
    return table

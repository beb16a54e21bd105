"""CPU: does an engine step cost the pages it uses, or the size of the KV pool?

    python -m benchmarks.cpu_pool_step [--pages 64,1024] [--dtypes bf16,fp32] [--out DIR] [--name NAME]

The CPU path's jnp references gather and scatter only the pages a step uses, but XLA's CPU backend once
copied the whole pool around them (converts, bitcast-converts at a program's or a loop's edge). This times
the engine's decode program (4 rows of 100 cached tokens each, one new token) and its mixed program (no
decode rows, one empty prefill bucket) through a `ModelRunner` of a random SmolLM2-135M at each pool size:
wall clock of one call (median of 8 after 2 warm-up calls). Flat across pool sizes is the goal. Also counts
the instructions of each compiled program that make a whole pool (`whole_pool_ops`, which
tests/test_engine.py holds at zero: converts, copies, bitcast-converts; not parameters, plumbing or the
in-place scatters), in loop bodies too. CPU figures, for CPU questions: written to DIR (default benchmarks/results/cpu), never next to the
GPU results.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from polar_jax.config import preset
from polar_jax.engine import model_runner as mr
from polar_jax.params import init_params

ROWS, CACHED = 4, 100
COLUMNS = ["program", "dtype", "pages", "pool_MB", "ms", "whole_pool_ops"]


def _shape_and_opcode(instruction: str) -> tuple[str, str]:
    """('u16[2,3]{1,0}', 'fusion') of an HLO instruction line '[ROOT ]%x = <shape> <opcode>(...)'; a tuple
    shape '(.., ..)' whole."""
    rest = instruction.split(" = ", 1)[1]
    depth, end = 0, 0
    for end, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == " " and depth == 0:
            break
    return rest[:end], rest[end + 1:].split("(", 1)[0]


def whole_pool_ops(hlo: str, shape) -> list[str]:
    """The instructions of a compiled CPU program that make a whole array of `shape` (any dtype), but for the
    parameters, loop and tuple plumbing, bitcasts and fusions whose root is a scatter (an in-place write of a
    few rows): converts, copies, bitcast-converts, selects, .. over the whole pool. Fused computations are
    skipped: their instructions are computed element by element into the fusion's result (a gather's fusion
    reads only the rows it gathers)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%(\S+) \(.*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name and line.strip().startswith(("%", "ROOT %")):
            comps[name].append(line.strip())
    calls = re.compile(r"calls=%([\w.\-]+)")
    fused = {c for lines in comps.values() for i in lines if _shape_and_opcode(i)[1] == "fusion"
             for c in calls.findall(i)}
    roots = {n: _shape_and_opcode(i)[1] for n, lines in comps.items() for i in lines if i.startswith("ROOT")}
    dims = "[" + ",".join(map(str, shape)) + "]"
    bad = []
    for n, lines in comps.items():
        if n in fused:
            continue
        for i in lines:
            out, op = _shape_and_opcode(i)
            if dims not in out or op in ("parameter", "get-tuple-element", "tuple", "bitcast", "while", "call"):
                continue
            if op == "fusion" and roots.get(calls.findall(i)[0]) in ("scatter", "dynamic-update-slice"):
                continue
            bad.append(i[:200])
    return bad


def measure(dtype, pages: int) -> list[dict]:
    cfg = preset("smollm2-135m")
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), init_params(cfg, jax.random.key(0)))
    buckets = mr.Buckets.make(ROWS, 64, 128)
    r = mr.ModelRunner(cfg, params, num_pages=pages, page_size=32, max_model_len=512, buckets=buckets)
    decode = list(r._decode_args([], ROWS)[0])
    decode[2] = (np.arange(ROWS * r.M, dtype=np.int32).reshape(ROWS, r.M) % (pages - 1)) + 1  # page table
    decode[3] = np.full(ROWS, CACHED, np.int32)                                                # lengths
    decode[4] = np.ones(ROWS, bool)                                                            # valid rows
    S = buckets.prefill[0]
    prefill = r._prefill_args([], S)[0]
    programs = {"decode": (mr._DECODE, (cfg, None, params)),
                "mixed": (mr._MIXED, (cfg, None, r._max_new(S), params))}
    records = []
    for name, (fn, head) in programs.items():
        rest = (*decode, *prefill) if name == "mixed" else tuple(decode)
        n_ops = len(whole_pool_ops(fn.lower(*head, r.k, r.v, r.last, *rest).compile().as_text(), r.k.shape))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r.k, r.v, logits = fn(*head, r.k, r.v, r.last, *rest)
            jax.block_until_ready((r.k, r.v, logits))
            times.append(time.perf_counter() - t0)
        rec = dict(program=name, dtype=jnp.dtype(dtype).name, pages=pages, pool_MB=2 * r.k.nbytes / 1e6,
                   ms=statistics.median(times[2:]) * 1e3, whole_pool_ops=n_ops)
        print(f"  {name:6s} {rec['dtype']:8s} {pages:5d} pages ({rec['pool_MB']:7.1f} MB): {rec['ms']:8.1f} ms; "
              f"whole-pool ops {n_ops}", flush=True)
        records.append(rec)
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="64,1024", help="pool sizes, comma-separated (default 64,1024)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="weight and pool dtypes, comma-separated")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu"), help="result folder (default benchmarks/results/cpu)")
    ap.add_argument("--name", default="cpu_pool_step", help="result file name (default cpu_pool_step)")
    args = ap.parse_args(argv)
    dtypes = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
    sources = subprocess.run(["git", "-C", str(Path(mr.__file__).parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"{jax.default_backend()} ({common.device_name()}), jax {jax.__version__}, polar_jax sources {sources}")
    records = [rec for d in args.dtypes.split(",") for p in args.pages.split(",") for rec in measure(dtypes[d], int(p))]
    command = " ".join(["python -m benchmarks.cpu_pool_step", *(sys.argv[1:] if argv is None else argv)])
    meta = {**common.metadata(command), "sources": sources,
            "clocks": [f"wall: one call of the program, median of 8 after 2 warm-up calls; {ROWS} rows of "
                       f"{CACHED} cached tokens; polar_jax sources {sources}"]}
    common.write_results(args.name, meta, records, COLUMNS, Path(args.out))


if __name__ == "__main__":
    main()

"""Probe: is a decode step bound by the host's dispatch or by the GPU? One model shape, dense, as
benchmarks.generate times it (ctx positions in a cache of exactly ctx, pipelined steps).

    python -m benchmarks.probe_dispatch --model llama-3-8b --batch 16 --ctx 2048 [--label NAME]

Prints one line: the host's time to enqueue a step (the `step(...)` call returning, nothing blocked), the wall
time per pipelined step, and the device span per step from a profiler trace (kernel clock). A wall time near
the enqueue time and above the device span means the host sets the pace. Run it under different XLA_FLAGS
(e.g. command buffers off) in separate processes: the flags are read when the GPU backend starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from benchmarks.generate import load_model, make_step, random_cache


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--label", default="", help="a name for this run's line (e.g. the XLA_FLAGS it ran under)")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--fold-in", action="store_true",
                    help="make each step's key with jax.random.fold_in(key, i) between the steps (a dispatch of "
                         "its own), as benchmarks.generate's timing loop did; default: one key for every step")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_dispatch", args.allow_cpu)

    cfg, params, _ = load_model(args.model, None)
    step = make_step(cfg, None)
    state = {"cache": random_cache(cfg, args.batch, args.ctx - 1, room=1)}
    tokens = jnp.zeros((args.batch,), jnp.int32) + 7
    key = jax.random.key(0)
    for _ in range(3):
        tokens, state["cache"] = step(params, state["cache"], tokens, key)
    jax.block_until_ready(tokens)

    enqueue, wall = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(args.steps):
            k = jax.random.fold_in(key, i) if args.fold_in else key
            tokens, state["cache"] = step(params, state["cache"], tokens, k)
        t1 = time.perf_counter()
        jax.block_until_ready(tokens)
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) / args.steps * 1e3)
        wall.append((t2 - t0) / args.steps * 1e3)

    def run(k):
        tok, state["cache"] = step(params, state["cache"], tokens, k)
        return tok

    _, span = device_profile(run, [(key,)] * 4, calls=4)
    label = args.label or f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}" + (" fold_in" if args.fold_in else "")
    print(f"{label}: {args.model} B={args.batch} "
          f"ctx={args.ctx}: enqueue {statistics.median(enqueue):.3f} ms/step, wall {statistics.median(wall):.3f} "
          f"ms/step, device span {span / 1e6:.3f} ms/step")


if __name__ == "__main__":
    main()

"""Probe: what dispatching an engine decode step costs the host, part by part (GPU).

    python -m benchmarks.probe_dispatch_args [--model smollm2-135m] [--batch 64] [--ctx 1024]

Runs the engine in pure decode (as benchmarks.host_step), then times, per step, the decode program's and the
sampler program's calls as the engine makes them (host_args.HostPacked): packing the host arguments into one
buffer, and the jitted call (its one host-to-device copy and XLA's enqueue of the program). Prints one line per
part (ms a step, median). (Before HostPacked, git 249382b's version timed each numpy argument's own copy:
logs/probe_dispatch_args_465a168.log.)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax import SamplingParams, init_params, preset
from polar_jax.engine import model_runner
from polar_jax.engine.llm_engine import LLMEngine


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="unused (gpu_session.sh passes it); prints only")
    args = ap.parse_args(argv)
    cfg = preset(args.model)
    params = init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    B, steps = args.batch, args.steps
    eng = LLMEngine(cfg, params, None, max_num_seqs=B, max_model_len=args.ctx + steps + 64, progress=False)
    rng = np.random.default_rng(0)
    for i in range(B):
        eng.add_request(f"h{i}", rng.integers(3, cfg.vocab_size, args.ctx).tolist(),
                        SamplingParams(temperature=0, max_tokens=steps + 32, ignore_eos=True))
    while eng.scheduler.waiting or any(s.needs_prefill for s in eng.scheduler.running):
        eng.step()
    for _ in range(8):
        eng.step()
    t = defaultdict(list)

    def timed(name, program):
        """Time program's calls: packing its host arguments, and the jitted call (XLA's enqueue of the step)."""
        pack_args, jitted = program._packed_args, program._jit

        def timed_pack(args):
            t0 = time.perf_counter()
            out = pack_args(args)
            t[name + " pack"].append(time.perf_counter() - t0)
            return out

        def timed_jit(*args):
            t0 = time.perf_counter()
            out = jitted(*args)
            t[name + " jitted call"].append(time.perf_counter() - t0)
            return out

        program._packed_args, program._jit = timed_pack, timed_jit

    for name in ("_DECODE", "_SAMPLE"):
        timed(name, getattr(model_runner, name))
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    print(f"{'engine step (wall)':40s} {(time.perf_counter() - t0) / steps * 1e3:.3f} ms")
    # The same device arguments (weights, pools, last tokens, a buffer) into a program of one tiny kernel: what a
    # jitted call costs before any of the model's kernels is enqueued.
    tiny = jax.jit(lambda params, k, v, last, buf: buf[0] + last[0])
    r, buf = eng.runner, jnp.zeros(1024, jnp.int32)
    jax.block_until_ready(tiny(r.params, r.k, r.v, r.last, buf))
    for _ in range(steps):
        t0 = time.perf_counter()
        tiny(r.params, r.k, r.v, r.last, buf)
        t["tiny program, the step's arguments"].append(time.perf_counter() - t0)
    for k, v in t.items():
        print(f"{k:40s} {statistics.median(v) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

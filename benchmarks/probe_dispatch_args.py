"""Probe: what dispatching an engine decode step costs the host, part by part (GPU).

    python -m benchmarks.probe_dispatch_args [--model smollm2-135m] [--batch 64] [--ctx 1024]

Runs the engine in pure decode (as benchmarks.host_step), then times, per step: the decode program's call
and the sampler program's call as the engine makes them (numpy arguments), and, on the same arguments,
jax.device_put of all of them at once and one by one. Prints one line per part (ms a step, median).
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
    real = {n: getattr(model_runner, n) for n in ("_DECODE", "_SAMPLE")}

    def timed(name):
        fn = real[name]

        def wrapper(*a):
            host = [x for x in a if isinstance(x, np.ndarray | np.generic)]
            t0 = time.perf_counter()
            out = fn(*a)
            t1 = time.perf_counter()
            t[name].append(t1 - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(host))
            t[name + " device_put(all) blocked"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.device_put(host)
            t[name + " device_put(all) async"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for x in host:
                jax.device_put(x)
            t[name + " device_put(each) async"].append(time.perf_counter() - t0)
            t[name + " numpy args"].append(len(host))
            return out

        return wrapper

    for n in real:
        setattr(model_runner, n, timed(n))
    for _ in range(steps):
        eng.step()
    for k, v in t.items():
        print(f"{k:40s} {statistics.median(v) * (1 if 'args' in k else 1e3):.3f}{'' if 'args' in k else ' ms'}")


if __name__ == "__main__":
    main()

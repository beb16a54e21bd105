"""Where the host's time goes in an engine decode step: scheduling, launching, waiting, finishing.

    python -m benchmarks.host_step [--model smollm2-135m] [--batch 64] [--ctx 1024] [--steps 200] [--out DIR]

B requests of ctx prompt tokens (random ids, random bf16 weights of the preset) are prefilled, then `--steps`
decode steps of all B rows are timed through `LLMEngine.step()`, greedy, ignore_eos, with the time of each part
of a step (the engine's own methods, timed by wrappers): `Scheduler.schedule` and `advance` (schedule_ms),
`ModelRunner.launch` (launch_ms: the programs' arguments and their dispatch), the wait for the step before
(wait_ms: `collect` blocked on the device), and the rest of finishing it (finish_ms: `apply`, detokenising,
the outputs). host_ms = wall - wait: the host's work a step, which overlaps the device's (one step in flight),
so a step takes max(host, device) and a host_ms above the device's step time means the host sets the pace.

Two rows per batch: `device` (the real programs) and `stub` (the same loop with the model and sampler
programs replaced by functions that return host arrays at once: the engine's Python alone, no dispatch). On a
CPU the device rows time the CPU backend, whose compute competes with the host for the same cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from polar_jax import SamplingParams, init_params, preset
from polar_jax.engine import model_runner
from polar_jax.engine.llm_engine import LLMEngine

COLUMNS = ["mode", "model", "batch", "ctx", "steps", "ms_per_step", "host_ms", "schedule_ms", "launch_ms",
           "wait_ms", "finish_ms"]
WARM_STEPS = 8  # decode steps before the timed ones


def _stub_programs(vocab: int, seed: int = 0):
    """Stand-ins for the engine's model and sampler programs that return host arrays at once (random tokens)."""
    rng = np.random.default_rng(seed)

    def decode(cfg, sparsity, params, k, v, last, tokens, *rest):
        return k, v, np.zeros((tokens.shape[0], 1), np.float32)

    def mixed(cfg, sparsity, max_new, params, k, v, last, d_tokens, *rest):
        return k, v, np.zeros((d_tokens.shape[0] + rest[9].shape[0], 1), np.float32)  # riders + chunks

    def sample(filtered, top, last, logits, *rest):
        n = logits.shape[0]
        sampled = np.zeros((n, 2 + 2 * top), np.int32)  # model_runner.unpack_sampled's layout
        sampled[:, 0] = rng.integers(3, vocab, n)
        return last, sampled

    return {"_DECODE": decode, "_MIXED": mixed, "_SAMPLE": sample}


def _timed(obj, name: str, key: str, totals: dict) -> None:
    """Wrap obj.name so that its calls' seconds add up in totals[key]."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            totals[key] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def measure(cfg, params, B: int, ctx: int, steps: int, stub: bool) -> dict:
    """One row: B requests of ctx prompt tokens prefilled, then `steps` decode steps timed by part."""
    saved = {name: getattr(model_runner, name) for name in ("_DECODE", "_MIXED", "_SAMPLE")}
    if stub:
        for name, fn in _stub_programs(cfg.vocab_size).items():
            setattr(model_runner, name, fn)
    try:
        # Room for the prompt, its first token, WARM_STEPS and the timed steps, so no request ends while timed.
        eng = LLMEngine(cfg, params, None, max_num_seqs=B, max_model_len=ctx + steps + WARM_STEPS + 8,
                        progress=not stub, compile=not stub)
        rng = np.random.default_rng(0)
        for i in range(B):
            eng.add_request(f"h{i}", rng.integers(3, cfg.vocab_size, ctx).tolist(),
                            SamplingParams(temperature=0, max_tokens=steps + WARM_STEPS + 4, ignore_eos=True))
        while eng.scheduler.waiting or any(s.needs_prefill for s in eng.scheduler.running):
            eng.step()
        for _ in range(WARM_STEPS):  # decode only from here; the step in flight and warm caches settle
            eng.step()
        totals = defaultdict(float)
        _timed(eng.scheduler, "schedule", "schedule", totals)
        _timed(eng.scheduler, "advance", "schedule", totals)
        _timed(eng.runner, "launch", "launch", totals)
        _timed(eng, "_finish", "finish", totals)  # includes collect, and so the wait
        eng.runner.record = True  # each step's wait for the device (StepRecord.wait_seconds)
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t0
        wait = sum(s.wait_seconds for s in eng.runner.log)
    finally:
        for name, fn in saved.items():
            setattr(model_runner, name, fn)
    ms = {k: 1e3 * v / steps for k, v in totals.items()}
    wait_ms = 1e3 * wait / steps
    return {"mode": "stub" if stub else "device", "model": cfg.name, "batch": B, "ctx": ctx, "steps": steps,
            "ms_per_step": 1e3 * wall / steps, "host_ms": 1e3 * wall / steps - wait_ms,
            "schedule_ms": ms["schedule"], "launch_ms": ms["launch"], "wait_ms": wait_ms,
            "finish_ms": ms["finish"] - wait_ms}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model preset (random weights; default smollm2-135m)")
    ap.add_argument("--batch", default="64", help="comma-separated decode batches (default 64)")
    ap.add_argument("--ctx", type=int, default=1024, help="prompt tokens of each request (default 1024)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed (default 200)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights (default bfloat16)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for host_step.json / .md")
    ap.add_argument("--name", default="host_step", help="result file name (default host_step)")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.host_step", args.allow_cpu)
    common.check_out_dir(args.out)
    cfg = preset(args.model)
    params = init_params(cfg, jax.random.PRNGKey(0), getattr(jnp, args.dtype))
    records = []
    for B in (int(b) for b in args.batch.split(",")):
        for stub in (False, True):
            records.append(measure(cfg, params, B, args.ctx, args.steps, stub))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in records[-1].items()}, flush=True)
    meta = common.metadata("python -m benchmarks.host_step " + " ".join(argv if argv is not None else sys.argv[1:]))
    common.write_results(args.name, meta, records, COLUMNS, args.out)


if __name__ == "__main__":
    main()

"""The engine side of benchmarks/serve_http.py: workload W offline and the reference step times (GPU).

Runs in its own process, so that its device memory is gone before the server starts. With the engine
configuration the server will use (model, max_num_seqs, max_model_len, prefill_chunk, random bf16 weights):
1. the references the server's latency targets compare with, from the wall time of `LLMEngine.step()`:
   - first token of a lone request whose prompt is one prefill chunk (add -> first token), and the next
     decode step (batch 1);
   - a pure decode step at each batch of --batches, every sequence at --ref-context cached tokens (the mean
     context of W's decode steps): max_num_seqs sequences are prefilled once, then aborted down batch by batch;
2. workload W offline, all submitted at once (benchmarks/serve_offline.py's run_workload): output tokens/s.
Writes one JSON file (--out) with these, the device and the KV pool size the server must use too.

    python -m benchmarks.serve_http_engine --model llama-2-7b --workload W.json --ref-context 1261 --out e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_device_args, device_name, require_gpu
from benchmarks.serve_offline import run_workload
from polar_jax import SamplingParams, init_params, preset
from polar_jax.cache import pages_for
from polar_jax.engine.llm_engine import LLMEngine

STEP_LIMIT = 10_000  # steps any one reference may take; more means the engine stopped making progress


def _steps_until(eng: LLMEngine, done, what: str) -> None:
    for _ in range(STEP_LIMIT):
        if done():
            return
        eng.step()
    raise RuntimeError(f"{what}: not done after {STEP_LIMIT} engine steps")


def first_token_reference(eng: LLMEngine, chunk: int, vocab: int, reps: int = 5) -> dict:
    """Median ms from adding a lone request of `chunk` prompt tokens to its first token, and of the next
    step (a decode step at batch 1). The first repetition is a warm-up."""
    rng = np.random.default_rng(3)
    first, second = [], []
    for r in range(reps + 1):
        rid = f"chunk{r}"
        eng.add_request(rid, rng.integers(3, vocab, chunk).tolist(),
                        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        t0 = time.perf_counter()
        stamps = []
        for _ in range(STEP_LIMIT):
            outs = [o for o in eng.step() if o.request_id == rid]
            if outs:
                stamps.append(time.perf_counter())
            if outs and outs[-1].finished:
                break
        if len(stamps) != 2:
            raise RuntimeError(f"expected 2 steps with a token for a 2-token request, got {len(stamps)}")
        if r:
            first.append((stamps[0] - t0) * 1e3)
            second.append((stamps[1] - stamps[0]) * 1e3)
    return {"prefill_chunk_first_token_ms": statistics.median(first),
            "decode_after_prefill_ms": statistics.median(second)}


def decode_reference(eng: LLMEngine, batches: list[int], ctx: int, vocab: int, warm: int = 2,
                     timed: int = 8) -> dict[int, float]:
    """{batch: median ms of a pure decode step}, each sequence about `ctx` tokens into its context.

    Batches whose sequences the KV pool cannot hold at that context are skipped (the engine never runs them
    there either: it preempts first)."""
    cap = eng.config.max_model_len - ctx
    grown = len(batches) * (warm + timed) + 2  # tokens each sequence gains while the batches are timed
    if cap < grown:
        raise ValueError(f"--ref-context {ctx} leaves {cap} output tokens below max_model_len: too few to time "
                         f"{len(batches)} batches")
    fit = eng.config.num_pages // pages_for(ctx + grown, eng.config.page_size)
    if fit < 1:
        raise ValueError(f"the KV pool ({eng.config.num_pages} pages) cannot hold one sequence of context {ctx}")
    if fit < max(batches):
        print(f"decode reference: the KV pool holds {fit} sequences of context {ctx}; batch {fit} timed instead "
              f"of the larger ones", flush=True)
        batches = sorted({b for b in batches if b <= fit} | {fit})
    top = max(batches)
    rng = np.random.default_rng(4)
    ids = [f"dec{i}" for i in range(top)]
    for rid in ids:
        eng.add_request(rid, rng.integers(3, vocab, ctx).tolist(),
                        SamplingParams(temperature=0, max_tokens=cap, ignore_eos=True))
    sched = eng.scheduler
    _steps_until(eng, lambda: not sched.num_waiting and not any(s.needs_prefill for s in sched.running),
                 "prefilling the decode reference's sequences")
    out = {}
    for b in sorted(batches, reverse=True):
        while sched.num_running > b:
            eng.abort_request(ids.pop())
        for _ in range(warm):
            eng.step()
        times = []
        for _ in range(timed):
            t0 = time.perf_counter()
            eng.step()
            times.append((time.perf_counter() - t0) * 1e3)
        if sched.num_running != b or sched.num_waiting:
            raise RuntimeError(f"decode reference at batch {b}: {sched.num_running} running, {sched.num_waiting} "
                               "waiting after timing (a sequence finished or was preempted)")
        out[b] = statistics.median(times)
        print(f"decode step at batch {b}, context {ctx}: {out[b]:.2f} ms", flush=True)
    for rid in ids:
        eng.abort_request(rid)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model preset (random bf16 weights)")
    ap.add_argument("--workload", type=Path, required=True, help='JSON {"prompts": [[ids]], "outs": [n]}')
    ap.add_argument("--max-num-seqs", type=int, required=True)
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--prefill-chunk", type=int, required=True)
    ap.add_argument("--ref-context", type=int, required=True, help="cached tokens per sequence of the decode "
                    "reference")
    ap.add_argument("--batches", required=True, help="comma-separated decode batches to time")
    ap.add_argument("--seed", type=int, default=0, help="random weights' seed (the server's --seed)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    add_device_args(ap)
    args = ap.parse_args(argv)
    require_gpu("benchmarks.serve_http", args.allow_cpu)
    w = json.loads(args.workload.read_text())
    cfg = preset(args.model)
    # The same weights as `polar serve --random-weights --seed S` (the figures do not depend on them).
    params = jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16))(jax.random.key(args.seed))
    eng = LLMEngine(cfg, params, None, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    prefill_chunk=args.prefill_chunk, progress=True)
    num_pages, page_size = eng.config.num_pages, eng.config.page_size
    refs = first_token_reference(eng, args.prefill_chunk, cfg.vocab_size)
    print(f"references: {refs}", flush=True)
    batches = sorted({min(int(b), args.max_num_seqs) for b in args.batches.split(",")})
    decode_ms = decode_reference(eng, batches, args.ref_context, cfg.vocab_size)
    del eng  # its KV pool: run_workload builds its own of the same size
    gc.collect()
    print(f"== offline engine: {len(w['prompts'])} requests of W", flush=True)
    rec, _, _ = run_workload(cfg, params, None, w["prompts"], w["outs"], max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk, num_pages=num_pages)
    rec.pop("tokens")
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
    args.out.write_text(json.dumps({
        "device": device_name(), "backend": jax.default_backend(), "jax": jax.__version__,
        "num_pages": num_pages, "page_size": page_size, "ref_context": args.ref_context, **refs,
        "decode_ms_by_batch": {str(b): ms for b, ms in decode_ms.items()}, "offline": rec}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

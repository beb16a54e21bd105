"""What the engine's sampler program costs a step, by vocabulary, batch and variant.

    python -m benchmarks.sampler_cost [--vocab 32000,49152,128256] [--batch 16,64,256] [--out DIR]

Times the program every engine step runs on its logits (`polar_jax.engine.model_runner._sample_program`: a
token per row with the row's own temperature, top-k, top-p and seed, its logprob, and the most likely tokens
with theirs) on f32 logits [B, V], wall clock of calls back to back, in its four variants: without and with
the top-k / top-p / min-p cut-offs (`filtered`, chosen on the host when some row asks for it) and reporting the
most likely token (top 1, an argmax) or the 20 most likely (a step in which some request asks for `logprobs`
or `top_logprobs` above 1); and one with every row penalized (repetition, frequency and presence penalties
over 2,048 tokens so far each). The rows sample at temperature 0.7, top-p 0.9. Writes sampler_cost.json and
.md; vs_plain divides by the variant without cut-offs, top-20 or penalties (or by the filtered one, for filtered
variants).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from polar_jax.engine.model_runner import _sample_program
from polar_jax.engine.sampling_params import MAX_LOGPROBS

PENALTY_TOKENS = 2048  # tokens so far of each row in the penalized variant
# The engine's program without its donation of `last`, so that one `last` serves every timed call.
_SAMPLE = jax.jit(_sample_program, static_argnums=(0, 1))


def time_variants(V: int, B: int) -> list[dict]:
    logit_sets = [(jax.random.normal(jax.random.key(i), (B, V), jnp.float32) * 3,) for i in range(2)]
    last = jnp.zeros(B, jnp.int32)
    slots = jnp.arange(B, dtype=jnp.int32)
    temps, top_p = jnp.full(B, 0.7, jnp.float32), jnp.full(B, 0.9, jnp.float32)
    top_k, seeds, steps = jnp.zeros(B, jnp.int32), jnp.arange(B, dtype=jnp.uint32), jnp.zeros(B, jnp.int32)
    min_p = jnp.zeros(B, jnp.float32)
    # Every row penalized, with T tokens so far (ids drawn at random): repetition 1.1, frequency 0.2, presence 0.1.
    T = PENALTY_TOKENS
    penalties = (jax.random.randint(jax.random.key(9), (B, T), 0, V, jnp.int32), jnp.full(B, T // 2, jnp.int32),
                 jnp.full(B, 0.1, jnp.float32), jnp.full(B, 0.2, jnp.float32), jnp.full(B, 1.1, jnp.float32))
    records = []
    for filtered, top, pen in [(f, t, None) for f in (False, True) for t in (1, min(MAX_LOGPROBS, V))] + \
            [(False, 1, penalties)]:
        def call(logits, filtered=filtered, top=top, pen=pen):
            return _SAMPLE(filtered, top, last, logits, slots, temps, top_k, top_p, min_p, seeds, steps, pen, None)
        ms = common.time_fn(call, logit_sets, inner=20, reps=15)
        records.append({"vocab": V, "batch": B, "filtered": filtered, "top": top,
                        "penalty_tokens": 0 if pen is None else T, "us": ms * 1e3})
    base = {r["filtered"]: r["us"] for r in records if r["top"] == 1 and not r["penalty_tokens"]}
    for r in records:
        r["vs_plain"] = r["us"] / base[r["filtered"]]
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_sampler_sizes_args(ap, vocab="32000,49152,128256")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for sampler_cost.json / .md")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.sampler_cost", args.allow_cpu)
    common.check_out_dir(args.out)
    vocabs, batches = common.sampler_sizes(args)
    records = []
    for V in vocabs:
        for B in batches:
            records += time_variants(V, B)
            print(f"V={V} B={B}: " + ", ".join(f"{'filtered' if r['filtered'] else 'plain'} top {r['top']}"
                                              f"{' penalized' if r['penalty_tokens'] else ''} {r['us']:.1f} us"
                                              for r in records[-5:]), flush=True)
    meta = common.metadata("python -m benchmarks.sampler_cost " + " ".join(argv if argv is not None else sys.argv[1:]))
    meta["median_top20_over_top1"] = float(np.median([r["vs_plain"] for r in records if r["top"] > 1]))
    common.write_results("sampler_cost", meta, records,
                         ["vocab", "batch", "filtered", "top", "penalty_tokens", "us", "vs_plain"], args.out)


if __name__ == "__main__":
    main()

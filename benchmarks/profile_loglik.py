"""Where decode-mode log-likelihood's time goes (the `polar` lm-eval model's requests, without lm-eval).

    python -m benchmarks.profile_loglik                      # smollm2-135m shape, arc_easy-like requests
    python -m benchmarks.profile_loglik --questions 300 --choices 4 --ctx-len 20,120 --cont-len 1,16

Random bf16 weights of a model preset; multiple-choice requests with a random context per question (lengths
uniform in --ctx-len) and --choices continuations (lengths uniform in --cont-len). Runs
polar_jax.evals.loglik.loglikelihood once to compile, then times one warm call (requests/s), then the same
batches one by one: host packing (numpy) apart from the device call (launch until the result is ready), and
the GPU kernels of one warm call from a profiler trace, grouped by name (kernel clock). Prints only; a
diagnostic, not a benchmark with a ceiling.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from benchmarks.generate import load_model
from benchmarks.profile_step import print_kernel_groups
from polar_jax.cache import PAGE_SIZE
from polar_jax.evals import loglik


def lohi(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_requests(vocab: int, questions: int, choices: int, ctx_len, cont_len, seed: int):
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(questions):
        ctx = tuple(int(t) for t in rng.integers(3, vocab, rng.integers(ctx_len[0], ctx_len[1] + 1)))
        for _ in range(choices):
            reqs.append((ctx, tuple(int(t) for t in rng.integers(3, vocab, rng.integers(cont_len[0], cont_len[1] + 1)))))
    return reqs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model preset, random bf16 weights")
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--ctx-len", type=lohi, default=(20, 120), help="LO,HI context tokens (default 20,120)")
    ap.add_argument("--cont-len", type=lohi, default=(1, 16), help="LO,HI continuation tokens (default 1,16)")
    ap.add_argument("--batch-size", type=int, default=1024, help="continuation rows per device call")
    ap.add_argument("--seed", type=int, default=0)
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.profile_loglik", args.allow_cpu)

    cfg, params, _ = load_model(args.model, None)
    reqs = make_requests(cfg.vocab_size, args.questions, args.choices, args.ctx_len, args.cont_len, args.seed)

    def run():
        return loglik.loglikelihood(cfg, params, reqs, batch_size=args.batch_size)

    t0 = time.perf_counter()
    run()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    print(f"{args.model}: {len(reqs)} requests ({args.questions} questions x {args.choices}), batch "
          f"{args.batch_size} rows: cold {cold:.2f} s, warm {warm:.3f} s = {len(reqs) / warm:.0f} requests/s")

    batches = loglik.plan_batches(reqs, args.batch_size)
    key = jax.random.key(0)
    print("batch  questions  rows  R  Q  Tp  Tc   pack ms  device ms")
    pack_s = device_s = 0.0
    for b, qs in enumerate(batches):
        t0 = time.perf_counter()
        p = loglik._pack(cfg, reqs, qs, PAGE_SIZE)
        t1 = time.perf_counter()
        jax.block_until_ready(loglik.score_batch(cfg, params, p, jax.random.fold_in(key, b), None, PAGE_SIZE))
        t2 = time.perf_counter()
        pack_s, device_s = pack_s + t1 - t0, device_s + t2 - t1
        R, Tc = p.inputs.shape
        Q, Tp = p.ctx_tokens.shape
        print(f"{b:5d}  {len(qs):9d}  {len(p.rows):4d}  {R}  {Q}  {Tp}  {Tc}  {1e3 * (t1 - t0):8.2f}  "
              f"{1e3 * (t2 - t1):9.2f}")
    print(f"total, batches one by one, each waited for: pack {pack_s:.3f} s, device {device_s:.3f} s (the warm "
          f"call overlaps packing with the device)")

    kernels, span = device_profile(run, [()], calls=1)
    if not kernels:
        print(f"no GPU kernels in the profiler trace (backend {jax.default_backend()}): no kernel breakdown")
        return
    print(f"kernels of one warm call: {sum(kernels.values()) / 1e6:.1f} ms busy over a device span of "
          f"{span / 1e6:.1f} ms")
    print_kernel_groups(kernels, top=20)


if __name__ == "__main__":
    main()

"""Where one decode (or prefill) step's time goes: GPU kernels of a step from a JAX profiler trace, grouped
by name.

    python -m benchmarks.profile_step --model llama-2-7b --batch 64 --ctx 2048 [--attn random --density 0.5]
    python -m benchmarks.profile_step --model llama-2-7b --batch 1 --ctx 0 --prefill 2048

Prints the kernels sorted by total time per step (count, total µs, share) and the step's device span
(kernel clock: durations from the profiler trace); for a prefill step also its matmul FLOP rate. Without a
GPU trace it says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from benchmarks.generate import fits, load_model, make_prefill_step, make_step, random_cache, random_routers
from benchmarks.serve_offline import matmul_params
from polar_jax.sparsity import SparsityConfig


def _group(name: str) -> str:
    """Kernel names carry numeric suffixes (fusion.123, loop_add_fusion_4): drop them to group."""
    return re.sub(r"[._]\d+", "", name)


def print_kernel_groups(kernels: dict[str, float], top: int, launches: dict[str, float] | None = None) -> None:
    """The `top` kernel groups (names without numeric suffixes) by total time: us, share, distinct names, and
    launches per step when `launches` is given."""
    groups, counts, n = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    for name, ns in kernels.items():
        groups[_group(name)] += ns
        counts[_group(name)] += 1
        n[_group(name)] += (launches or {}).get(name, 0)
    total = sum(groups.values())
    for name, ns in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        calls = f"  {n[name]:5.0f} launches" if launches is not None else ""
        print(f"{ns / 1e3:10.1f} us {100 * ns / total:5.1f}%  {counts[name]:3d} names{calls}  {name[:110]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--attn", default="all", choices=["all", "random", "router", "oracle"])
    ap.add_argument("--density", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4, help="steps traced (the figures are per step)")
    ap.add_argument("--prefill", type=int, default=0, metavar="T",
                    help="profile a prefill step of T new tokens per sequence after --ctx cached ones (dense)")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.profile_step", args.allow_cpu)

    cfg, params, _ = load_model(args.model, None)
    if not fits(cfg, args.batch, args.ctx + args.prefill):
        sys.exit(f"error: {args.model} at batch {args.batch}, context {args.ctx + args.prefill}: weights and KV cache "
                 f"need more than 85% of this GPU's memory; lower --batch or --ctx")
    params = dict(params, routers=random_routers(cfg, jax.random.key(3)))
    sp = None if args.attn == "all" else SparsityConfig(attn=args.attn, attn_density=args.density)
    T = args.prefill or 1
    step = make_prefill_step(cfg) if args.prefill else make_step(cfg, sp)
    # decode: ctx positions in a cache of exactly ctx, as benchmarks.generate; prefill: ctx cached + T new
    cached, room = (args.ctx, max(128, T)) if args.prefill else (args.ctx - 1, 1)
    state = {"cache": random_cache(cfg, args.batch, cached, room=room)}
    tokens = jnp.zeros((args.batch,) + ((T,) if args.prefill else ()), jnp.int32) + 7

    def run(key):  # threads the donated cache through the calls
        tok, state["cache"] = step(params, state["cache"], tokens, key)
        return tok

    keys = [(jax.random.key(i),) for i in range(args.steps)]
    launches = {}
    kernels, span = device_profile(run, keys, calls=args.steps, launches=launches)
    if not kernels:
        sys.exit(f"error: no GPU kernels in the profiler trace (backend {jax.default_backend()}): no kernel clock")
    print(f"{args.model} B={args.batch} ctx={args.ctx} attn={args.attn} {args.density}"
          f"{f' prefill T={T}' if args.prefill else ''}: device span {span / 1e3:.0f} us/step, kernels "
          f"{sum(kernels.values()) / 1e3:.0f} us/step, {sum(launches.values()):.0f} kernel launches/step")
    if args.prefill:
        flops = 2 * matmul_params(params) * args.batch * T  # the projections and the LM head (last token only)
        print(f"prefill: {flops / (span * 1e-9) / 1e12:.0f} TFLOP/s of projection matmuls over the device span")
    print_kernel_groups(kernels, top=25, launches=launches)


if __name__ == "__main__":
    main()

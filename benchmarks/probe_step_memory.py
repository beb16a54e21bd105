"""Probe: what device memory a compiled decode step asks for beyond its arguments, per model shape (dense, as
benchmarks.generate builds it: ctx positions in a cache of exactly ctx, the cache donated).

    python -m benchmarks.probe_step_memory --cases llama-2-7b:64:2048,llama-3-8b:16:2048

Compiles each step from abstract shapes (nothing is allocated, so shapes that do not fit still compile) and
prints XLA's memory analysis: the weights and the KV cache, the output bytes aliased to the donated cache, and
the temporary bytes. A temporary about the size of the cache means the step copies the cache.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.generate import DTYPE, _nbytes, make_step, parse_cases
from polar_jax import preset
from polar_jax.cache import cache_bytes, init_cache
from polar_jax.params import init_params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=parse_cases, default=parse_cases("llama-2-7b:64:2048,llama-3-8b:16:2048"),
                    help="MODEL:B:CTX, comma-separated")
    args = ap.parse_args(argv)
    gib = 2.0 ** 30
    for name, B, ctx in args.cases:
        cfg = preset(name)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), DTYPE))
        cache = jax.eval_shape(lambda: init_cache(cfg, B, ctx, DTYPE))
        tokens = jax.ShapeDtypeStruct((B,), jnp.int32)
        key = jax.eval_shape(lambda: jax.random.key(0))
        m = make_step(cfg, None).lower(params, cache, tokens, key).compile().memory_analysis()
        weights = sum(_nbytes(x) for x in jax.tree_util.tree_leaves(params))
        kv = cache_bytes(cfg, B, ctx, DTYPE)
        print(f"{name} B={B} ctx={ctx} ({jax.devices()[0].device_kind}): weights {weights / gib:.2f} GiB, "
              f"KV cache {kv / gib:.2f} GiB, arguments {m.argument_size_in_bytes / gib:.2f} GiB, output "
              f"{m.output_size_in_bytes / gib:.2f} GiB (aliased {m.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{m.temp_size_in_bytes / gib:.3f} GiB")


if __name__ == "__main__":
    main()

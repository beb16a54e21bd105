"""Probe: what the sampler's top-k / top-p / min-p filter costs, the sort-based way and by threshold search.

    python -m benchmarks.probe_sampler_filter [--vocab 49152,128256] [--batch 16,64,256] [--out DIR]

Wall clock (calls back to back) of one jitted filter on f32 logits [B, V], rows at top-k 50 / top-p 0.9 /
min-p 0.05 mixed: the engine's `sampler._filtered` (threshold searches, each pass one Pallas kernel that reads
the rows once: pallas_kernels.threshold_search), the same searches in jnp (the kernel's reference), the
sort-based filter it replaced (a [B, V] sort and cumulative sum) and that filter sorting uint32 keys that
order as the values do in place of the floats, and each sort alone; and the kernel with other numbers of
tokens a program. Checks first that both filters keep the same tokens on these inputs. Writes
probe_sampler_filter.json / .md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from polar_jax.engine import sampler
from pallas_kernels.threshold_search import largest_threshold
from pallas_kernels.threshold_search import triton as kernel
from pallas_kernels.threshold_search.search import key, value
from polar_jax.engine.sampler import _filtered


def sorted_filter(z, top_k, top_p, min_p, desc=None):
    """The sampler's filter before the threshold search: a sort and a cumulative sum over [B, V]."""
    V = z.shape[-1]
    desc = -jnp.sort(-z, axis=-1) if desc is None else desc  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)
    cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
    cut = jnp.minimum(jnp.sum(cum < top_p[:, None], axis=-1), V - 1)
    cutoff = jnp.maximum(jnp.take_along_axis(desc, cut[:, None], axis=-1), kth)
    cutoff = jnp.maximum(cutoff, desc[:, :1] + jnp.log(min_p)[:, None])
    keep = ((top_k <= 0) | (top_k >= V)) & (top_p >= 1) & (min_p <= 0)
    return jnp.where((z < cutoff) & ~keep[:, None], -jnp.inf, z)


def key_sorted_filter(z, top_k, top_p, min_p):
    """sorted_filter with the sort on uint32 keys that order as the values do (an integer sort, which XLA may
    hand to a radix sort) in place of the float sort."""
    desc = value(~jnp.sort(~key(z), axis=-1))
    return sorted_filter(z, top_k, top_p, min_p, desc=desc)


def traced_with(impl=None, block=None):
    """_filtered jitted with the threshold search's implementation `impl`, or the kernel's programs taking
    `block` tokens each."""
    def fn(*args):
        saved = sampler.largest_threshold, kernel.BLOCK
        sampler.largest_threshold = functools.partial(largest_threshold, impl=impl)
        kernel.BLOCK = block or kernel.BLOCK
        try:
            return _filtered(*args)
        finally:
            sampler.largest_threshold, kernel.BLOCK = saved
    return jax.jit(fn)


VARIANTS = {"search": jax.jit(_filtered),
            **{f"search, blocks of {n}": traced_with(block=n) for n in (1024, 2048, 8192)},
            "search, XLA": traced_with(impl="xla"),
            "search, no top-k row": jax.jit(lambda z, k, p, m: _filtered(z, jnp.zeros_like(k), p, m)),
            "sort + cumsum": jax.jit(sorted_filter), "sort alone": jax.jit(lambda z, *_: -jnp.sort(-z, axis=-1)),
            "key sort + cumsum": jax.jit(key_sorted_filter),
            "key sort alone": jax.jit(lambda z, *_: jnp.sort(~key(z), axis=-1))}


def inputs(V: int, B: int, seed: int):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(B, V)) * 3 / 0.7).astype(np.float32)  # temperature 0.7
    top_k = np.where(np.arange(B) % 3 == 0, 50, 0).astype(np.int32)
    top_p = np.where(np.arange(B) % 3 == 1, 1.0, 0.9).astype(np.float32)
    min_p = np.where(np.arange(B) % 4 == 2, 0.05, 0.0).astype(np.float32)
    return tuple(jnp.asarray(a) for a in (z, top_k, top_p, min_p))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_sampler_sizes_args(ap, vocab="49152,128256")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for probe_sampler_filter.json / .md")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_sampler_filter", args.allow_cpu)
    common.check_out_dir(args.out)
    vocabs, batches = common.sampler_sizes(args)
    records = []
    for V in vocabs:
        for B in batches:
            sets = [inputs(V, B, s) for s in range(2)]
            a, *others = (np.isfinite(np.asarray(VARIANTS[n](*sets[0])))
                       for n in ("search", "sort + cumsum", "key sort + cumsum", "search, XLA"))
            if not all(np.array_equal(a, b) for b in others):
                sys.exit(f"error: V={V} B={B}: the filters keep different tokens in rows "
                         f"{[np.flatnonzero((a != b).any(-1)).tolist() for b in others]}")
            for name, fn in VARIANTS.items():
                us = common.time_fn(fn, sets, inner=20, reps=15) * 1e3
                records.append({"vocab": V, "batch": B, "variant": name, "us": us,
                                "kept_mean": float(a.sum(-1).mean())})
            base = next(r["us"] for r in records[-len(VARIANTS):] if r["variant"] == "sort + cumsum")
            for r in records[-len(VARIANTS):]:
                r["vs_sort"] = r["us"] / base
            print(f"V={V} B={B}: " + ", ".join(f"{r['variant']} {r['us']:.1f} us" for r in records[-len(VARIANTS):]), flush=True)
    meta = common.metadata("python -m benchmarks.probe_sampler_filter " + " ".join(argv if argv is not None else sys.argv[1:]))
    common.write_results("probe_sampler_filter", meta, records, ["vocab", "batch", "variant", "us", "vs_sort", "kept_mean"],
                         args.out)


if __name__ == "__main__":
    main()

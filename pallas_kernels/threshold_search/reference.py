"""Pure-jnp reference for largest_threshold (same signature as the public function): the same search, each
pass's masses a jnp reduction. The CPU path, and the kernel tests' yardstick. On a GPU XLA reads each row
once per threshold there (benchmarks/probe_sampler_filter.md)."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.threshold_search.search import PASSES, key, narrowed, thresholds, value


def masses(z, t, shift=None):
    """[B, W]: per row, the weight of the tokens with z [B, V] >= each threshold t [B, W]."""
    w = jnp.ones_like(z) if shift is None else jnp.exp(z - shift[:, None])  # [B, V]
    return jnp.sum(jnp.where(z[:, None, :] >= t[:, :, None], w[:, None, :], 0.0), axis=-1)


def largest_threshold(z, target, lo, hi, shift=None, *, impl=None, interpret=None):
    del impl, interpret
    lo, hi = key(lo), key(hi)
    for _ in range(PASSES):
        lo, hi = narrowed(lo, hi, masses(z, value(thresholds(lo, hi)), shift), target)
    return value(lo)

"""Per row, the largest threshold at or above which the tokens still hold a count or mass.

  largest_threshold(z, target, lo, hi, shift=None, *, impl=None, interpret=None) -> [B] float32

Shapes and dtypes:
  z        [B, V] float32: a row per request (the sampler's scaled logits).
  target   [B] float32: the count or mass to hold.
  lo, hi   [B] float32: where to search; the tokens at or above lo must hold the target (lo is returned where
           no larger threshold does), and none above hi is looked at. lo = hi: that row is not searched.
  shift    None: each token weighs 1 (a count; exact up to 2 ** 24 tokens); or [B] float32: token v of row b
           weighs exp(z[b, v] - shift[b]) (with shift the row's maximum, the unnormalised softmax mass).
  returns  [B] float32: the largest t in [lo, hi] with sum of the weights of {v : z[b, v] >= t} >= target[b].
           With a count and target k, the k-th largest value; with the mass and target p times the row's
           total, the least likely token of the nucleus of p.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (a Pallas kernel a pass of the search on a CUDA GPU, or the Pallas interpreter with
  interpret=True: each pass reads every row once), "xla" (the pure-jnp reference, the same search, which XLA
  compiles to reductions that read each row once per threshold).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import dispatch, shape_of
from pallas_kernels.threshold_search import reference
from pallas_kernels.threshold_search import triton as triton_impl

IMPLS = {
    "triton": triton_impl.largest_threshold,
    "xla": reference.largest_threshold,
}


def check_contract(z, target, lo, hi, shift):
    """Raise ValueError naming the problem."""
    if z.ndim != 2 or z.dtype != jnp.float32:
        raise ValueError(f"z is {shape_of(z)} {z.dtype}; expected [B, V] float32")
    for name, a in (("target", target), ("lo", lo), ("hi", hi), ("shift", shift)):
        if a is not None and (shape_of(a) != (z.shape[0],) or a.dtype != jnp.float32):
            raise ValueError(f"{name} is {shape_of(a)} {a.dtype}; expected [B]=({z.shape[0]},) float32")


def largest_threshold(z, target, lo, hi, shift=None, *, impl=None, interpret=None):
    """[B] float32: see the module docstring."""
    check_contract(z, target, lo, hi, shift)
    return dispatch(IMPLS, impl, lambda name: IMPLS[name](z, target, lo, hi, shift, interpret=interpret))

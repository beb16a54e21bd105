"""largest_threshold in Pallas, lowered through Triton (GPU) or run by the Pallas interpreter (CPU).

One kernel a pass of the search, a program per (row b, block of BLOCK tokens): it first cuts the row's range
by the previous pass's partial masses (every program of the row alike: [S, W] floats), then reads its block
of z once, in CHUNK-token steps, adding each token's weight to the accumulator of every threshold it reaches
([CHUNK, WAYS] in registers, reduced once), and writes its partial masses [WAYS]. A row whose range is one
key (converged, or not searched: lo = hi) reads nothing. S, the blocks a row, is rounded up to a power of
two (the blocks past V add zeros), as Triton's vectors must be."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_backend
from pallas_kernels.threshold_search.search import PASSES, WAYS, key, narrowed, thresholds, value

CHUNK = 256  # tokens a loop step
BLOCK = 4096  # tokens a program (a multiple of CHUNK)


def _pass_kernel(z_ref, shift_ref, target_ref, lo_ref, hi_ref, prev_ref, mass_ref, lo_out_ref, hi_out_ref, *,
                 V: int, weighted: bool, first: bool):
    b, s = pl.program_id(0), pl.program_id(1)
    lo, hi, target = lo_ref[b], hi_ref[b], target_ref[b]
    if not first:  # the row's masses at the previous pass's thresholds
        lo, hi = narrowed(lo, hi, jnp.sum(plgpu.load(prev_ref.at[b]), axis=0), target)

    @pl.when(s == 0)
    def _range():
        lo_out_ref[b] = lo
        hi_out_ref[b] = hi

    t = value(thresholds(lo, hi))  # [WAYS]
    shift = shift_ref[b]

    def step(i, acc):
        cols = s * BLOCK + i * CHUNK + jnp.arange(CHUNK)
        live = cols < V
        z = plgpu.load(z_ref.at[b, pl.ds(s * BLOCK + i * CHUNK, CHUNK)], mask=live, other=-jnp.inf)  # [CHUNK]
        w = jnp.where(live, jnp.exp(z - shift) if weighted else 1.0, 0.0)
        return acc + jnp.where(z[:, None] >= t[None, :], w[:, None], 0.0)

    n_chunks = jnp.where((lo < hi) & (s * BLOCK < V), jnp.int32(BLOCK // CHUNK), jnp.int32(0))
    acc = lax.fori_loop(jnp.int32(0), n_chunks, step, jnp.zeros((CHUNK, WAYS), jnp.float32))
    plgpu.store(mass_ref.at[b, s, pl.ds(0, WAYS)], jnp.sum(acc, axis=0))


def largest_threshold(z, target, lo, hi, shift=None, *, impl=None, interpret=None):
    """Arguments already validated by the API."""
    del impl
    interpret = check_backend(interpret)
    B, V = z.shape
    if B == 0:
        return lo
    S = pl.next_power_of_2(pl.cdiv(V, BLOCK))
    lo, hi = key(lo), key(hi)
    mass = jnp.zeros((B, S, WAYS), jnp.float32)
    shift_arg = jnp.zeros(B, jnp.float32) if shift is None else shift
    rows = jax.ShapeDtypeStruct((B,), jnp.uint32)
    for p in range(PASSES):
        kernel = functools.partial(_pass_kernel, V=V, weighted=shift is not None, first=p == 0)
        mass, lo, hi = pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct((B, S, WAYS), jnp.float32), rows, rows),
            grid=(B, S),
            interpret=interpret,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            name="threshold_search",
        )(z, shift_arg, target, lo, hi, mass)
    return value(narrowed(lo, hi, jnp.sum(mass, axis=1), target)[0])

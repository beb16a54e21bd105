"""rope_and_cache_write in Pallas, lowered through Triton (GPU) or run by the Pallas interpreter (CPU).

One program per (token r, head slot s) of the fused projection qkv [R, (N + 2K) * H]: slot s < N is a
query head (rotated, stored to q [R, N * H]); N <= s < N + K a key head (rotated, stored into the pool at
[layer, page[r], s - N, off[r]]); the last K slots value heads (stored as they are). The pools are
aliased to the outputs, so only the new tokens' rows are written; a page id outside [0, P), or an offset
outside [0, Z), writes nothing. This replaces three XLA kernels of a decode layer (q's RoPE, the K scatter, the V scatter) by one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_backend


def _kernel(page_ref, off_ref, layer_ref, qkv_ref, *refs, N: int, K: int, H: int, P: int, Z: int, rope: bool):
    cos_ref, sin_ref = refs[:2] if rope else (None, None)
    q_ref, k_ref, v_ref = refs[-3:]  # k_ref / v_ref: the pools (aliased to their inputs)
    r, s = pl.program_id(0), pl.program_id(1)
    half = H // 2

    def load(ref, start):  # [H/2] f32
        return plgpu.load(ref.at[r, pl.ds(start, half)]).astype(jnp.float32)

    def halves(rotate):  # slot s of this token as its two halves, rotated when asked (HF rotate-half)
        x1, x2 = load(qkv_ref, s * H), load(qkv_ref, s * H + half)
        if not (rope and rotate):
            return x1, x2
        c1, c2, s1, s2 = load(cos_ref, 0), load(cos_ref, half), load(sin_ref, 0), load(sin_ref, half)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    def store(ref, at, start, x1, x2):  # the two halves at ref[*at, start:start + H]
        plgpu.store(ref.at[(*at, pl.ds(start, half))], x1.astype(ref.dtype))
        plgpu.store(ref.at[(*at, pl.ds(start + half, half))], x2.astype(ref.dtype))

    @pl.when(s < N)
    def _query():
        store(q_ref, (r,), s * H, *halves(True))

    page, off = page_ref[r], off_ref[r]
    writes = (page >= 0) & (page < P) & (off >= 0) & (off < Z)  # else the token's k and v go nowhere
    at = (layer_ref[0], jnp.clip(page, 0, P - 1), (s - N) % K, jnp.clip(off, 0, Z - 1))

    @pl.when((s >= N) & (s < N + K) & writes)
    def _key():
        store(k_ref, at, 0, *halves(True))

    @pl.when((s >= N + K) & writes)
    def _value():
        store(v_ref, at, 0, *halves(False))


def rope_and_cache_write(qkv, k_pages, v_pages, write_page, write_off, rope=None, *, n_heads, layer=None,
                         impl=None, interpret=None):
    """Arguments already validated by the API; k_pages / v_pages are the stacked [L, P, K, Z, H] pools."""
    del impl
    interpret = check_backend(interpret)
    B, T, W = qkv.shape
    _, P, K, Z, H = k_pages.shape
    if H & (H - 1):
        raise NotImplementedError(f"head_dim={H}: the Triton kernel loads half heads as power-of-two vectors")
    N, R = n_heads, B * T
    if R == 0:  # no tokens: nothing to rotate or write (an empty grid)
        return jnp.zeros((B, T, N, H), qkv.dtype), k_pages, v_pages
    flat = lambda a: a.reshape(R, *a.shape[2:])
    args = [flat(write_page).astype(jnp.int32), flat(write_off).astype(jnp.int32),
            jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), flat(qkv)]
    if rope is not None:
        args += [flat(rope[0]).astype(jnp.float32), flat(rope[1]).astype(jnp.float32)]
    args += [k_pages, v_pages]
    kernel = functools.partial(_kernel, N=N, K=K, H=H, P=P, Z=Z, rope=rope is not None)
    q, k_pages, v_pages = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((R, N * H), qkv.dtype), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        grid=(R, N + 2 * K),
        input_output_aliases={len(args) - 2: 1, len(args) - 1: 2},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        name="rope_and_cache_write",
    )(*args)
    return q.reshape(B, T, N, H), k_pages, v_pages

"""Pure-jnp reference for rope_and_cache_write (same signature as the public function): a split, the
HF rotate-half RoPE in f32 and two scatters. The CPU path, and the kernel tests' yardstick."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import from_raw_bits, raw_bits


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated by position (cos, sin [B, T, H], HF rotate-half layout); math in f32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def rope_and_cache_write(qkv, k_pages, v_pages, write_page, write_off, rope=None, *, n_heads, layer=None,
                         impl=None, interpret=None):
    del impl, interpret
    B, T = qkv.shape[:2]
    K, H = k_pages.shape[-3], k_pages.shape[-1]
    N = n_heads
    q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
    q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    # [B, T, K, H] into pages [(layer,) page, :, off]: the advanced indices broadcast to [B, T] in front. A page
    # id outside [0, P), or an offset outside [0, Z), drops its write, as in the kernel (mode="drop"; a
    # negative index would otherwise count from the end).
    P, Z = k_pages.shape[-4], k_pages.shape[-2]
    page = jnp.where((write_page >= 0) & (write_page < P) & (write_off >= 0) & (write_off < Z), write_page, P)
    at = (page, slice(None), write_off) if layer is None else (layer, page, slice(None), write_off)
    # Scattered as raw bits (pallas_kernels.common.raw_bits: a bf16 scatter on the CPU converts the whole pool).
    k_pages = from_raw_bits(raw_bits(k_pages).at[at].set(raw_bits(k.astype(k_pages.dtype)), mode="drop"),
                            k_pages.dtype)
    v_pages = from_raw_bits(raw_bits(v_pages).at[at].set(raw_bits(v.astype(v_pages.dtype)), mode="drop"),
                            v_pages.dtype)
    return q, k_pages, v_pages

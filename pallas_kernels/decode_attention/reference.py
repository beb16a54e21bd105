"""Pure-jnp reference for selective-head decode attention (same signature as the public function).

Computes every head (dense einsums, f32 scores and softmax, f32 accumulation) and zeroes the heads not
selected: the "XLA dense" baseline of the benchmarks is this function with head_idx=None under jit.
For f32 inputs the einsums run at HIGHEST precision (IEEE f32, not TF32).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def selected_mask(head_idx, K: int):
    """[B, K] bool: KV head k is selected for sequence b (entries outside [0, K), -1 included, select
    nothing: the kernel ignores them too)."""
    return jnp.any(head_idx[:, :, None] == jnp.arange(K)[None, None, :], axis=1)


def decode_attention(q, k_cache, v_cache, lengths, head_idx=None, *, layer=None, sm_scale=None, impl=None,
                     interpret=None):
    del impl, interpret
    if layer is not None:
        k_cache = lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        v_cache = lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
    B, N, H = q.shape
    _, K, S, _ = k_cache.shape
    G = N // K
    if sm_scale is None:
        sm_scale = H ** -0.5
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qg = q.reshape(B, K, G, H)
    s = jnp.einsum("bkgh,bksh->bkgs", qg, k_cache, precision=precision,
                   preferred_element_type=jnp.float32) * sm_scale                   # [B, K, G, S]
    live = jnp.arange(S)[None, :] < lengths[:, None]                # [B, S]; lengths > S act as S
    s = jnp.where(live[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)                                            # empty sequence
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)                                        # [B, K, G, 1]
    o = jnp.einsum("bkgs,bksh->bkgh", p.astype(v_cache.dtype), v_cache, precision=precision,
                   preferred_element_type=jnp.float32)                              # [B, K, G, H]
    o = o / jnp.where(den > 0, den, 1.0)
    if head_idx is not None:
        o = jnp.where(selected_mask(head_idx, K)[:, :, None, None], o, 0.0)
    return o.astype(q.dtype).reshape(B, N, H)

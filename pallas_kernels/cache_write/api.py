"""The new tokens' q, k and v from a fused q/k/v projection, k and v written into the paged KV cache.

  rope_and_cache_write(qkv, k_pages, v_pages, write_page, write_off, rope=None, *, n_heads, layer=None,
                       impl=None, interpret=None) -> (q [B, T, N, H], k_pages, v_pages)

Shapes and dtypes:
  qkv         [B, T, (N + 2K) * H] float16 | bfloat16 | float32: per token, N query heads, then K key
              heads, then K value heads, H each (the fused projection's layout).
  k_pages     [P, K, Z, H] (a pool of P pages of Z positions), or the stacked [L, P, K, Z, H] together with
              `layer`; float16 | bfloat16 | float32 (k and v are cast to it).
  v_pages     same shape and dtype as k_pages.
  write_page  [B, T] int32: the page each token's k and v go to; an id outside [0, P) writes nothing
              (padding tokens, positions past a sequence's capacity).
  write_off   [B, T] int32 in [0, Z): the position inside that page.
  rope        None, or (cos, sin), each [B, T, H] float: q and k are rotated (HF rotate-half, f32 math).
  n_heads     N, a Python int; N + 2K heads of H must make up qkv's last axis.
  layer       int32 scalar selecting the layer of a stacked pool (may be traced).
  returns     q [B, T, N, H] in qkv's dtype (rotated), and the pools with the new tokens written.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (one Pallas kernel on a CUDA GPU, or the Pallas interpreter with interpret=True; head dims
  that are powers of two), "xla" (the pure-jnp reference: a split, the rotation and two scatters).
  impl=None takes "xla" when each sequence brings more than one token (T > 1, a prefill chunk): the
  kernel's program per token and head was slower there (a 2,048-token llama-3-8b prefill on an H100: 1.97
  ms against 1.75 ms for XLA's scatters and q's RoPE, benchmarks/results/logs/profile_prefill_cache_write.log
  and profile_prefill_llama3_xla_write.log). For decode rows (T = 1) the kernel replaces three XLA kernels
  per layer (benchmarks/NOTES.md).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import check_float, check_layer, dispatch, shape_of
from pallas_kernels.cache_write import reference
from pallas_kernels.cache_write import triton as triton_impl

IMPLS = {
    "triton": triton_impl.rope_and_cache_write,
    "xla": reference.rope_and_cache_write,
}


def check_contract(qkv, k_pages, v_pages, write_page, write_off, rope, n_heads, layer):
    """Raise ValueError/TypeError naming the problem."""
    if qkv.ndim != 3:
        raise ValueError(f"qkv has shape {shape_of(qkv)}; expected [B, T, (N + 2K) * H]")
    check_float("qkv", qkv)
    check_float("k_pages", k_pages)
    if k_pages.ndim not in (4, 5):
        raise ValueError(f"k_pages has shape {shape_of(k_pages)}; expected [P, K, Z, H] or [L, P, K, Z, H]")
    if shape_of(v_pages) != shape_of(k_pages) or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages is {shape_of(v_pages)} {v_pages.dtype} but k_pages is {shape_of(k_pages)} "
                         f"{k_pages.dtype}")
    if (k_pages.ndim == 5) != (layer is not None):
        raise ValueError(f"k_pages has shape {shape_of(k_pages)}: pass layer with a stacked [L, P, K, Z, H] pool "
                         "and only with one")
    if k_pages.ndim == 5:
        check_layer(layer, k_pages.shape[0])
    B, T, W = qkv.shape
    K, H = k_pages.shape[-3], k_pages.shape[-1]
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive Python int, got {n_heads!r}")
    if W != (n_heads + 2 * K) * H:
        raise ValueError(f"qkv's last axis is {W}, but N={n_heads} query and K={K} key/value heads of H={H} "
                         f"need {(n_heads + 2 * K) * H}")
    for name, a in (("write_page", write_page), ("write_off", write_off)):
        if shape_of(a) != (B, T):
            raise ValueError(f"{name} has shape {shape_of(a)}; expected [B, T]=({B}, {T})")
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{name} has dtype {a.dtype}; expected int32")
    if rope is not None:
        if H % 2:
            raise ValueError(f"RoPE needs an even head dim, got H={H}")
        for name, a in zip(("cos", "sin"), rope):
            if shape_of(a) != (B, T, H):
                raise ValueError(f"rope {name} has shape {shape_of(a)}; expected [B, T, H]=({B}, {T}, {H})")


def rope_and_cache_write(qkv, k_pages, v_pages, write_page, write_off, rope=None, *, n_heads, layer=None,
                         impl=None, interpret=None):
    """(q [B, T, N, H], k_pages, v_pages): see the module docstring. Donate the pools (or let them be dead
    after the call under jit) and the write is in place."""
    check_contract(qkv, k_pages, v_pages, write_page, write_off, rope, n_heads, layer)

    def call(name):
        if name == "triton" and layer is None:  # the kernel indexes a stacked pool
            q, k, v = IMPLS[name](qkv, k_pages[None], v_pages[None], write_page, write_off, rope, n_heads=n_heads,
                                  layer=0, interpret=interpret)
            return q, k[0], v[0]
        return IMPLS[name](qkv, k_pages, v_pages, write_page, write_off, rope, n_heads=n_heads, layer=layer,
                           interpret=interpret)

    if impl is None and qkv.shape[1] > 1:
        impl = "xla"
    return dispatch(IMPLS, impl, call)

"""Paged selective-head decode attention: public function, contract checks and dispatch.

  paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                         sm_scale=None, impl=None, interpret=None) -> o [B, N, H]

Shapes and dtypes:
  q          [B, N, H]  float16 | bfloat16 | float32; H in {64, 80, 96, 128}.
  k_pages    [P, K, Z, H] in q's dtype (P pages of Z positions, head-major inside a page), or the
             stacked [L, P, K, Z, H] together with `layer`; Z in {8, 16, 32, 64, 128}; N % K == 0.
  v_pages    same shape and dtype as k_pages.
  lengths    [B] int32: sequence b attends to its positions [0, lengths[b]); 0 gives zeros. Values are
             clamped into [0, M*Z] inside the kernel (never checked: they are traced under jit).
  page_table [B, M] int32: position s of sequence b is at page page_table[b, s // Z], offset s % Z.
             Entries past a sequence's length are never read; ids are clamped into [0, P), so no load
             leaves the pool whatever the table holds.
  head_idx   None (every KV head), or [B, C] int32: the selected KV heads (GQA: KV groups). -1 marks an
             empty slot; any id outside [0, K) is treated as unselected (never read or written). Query
             heads whose KV head is not selected come out exactly 0.
  layer      int32 scalar selecting the layer of a stacked pool; may be traced (lax.scan over layers):
             the kernel indexes the layer itself, so a jitted scan never copies a layer.
  sm_scale   softmax scale, a Python float (default 1/sqrt(H)).
  returns    o [B, N, H] in q's dtype, f32 accumulation.

Checks: shapes, dtypes, head dim, page size and the layer/pool rank agreement always (they are static);
layer in [0, L) when concrete.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernel lowered through Triton on a CUDA GPU, or the Pallas interpreter with
  interpret=True), "xla" (the pure-jnp reference, last resort). `impl` forces one.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import (check_head_idx, check_layer, check_per_sequence, check_query, check_sm_scale,
                                   check_stacked_kv, dispatch, shape_of)
from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import triton as triton_impl

PAGE_SIZES = (8, 16, 32, 64, 128)

IMPLS = {
    "triton": triton_impl.paged_decode_attention,
    "xla": reference.paged_decode_attention,
}


def check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, *, q_rank: int):
    """Checks shared with paged prefill. Return (B, N, H, L, P, K, Z, M); L is None for a 4-D pool."""
    check_query(q, "[B, N, H]" if q_rank == 3 else "[B, T, N, H]")
    B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
    L = check_stacked_kv(q, k_pages, v_pages, layer, ("k_pages", "v_pages"), "[P, K, Z, H]", "pool")
    P, K, Z, Hc = k_pages.shape[-4:]
    if Hc != H:
        raise ValueError(f"k_pages has shape {shape_of(k_pages)} (H={Hc}) but q has {shape_of(q)} (H={H})")
    if Z not in PAGE_SIZES:
        raise ValueError(f"page size Z={Z} unsupported; supported: {', '.join(map(str, PAGE_SIZES))}")
    if P == 0:
        raise ValueError(f"k_pages has shape {shape_of(k_pages)}: an empty pool (P=0)")
    if K == 0 or N % K != 0:
        raise ValueError(f"q has N={N} heads, not a multiple of the pool's K={K} KV heads")
    if jnp.ndim(page_table) != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table has shape {shape_of(page_table)}; expected [B, M] with B={B}")
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise TypeError(f"page_table has dtype {page_table.dtype}; expected int32")
    check_layer(layer, L)
    check_sm_scale(sm_scale)
    return B, N, H, L, P, K, Z, page_table.shape[1]


def check_contract(q, k_pages, v_pages, lengths, page_table, head_idx=None, layer=None, sm_scale=None):
    """Raise ValueError/TypeError naming the problem; return (B, N, K, Z, M, H, C)."""
    B, N, H, _, _, K, Z, M = check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, q_rank=3)
    check_per_sequence("lengths", lengths, B)
    C = K
    if head_idx is not None:
        check_head_idx(head_idx, B)
        C = head_idx.shape[1]
    return B, N, K, Z, M, H, C


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                           sm_scale=None, impl=None, interpret=None):
    """o [B, N, H]: one decode step of (selective-head) attention over a paged KV cache.

    See the module docstring for the contract. `impl` picks a backend ("triton", "xla"); `interpret`
    runs the Triton kernel in the Pallas interpreter (CPU tests). Without a GPU and with interpret not
    set, impl=None falls back to the XLA reference.
    """
    check_contract(q, k_pages, v_pages, lengths, page_table, head_idx, layer, sm_scale)
    if sm_scale is not None:
        sm_scale = float(sm_scale)

    def call(name):
        if name == "triton":
            kp, vp = (k_pages, v_pages) if layer is not None else (k_pages[None], v_pages[None])
            return IMPLS[name](q, kp, vp, lengths, page_table, head_idx, layer=0 if layer is None else layer,
                               sm_scale=sm_scale, interpret=interpret)
        return IMPLS[name](q, k_pages, v_pages, lengths, page_table, head_idx, layer=layer, sm_scale=sm_scale,
                           interpret=interpret)

    return dispatch(IMPLS, impl, call)

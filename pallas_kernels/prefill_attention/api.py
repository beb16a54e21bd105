"""Paged causal prefill attention: public function, contract checks and dispatch.

  paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                          impl=None, interpret=None) -> o [B, T, N, H]

Shapes and dtypes:
  q          [B, T, N, H] float16 | bfloat16 | float32, H in {64, 80, 96, 128}: the T new tokens of
             sequence b, at positions starts[b] + t. Their K/V are already written to the pages.
  k_pages    [P, K, Z, H] in q's dtype, or the stacked [L, P, K, Z, H] with `layer`; Z in {8, .., 128};
             N % K == 0 (GQA: the G query heads of a group share every K/V load).
  v_pages    same shape and dtype as k_pages.
  page_table [B, M] int32: position s of sequence b is at page page_table[b, s // Z], offset s % Z; ids
             are clamped into [0, P), positions bounded by M*Z.
  starts     [B] int32 >= 0: the position of the chunk's first token (tokens already in the cache).
  n_new      [B] int32 in [0, T] (clamped): query t < n_new[b] attends causally to positions
             [0, starts[b] + t]; rows t >= n_new[b] give zeros.
  layer      int32 scalar selecting the layer of a stacked pool; may be traced.
  sm_scale   softmax scale, a Python float (default 1/sqrt(H)).
  returns    o [B, T, N, H] in q's dtype, f32 softmax and accumulation.

Never materialises [T, S] scores of the whole context: both implementations are flash-style loops
over KV blocks with an online softmax.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernel lowered through Triton on a CUDA GPU, or the Pallas interpreter with
  interpret=True), "xla" (the blockwise reference: the CPU fallback). `impl` forces one.
"""

from __future__ import annotations

from pallas_kernels.common import check_per_sequence, dispatch
from pallas_kernels.paged_attention.api import check_pages
from pallas_kernels.prefill_attention import reference
from pallas_kernels.prefill_attention import triton as triton_impl

IMPLS = {
    "triton": triton_impl.paged_prefill_attention,
    "xla": reference.paged_prefill_attention,
}


def check_contract(q, k_pages, v_pages, page_table, starts, n_new, layer=None, sm_scale=None):
    """Raise ValueError/TypeError naming the problem; return (B, T, N, K, Z, M, H)."""
    B, N, H, _, _, K, Z, M = check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, q_rank=4)
    check_per_sequence("starts", starts, B)
    check_per_sequence("n_new", n_new, B)
    return B, q.shape[1], N, K, Z, M, H


def paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                            impl=None, interpret=None):
    """o [B, T, N, H]: causal attention of a chunk of new tokens over each sequence's pages.

    See the module docstring for the contract. Without a GPU and with interpret not set, impl=None
    falls back to the XLA reference.
    """
    check_contract(q, k_pages, v_pages, page_table, starts, n_new, layer, sm_scale)
    if sm_scale is not None:
        sm_scale = float(sm_scale)

    def call(name):
        if name == "triton":
            kp, vp = (k_pages, v_pages) if layer is not None else (k_pages[None], v_pages[None])
            return IMPLS[name](q, kp, vp, page_table, starts, n_new, layer=0 if layer is None else layer,
                               sm_scale=sm_scale, interpret=interpret)
        return IMPLS[name](q, k_pages, v_pages, page_table, starts, n_new, layer=layer, sm_scale=sm_scale,
                           interpret=interpret)

    return dispatch(IMPLS, impl, call)

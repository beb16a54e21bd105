"""Paged causal prefill attention: public function, contract checks and dispatch.

  paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                          q_offsets=None, max_new=None, batch_invariant=False, impl=None, interpret=None)
      -> o [B, T, N, H], or o [S, N, H] (packed)

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

Packed mode (q_offsets given): the chunks of B sequences lie back to back in one token axis, no padding.
  q          [S, N, H]: S packed token rows. B is page_table.shape[0]; page_table, starts as above.
  q_offsets  [B] int32 >= 0: chunk b's query t is row q_offsets[b] + t of q, at position starts[b] + t of
             sequence b (the same causal attention as above). The caller promises that the chunks
             [q_offsets[b], q_offsets[b] + n_new[b]) do not overlap (overlapping rows are undefined) and
             lie within [0, S); offsets are traced, so this is never checked, but rows outside [0, S)
             are never read or written whatever the values. Offsets need not be block-aligned.
  max_new    a Python int >= 1, an upper bound on every n_new[b] (it sizes the grid); default S.
  n_new      [B] int32, clamped into [0, max_new].
  returns    o [S, N, H] in q's dtype: row q_offsets[b] + t is chunk b's output for t < n_new[b]; rows
             no chunk covers are exactly 0.

batch_invariant (default False): each query row's output is a function of that row and its sequence's cache
alone, bit for bit, whatever chunk it sits in and whatever shares the call, provided the call's shapes (and
so the kernel's blocks) are the same. The Triton kernel then masks every KV block (it otherwise skips the
masks on blocks wholly before a program's first row, which may round differently); the XLA reference always
masks alike. Costs the masking of long contexts' early blocks.

Never materialises the [T, context] scores of the whole context (nor packed mode's [S, context]): both
implementations are flash-style loops over KV blocks with an online softmax.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernel lowered through Triton on a CUDA GPU, or the Pallas interpreter with
  interpret=True), "xla" (the blockwise reference: the CPU fallback). `impl` forces one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import check_per_sequence, check_query, dispatch, shape_of
from pallas_kernels.paged_attention.api import check_pages
from pallas_kernels.prefill_attention import reference
from pallas_kernels.prefill_attention import triton as triton_impl

IMPLS = {
    "triton": triton_impl.paged_prefill_attention,
    "xla": reference.paged_prefill_attention,
}


def _check_pages_packed(q, k_pages, v_pages, page_table, layer, sm_scale):
    """check_pages for a packed q [S, N, H], B taken from page_table: returns (B, N, H, L, P, K, Z, M)."""
    if jnp.ndim(q) != 3:
        raise ValueError(f"q has shape {shape_of(q)}; expected [S, N, H] (packed rows) when q_offsets is given")
    check_query(q, "[S, N, H]")
    if jnp.ndim(page_table) != 2:
        raise ValueError(f"page_table has shape {shape_of(page_table)}; expected [B, M]")
    if jnp.ndim(k_pages) in (4, 5) and k_pages.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_pages has shape {shape_of(k_pages)} (H={k_pages.shape[-1]}) but q has "
                         f"{shape_of(q)} (H={q.shape[-1]})")
    # check_pages takes B from q's first axis: hand it a [B, S, N, H] stand-in with q's dtype.
    stand_in = jax.ShapeDtypeStruct((page_table.shape[0],) + tuple(q.shape), q.dtype)
    return check_pages(stand_in, k_pages, v_pages, page_table, layer, sm_scale, q_rank=4)


def check_contract(q, k_pages, v_pages, page_table, starts, n_new, layer=None, sm_scale=None, q_offsets=None,
                   max_new=None):
    """Raise ValueError/TypeError naming the problem; return (B, T, N, K, Z, M, H). Packed mode (q_offsets
    given): T is max_new (default S)."""
    if q_offsets is None:
        if max_new is not None:
            raise ValueError(f"max_new={max_new!r} was given without q_offsets; it bounds n_new only in packed "
                             f"mode (q [S, N, H] with q_offsets)")
        B, N, H, _, _, K, Z, M = check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, q_rank=4)
        check_per_sequence("starts", starts, B)
        check_per_sequence("n_new", n_new, B)
        return B, q.shape[1], N, K, Z, M, H
    B, N, H, _, _, K, Z, M = _check_pages_packed(q, k_pages, v_pages, page_table, layer, sm_scale)
    check_per_sequence("starts", starts, B)
    check_per_sequence("n_new", n_new, B)
    check_per_sequence("q_offsets", q_offsets, B)
    if max_new is None:
        return B, q.shape[0], N, K, Z, M, H
    if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)):
        raise TypeError(f"max_new must be a Python int (static: it sizes the grid), got {max_new!r}")
    if max_new < 1:
        raise ValueError(f"max_new={int(max_new)} must be >= 1 (an upper bound on every n_new[b])")
    return B, int(max_new), N, K, Z, M, H


def paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                            q_offsets=None, max_new=None, batch_invariant=False, impl=None, interpret=None):
    """o [B, T, N, H]: causal attention of a chunk of new tokens over each sequence's pages; packed mode
    (q_offsets given): q and o [S, N, H], the chunks back to back in one token axis.

    See the module docstring for the contract. Without a GPU and with interpret not set, impl=None
    falls back to the XLA reference.
    """
    _, T, *_ = check_contract(q, k_pages, v_pages, page_table, starts, n_new, layer, sm_scale, q_offsets, max_new)
    if sm_scale is not None:
        sm_scale = float(sm_scale)
    kw = {"batch_invariant": bool(batch_invariant)}
    if q_offsets is not None:
        kw |= {"q_offsets": q_offsets, "max_new": T}

    def call(name):
        if name == "triton":
            kp, vp = (k_pages, v_pages) if layer is not None else (k_pages[None], v_pages[None])
            return IMPLS[name](q, kp, vp, page_table, starts, n_new, layer=0 if layer is None else layer,
                               sm_scale=sm_scale, interpret=interpret, **kw)
        return IMPLS[name](q, k_pages, v_pages, page_table, starts, n_new, layer=layer, sm_scale=sm_scale,
                           interpret=interpret, **kw)

    return dispatch(IMPLS, impl, call)

"""Pure-jnp reference for paged selective-head decode attention (same signature as the public function).

Gathers each sequence's pages into a contiguous [B, K, M*Z, H] cache and calls the contiguous
reference (pallas_kernels.decode_attention.reference): dense einsums, f32 softmax and accumulation,
unselected heads zeroed. The gather is a copy of every sequence's whole page row: this is the CPU
fallback and the tests' yardstick, not a fast path.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import from_raw_bits, raw_bits
from pallas_kernels.decode_attention.reference import decode_attention as contiguous_reference


def gather_pages(pages, page_table, layer=None):
    """[B, K, M*Z, H]: pages[(layer,) page_table[b, s // Z], :, s % Z] for every s < M*Z; ids clamped. Gathered
    as raw bits (pallas_kernels.common.raw_bits: a bf16 gather on the CPU would convert the whole pool)."""
    raw = raw_bits(pages)
    if layer is not None:
        ids = jnp.clip(page_table, 0, pages.shape[1] - 1)
        g = raw[layer, ids]                                                         # [B, M, K, Z, H]
    else:
        ids = jnp.clip(page_table, 0, pages.shape[0] - 1)
        g = raw[ids]                                                                # [B, M, K, Z, H]
    g = from_raw_bits(g, pages.dtype)
    B, M, K, Z, H = g.shape
    return g.transpose(0, 2, 1, 3, 4).reshape(B, K, M * Z, H)


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                           sm_scale=None, impl=None, interpret=None):
    del impl, interpret
    M, Z = page_table.shape[1], k_pages.shape[-2]
    if M == 0:  # no positions to attend to (a [B, 0] gather would leave nothing to take a max over)
        return jnp.zeros_like(q)
    k = gather_pages(k_pages, page_table, layer)                                    # [B, K, S, H]
    v = gather_pages(v_pages, page_table, layer)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, M * Z)
    # Positions past a sequence's length hold whatever the pool has there (stale, scratch): their
    # scores are masked, but 0 * inf in the value einsum would still poison the row, so zero them.
    live = jnp.arange(M * Z)[None, :] < lengths[:, None]                            # [B, S]
    v = jnp.where(live[:, None, :, None], v, 0)
    return contiguous_reference(q, k, v, lengths, head_idx, sm_scale=sm_scale)

"""Memory-efficient XLA paged prefill attention (same signature as the public function): the CPU fallback.

A lax.fori_loop over KV blocks of `pages_per_step` pages with an f32 online softmax: each step gathers
the block's pages of every sequence ([B, K, blk, H]), scores it against the whole chunk ([B, K, G, T,
blk] f32) and folds it into the running (o, max, sum). The [T, S] score matrix of the whole context
never exists; the loop stops at the batch's furthest causal limit. On CPU the operands are upcast to
f32 before each dot (XLA:CPU has no bf16 x bf16 -> f32 dot); f32 dots run at HIGHEST precision.

Packed mode (q_offsets given, q [S, N, H]): gathers each chunk's rows into a padded [B, max_new, N, H]
(rows past n_new[b] zero), runs the same blockwise loop and scatters the live rows back into a zero
[S, N, H] (rows outside [0, S) dropped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import from_raw_bits, raw_bits

BLOCK = 256  # positions per step (rounded to whole pages)


def paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                            q_offsets=None, max_new=None, batch_invariant=False, impl=None, interpret=None):
    del impl, interpret, batch_invariant  # every block is masked alike: always batch-invariant
    if q_offsets is not None:
        return _packed(q, k_pages, v_pages, page_table, starts, n_new, layer=layer, sm_scale=sm_scale,
                       q_offsets=q_offsets, max_new=max_new)
    B, T, N, H = q.shape
    NP, K, Z = k_pages.shape[-4:-1]
    M = page_table.shape[1]
    G = N // K
    if sm_scale is None:
        sm_scale = H ** -0.5
    if B == 0 or T == 0 or M == 0:
        return jnp.zeros_like(q)
    upcast = jax.default_backend() == "cpu" or q.dtype == jnp.float32
    cdt = jnp.float32 if upcast else q.dtype
    precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    ppb = max(1, min(M, BLOCK // Z))                    # pages per step
    blk = ppb * Z
    steps = -(-M // ppb)
    table = jnp.pad(jnp.clip(page_table.astype(jnp.int32), 0, NP - 1), ((0, 0), (0, steps * ppb - M)))
    starts = jnp.maximum(starts.astype(jnp.int32), 0)
    n_new = jnp.clip(n_new.astype(jnp.int32), 0, T)
    t = jnp.arange(T)
    qpos = starts[:, None] + t[None, :]                                             # [B, T]
    row_live = t[None, :] < n_new[:, None]                                          # [B, T]
    bound = M * Z
    written = jnp.minimum(jnp.where(n_new > 0, starts + n_new, 0), bound)           # [B] positions read
    hi = jnp.max(written)                                                           # furthest causal limit
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).astype(cdt)             # [B, K, G, T, H]

    # Gathered as raw bits (pallas_kernels.common.raw_bits: a bf16 gather on the CPU converts the whole pool),
    # taken outside the loop: the loop then carries the pool as the caller's bits, no converted copy of it.
    k_raw, v_raw = raw_bits(k_pages), raw_bits(v_pages)

    def gather(raw, ids):
        g = raw[layer, ids] if layer is not None else raw[ids]                      # [B, ppb, K, Z, H]
        g = from_raw_bits(g, k_pages.dtype)
        return g.transpose(0, 2, 1, 3, 4).reshape(B, K, blk, H).astype(cdt)         # [B, K, blk, H]

    def body(j, carry):
        o, m, l = carry
        ids = lax.dynamic_slice_in_dim(table, j * ppb, ppb, axis=1)                 # [B, ppb]
        k, v = gather(k_raw, ids), gather(v_raw, ids)
        pos = j * blk + jnp.arange(blk)
        # Positions past a sequence's written length hold whatever the pool has there: masked scores
        # give p = 0, but 0 * inf in the value einsum would still poison the row, so zero them.
        v = jnp.where((pos[None, :] < written[:, None])[:, None, :, None], v, 0)
        s = jnp.einsum("bkgth,bksh->bkgts", qg, k, precision=precision,
                       preferred_element_type=jnp.float32) * sm_scale              # [B, K, G, T, blk]
        vis = (pos[None, None, :] <= qpos[:, :, None]) & (pos < bound)[None, None, :]  # [B, T, blk]
        s = jnp.where(vis[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))                                 # [B, K, G, T]
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)    # rows with nothing visible yet
        corr = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(cdt), v, precision=precision,
                        preferred_element_type=jnp.float32)                        # [B, K, G, T, H]
        return o * corr[..., None] + pv, m_new, l

    init = (jnp.zeros((B, K, G, T, H), jnp.float32), jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, T), jnp.float32))
    o, _, l = lax.fori_loop(0, (hi + blk - 1) // blk, body, init)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    o = o.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)                              # [B, T, N, H]
    return jnp.where(row_live[:, :, None, None], o, 0.0).astype(q.dtype)


def _packed(q, k_pages, v_pages, page_table, starts, n_new, *, layer, sm_scale, q_offsets, max_new):
    """o [S, N, H]: chunk b's rows q[q_offsets[b] + t], t < n_new[b], through the padded [B, T, N, H] path."""
    S = q.shape[0]
    B = page_table.shape[0]
    T = S if max_new is None else int(max_new)
    if S == 0 or B == 0 or T == 0:
        return jnp.zeros_like(q)
    n_new = jnp.clip(n_new.astype(jnp.int32), 0, T)
    t = jnp.arange(T)
    rows = q_offsets.astype(jnp.int32)[:, None] + t[None, :]                          # [B, T] token rows
    live = (t[None, :] < n_new[:, None]) & (rows >= 0) & (rows < S)                   # [B, T]
    qb = jnp.where(live[:, :, None, None], q[jnp.clip(rows, 0, S - 1)], 0)             # [B, T, N, H]
    o = paged_prefill_attention(qb, k_pages, v_pages, page_table, starts, n_new, layer=layer,
                                sm_scale=sm_scale)                                      # [B, T, N, H]
    return jnp.zeros_like(q).at[jnp.where(live, rows, S)].set(o, mode="drop")

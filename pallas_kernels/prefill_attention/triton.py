"""Causal flash attention of a chunk of new tokens over a paged KV cache, in Pallas lowered through
Triton (GPU) or run by the Pallas interpreter (CPU).

Grid (B, K, cdiv(T, block_t)): program (b, kv, i) computes the G query heads of KV group kv for the
chunk rows t in [i*block_t, (i+1)*block_t) of sequence b. The G heads of a group share every K/V load:
they are folded into the rows of the dot, row r = t_local * GP + g (GP = pow2(G); M of the dot is
block_t * GP, at least 16). The program loops over KV blocks of `block_s` positions from 0 to its causal
limit starts[b] + (its last live query) + 1, with an f32 online softmax in base 2 (blocks wholly
before the program's first query position skip the masks); position s of the sequence is
read at pages[layer, page_table[b, s // Z], kv, s % Z, :] (page ids gathered per block, clamped into
[0, P); positions bounded by M*Z). Query row t sees positions [0, starts[b] + t]; rows t >= n_new[b]
are written as zeros and their programs skip the loop.

Packed mode (q_offsets given; q and o are [S, N, H], T = max_new): the same grid (B, K, cdiv(T, block_t))
and body, but chunk row t of chunk b is token row q_offsets[b] + t of q and o (offsets need not be
multiples of block_t). A program whose block starts at or past n_new[b] does nothing at all (those rows
belong to other chunks), and loads and stores are masked to the chunk's live rows t < n_new[b] that lie
in [0, S). Rows no chunk covers keep the zeros of a buffer aliased into the output
(input_output_aliases: on the GPU a memset, no extra pass over o).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_backend, dot
from pallas_kernels.decode_attention.triton import NUM_SMS, _pow2_at_least

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_t: int = 64      # chunk rows per program (times GP query heads = the dot's M)
    block_s: int = 64      # cache positions per loop step
    num_warps: int = 4
    num_stages: int = 3
    # Every KV block through the masked step (batch-invariant mode): a row's arithmetic then does not depend
    # on where its program's first row lies (the unmasked fast path may round differently: the compiler is
    # free to contract its multiply and subtract into one FMA, which the masked step's select prevents).
    mask_every_block: bool = False


def prefill_config(B: int, T: int, N: int, K: int, H: int, Z: int, dtype=jnp.float16) -> PrefillConfig:
    """Block sizes for B sequences of T new tokens, N / K heads, head dim H, page size Z.

    The shape of Triton's flash-attention forward on H100: 128 dot rows (block_t * GP), 64-position KV
    blocks, 8 warps at 128 rows x H 128, 3 stages. When that gives fewer programs than SMs (B = 1,
    few KV heads) the rows halve to 64 so every SM gets work; a short chunk shrinks block_t to the
    chunk while the dot keeps >= 16 rows; f32 inputs get 32-position blocks and 2 stages (shared
    memory). A starting point, to be confirmed by benchmarks/bench_paged.py.
    """
    del Z
    GP = _pow2_at_least(N // K)
    rows = 128 if B * K * pl.cdiv(T, max(1, 128 // GP)) >= NUM_SMS else 64
    block_t = max(1, rows // GP)
    block_t = max(min(block_t, _pow2_at_least(T)), pl.cdiv(16, GP))
    num_warps = 8 if block_t * GP * _pow2_at_least(H) >= 128 * 128 else 4
    if jnp.dtype(dtype).itemsize == 4:  # f32 tiles are twice the bytes: keep q + staged K/V in shared memory
        return PrefillConfig(block_t=block_t, block_s=32, num_warps=num_warps, num_stages=2)
    return PrefillConfig(block_t=block_t, block_s=64, num_warps=num_warps, num_stages=3)


def _load(ref, mask):
    """A load, masked lanes 0; mask None: unmasked (Triton's lowering rejects `other` without a mask)."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def _prefill_kernel(pt_ref, starts_ref, n_new_ref, layer_ref, *refs, cfg: PrefillConfig, T: int, G: int,
                    H: int, M: int, Z: int, NP: int, sm_scale: float, S: int | None = None):
    """S None: refs = (q, k, v, out), q / out [B, T, N, H]. S given (packed): refs = (q_offsets, q, k, v,
    zeros, out), q / out [S, N, H] with `zeros` aliased to out (never read: it only initialises out)."""
    packed = S is not None
    if packed:
        qo_ref, q_ref, k_ref, v_ref, _, out_ref = refs
    else:
        q_ref, k_ref, v_ref, out_ref = refs
    BT, BS = cfg.block_t, cfg.block_s
    Hp, GP = _pow2_at_least(H), _pow2_at_least(G)
    R = BT * GP
    b, kv, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    start = jnp.maximum(starts_ref[b], 0)
    n = jnp.clip(n_new_ref[b], 0, T)
    t0 = i * BT

    hh = jnp.arange(Hp)
    h_mask = hh < H
    r = jnp.arange(R)
    t = t0 + r // GP                                                                 # [R] chunk row
    g = r % GP
    qpos = start + t                                                                 # [R] query position
    # Masked-off lanes keep their own indices (never clamped onto a live element): the interpreter
    # implements a masked store as a scatter of old-or-new values, so a duplicate index would race.
    t2 = jnp.broadcast_to(t[:, None], (R, Hp))
    n2 = jnp.broadcast_to((kv * G + g)[:, None], (R, Hp))
    hh2 = jnp.broadcast_to(hh[None, :], (R, Hp))
    if packed:
        row = qo_ref[b] + t                                                          # [R] token row of q / out
        row_ok = (g < G) & (t < n) & (row >= 0) & (row < S)    # only the chunk's own rows, never past S
        row_live = row_ok
        row2 = jnp.broadcast_to(row[:, None], (R, Hp))

        def at(ref):
            return ref.at[row2, n2, hh2]
    else:
        row_ok = (g < G) & (t < T)                                                   # rows of the output
        row_live = row_ok & (t < n)                                                  # rows that attend

        def at(ref):
            return ref.at[b, t2, n2, hh2]
    out_mask = row_ok[:, None] & h_mask[None, :]
    hh_s = jnp.broadcast_to(hh[None, :], (BS, Hp))
    pos_base = jnp.arange(BS)
    # Positions [0, hi): the causal limit of the program's last live row, bounded by the page row.
    hi = jnp.clip(start + jnp.minimum(t0 + BT, n), 0, M * Z)

    scale = sm_scale * LOG2E    # scores in base 2: exp2 is one instruction, exp a multiply and exp2

    def step(j, carry, q, causal: bool):
        """Fold KV block j into (o [R, Hp], m [R], l [R]). causal=False: every position of the block is
        visible to every row (the block ends at or before the first row's position), so no masks."""
        o, m, l = carry
        pos = j * BS + pos_base                                                      # [BS]
        live = pos < hi
        page = _load(pt_ref.at[b, jnp.minimum(pos // Z, M - 1)], live if causal else None)
        page2 = jnp.broadcast_to(jnp.clip(page, 0, NP - 1)[:, None], (BS, Hp))
        off2 = jnp.broadcast_to((pos % Z)[:, None], (BS, Hp))
        if causal:
            mask = live[:, None] & h_mask[None, :]
        else:
            mask = None if Hp == H else jnp.broadcast_to(h_mask[None, :], (BS, Hp))
        k = _load(k_ref.at[layer, page2, kv, off2, hh_s], mask)                       # [BS, Hp]
        s = dot(q, k, trans_b=True) * scale                                          # [R, BS] f32
        if causal:
            s = jnp.where((pos[None, :] <= qpos[:, None]) & live[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))                                   # [R]
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row with nothing visible yet
        corr = jnp.exp2(m - m_safe)
        pr = jnp.exp2(s - m_safe[:, None])
        l = l * corr + jnp.sum(pr, axis=1)
        v = _load(v_ref.at[layer, page2, kv, off2, hh_s], mask)                       # [BS, Hp]
        o = o * corr[:, None] + dot(pr.astype(v.dtype), v, trans_b=False)          # [R, Hp]
        return o, m_new, l

    @pl.when(t0 < n)
    def _():
        q = plgpu.load(at(q_ref), mask=row_live[:, None] & h_mask[None, :], other=0)  # [R, Hp]
        init = (jnp.zeros((R, Hp), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32),
                jnp.zeros((R,), jnp.float32))
        # Blocks wholly before the first row's position need no mask (most of a long context); the
        # rest, up to the last live row's limit, are masked.
        n_full = 0 if cfg.mask_every_block else jnp.minimum(start + t0 + 1, hi) // BS
        carry = lax.fori_loop(0, n_full, lambda j, c: step(j, c, q, False), init)
        o, _, l = lax.fori_loop(n_full, (hi + BS - 1) // BS, lambda j, c: step(j, c, q, True), carry)
        o = jnp.where(row_live[:, None] & (l > 0)[:, None], o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
        plgpu.store(at(out_ref), o.astype(out_ref.dtype), mask=out_mask)

    if not packed:  # packed: rows past the chunk belong to other chunks (or stay the aliased zeros)
        @pl.when(t0 >= n)
        def _():
            plgpu.store(at(out_ref), jnp.zeros((R, Hp), out_ref.dtype), mask=out_mask)


def paged_prefill_attention(q, k_pages, v_pages, page_table, starts, n_new, *, layer=None, sm_scale=None,
                            q_offsets=None, max_new=None, batch_invariant=False, impl=None, interpret=None,
                            config: PrefillConfig | None = None):
    """o [B, T, N, H], or packed (q_offsets given) o [S, N, H]; arguments already validated by the API.
    batch_invariant: every KV block through the masked step (`PrefillConfig.mask_every_block`).

    Here k_pages / v_pages are always [L, P, K, Z, H] and `layer` an int32 scalar (the API lifts a 4-D
    pool to L = 1 with a free reshape). Packed mode: B = page_table.shape[0], T = max_new (default S).
    """
    del impl
    interpret = check_backend(interpret)
    packed = q_offsets is not None
    if packed:
        S, N, H = q.shape
        B = page_table.shape[0]
        T = S if max_new is None else int(max_new)
    else:
        B, T, N, H = q.shape
    L, NP, K, Z, _ = k_pages.shape
    M = page_table.shape[1]
    G = N // K
    if sm_scale is None:
        sm_scale = H ** -0.5
    if config is None:
        config = prefill_config(B, T, N, K, H, Z, q.dtype)
    if batch_invariant:
        config = dataclasses.replace(config, mask_every_block=True)
    if config.block_t * _pow2_at_least(G) < 16:
        raise ValueError(f"block_t={config.block_t} x GP={_pow2_at_least(G)} rows < 16 (tl.dot needs M >= 16)")
    if B == 0 or T == 0 or M == 0 or (packed and S == 0):
        return jnp.zeros_like(q)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    kernel = functools.partial(_prefill_kernel, cfg=config, T=T, G=G, H=H, M=M, Z=Z, NP=NP,
                               sm_scale=float(sm_scale), S=S if packed else None)
    args = [page_table.astype(jnp.int32), starts.astype(jnp.int32), n_new.astype(jnp.int32), layer]
    if packed:
        # The zeros are aliased into o: rows no chunk covers are never stored and stay 0.
        args += [q_offsets.astype(jnp.int32), q, k_pages, v_pages, jnp.zeros_like(q)]
        aliases = {len(args) - 1: 0}
    else:
        args += [q, k_pages, v_pages]
        aliases = {}
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, K, pl.cdiv(T, config.block_t)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="paged_prefill_attention",
    )(*args)

"""Selective-head flash-decoding attention over a paged KV cache, in Pallas lowered through Triton (GPU)
or run by the Pallas interpreter (CPU).

The kernel is pallas_kernels/decode_attention/triton.py with one change: K/V rows are found through the
page table. Position s of sequence b lives at pages[layer, page_table[b, s // Z], kv, s % Z, :], so a
block of `block_s` positions gathers its page ids (one small vector load of the page table) and loads
its rows by computed addresses. A block may span several pages (block_s > Z) or part of one (block_s <
Z); both are the same gather. Inside a page the [Z, H] slab of one KV head is contiguous, so a selected
head still reads only its own bytes, in runs of Z * H elements.

Grid (B, C, P): one program per (sequence b, selected slot c, KV split p), as in decode_attention:
split-K by the dynamic length, f32 online softmax, the G query rows of a group padded to 16 for tl.dot
(GQA: the group's K/V read once), zeros for unselected heads (P == 1: written by the slot programs;
P > 1: by the combine kernel), the layer of a stacked [L, P, K, Z, H] pool indexed inside the kernel.

Safety (every rule enforced inside the kernel, so traced inputs can never read outside the pool):
  - the valid length is clamp(lengths[b], 0, M*Z): no page-table entry past M is read;
  - page ids are clamped into [0, P);
  - head ids outside [0, K) are unselected: their slot never loads nor stores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import autotune
from pallas_kernels.common import check_backend, dot
from pallas_kernels.decode_attention.triton import (_pow2_at_least, _split_size, attention_bucket,
                                                   attention_candidates, attention_heuristic,
                                                   random_selection)


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    block_s: int = 64      # cache positions per loop step (any power of two: a block may span pages)
    splits: int = 1        # programs sharing one (sequence, head) slab
    num_warps: int = 4
    num_stages: int = 3    # software-pipelining depth of the K/V loads


def paged_attention_config(B: int, N: int, K: int, S: int, H: int, C: int, Z: int,
                           dtype=jnp.float16) -> PagedAttentionConfig:
    """Block sizes for batch B, N / K heads, S = M*Z addressable positions, head dim H, C slots, page Z:
    the tuned entry of this device and shape class if there is one (pallas_kernels.autotune), else
    `paged_attention_heuristic`."""
    shape = dict(B=B, N=N, K=K, S=S, H=H, C=C, Z=Z, dtype=dtype)
    return autotune.config_for("paged_attention", shape, lambda: paged_attention_heuristic(**shape))


def paged_attention_heuristic(B: int, N: int, K: int, S: int, H: int, C: int, Z: int,
                              dtype=jnp.float16) -> PagedAttentionConfig:
    """The hand-fitted block sizes (the fallback when no tuned entry exists).

    Starts from decode_attention's heuristic (tuned on the contiguous cache, H200): the paged loads
    differ only in their addresses. Blocks of at least one page keep every page's slab one run of the
    load (block_s < Z would issue partial-page runs, never more bytes).
    """
    base = attention_heuristic(B, N, K, S, H, C, dtype)
    return PagedAttentionConfig(block_s=max(16, base.block_s), splits=base.splits, num_warps=base.num_warps,
                                num_stages=base.num_stages)


def _valid_length(lengths_ref, b, M: int, Z: int):
    """clamp(lengths[b], 0, M*Z): loads never go past the sequence's page-table row."""
    return jnp.clip(lengths_ref[b], 0, M * Z)


def _attn_kernel(lengths_ref, pt_ref, hidx_ref, layer_ref, q_ref, k_ref, v_ref, *out_refs,
                 cfg: PagedAttentionConfig, G: int, H: int, K: int, C: int, M: int, Z: int, NP: int,
                 sm_scale: float, dense: bool):
    BS, P = cfg.block_s, cfg.splits
    Hp = _pow2_at_least(H)
    GP = _pow2_at_least(G, 16)
    b, c, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = _valid_length(lengths_ref, b, M, Z)
    layer = layer_ref[0]
    kv_raw = c if dense else hidx_ref[b, jnp.minimum(c, C - 1)]
    selected = (kv_raw >= 0) & (kv_raw < K)
    kv = jnp.clip(kv_raw, 0, K - 1)          # only used where `selected`
    per = _split_size(length, P, BS)
    start = p * per
    end = jnp.minimum(start + per, length)

    hh = jnp.arange(Hp)
    h_mask = hh < H
    pos_base = jnp.arange(BS)
    hh_s = jnp.broadcast_to(hh[None, :], (BS, Hp))
    rows = jnp.arange(GP)
    row_mask = rows < G
    tile_mask = row_mask[:, None] & h_mask[None, :]                                   # [GP, Hp]
    # Masked-off lanes keep their own indices (never clamped onto a live element): the interpreter
    # implements a masked store as a scatter of old-or-new values, so a duplicate index would race.
    rows2 = jnp.broadcast_to(rows[:, None], (GP, Hp))
    hh2 = jnp.broadcast_to(hh[None, :], (GP, Hp))

    def block_addr(s0):
        """(page ids [BS, Hp], offsets [BS, Hp], live [BS]) of positions s0 .. s0 + BS - 1."""
        pos = s0 + pos_base
        live = pos < end
        slot = jnp.minimum(pos // Z, M - 1)
        page = plgpu.load(pt_ref.at[b, slot], mask=live, other=0)                    # [BS]
        page = jnp.clip(page, 0, NP - 1)
        return (jnp.broadcast_to(page[:, None], (BS, Hp)), jnp.broadcast_to((pos % Z)[:, None], (BS, Hp)),
                live)

    def kv_block(ref, page2, off2, live):
        mask = live[:, None] & h_mask[None, :] if Hp != H else jnp.broadcast_to(live[:, None], (BS, Hp))
        return plgpu.load(ref.at[layer, page2, kv, off2, hh_s], mask=mask, other=0)  # [BS, Hp]

    n_blocks = (end - start + BS - 1) // BS

    def compute():
        """(o [GP, Hp] unnormalised, m [GP], l [GP]) over positions [start, end), all f32."""
        q = plgpu.load(q_ref.at[b, kv * G + rows2, hh2], mask=tile_mask, other=0)      # [GP, Hp]

        def body(j, carry):
            o, m, l = carry
            page2, off2, live = block_addr(start + j * BS)
            k = kv_block(k_ref, page2, off2, live)
            s = dot(q, k, trans_b=True) * sm_scale                                  # [GP, BS] f32
            s = jnp.where(live[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))                               # [GP]
            corr = jnp.exp(m - m_new)
            pr = jnp.exp(s - m_new[:, None])
            l = l * corr + jnp.sum(pr, axis=1)
            v = kv_block(v_ref, page2, off2, live)
            o = o * corr[:, None] + dot(pr.astype(v.dtype), v, trans_b=False)      # [GP, Hp]
            return o, m_new, l

        init = (jnp.zeros((GP, Hp), jnp.float32), jnp.full((GP,), -jnp.inf, jnp.float32),
                jnp.zeros((GP,), jnp.float32))
        return lax.fori_loop(0, n_blocks, body, init)

    active = selected & (start < end)

    if P == 1:
        (out_ref,) = out_refs                                                        # [B, N, H]
        if not dense:
            # Slot c also zeroes the unselected KV heads k with k % C == c (all of [B, N, H] is written
            # by this one launch). Out-of-range ids match no head, so their heads are zeroed here too.
            N = K * G
            Np, Cp = _pow2_at_least(N), _pow2_at_least(C)
            cc = jnp.arange(Cp)
            ids = plgpu.load(hidx_ref.at[b, cc], mask=cc < C, other=-1)              # [Cp]
            n_rows = jnp.arange(Np)
            k_of = n_rows // G                                                       # [Np]
            chosen = jnp.max(jnp.where(k_of[:, None] == ids[None, :], 1, 0), axis=1) > 0
            mine = (n_rows < N) & (k_of % C == c) & jnp.logical_not(chosen)
            z_rows = jnp.broadcast_to(n_rows[:, None], (Np, Hp))
            z_hh = jnp.broadcast_to(hh[None, :], (Np, Hp))
            plgpu.store(out_ref.at[b, z_rows, z_hh], jnp.zeros((Np, Hp), out_ref.dtype),
                        mask=mine[:, None] & h_mask[None, :])

        @pl.when(active)
        def _():
            o, m, l = compute()
            plgpu.store(out_ref.at[b, kv * G + rows2, hh2], (o / l[:, None]).astype(out_ref.dtype),
                        mask=tile_mask)

        @pl.when(selected & (length <= 0))        # a selected head of an empty sequence: zeros
        def _():
            plgpu.store(out_ref.at[b, kv * G + rows2, hh2], jnp.zeros((GP, Hp), out_ref.dtype), mask=tile_mask)
    else:
        o_ref, m_ref, l_ref = out_refs                                               # [B, C, P, G, H] ...

        @pl.when(active)
        def _():
            o, m, l = compute()
            plgpu.store(o_ref.at[b, c, p, rows2, hh2], o, mask=tile_mask)
            plgpu.store(m_ref.at[b, c, p, rows], m, mask=row_mask)
            plgpu.store(l_ref.at[b, c, p, rows], l, mask=row_mask)


def _combine_kernel(lengths_ref, hidx_ref, o_ref, m_ref, l_ref, out_ref, *, G: int, H: int, C: int, P: int,
                    M: int, Z: int, block_s: int, dense: bool):
    """Program (b, k): merge the splits of KV head k of sequence b into out[b, k*G:(k+1)*G], or zeros."""
    Hp, GP = _pow2_at_least(H), _pow2_at_least(G)
    b, k = pl.program_id(0), pl.program_id(1)
    length = _valid_length(lengths_ref, b, M, Z)
    hh = jnp.arange(Hp)
    rows = jnp.arange(GP)
    row_mask = rows < G
    tile_mask = row_mask[:, None] & (hh < H)[None, :]
    rows2 = jnp.broadcast_to(rows[:, None], (GP, Hp))
    hh2 = jnp.broadcast_to(hh[None, :], (GP, Hp))
    if dense:
        slot, chosen = k, True
    else:
        Cp = _pow2_at_least(C)
        cc = jnp.arange(Cp)
        ids = plgpu.load(hidx_ref.at[b, cc], mask=cc < C, other=-1)
        slot = jnp.min(jnp.where(ids == k, cc, Cp))        # the first slot holding k (duplicates: equal)
        chosen = slot < C
    live = chosen & (length > 0)

    @pl.when(live)
    def _():
        per = _split_size(length, P, block_s)
        n_valid = (length + per - 1) // per     # the splits that ran: start = p * per < length

        def body(p, carry):
            acc, m, l = carry
            m_p = plgpu.load(m_ref.at[b, slot, p, rows], mask=row_mask, other=0)
            l_p = plgpu.load(l_ref.at[b, slot, p, rows], mask=row_mask, other=0)
            o_p = plgpu.load(o_ref.at[b, slot, p, rows2, hh2], mask=tile_mask, other=0)
            m_new = jnp.maximum(m, m_p)
            a, w = jnp.exp(m - m_new), jnp.exp(m_p - m_new)
            return acc * a[:, None] + o_p * w[:, None], m_new, l * a + l_p * w

        init = (jnp.zeros((GP, Hp), jnp.float32), jnp.full((GP,), -jnp.inf, jnp.float32),
                jnp.zeros((GP,), jnp.float32))
        acc, _, l = lax.fori_loop(0, n_valid, body, init)
        l = jnp.where(row_mask, l, 1.0)
        plgpu.store(out_ref.at[b, k * G + rows2, hh2], (acc / l[:, None]).astype(out_ref.dtype), mask=tile_mask)

    @pl.when(jnp.logical_not(live))
    def _():
        plgpu.store(out_ref.at[b, k * G + rows2, hh2], jnp.zeros((GP, Hp), out_ref.dtype), mask=tile_mask)


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                           sm_scale=None, impl=None, interpret=None,
                           config: PagedAttentionConfig | None = None):
    """o [B, N, H]; arguments already validated by the API.

    Here k_pages / v_pages are always [L, P, K, Z, H] and `layer` an int32 scalar (the API lifts a 4-D
    pool to L = 1 with a free reshape).
    """
    del impl
    interpret = check_backend(interpret)
    B, N, H = q.shape
    L, NP, K, Z, _ = k_pages.shape
    M = page_table.shape[1]
    G = N // K
    dense = head_idx is None
    C = K if dense else head_idx.shape[1]
    if sm_scale is None:
        sm_scale = H ** -0.5
    if config is None:
        config = paged_attention_config(B, N, K, M * Z, H, C, Z, q.dtype)
    P = config.splits
    if B == 0 or C == 0 or M == 0:
        return jnp.zeros_like(q)
    hidx = jnp.zeros((B, 1), jnp.int32) if dense else head_idx.astype(jnp.int32)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    lengths = lengths.astype(jnp.int32)
    page_table = page_table.astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = functools.partial(_attn_kernel, cfg=config, G=G, H=H, K=K, C=C, M=M, Z=Z, NP=NP,
                               sm_scale=float(sm_scale), dense=dense)
    args = (lengths, page_table, hidx, layer, q, k_pages, v_pages)
    if P == 1:
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((B, N, H), q.dtype),
            grid=(B, C, 1),
            interpret=interpret,
            compiler_params=params,
            name="paged_decode_attention",
        )(*args)
    o, m, l = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((B, C, P, G, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, C, P, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, C, P, G), jnp.float32)],
        grid=(B, C, P),
        interpret=interpret,
        compiler_params=params,
        name="paged_decode_attention_split",
    )(*args)
    combine = functools.partial(_combine_kernel, G=G, H=H, C=C, P=P, M=M, Z=Z, block_s=config.block_s,
                                dense=dense)
    return pl.pallas_call(
        combine,
        out_shape=jax.ShapeDtypeStruct((B, N, H), q.dtype),
        grid=(B, K),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1 if G * H <= 256 else 4, num_stages=2),
        name="paged_decode_attention_combine",
    )(lengths, hidx, o, m, l)


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune; also benchmarks/bench_paged.py --tune)

def paged_attention_candidates(B: int, N: int, K: int, S: int, H: int, C: int, Z: int,
                               dtype=jnp.float16) -> list[PagedAttentionConfig]:
    """The heuristic's config first; then (block, stages) variants at its split count; then the contiguous
    kernel's candidates (other split counts) as paged configs."""
    base = paged_attention_heuristic(B, N, K, S, H, C, Z, dtype)
    out = [base]
    for bs in (64, 128, 256):
        for stages in (2, 3, 4):
            out.append(PagedAttentionConfig(block_s=bs, splits=base.splits, num_warps=4, num_stages=stages))
    for c in attention_candidates(B, N, K, S, H, C, dtype):
        if c.use_dot:
            out.append(PagedAttentionConfig(block_s=max(16, c.block_s), splits=c.splits, num_warps=c.num_warps,
                                            num_stages=c.num_stages))
    return list(dict.fromkeys(out))


def paged_attention_bucket(B, N, K, S, H, C, Z, dtype) -> dict:
    """Shape class: the contiguous kernel's (batch and S = M*Z rounded up, the rest exact) plus the page size."""
    return {**attention_bucket(B, N, K, S, H, C, dtype), "Z": Z}


def _tune_inputs(sc: dict, key):
    """q [B, N, H], k / v pools [1, B*M + 1, K, Z, H], lengths [B] = S, a shuffled page table [B, M] (page 0
    unused), head_idx [B, C] (None when C == K)."""
    B, N, K, S, H, C, Z = (sc[d] for d in "BNKSHCZ")
    M = pl.cdiv(S, Z)
    kq, kk, kv, kt, kh = jax.random.split(key, 5)
    rnd = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(sc["dtype"])
    pool = (1, B * M + 1, K, Z, H)
    table = (1 + jax.random.permutation(kt, B * M)).reshape(B, M).astype(jnp.int32)
    hidx = None if C == K else random_selection(kh, B, K, C)
    return rnd(kq, (B, N, H)), rnd(kk, pool), rnd(kv, pool), jnp.full((B,), S, jnp.int32), table, hidx


autotune.register(autotune.Tunable(
    name="paged_attention", config_cls=PagedAttentionConfig, bucket=paged_attention_bucket,
    candidates=paged_attention_candidates, make_inputs=_tune_inputs,
    run=lambda cfg, a, interpret: paged_decode_attention(*a, layer=0, config=cfg, interpret=interpret)))

"""Selective-head flash-decoding attention in Pallas, lowered through Triton (GPU) or run by the Pallas
interpreter (CPU).

Grid (B, C, P): one program per (sequence b, selected slot c, KV split p). A program reads its KV head
id `kv = head_idx[b, c]` and exits at once when the slot selects nothing (-1, or any id outside
[0, K)) or its split starts at or past `lengths[b]`; otherwise it loads the G query rows of group `kv`
and streams its part of the K/V slab `cache[layer, b, kv, start:end, :]` in `block_s`-position blocks
with an f32 online softmax. Each selected slab is read once, and only its valid positions (loads past
`lengths[b]` are masked off, so they fetch nothing).

Memory safety for any input values (under jit the API cannot check them): `lengths[b]` is clamped to
[0, S] in both kernels, so no load leaves the sequence's own [S, H] slab; an id outside [0, K) is an
unselected slot, so no program reads or writes rows of another head or sequence for it.

Splits follow the *dynamic* length: sequence b's positions are cut into P pieces of
`round_up(cdiv(lengths[b], P), block_s)`, so short sequences in a long cache still use all P programs
and a split past the length is an early exit.
  P == 1: one launch. A slot program normalises and writes its G rows of the [B, N, H] result; slot c
          also writes zeros for the KV heads k with k % C == c that no slot selects, so no scatter
          pass follows.
  P > 1:  slot programs write partial (o, max, sum) in f32; `_combine_kernel` (grid (B, K), a second
          small launch) merges the splits that ran and writes the result, zeros for unselected heads.

Query rows: the scores are a dot `q[GP, H] @ k[BS, H].T` with the G rows of a group padded to
GP = max(16, pow2(G)) (Triton's dot needs M >= 16); padded rows are zeros and never stored. The dot
form matters beyond arithmetic: Triton software-pipelines (cp.async, `num_stages` deep) only loads
that feed a dot, so K and V blocks are in flight while the previous block is reduced. For MHA (G == 1)
an elementwise variant (`use_dot=False`: multiply + reduce, with the next block's K/V prefetched into
registers by hand) is kept for tuning.

Head dims that are not powers of two (80, 96) are padded to Hp = pow2(H) inside the kernel and masked
(a 16-byte multiple, so loads stay vectorised). The layer of a stacked [L, B, K, S, H] cache is
indexed inside the kernel: the whole stacked cache is the kernel's operand, so a jitted scan over
layers never materialises a layer slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import autotune
from pallas_kernels.common import check_backend, dot

NUM_SMS = 132  # H100 / H200; sizes the split count only: a wrong value costs speed, not correctness.


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_s: int = 64      # cache positions per loop step
    splits: int = 1        # P: programs sharing one (sequence, head) slab
    num_warps: int = 4
    num_stages: int = 3    # software-pipelining depth of the K/V loads (dot path)
    use_dot: bool = True   # scores/values through tl.dot (rows padded to 16); False: elementwise (G == 1)


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def attention_config(B: int, N: int, K: int, S: int, H: int, C: int, dtype=jnp.float16) -> AttentionConfig:
    """Block sizes for batch B, N query / K KV heads, cache length S, head dim H, C selected slots: the
    tuned entry of this device and shape class if there is one (pallas_kernels.autotune), else
    `attention_heuristic`."""
    shape = dict(B=B, N=N, K=K, S=S, H=H, C=C, dtype=dtype)
    return autotune.config_for("attention", shape, lambda: attention_heuristic(**shape))


def attention_heuristic(B: int, N: int, K: int, S: int, H: int, C: int, dtype=jnp.float16) -> AttentionConfig:
    """The hand-fitted block sizes (the fallback when no tuned entry exists).

    From `python -m benchmarks.bench_attention --tune` on an H200 (fp16, H = 128; results/
    tune_attention.json), where configurations within ~5% of each other are not distinguishable:
      - B*C >= 2 x SMs slab programs: one split (no combine launch), 32 KB K and V tiles
        (block_s = 128 at H = 128 fp16), 3 stages: one CTA per SM with two tiles of each in flight.
        Dense: 4.3-4.4 TB/s MHA; GQA 3.6-4.0 TB/s at B = 64, S = 2048 and 4.0-4.3 TB/s above.
      - fewer: split each slab into P ~ 4 x SMs / (B*C) pieces (a power of two, >= 512 positions
        each), 16 KB tiles; pipeline depth by how many programs share an SM: 5 stages when there is
        at most one program per SM, 3 up to ~3.5 per SM, else 2 (three CTAs per SM).
    """
    del N, K
    row = _pow2_at_least(H) * jnp.dtype(dtype).itemsize          # bytes of one cache position
    work = max(1, B * C)
    if work >= 2 * NUM_SMS:
        block_s = min(256, max(16, 32768 // row))
        return AttentionConfig(block_s=block_s, splits=1, num_warps=4, num_stages=3)
    block_s = min(256, max(16, 16384 // row))
    splits = _pow2_at_most(pl.cdiv(4 * NUM_SMS, work))
    splits = max(1, min(splits, S // 512))
    programs = work * splits
    stages = 5 if programs <= NUM_SMS else (3 if programs < 3.5 * NUM_SMS else 2)
    return AttentionConfig(block_s=block_s, splits=splits, num_warps=4, num_stages=stages)


def _split_size(length, P: int, BS: int):
    """Positions per split of a sequence of `length` valid positions: round_up(cdiv(length, P), BS)."""
    per = (length + P - 1) // P
    return (per + BS - 1) // BS * BS


def _clamp_length(length, S: int):
    """lengths[b] clamped to [0, S]: every load stays inside the sequence's own [S, H] slab, whatever the
    caller passes (under jit the API cannot check values; a length past S would read the next head)."""
    return jnp.minimum(jnp.maximum(length, 0), S)


def _attn_kernel(lengths_ref, hidx_ref, layer_ref, q_ref, k_ref, v_ref, *out_refs, cfg: AttentionConfig,
                 G: int, H: int, K: int, C: int, sm_scale: float, dense: bool):
    BS, P = cfg.block_s, cfg.splits
    Hp = _pow2_at_least(H)
    GP = _pow2_at_least(G, 16) if cfg.use_dot else 1
    b, c, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = _clamp_length(lengths_ref[b], k_ref.shape[3])
    layer = layer_ref[0]
    if dense:
        kv, chosen = c, True
    else:
        kv = hidx_ref[b, c]
        chosen = (kv >= 0) & (kv < K)   # any other id (-1 = empty slot, or out of range) selects nothing
        kv = jnp.where(chosen, kv, 0)   # never used to address memory unless chosen
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

    def kv_block(ref, s0):
        pos = s0 + pos_base
        live = pos < end
        mask = live[:, None] & h_mask[None, :] if Hp != H else jnp.broadcast_to(live[:, None], (BS, Hp))
        pos2 = jnp.broadcast_to(pos[:, None], (BS, Hp))
        return plgpu.load(ref.at[layer, b, kv, pos2, hh_s], mask=mask, other=0), live  # [BS, Hp]

    n_blocks = (end - start + BS - 1) // BS

    def compute():
        """(o [GP, Hp] unnormalised, m [GP], l [GP]) over positions [start, end), all f32."""
        if cfg.use_dot:
            q = plgpu.load(q_ref.at[b, kv * G + rows2, hh2], mask=tile_mask, other=0)  # [GP, Hp]

            def body(j, carry):
                o, m, l = carry
                s0 = start + j * BS
                k, live = kv_block(k_ref, s0)
                s = dot(q, k, trans_b=True) * sm_scale                              # [GP, BS] f32
                s = jnp.where(live[None, :], s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))                           # [GP]
                corr = jnp.exp(m - m_new)
                pr = jnp.exp(s - m_new[:, None])
                l = l * corr + jnp.sum(pr, axis=1)
                v, _ = kv_block(v_ref, s0)
                o = o * corr[:, None] + dot(pr.astype(v.dtype), v, trans_b=False)  # [GP, Hp]
                return o, m_new, l

            init = (jnp.zeros((GP, Hp), jnp.float32), jnp.full((GP,), -jnp.inf, jnp.float32),
                    jnp.zeros((GP,), jnp.float32))
            return lax.fori_loop(0, n_blocks, body, init)

        # G == 1: scores by multiply + reduce; K/V of block j + 1 are loaded before block j is reduced
        # (a hand-made two-stage pipeline: Triton pipelines only loads that feed a dot).
        q = plgpu.load(q_ref.at[b, kv, hh], mask=h_mask, other=0).astype(jnp.float32) * sm_scale  # [Hp]

        def body(j, carry):
            o, m, l, k, v, live = carry
            nxt = start + (j + 1) * BS
            k_n, live_n = kv_block(k_ref, nxt)   # masked off past `end`: nothing is fetched
            v_n, _ = kv_block(v_ref, nxt)
            s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)                  # [BS]
            s = jnp.where(live, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s))
            corr = jnp.exp(m - m_new)
            pr = jnp.exp(s - m_new)
            l = l * corr + jnp.sum(pr)
            o = o * corr + jnp.sum(pr[:, None] * v.astype(jnp.float32), axis=0)      # [Hp]
            return o, m_new, l, k_n, v_n, live_n

        k0, live0 = kv_block(k_ref, start)
        v0, _ = kv_block(v_ref, start)
        init = (jnp.zeros((Hp,), jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0), k0, v0, live0)
        o, m, l, *_ = lax.fori_loop(0, n_blocks, body, init)
        return o[None, :], m[None], l[None]

    active = chosen & (start < end)

    if P == 1:
        (out_ref,) = out_refs                                                        # [B, N, H]
        zeros = jnp.zeros((GP, Hp), out_ref.dtype)
        if not dense:
            # Slot c also zeroes the unselected KV heads k with k % C == c (all of [B, N, H] is written
            # by this one launch). Issued before the loop: the stores drain while the K/V loads run.
            N = K * G
            Np, Cp = _pow2_at_least(N), _pow2_at_least(C)
            cc = jnp.arange(Cp)
            ids = plgpu.load(hidx_ref.at[b, cc], mask=cc < C, other=-1)              # [Cp]
            n_rows = jnp.arange(Np)
            k_of = n_rows // G                                                       # [Np]
            row_chosen = jnp.max(jnp.where(k_of[:, None] == ids[None, :], 1, 0), axis=1) > 0  # [Np]
            mine = (n_rows < N) & (k_of % C == c) & jnp.logical_not(row_chosen)
            z_rows = jnp.broadcast_to(n_rows[:, None], (Np, Hp))
            z_hh = jnp.broadcast_to(hh[None, :], (Np, Hp))
            plgpu.store(out_ref.at[b, z_rows, z_hh], jnp.zeros((Np, Hp), out_ref.dtype),
                        mask=mine[:, None] & h_mask[None, :])

        @pl.when(active)
        def _():
            o, m, l = compute()
            plgpu.store(out_ref.at[b, kv * G + rows2, hh2], (o / l[:, None]).astype(out_ref.dtype),
                        mask=tile_mask)

        # A selected head of an empty sequence: zeros.
        @pl.when(chosen & (length <= 0))
        def _():
            plgpu.store(out_ref.at[b, kv * G + rows2, hh2], zeros, mask=tile_mask)
    else:
        o_ref, m_ref, l_ref = out_refs                                               # [B, C, P, G, H] ...

        @pl.when(active)
        def _():
            o, m, l = compute()
            plgpu.store(o_ref.at[b, c, p, rows2, hh2], o, mask=tile_mask)
            plgpu.store(m_ref.at[b, c, p, rows], m, mask=row_mask)
            plgpu.store(l_ref.at[b, c, p, rows], l, mask=row_mask)


def _combine_kernel(lengths_ref, hidx_ref, o_ref, m_ref, l_ref, out_ref, *, G: int, H: int, C: int, P: int,
                    S: int, block_s: int, dense: bool):
    """Program (b, k): merge the splits of KV head k of sequence b into out[b, k*G:(k+1)*G], or zeros."""
    Hp, GP = _pow2_at_least(H), _pow2_at_least(G)
    b, k = pl.program_id(0), pl.program_id(1)
    length = _clamp_length(lengths_ref[b], S)   # as in _attn_kernel: the same splits ran
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
        slot = jnp.min(jnp.where(ids == k, cc, Cp))
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


def decode_attention(q, k_cache, v_cache, lengths, head_idx=None, *, layer=None, sm_scale=None, impl=None,
                     interpret=None, config: AttentionConfig | None = None, _partials_only: bool = False):
    """o [B, N, H]; arguments already validated by the API.

    Here k_cache / v_cache are always [L, B, K, S, H] and `layer` an int32 scalar (the API lifts a 4-D
    cache to L = 1 with a free reshape). `_partials_only` (tuning) skips the combine launch.
    """
    del impl
    interpret = check_backend(interpret)
    B, N, H = q.shape
    L, _, K, S, _ = k_cache.shape
    G = N // K
    dense = head_idx is None
    C = K if dense else head_idx.shape[1]
    if sm_scale is None:
        sm_scale = H ** -0.5
    if config is None:
        config = attention_config(B, N, K, S, H, C, q.dtype)
    if not config.use_dot and G != 1:
        raise ValueError(f"use_dot=False handles G == 1 (MHA) only; got G={G}")
    P = config.splits
    if B == 0 or C == 0:
        return jnp.zeros_like(q)
    hidx = jnp.zeros((B, 1), jnp.int32) if dense else head_idx.astype(jnp.int32)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    lengths = lengths.astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = functools.partial(_attn_kernel, cfg=config, G=G, H=H, K=K, C=C, sm_scale=float(sm_scale),
                               dense=dense)
    if P == 1:
        # One launch: slot programs write their heads and zero the unselected ones.
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((B, N, H), q.dtype),
            grid=(B, C, 1),
            interpret=interpret,
            compiler_params=params,
            name="decode_attention",
        )(lengths, hidx, layer, q, k_cache, v_cache)
    o, m, l = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((B, C, P, G, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, C, P, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, C, P, G), jnp.float32)],
        grid=(B, C, P),
        interpret=interpret,
        compiler_params=params,
        name="decode_attention_split",
    )(lengths, hidx, layer, q, k_cache, v_cache)
    if _partials_only:
        return o, m, l
    combine = functools.partial(_combine_kernel, G=G, H=H, C=C, P=P, S=S, block_s=config.block_s, dense=dense)
    return pl.pallas_call(
        combine,
        out_shape=jax.ShapeDtypeStruct((B, N, H), q.dtype),
        grid=(B, K),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1 if G * H <= 256 else 4, num_stages=2),
        name="decode_attention_combine",
    )(lengths, hidx, o, m, l)


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune; also benchmarks/bench_attention.py --tune)

def attention_candidates(B: int, N: int, K: int, S: int, H: int, C: int, dtype=jnp.float16) -> list[AttentionConfig]:
    """The heuristic's config first. Much work (B*C programs fill the SMs several times): one split and
    block variants. Little work: (block, stages) variants crossed with split counts, deep pipelines
    (one CTA per SM) at few splits, shallow ones (several CTAs per SM) at more."""
    A = AttentionConfig
    out = [attention_heuristic(B, N, K, S, H, C, dtype)]
    if B * C >= 2 * NUM_SMS:
        for bs, w, st, P in [(128, 4, 3, 1), (64, 4, 5, 1), (64, 4, 3, 1), (128, 8, 3, 1), (32, 4, 8, 1),
                             (64, 4, 6, 1), (128, 4, 3, 2)]:
            out.append(A(block_s=bs, splits=P, num_warps=w, num_stages=st))
    else:
        for P in (1, 2, 3, 4, 6, 8, 12, 16):
            if S // P < 256:
                continue
            if P <= 2:
                grid = [(128, 4, 3), (64, 4, 5), (64, 4, 6), (32, 4, 8), (128, 8, 3), (64, 4, 3)]
            elif P <= 4:
                grid = [(64, 4, 3), (64, 4, 2), (32, 4, 4), (128, 4, 3), (64, 4, 5)]
            else:
                grid = [(64, 4, 2), (32, 4, 3), (64, 4, 3)]
            for bs, w, st in grid:
                out.append(A(block_s=bs, splits=P, num_warps=w, num_stages=st))
    return list(dict.fromkeys(out))


def attention_bucket(B, N, K, S, H, C, dtype) -> dict:
    """Shape class: batch and cache length rounded up (autotune.coarse), heads, head dim, slots, dtype exact."""
    return dict(B=autotune.coarse(B), N=N, K=K, S=autotune.coarse(S), H=H, C=C, dtype=jnp.dtype(dtype).name)


def random_selection(key, B: int, K: int, C: int):
    """[B, C] int32: C distinct KV heads of [0, K) per sequence, random order."""
    return jax.vmap(lambda k: jax.random.permutation(k, K)[:C])(jax.random.split(key, B)).astype(jnp.int32)


def _tune_inputs(sc: dict, key):
    """q [B, N, H], k / v [1, B, K, S, H] (every position valid), head_idx [B, C] (None when C == K)."""
    B, N, K, S, H, C = (sc[d] for d in "BNKSHC")
    kq, kk, kv, kh = jax.random.split(key, 4)
    rnd = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(sc["dtype"])
    hidx = None if C == K else random_selection(kh, B, K, C)
    return rnd(kq, (B, N, H)), rnd(kk, (1, B, K, S, H)), rnd(kv, (1, B, K, S, H)), jnp.full((B,), S, jnp.int32), hidx


autotune.register(autotune.Tunable(
    name="attention", config_cls=AttentionConfig, bucket=attention_bucket, candidates=attention_candidates,
    make_inputs=_tune_inputs,
    run=lambda cfg, a, interpret: decode_attention(*a, layer=0, config=cfg, interpret=interpret)))

"""Selective GEMM kernels in Pallas, lowered through Triton (GPU) or run by the Pallas interpreter (CPU).

Both kernels read the whole stacked weight array `w [L, F, D]` plus a `layer` scalar and gather rows
`w[layer, idx[j]]` inside the matmul, so `W[idx]` is never materialised and a jitted `lax.scan` over
layers never copies a layer's slice. Work follows the dynamic `count`: programs whose neuron block
starts at or past `count` write their zero tile and exit (up), or loop over no blocks (down).

  up:   grid (B blocks, C/block_n). A program owns `block_n` selected neurons and all of D:
        acc[BB, BN] += x[BB, BK] @ w[layer, idx[n0:n0+BN], k:k+BK].T over K, then bias + activation.
        Weight rows are read once (each program reads its own rows); x is re-read by every program
        (from L2), so block_n trades parallelism at small counts against L2 traffic at large B.
  down: grid (D/block_d, split, B blocks). A program owns `block_d` output columns and 1/split of the
        active neuron blocks: acc[BB, BD] += h[BB, BN] @ w[layer, idx[j0:j0+BN], d0:d0+BD]. Each
        selected row is read once in contiguous `block_d`-wide pieces (neuron-major is why). With
        split > 1 the programs write f32 partial sums [split, B, D] that the caller adds (XLA fuses
        that sum with the bias and with whatever consumes y, e.g. the residual add).

All accumulation is f32. Sizes are chosen by `up_config` / `down_config`: a tuned entry (pallas_kernels.
autotune) or the heuristics of B, D and the expected count, whose numbers come from
`python -m benchmarks.bench_mlp --tune` on an H200.
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

NUM_SMS = 132  # H100 / H200; only used to size the work split, a wrong value costs speed, not correctness.


@dataclasses.dataclass(frozen=True)
class UpConfig:
    block_b: int = 16     # batch rows per program (>= 16: Triton's dot needs M >= 16; padded rows are masked)
    block_n: int = 16     # selected neurons per program
    block_k: int = 256    # D chunk per loop step
    split_k: int = 1      # programs sharing one neuron block, each over 1/split_k of D (f32 partial sums)
    num_warps: int = 4
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class DownConfig:
    block_b: int = 16     # batch rows per program
    block_n: int = 64     # selected neurons per loop step
    block_d: int = 64     # output columns per program
    split: int = 1        # programs sharing one column block, each over 1/split of the active neurons
    num_warps: int = 4
    num_stages: int = 4


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _block_dividing(D: int, cap: int, lo: int = 16) -> int:
    """Largest power of two <= cap dividing D (so no K/D mask is needed); else cap (masked tail)."""
    b = cap
    while b >= lo:
        if D % b == 0:
            return b
        b //= 2
    return min(cap, _pow2_at_least(D, lo))


def up_config(B: int, D: int, count: int, gated: bool = False, dtype=jnp.float16) -> UpConfig:
    """Block sizes for the up projection (`count`: the expected number of selected neurons): the tuned
    entry of this device and shape class if there is one (pallas_kernels.autotune), else `up_heuristic`."""
    shape = dict(B=B, D=D, count=count, gated=gated, dtype=dtype)
    return autotune.config_for("selective_up", shape, lambda: up_heuristic(B, D, count, gated))


def up_heuristic(B: int, D: int, count: int, gated: bool = False) -> UpConfig:
    """The hand-fitted block sizes of the up projection (the fallback when no tuned entry exists).

    From `python -m benchmarks.bench_mlp --tune` on an H200 (fp16, kernel time, D=8192, count=3328):
    B=16: block_n=16 at 2 warps, 6 stages, no split: 17.7 us (4 warps: 22.7; the 16x16 dot tile leaves
    4 warps duplicating work); block_n=32, split_k=2: 17.8 us + a 1.5 us epilogue kernel.
    B=128: block_b=128, block_n=64, block_k=64, split_k=4: 22.8 us (+1.4 us epilogue); no split: 37 us.
    """
    block_b = min(_pow2_at_least(B, 16), 128)
    n_b = pl.cdiv(B, block_b)
    if block_b <= 32:
        block_n, block_k, warps = 16, _block_dividing(D, 256), 2
        target = 192            # ~1.5 programs per SM was enough; a split costs an epilogue kernel
    elif block_b == 64:
        # Batch 33-64, from the tuned tables of both GPUs (pallas_kernels/tuned) and
        # benchmarks/results/probe_heuristics_ab.json: 32-row neuron blocks with 128-wide K chunks where
        # they, and not 64-row blocks, give every SM a program (ungated); no split of D once the programs
        # cover the SMs, or half of them gated (a gated program streams two rows per neuron). split_k = 1
        # won at every count the tables hold (ungated 6,144-12,288 rows, gated 6,656-16,384).
        thin = not gated and pl.cdiv(count, 64) * n_b < NUM_SMS <= pl.cdiv(count, 32) * n_b
        block_n, block_k, warps = (32, _block_dividing(D, 128), 4) if thin else (64, _block_dividing(D, 64), 4)
        target = NUM_SMS // 2 if gated else NUM_SMS
    else:
        # Re-reading x (block_b * D per program, from L2) must stay small next to the weight rows
        # (block_n * D per program): block_n >= block_b / 2. At block_b = 128 the sparse counts need
        # the split.
        block_n, block_k, warps = 64, _block_dividing(D, 64), 4
        target = 3 * NUM_SMS
    # Split D across programs until the SMs hold enough programs (each keeps num_stages - 1 tiles in
    # flight); the f32 partial sums cost a small epilogue kernel.
    split_k = 1
    n_k = pl.cdiv(D, block_k)
    while pl.cdiv(count, block_n) * n_b * split_k < target and split_k < 4 and n_k // (2 * split_k) >= 4:
        split_k *= 2
    # Stages: about 96 KB of shared memory per program, so two programs fit on an SM.
    stage_bytes = (block_b + block_n * (2 if gated else 1)) * block_k * 2
    stages = max(2, min(6 if block_b <= 32 else 4, (96 << 10) // stage_bytes))
    return UpConfig(block_b=block_b, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=warps,
                    num_stages=stages)


def down_config(B: int, D: int, count: int, dtype=jnp.float16) -> DownConfig:
    """Block sizes for the down projection (`count`: the expected number of selected neurons): the tuned
    entry of this device and shape class if there is one (pallas_kernels.autotune), else `down_heuristic`."""
    shape = dict(B=B, D=D, count=count, dtype=dtype)
    return autotune.config_for("selective_down", shape, lambda: down_heuristic(B, D, count))


def down_heuristic(B: int, D: int, count: int) -> DownConfig:
    """The hand-fitted block sizes of the down projection (the fallback when no tuned entry exists).

    From `--tune` on an H200 (fp16, kernel time): D=8192, B=16, count=3328: block_n=128, block_d=128,
    split=4: 18.0 us (split 2: 27 us, no split: 47 us). D=4096, B=16, count=1664: block_n=64, block_d=64,
    split=8: 7.4 us. D=8192, B=128: split=4: 26.5 us (+1.4 us for the partial sums), split 2: 32 us.
    The rule behind them: enough programs that ~256 (block_n=128) or ~512 (block_n=64) weight tiles are
    in flight, each program keeping >= 3 loop steps.
    """
    block_b = min(_pow2_at_least(B, 16), 128)
    n_b = pl.cdiv(B, block_b)
    block_d = 128 if D >= 64 * 128 else _block_dividing(D, 64)
    n_d = pl.cdiv(D, block_d)

    def split_for(target):
        split = 1
        while n_d * n_b * split < target and split < 8:
            split *= 2
        return split

    split, block_n, warps = split_for(256), 128, 4
    # 128-row tiles of h and w, where all programs are resident at once (two per SM at block_b = 64 and
    # 3 stages, one of 8 warps at block_b = 128 with a split of 2; a second wave cost more than the
    # bigger tiles saved: D = 5120 in benchmarks/results/probe_heuristics_ab.json). At block_b = 64 the
    # tuned tables of both GPUs chose them at every count they hold (4,096-16,384 rows, D = 4096).
    if block_b == 128:
        split, warps = split_for(128), 8
        big_tiles = n_d * n_b * split <= NUM_SMS
    elif block_b == 64:
        big_tiles = count >= 4096 and n_d * n_b * split <= 2 * NUM_SMS
    else:
        big_tiles = count >= 6 * 128 * split
    if not big_tiles:
        split, block_n, warps = split_for(512 if block_b <= 32 else 256), 64, 4
    # Keep >= 3 loop steps per program and the f32 partial sums (split * B * D * 4 bytes, written once
    # and read once, mostly in L2) below the weight bytes (count * D * 2).
    while split > 1 and (pl.cdiv(count, block_n * split) < 3 or split * B * 4 > count * 2):
        split //= 2
    stage_bytes = (block_b * block_n + block_n * block_d) * 2
    # About 112 KB of shared memory (two programs per SM); at block_b = 128 one program of 8 warps per
    # SM, up to about 200 KB (3 stages of 128-row tiles, as tuned).
    stages = max(2, min(4, ((200 if block_b == 128 else 112) << 10) // stage_bytes))
    return DownConfig(block_b=block_b, block_n=block_n, block_d=block_d, split=split, num_warps=warps,
                      num_stages=stages)


def _activate(h, activation):
    if activation == "relu":
        return jnp.maximum(h, 0.0)
    if activation == "gelu":  # tanh approximation (jax.nn.gelu's default); erf has no Triton lowering
        return 0.5 * h * (1.0 + jnp.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    if activation == "silu":
        return h / (1.0 + jnp.exp(-h))
    return h


def _up_kernel(count_ref, layer_ref, idx_ref, x_ref, w_ref, *refs, cfg: UpConfig, B: int, D: int, C: int,
               has_gate: bool, has_bias: bool, activation: str):
    g_ref = refs[0] if has_gate else None
    b_ref = refs[int(has_gate)] if has_bias else None
    up_tile(count_ref[0], layer_ref[0], idx_ref, x_ref, w_ref, g_ref, b_ref, refs[-1], pl.program_id(0) * cfg.block_b,
            pl.program_id(1) * cfg.block_n, pl.program_id(2), cfg=cfg, B=B, D=D, C=C, activation=activation)


def up_tile(count, layer, idx_ref, x_ref, w_ref, g_ref, b_ref, o_ref, b0, n0, sk, *, cfg: UpConfig, B: int, D: int,
            C: int, activation: str):
    """One program's tile of the up projection: rows [b0, b0 + block_b) of h, neurons [n0, n0 + block_n)
    (and split sk of D with split_k > 1). Also the fused MLP's up phase (fused.py), one tile a loop step."""
    has_gate, has_bias = g_ref is not None, b_ref is not None
    BB, BN, BK, SK = cfg.block_b, cfg.block_n, cfg.block_k, cfg.split_k
    cols = n0 + jnp.arange(BN)                             # positions in idx
    b_mask = (b0 + jnp.arange(BB)) < B
    o_mask = b_mask[:, None] & (cols < C)[None, :]
    mask_k, mask_b = D % BK != 0, B % BB != 0

    @pl.when(n0 < count)
    def _compute():
        live = cols < count
        rows = plgpu.load(idx_ref.at[pl.ds(n0, BN)], mask=cols < C, other=0)
        rows = jnp.where(live, rows, 0)
        rows2 = jnp.broadcast_to(rows[:, None], (BN, BK))

        def body(k, accs):
            kk = k * BK + jnp.arange(BK)
            kk2 = jnp.broadcast_to(kk[None, :], (BN, BK))
            w_mask = live[:, None] & (kk < D)[None, :] if mask_k else jnp.broadcast_to(live[:, None], (BN, BK))
            x_mask = None
            if mask_k or mask_b:
                x_mask = b_mask[:, None] & (kk < D)[None, :]
            xt = plgpu.load(x_ref.at[pl.ds(b0, BB), pl.ds(k * BK, BK)], mask=x_mask,
                            other=0 if x_mask is not None else None)          # [BB, BK]
            wt = plgpu.load(w_ref.at[layer, rows2, kk2], mask=w_mask, other=0)  # [BN, BK] gathered rows
            out = [accs[0] + dot(xt, wt, trans_b=True)]
            if has_gate:
                gt = plgpu.load(g_ref.at[layer, rows2, kk2], mask=w_mask, other=0)
                out.append(accs[1] + dot(xt, gt, trans_b=True))
            return tuple(out)

        zero = jnp.zeros((BB, BN), jnp.float32)
        init = (zero, zero) if has_gate else (zero,)
        n_k = pl.cdiv(D, BK)
        if SK == 1:
            accs = lax.fori_loop(0, n_k, body, init)
        else:  # this program's share of the D chunks; the caller adds the partial sums
            per = pl.cdiv(n_k, SK)
            k_lo = jnp.minimum(sk * per, n_k)
            accs = lax.fori_loop(k_lo, jnp.minimum(k_lo + per, n_k), body, init)
            for i, acc in enumerate(accs):
                plgpu.store(o_ref.at[jnp.int32(i), sk, pl.ds(b0, BB), pl.ds(n0, BN)], acc, mask=o_mask)
            return
        h = accs[0]
        if has_bias:
            h = h + plgpu.load(b_ref.at[layer, rows], mask=live, other=0).astype(jnp.float32)[None, :]
        h = _activate(accs[1], "silu") * h if has_gate else _activate(h, activation)
        h = jnp.where(live[None, :], h, 0.0)
        plgpu.store(o_ref.at[pl.ds(b0, BB), pl.ds(n0, BN)], h.astype(o_ref.dtype), mask=o_mask)

    if SK == 1:  # with split_k the caller masks the columns >= count
        @pl.when(n0 >= count)
        def _zero():
            plgpu.store(o_ref.at[pl.ds(b0, BB), pl.ds(n0, BN)], jnp.zeros((BB, BN), o_ref.dtype), mask=o_mask)


def _down_kernel(count_ref, layer_ref, idx_ref, h_ref, w_ref, *refs, cfg: DownConfig, B: int, D: int, C: int,
                 has_bias: bool):
    b_ref = refs[0] if has_bias else None
    down_tile(count_ref[0], layer_ref[0], idx_ref, h_ref, w_ref, b_ref, refs[-1], pl.program_id(0) * cfg.block_d,
              pl.program_id(1), pl.program_id(2) * cfg.block_b, cfg=cfg, B=B, D=D, C=C)


def down_tile(count, layer, idx_ref, h_ref, w_ref, b_ref, o_ref, d0, s, b0, *, cfg: DownConfig, B: int, D: int, C: int,
              poison=None):
    """One program's tile of the down projection: columns [d0, d0 + block_d) of y, rows [b0, b0 + block_b),
    split s of the active neuron blocks. Also the fused MLP's down phase (fused.py), one tile a loop step;
    `poison` (an f32 scalar, 0 or NaN) is added to its tile there, to mark a grid barrier that gave up."""
    has_bias = b_ref is not None
    BB, BN, BD, S = cfg.block_b, cfg.block_n, cfg.block_d, cfg.split
    dd = d0 + jnp.arange(BD)
    d_mask = dd < D
    b_mask = (b0 + jnp.arange(BB)) < B
    dd2 = jnp.broadcast_to(dd[None, :], (BN, BD))
    mask_d, mask_b = D % BD != 0, B % BB != 0

    n_full = count // BN
    n_blocks = pl.cdiv(count, BN)

    def load_rows(j):
        """idx of full block j (clamped into range: the last prefetch of a loop reads a block it won't use)."""
        j0 = jnp.maximum(jnp.minimum(j, n_full - 1), 0) * BN
        if C % BN == 0:
            return plgpu.load(idx_ref.at[pl.ds(j0, BN)])
        return plgpu.load(idx_ref.at[pl.ds(j0, BN)], mask=j0 + jnp.arange(BN) < C, other=0)

    def step(j, acc, rows, masked):
        # Full blocks load unmasked along the neuron axis: a mask that varies along h's contiguous axis
        # would turn its loads into 2-byte ones that Triton cannot pipeline (cp.async needs >= 4 bytes),
        # and the whole loop would wait on them. Only the one block straddling `count` is masked.
        j0 = j * BN
        cols = j0 + jnp.arange(BN)
        live = cols < count
        if masked:
            rows = plgpu.load(idx_ref.at[pl.ds(j0, BN)], mask=live, other=0)
        rows2 = jnp.broadcast_to(rows[:, None], (BN, BD))
        h_mask = None
        if masked or mask_b:
            h_mask = b_mask[:, None] & live[None, :] if masked else jnp.broadcast_to(b_mask[:, None], (BB, BN))
        ht = plgpu.load(h_ref.at[pl.ds(b0, BB), pl.ds(j0, BN)], mask=h_mask,
                        other=0 if h_mask is not None else None)                # [BB, BN]
        w_mask = None
        if masked or mask_d:
            w_mask = jnp.broadcast_to(live[:, None] if masked else d_mask[None, :], (BN, BD))
            if masked and mask_d:
                w_mask = w_mask & d_mask[None, :]
        wt = plgpu.load(w_ref.at[layer, rows2, dd2], mask=w_mask,
                        other=0 if w_mask is not None else None)                # [BN, BD] gathered rows
        return acc + dot(ht, wt, trans_b=False)

    # This program's share of the active neuron blocks: [lo, hi), of which [lo, min(hi, n_full)) are full.
    per = pl.cdiv(n_blocks, S)
    lo = jnp.minimum(s * per, n_blocks)
    hi = jnp.minimum(lo + per, n_blocks)

    def full_step(j, carry):
        # The ids of block j were loaded one iteration ahead (carried): an id load feeding the weight
        # addresses in the same iteration leaves Triton's pipeliner a single buffer (measured), while
        # a carried one lets it keep num_stages - 1 weight tiles in flight.
        acc, rows = carry
        return step(j, acc, rows, False), load_rows(j + 1)

    acc = jnp.zeros((BB, BD), jnp.float32)
    acc, _ = lax.fori_loop(lo, jnp.minimum(hi, n_full), full_step, (acc, load_rows(lo)))
    acc = lax.fori_loop(jnp.maximum(lo, n_full), hi, lambda j, a: step(j, a, None, True), acc)  # 0 or 1 step
    o_mask = None
    if mask_b or mask_d:
        o_mask = b_mask[:, None] & d_mask[None, :]
    if poison is not None:
        acc = acc + poison
    if S == 1:
        if has_bias:
            acc = acc + plgpu.load(b_ref.at[layer, dd], mask=d_mask, other=0).astype(jnp.float32)[None, :]
        plgpu.store(o_ref.at[pl.ds(b0, BB), pl.ds(d0, BD)], acc.astype(o_ref.dtype), mask=o_mask)
    else:
        plgpu.store(o_ref.at[s, pl.ds(b0, BB), pl.ds(d0, BD)], acc, mask=o_mask)


def _scalar(v):
    return jnp.asarray(v, jnp.int32).reshape(1)


def selective_up(x, w_up, idx, count, *, b_up=None, w_gate=None, activation="relu", layer=None,
                 impl=None, interpret=None, config: UpConfig | None = None):
    """h [B, C] = act(x @ w_up[layer, idx].T + b_up[layer, idx]); arguments already validated by the API.

    Here `w_up`/`w_gate` are always [L, F, D], `b_up` [L, F] and `layer` an int32 scalar (the API lifts
    2-D weights to L = 1).
    """
    del impl
    interpret = check_backend(interpret)
    B, D = x.shape
    C = idx.shape[0]
    if B == 0 or C == 0:  # an empty grid: no rows or columns to compute (and no config to look up)
        return jnp.zeros((B, C), x.dtype)
    if config is None:
        config = up_config(B, D, _static_count(count, C), gated=w_gate is not None, dtype=x.dtype)
    has_gate, has_bias = w_gate is not None, b_up is not None
    kernel = functools.partial(_up_kernel, cfg=config, B=B, D=D, C=C, has_gate=has_gate,
                               has_bias=has_bias and config.split_k == 1, activation=activation)
    SK = config.split_k
    grid = (pl.cdiv(B, config.block_b), pl.cdiv(C, config.block_n), SK)
    args = [_scalar(count), _scalar(layer), idx.astype(jnp.int32), x, w_up]
    args += [w_gate] if has_gate else []
    args += [b_up] if has_bias and SK == 1 else []
    if SK == 1:
        out_shape = jax.ShapeDtypeStruct((B, C), x.dtype)
    else:  # f32 partial sums [up (, gate), split, B, C]
        out_shape = jax.ShapeDtypeStruct((1 + has_gate, SK, B, C), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="selective_up",
    )(*args)
    if SK == 1:
        return out
    # Epilogue of the split: one small XLA fusion over [B, C].
    u = out[0].sum(axis=0)
    if has_bias:
        u = u + jnp.take(lax.dynamic_index_in_dim(b_up, layer, 0, keepdims=False), idx).astype(jnp.float32)
    h = _activate(out[1].sum(axis=0), "silu") * u if has_gate else _activate(u, activation)
    return jnp.where(jnp.arange(C) < count, h, 0.0).astype(x.dtype)


def selective_down(h, w_down, idx, count, *, b_down=None, layer=None, impl=None, interpret=None,
                   config: DownConfig | None = None):
    """y [B, D] = h[:, :count] @ w_down[layer, idx[:count]] + b_down[layer]; arguments already validated."""
    del impl
    interpret = check_backend(interpret)
    B, C = h.shape
    D = w_down.shape[-1]
    has_bias = b_down is not None
    if B == 0 or C == 0:  # an empty grid (no rows) or an empty sum (no slots): the bias alone
        return plus_bias(jnp.zeros((B, D), jnp.float32), b_down, layer, h.dtype)
    if config is None:
        config = down_config(B, D, _static_count(count, C), dtype=h.dtype)
    S = config.split
    kernel = functools.partial(_down_kernel, cfg=config, B=B, D=D, C=C, has_bias=has_bias and S == 1)
    grid = (pl.cdiv(D, config.block_d), S, pl.cdiv(B, config.block_b))
    out_shape = (B, D) if S == 1 else (S, B, D)
    out_dtype = h.dtype if S == 1 else jnp.float32
    args = [_scalar(count), _scalar(layer), idx.astype(jnp.int32), h, w_down]
    args += [b_down] if has_bias and S == 1 else []
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=grid,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="selective_down",
    )(*args)
    if S > 1:  # [B, D]; XLA fuses the sum with the bias, the cast and the consumer of y
        y = plus_bias(y.sum(axis=0), b_down, layer, h.dtype)
    return y


def plus_bias(y, b_down, layer, dtype):
    """y [B, D] f32 plus the down projection's bias of `layer` (b_down [L, D], or None), cast to dtype."""
    if b_down is not None:
        y = y + lax.dynamic_index_in_dim(b_down, layer, 0, keepdims=False).astype(jnp.float32)
    return y.astype(dtype)


def selective_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu",
                  layer=None, impl=None, interpret=None, up_cfg: UpConfig | None = None,
                  down_cfg: DownConfig | None = None):
    h = selective_up(x, w_up, idx, count, b_up=b_up, w_gate=w_gate, activation=activation, layer=layer,
                     interpret=interpret, config=up_cfg)
    return selective_down(h, w_down, idx, count, b_down=b_down, layer=layer, interpret=interpret,
                          config=down_cfg)


def _static_count(count, C: int) -> int:
    """The count the heuristics size for: the concrete value when known, else the capacity."""
    try:
        return max(1, min(int(count), C))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return max(1, C)


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune): candidates around the configurations benchmarks/bench_mlp.py's TUNE
# lists time at D = 4096 / 8192

def up_candidates(B: int, D: int, count: int, gated: int = 0, dtype="float16") -> list[UpConfig]:
    """The heuristic's config first, then (block_n, block_k, split_k, warps, stages) variants for its
    batch block: small batches (<= 32 rows) favour thin neuron blocks and long K chunks, large ones
    wider neuron blocks (x re-reads from L2) and a split of D at sparse counts."""
    base = up_heuristic(B, D, count, bool(gated))
    bb = base.block_b
    if bb <= 32:
        grid = [(16, 256, 1, 4, 4), (16, 256, 1, 4, 6), (16, 512, 1, 4, 4), (16, 256, 2, 4, 6), (32, 256, 2, 4, 4),
                (16, 128, 2, 4, 8), (16, 256, 1, 2, 6), (16, 256, 4, 4, 4), (16, 128, 1, 4, 6)]
    else:
        grid = [(32, 128, 1, 4, 4), (64, 64, 2, 4, 4), (64, 64, 1, 4, 5), (64, 128, 2, 8, 3), (128, 64, 2, 8, 3),
                (64, 64, 1, 4, 4), (64, 128, 1, 4, 3), (128, 64, 1, 8, 3), (64, 256, 1, 8, 2)]
    out = [base] + [UpConfig(bb, bn, min(bk, _pow2_at_least(D, 16)), sk, w, st) for bn, bk, sk, w, st in grid]
    if bb >= 64:
        out.append(dataclasses.replace(base, block_b=bb // 2))
    return list(dict.fromkeys(out))


def down_candidates(B: int, D: int, count: int, dtype="float16") -> list[DownConfig]:
    """The heuristic's config first, then (block_n, block_d, split, warps, stages) variants for its batch
    block: splits of the active neurons trade program count against the f32 partial sums."""
    base = down_heuristic(B, D, count)
    bb = base.block_b
    if bb <= 32:
        grid = [(64, 128, 4, 4, 4), (64, 128, 2, 4, 4), (64, 64, 4, 4, 4), (64, 64, 2, 4, 5), (32, 128, 8, 4, 6),
                (128, 128, 4, 4, 3), (64, 256, 4, 4, 3), (64, 128, 1, 4, 4), (64, 64, 8, 4, 4), (32, 64, 4, 4, 6)]
    else:
        grid = [(64, 128, 1, 4, 3), (64, 64, 1, 4, 3), (32, 128, 2, 4, 4), (64, 128, 4, 4, 3), (64, 256, 2, 8, 3),
                (64, 128, 2, 4, 3), (64, 64, 2, 4, 4), (128, 128, 2, 8, 3), (32, 64, 8, 4, 4), (128, 64, 4, 4, 3)]
    out = [base] + [DownConfig(bb, bn, min(bd, _pow2_at_least(D, 16)), sp, w, st) for bn, bd, sp, w, st in grid]
    if bb >= 64:
        out.append(dataclasses.replace(base, block_b=bb // 2))
    return list(dict.fromkeys(out))


def up_bucket(B, D, count, gated, dtype) -> dict:
    """Shape class: batch and neuron count rounded up (autotune.coarse); D, gating and dtype exact."""
    return dict(B=autotune.coarse(B), D=D, count=autotune.coarse(count), gated=int(bool(gated)),
                dtype=jnp.dtype(dtype).name)


def down_bucket(B, D, count, dtype) -> dict:
    """Shape class: batch and neuron count rounded up (autotune.coarse); D and dtype exact."""
    return dict(B=autotune.coarse(B), D=D, count=autotune.coarse(count), dtype=jnp.dtype(dtype).name)


def _rows(key, count: int):
    """idx [count]: every row of a [count, D] weight, shuffled (the gather of a sparse selection)."""
    return jax.random.permutation(key, count).astype(jnp.int32)


def _up_inputs(sc: dict, key):
    """x [B, D], w_up (and w_gate) [1, count, D] scaled 1/sqrt(D), idx [count]."""
    B, D, n = sc["B"], sc["D"], sc["count"]
    kx, ku, kg, ki = jax.random.split(key, 4)
    w = lambda k: (jax.random.normal(k, (1, n, D), jnp.float32) * D ** -0.5).astype(sc["dtype"])
    x = jax.random.normal(kx, (B, D), jnp.float32).astype(sc["dtype"])
    return x, w(ku), (w(kg) if sc["gated"] else None), _rows(ki, n)


def _down_inputs(sc: dict, key):
    """h [B, count], w_down [1, count, D] scaled 1/sqrt(count), idx [count]."""
    B, D, n = sc["B"], sc["D"], sc["count"]
    kh, kw, ki = jax.random.split(key, 3)
    w = (jax.random.normal(kw, (1, n, D), jnp.float32) * n ** -0.5).astype(sc["dtype"])
    return jax.random.normal(kh, (B, n), jnp.float32).astype(sc["dtype"]), w, _rows(ki, n)


def _run_up(cfg, a, interpret):
    x, w_up, w_gate, idx = a
    return selective_up(x, w_up, idx, idx.shape[0], w_gate=w_gate, activation="none" if w_gate is not None else "relu",
                        layer=0, interpret=interpret, config=cfg)


def _run_down(cfg, a, interpret):
    h, w, idx = a
    return selective_down(h, w, idx, idx.shape[0], layer=0, interpret=interpret, config=cfg)


autotune.register(autotune.Tunable(name="selective_up", config_cls=UpConfig, bucket=up_bucket,
                                   candidates=up_candidates, make_inputs=_up_inputs, run=_run_up))
autotune.register(autotune.Tunable(name="selective_down", config_cls=DownConfig, bucket=down_bucket,
                                   candidates=down_candidates, make_inputs=_down_inputs, run=_run_down))

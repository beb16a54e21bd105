"""Fused selective MLP in Pallas (Triton on GPU, the Pallas interpreter on CPU): up and down in one pass.

The two-kernel path (triton.py) writes the hidden activations h [B, C] to HBM and reads them back;
here each program keeps its block of h in registers:

  grid (B blocks, C / block_n). A program owns `block_n` selected neurons (positions n0..n0+BN of idx)
  and one batch block:
    1. hidden: acc[BB, BN] += x[BB, BK] @ w_up[layer, idx[n0:n0+BN], k:k+BK].T over all of D (and the
       gate alike), then bias and activation; neurons at positions >= count load no weights (masked).
    2. down: for each chunk of `block_d` output columns, part[BB, BD] = h[BB, BN] @ w_down[layer,
       idx[n0:n0+BN], d0:d0+BD], atomically added into an f32 [B, D] buffer (split-K over neuron blocks).
  Programs whose neuron block starts at or past `count` do nothing, so work follows the dynamic count.
  The batch block is grid axis 0 (the fastest), so the programs sharing a neuron block run together and
  the re-reads of its weight rows (B > block_b) come from L2.

The accumulator starts as b_down[layer] broadcast in f32 (the bias is added once) and is padded to
whole blocks (rows and columns), so the atomic adds need no mask (the Pallas interpreter cannot run a
masked atomic); the caller slices it and casts to x's dtype (one small XLA fusion with y's consumer).

Bytes moved per call, against the two-kernel path: both read the selected rows of w_up (w_gate) and
w_down once and x once per neuron block (from L2); the fused kernel does not write h (B * C * itemsize)
nor read it back (once per down column block), and instead adds B * D * 4 bytes per neuron block per
batch block into the accumulator (atomics resolved in L2; the accumulator, B * D * 4 bytes, is written
to HBM about once). block_n trades those atomics (fewer with wider blocks) against parallelism (more
programs with narrower ones). E.g. D=8192, B=16, count=3328, fp16: weights 109 MB either way; h is
0.1 MB; the atomic adds are 109 MB of L2 traffic at block_n=16 (208 programs), 27 MB at block_n=64
(52 programs). So the fused kernel saves a launch and the drain/fill between two kernels, not HBM bytes;
whether that beats the L2 atomics is for the GPU measurement (benchmarks/bench_mlp.py --fused).
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
from pallas_kernels.selective_gemm.triton import (
    NUM_SMS,
    _activate,
    _block_dividing,
    _pow2_at_least,
    _rows,
    _scalar,
    _static_count,
)


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    block_b: int = 16     # batch rows per program (>= 16: Triton's dot needs M >= 16; padded rows are dropped)
    block_n: int = 16     # selected neurons per program
    block_k: int = 256    # D chunk per step of the hidden loop
    block_d: int = 128    # output columns per step of the down loop (one atomic add of [block_b, block_d])
    num_warps: int = 4
    num_stages: int = 3


def fused_config(B: int, D: int, count: int, gated: bool = False, dtype=jnp.float16) -> FusedConfig:
    """Block sizes of the fused MLP (`count`: the expected number of selected neurons): the tuned entry
    of this device and shape class if there is one (pallas_kernels.autotune), else `fused_heuristic`."""
    shape = dict(B=B, D=D, count=count, gated=gated, dtype=dtype)
    return autotune.config_for("selective_mlp_fused", shape, lambda: fused_heuristic(B, D, count, gated))


def fused_heuristic(B: int, D: int, count: int, gated: bool = False) -> FusedConfig:
    """Hand-set block sizes (not yet measured on a GPU; `polar tune` / the autotuner replaces them).

    The widest neuron block (fewest atomic adds) that still gives every SM a program; batch blocks up to
    128 rows so the weight rows are read by as few programs as possible.
    """
    block_b = min(_pow2_at_least(B, 16), 128)
    n_b = pl.cdiv(B, block_b)
    block_n = 16
    for bn in (64, 32):
        if pl.cdiv(count, bn) * n_b >= NUM_SMS:
            block_n = bn
            break
    block_k = _block_dividing(D, 256 if block_b <= 32 else 128)
    # Each down step ends in an atomic add whose ordering (Pallas emits acq_rel atomics) may hold back the
    # next step's loads: wide column chunks make fewer steps, as far as the [block_b, block_d] f32
    # accumulator tile fits in registers.
    block_d = _block_dividing(D, 256 if block_b <= 32 else 128 if block_b <= 64 else 64)
    warps = 4 if block_b <= 32 else 8
    # Stages of the hidden loop: x and the up (and gate) tiles, kept under ~96 KB of shared memory.
    stage_bytes = (block_b + block_n * (2 if gated else 1)) * block_k * 2
    stages = max(2, min(4, (96 << 10) // stage_bytes))
    return FusedConfig(block_b=block_b, block_n=block_n, block_k=block_k, block_d=block_d, num_warps=warps,
                       num_stages=stages)


def _fused_kernel(count_ref, layer_ref, idx_ref, x_ref, wu_ref, wd_ref, *refs, cfg: FusedConfig, B: int, D: int,
                  C: int, has_gate: bool, has_bias: bool, activation: str):
    g_ref = refs[0] if has_gate else None
    b_ref = refs[int(has_gate)] if has_bias else None
    o_ref = refs[-1]  # f32 [Bp, Dp], aliased to the initial value (b_down broadcast, or zeros)
    BB, BN, BK, BD = cfg.block_b, cfg.block_n, cfg.block_k, cfg.block_d
    b0 = pl.program_id(0) * BB
    n0 = pl.program_id(1) * BN
    count = count_ref[0]
    layer = layer_ref[0]
    cols = n0 + jnp.arange(BN)                             # positions in idx
    b_mask = (b0 + jnp.arange(BB)) < B
    mask_b = B % BB != 0

    @pl.when(n0 < count)
    def _compute():
        live = cols < count
        rows = plgpu.load(idx_ref.at[pl.ds(n0, BN)], mask=cols < C, other=0)
        rows = jnp.where(live, rows, 0)

        # 1. hidden [BB, BN] over all of D
        rows_k = jnp.broadcast_to(rows[:, None], (BN, BK))

        def up_step(k, accs):
            kk = k * BK + jnp.arange(BK)
            kk2 = jnp.broadcast_to(kk[None, :], (BN, BK))
            w_mask = live[:, None] & (kk < D)[None, :]
            x_mask = None
            if D % BK or mask_b:
                x_mask = b_mask[:, None] & (kk < D)[None, :]
            xt = plgpu.load(x_ref.at[pl.ds(b0, BB), pl.ds(k * BK, BK)], mask=x_mask,
                            other=0 if x_mask is not None else None)              # [BB, BK]
            wt = plgpu.load(wu_ref.at[layer, rows_k, kk2], mask=w_mask, other=0)  # [BN, BK] gathered rows
            out = [accs[0] + dot(xt, wt, trans_b=True)]
            if has_gate:
                gt = plgpu.load(g_ref.at[layer, rows_k, kk2], mask=w_mask, other=0)
                out.append(accs[1] + dot(xt, gt, trans_b=True))
            return tuple(out)

        zero = jnp.zeros((BB, BN), jnp.float32)
        accs = lax.fori_loop(0, pl.cdiv(D, BK), up_step, (zero, zero) if has_gate else (zero,))
        h = accs[0]
        if has_bias:
            h = h + plgpu.load(b_ref.at[layer, rows], mask=live, other=0).astype(jnp.float32)[None, :]
        h = _activate(accs[1], "silu") * h if has_gate else _activate(h, activation)
        # Neurons past count read no weights (masked loads): their rows of w_down load as 0, so whatever
        # act(0) is, they add nothing.
        h = h.astype(x_ref.dtype)  # the down dot's operand dtype, as h is in HBM on the two-kernel path

        # 2. down: [BB, BN] @ [BN, BD] per column chunk, added into the accumulator
        rows_d = jnp.broadcast_to(rows[:, None], (BN, BD))

        def down_step(d, carry):
            dd = d * BD + jnp.arange(BD)
            dd2 = jnp.broadcast_to(dd[None, :], (BN, BD))
            wt = plgpu.load(wd_ref.at[layer, rows_d, dd2], mask=live[:, None] & (dd < D)[None, :], other=0)
            plgpu.atomic_add(o_ref, (pl.ds(b0, BB), pl.ds(d * BD, BD)), dot(h, wt, trans_b=False))
            return carry

        lax.fori_loop(0, pl.cdiv(D, BD), down_step, 0)


def fused_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu", layer=None,
              impl=None, interpret=None, config: FusedConfig | None = None):
    """y [B, D] = act(x @ w_up[layer, idx[:count]].T + b_up) @ w_down[layer, idx[:count]] + b_down[layer].

    Same contract as `selective_mlp` (api.py; arguments already validated there): here the weights are
    always [L, F, D], b_up [L, F], b_down [L, D] and `layer` an int32 scalar. Gated (w_gate [L, F, D]):
    the hidden is silu(x @ w_gate.T) * (x @ w_up.T + b_up). Accumulates in f32; y in x's dtype.
    """
    del impl
    interpret = check_backend(interpret)
    B, D = x.shape
    C = idx.shape[0]
    gated = w_gate is not None
    if config is None:
        config = fused_config(B, D, _static_count(count, C), gated=gated, dtype=x.dtype)
    BB, BN, BD = config.block_b, config.block_n, config.block_d
    Bp, Dp = pl.cdiv(B, BB) * BB, pl.cdiv(D, BD) * BD
    if b_down is None:
        init = jnp.zeros((Bp, Dp), jnp.float32)
    else:
        bias = jnp.pad(lax.dynamic_index_in_dim(b_down, layer, 0, keepdims=False).astype(jnp.float32), (0, Dp - D))
        init = jnp.broadcast_to(bias[None, :], (Bp, Dp))                      # [Bp, Dp]
    has_bias = b_up is not None
    kernel = functools.partial(_fused_kernel, cfg=config, B=B, D=D, C=C, has_gate=gated, has_bias=has_bias,
                               activation=activation)
    args = [_scalar(count), _scalar(layer), idx.astype(jnp.int32), x, w_up, w_down]
    args += [w_gate] if gated else []
    args += [b_up] if has_bias else []
    args.append(init)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Bp, Dp), jnp.float32),
        grid=(pl.cdiv(B, BB), pl.cdiv(C, BN)),
        input_output_aliases={len(args) - 1: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="selective_mlp_fused",
    )(*args)
    return y[:B, :D].astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune)

def fused_candidates(B: int, D: int, count: int, gated: int = 0, dtype="float16") -> list[FusedConfig]:
    """The heuristic's config first, then (block_n, block_k, block_d, warps, stages) variants for its
    batch block: narrow neuron blocks for parallelism at small counts, wide ones for fewer atomic adds."""
    base = fused_heuristic(B, D, count, bool(gated))
    bb = base.block_b
    if bb <= 32:
        grid = [(16, 256, 128, 4, 3), (16, 256, 512, 4, 2), (32, 256, 256, 4, 3), (64, 128, 256, 8, 3),
                (32, 128, 128, 4, 4), (16, 512, 256, 4, 2), (64, 256, 128, 8, 2), (16, 256, 64, 2, 4)]
    else:
        grid = [(16, 128, 64, 8, 3), (32, 128, 64, 8, 3), (64, 64, 64, 8, 3), (32, 64, 128, 8, 3),
                (16, 64, 128, 4, 4), (64, 128, 32, 8, 2), (32, 128, 128, 8, 2)]
    cap = _pow2_at_least(D, 16)
    out = [base] + [FusedConfig(bb, bn, min(bk, cap), min(bd, cap), w, st) for bn, bk, bd, w, st in grid]
    if bb >= 64:
        out.append(dataclasses.replace(base, block_b=bb // 2))
    return list(dict.fromkeys(out))


def fused_bucket(B, D, count, gated, dtype) -> dict:
    """Shape class: batch and neuron count rounded up (autotune.coarse); D, gating and dtype exact."""
    return dict(B=autotune.coarse(B), D=D, count=autotune.coarse(count), gated=int(bool(gated)),
                dtype=jnp.dtype(dtype).name)


def _fused_inputs(sc: dict, key):
    """x [B, D], w_up, w_down (and w_gate) [1, count, D], idx [count] (every row, shuffled)."""
    B, D, n = sc["B"], sc["D"], sc["count"]
    kx, ku, kd, kg, ki = jax.random.split(key, 5)
    w = lambda k, s: (jax.random.normal(k, (1, n, D), jnp.float32) * s).astype(sc["dtype"])
    x = jax.random.normal(kx, (B, D), jnp.float32).astype(sc["dtype"])
    return x, w(ku, D ** -0.5), w(kd, n ** -0.5), (w(kg, D ** -0.5) if sc["gated"] else None), _rows(ki, n)


def _run_fused(cfg, a, interpret):
    x, w_up, w_down, w_gate, idx = a
    return fused_mlp(x, w_up, w_down, idx, idx.shape[0], w_gate=w_gate,
                     activation="none" if w_gate is not None else "relu", layer=0, interpret=interpret, config=cfg)


autotune.register(autotune.Tunable(name="selective_mlp_fused", config_cls=FusedConfig, bucket=fused_bucket,
                                   candidates=fused_candidates, make_inputs=_fused_inputs, run=_run_fused))

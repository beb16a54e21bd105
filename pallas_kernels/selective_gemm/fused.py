"""Fused selective MLP in Pallas (Triton on GPU, the Pallas interpreter on CPU): up and down in one kernel.

The two-kernel path (triton.py) runs the up projection, then the down projection, each a grid of blocks
that the GPU schedules in waves; between them the first kernel drains (its last wave leaves SMs idle) and
the second fills. Here one persistent kernel does both, with work split evenly by streaming tiles:

  grid (P,): P programs, at most one per SM with the barrier (P = the device's SM count unless the config
  says fewer), so every program is resident at once and the programs can wait for each other.
  1. up. The work is a sequence of steps (batch block, neuron block of `block_n`, D chunk of `block_k`),
     neuron-block-major: acc[BB, BN] += x[BB, BK] @ w_up[layer, idx[n0:n0+BN], k:k+BK].T (and the gate
     alike). Program p takes steps [p * T / P, (p + 1) * T / P): every program moves the same number of
     weight tiles, whatever the count. At the end of a neuron block, or of its share, a program adds its
     acc into an f32 pre-activation buffer u [G, Bp, Cp] (atomic: the two programs whose shares split one
     block both add; that is all the atomics there are, a few per program).
  2. a grid barrier: each program adds 1 to a counter and waits until it reads P.
  3. down. Steps (batch block, column block of `block_d`, neuron block of `block_j`), column-block-major:
     acc[BB, BD] += act(u[:, j0:j0+BJ] + b_up[idx]) @ w_down[layer, idx[j0:j0+BJ], d0:d0+BD], split evenly
     the same way; at the end of a column block (or of the share) the acc is added into y [Bp, Dp] f32,
     which starts as b_down[layer] (so the bias is added once).
  Steps past `count` do not exist (T follows the dynamic count), so work follows it.

u and y live in one f32 scratch buffer (with the barrier counter), zeroed / biased by one XLA fusion and
aliased to the kernel's output; the caller slices y and casts it (one small fusion with y's consumer).
u is B * C * 4 bytes (0.2 MB at B = 16, 3328 neurons): it stays in L2.

A program walks its share one segment at a time (the part of one neuron block, up, or of one column block,
down, that it owns): an inner loop of loads and dots that Triton software-pipelines, then one atomic add.
In the down loop the ids of the next step's rows are loaded one step ahead (carried), as in triton.py's
down kernel: an id load feeding the weight addresses in the same iteration leaves the pipeliner a single
buffer. (A first version walked the whole share in one loop with the atomic add under a condition inside
it; Triton did not pipeline that loop, and it moved 1 TB/s on an H100.)

Interpret mode (CPU tests) runs the programs one after another, so no program could wait for another:
there the two phases run as two calls of the same kernel (phase "up", then "down"), same step split and
atomics, no barrier; `barrier=False` in the config does the same on the GPU (a tuning candidate: the
launch boundary instead of the barrier, and `per_sm` programs per SM). The barrier itself only runs
compiled (the GPU tests; `test_lowers_to_triton` checks its lowering on CPU).

Measured on an H100 (benchmarks/results/kernels_mlp_fused.md): 0.69x the two-kernel path's speed at
B = 16, 0.32-0.44x at B = 48 / 128. One resident program per SM keeps too few weight tiles in flight; two
launches of two programs per SM were faster than either one-per-SM variant. So it stays opt-in.
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
    block_b: int = 16     # batch rows per step (>= 16: Triton's dot needs M >= 16; padded rows are dropped)
    block_n: int = 16     # neurons per up step
    block_k: int = 256    # D chunk per up step
    block_j: int = 64     # neurons per down step
    block_d: int = 64     # output columns per down step
    num_warps: int = 4
    num_stages: int = 4
    programs: int = 0     # 0: per_sm per SM of the device
    per_sm: int = 1       # programs per SM (with the barrier never more than the SMs: they must all be resident)
    barrier: bool = True  # one launch with a grid barrier between the phases; False: two launches (no barrier)


def fused_config(B: int, D: int, count: int, gated: bool = False, dtype=jnp.float16) -> FusedConfig:
    """Block sizes of the fused MLP (`count`: the expected number of selected neurons): the tuned entry
    of this device and shape class if there is one (pallas_kernels.autotune), else `fused_heuristic`."""
    shape = dict(B=B, D=D, count=count, gated=gated, dtype=dtype)
    return autotune.config_for("selective_mlp_fused", shape, lambda: fused_heuristic(B, D, count, gated))


def fused_heuristic(B: int, D: int, count: int, gated: bool = False) -> FusedConfig:
    """Hand-set block sizes (`polar tune` / the autotuner replaces them).

    Steps of about 8 KB of weights each (16 rows x 256 columns up, 64 x 64 down in fp16/bf16), so a
    program keeps num_stages - 1 of them in flight; wider neuron blocks at large batches, where x and u
    are re-read (from L2) once per step."""
    del count
    block_b = min(_pow2_at_least(B, 16), 128)
    if block_b <= 32:
        block_n, block_k, block_j, warps = 16, _block_dividing(D, 256), 64, 4
    else:
        block_n, block_k, block_j, warps = 64, _block_dividing(D, 64), 64, 8
    block_d = _block_dividing(D, 64)
    stage_bytes = (block_b + block_n * (2 if gated else 1)) * block_k * 2
    stages = max(2, min(6, (128 << 10) // stage_bytes))
    return FusedConfig(block_b=block_b, block_n=block_n, block_k=block_k, block_j=block_j, block_d=block_d,
                       num_warps=warps, num_stages=stages)


def _share(T, P, p):
    """Steps [lo, hi) of program p when T steps are split evenly over P programs."""
    return (p * T) // P, ((p + 1) * T) // P


def _fused_kernel(count_ref, layer_ref, idx_ref, x_ref, wu_ref, wd_ref, *refs, cfg: FusedConfig, P: int, B: int,
                  D: int, C: int, Cp: int, has_gate: bool, has_bias: bool, activation: str, phase: str):
    g_ref = refs[0] if has_gate else None
    b_ref = refs[int(has_gate)] if has_bias else None
    s_ref = refs[-1]  # f32 scratch [Bp, G * Cp + Dp + 1]: u (and the gate's), then y, then the counter
    BB, BN, BK, BJ, BD = cfg.block_b, cfg.block_n, cfg.block_k, cfg.block_j, cfg.block_d
    G = 2 if has_gate else 1
    y0 = G * Cp                                   # first column of y in the scratch
    counter = y0 + pl.cdiv(D, BD) * BD            # the barrier's column (row 0)
    nb = pl.cdiv(B, BB)
    p = pl.program_id(0)
    count = count_ref[0]
    layer = layer_ref[0]
    rows_in = lambda r0: r0 + jnp.arange(BB) < B  # noqa: E731

    def ids(n0, width):
        """idx[n0:n0+width], positions past C read as 0 (a valid id; their weights load masked)."""
        return plgpu.load(idx_ref.at[pl.ds(n0, width)], mask=n0 + jnp.arange(width) < C, other=0)

    # 1. up: steps (batch block, neuron block, D chunk). A program's share is walked one segment (the part of
    # one neuron block it owns) at a time: an inner loop over D chunks with nothing but loads and dots, which
    # Triton software-pipelines, then one atomic add of the segment's acc.
    n_k = pl.cdiv(D, BK)
    per_b1 = pl.cdiv(count, BN) * n_k
    mask_k = D % BK != 0
    up_lo, up_hi = _share(nb * per_b1, P, p)

    def up_segment(t):
        bb, n, k = t // per_b1, (t % per_b1) // n_k, t % n_k
        end = jnp.minimum(t - k + n_k, up_hi)             # the end of the neuron block or of the share
        b0, n0 = bb * BB, n * BN
        live = n0 + jnp.arange(BN) < count
        rows2 = jnp.broadcast_to(ids(n0, BN)[:, None], (BN, BK))

        def step(kc, accs):
            kk = kc * BK + jnp.arange(BK)
            kk2 = jnp.broadcast_to(kk[None, :], (BN, BK))
            w_mask = live[:, None] & (kk < D)[None, :] if mask_k else jnp.broadcast_to(live[:, None], (BN, BK))
            x_mask = rows_in(b0)[:, None] & (kk < D)[None, :] if mask_k or B % BB else None
            xt = plgpu.load(x_ref.at[pl.ds(b0, BB), pl.ds(kc * BK, BK)], mask=x_mask,
                            other=0 if x_mask is not None else None)               # [BB, BK]
            out = [accs[0] + dot(xt, plgpu.load(wu_ref.at[layer, rows2, kk2], mask=w_mask, other=0), trans_b=True)]
            if has_gate:
                gt = plgpu.load(g_ref.at[layer, rows2, kk2], mask=w_mask, other=0)
                out.append(accs[1] + dot(xt, gt, trans_b=True))
            return tuple(out)

        accs = lax.fori_loop(k, k + end - t, step, (jnp.zeros((BB, BN), jnp.float32),) * G)
        for g, acc in enumerate(accs):
            plgpu.atomic_add(s_ref, (pl.ds(b0, BB), pl.ds(g * Cp + n0, BN)), acc)
        return end

    if phase in ("up", "both"):
        lax.while_loop(lambda t: t < up_hi, up_segment, up_lo)

    # 2. every program's u is in: wait for all P programs (compiled only; see the module docstring)
    if phase == "both":
        plgpu.debug_barrier()                                     # this program's atomic adds are issued
        arrived = plgpu.atomic_add(s_ref, (0, counter), 1.0) + 1.0
        lax.while_loop(lambda v: v < P, lambda v: plgpu.atomic_add(s_ref, (0, counter), 0.0), arrived)
        plgpu.debug_barrier()

    # 3. down: steps (batch block, column block, neuron block), walked one segment (the part of one column
    # block this program owns) at a time, as in the up phase.
    n_d = pl.cdiv(D, BD)
    n_j = pl.cdiv(count, BJ)
    per_b2 = n_d * n_j
    mask_d = D % BD != 0
    down_lo, down_hi = _share(nb * per_b2, P, p)

    def down_segment(t):
        bb, d, j = t // per_b2, (t % per_b2) // n_j, t % n_j
        end = jnp.minimum(t - j + n_j, down_hi)            # the end of the column block or of the share
        b0, d0 = bb * BB, d * BD
        dd = d0 + jnp.arange(BD)
        dd2 = jnp.broadcast_to(dd[None, :], (BJ, BD))

        def step(jc, carry):
            # The ids of block jc were loaded one step ahead (carried): see the module docstring.
            acc, rows = carry
            j0 = jc * BJ
            live = j0 + jnp.arange(BJ) < count
            # u past count is 0 (never added to); those rows of w_down load as 0, so act(u + b) adds nothing.
            hs = [plgpu.load(s_ref.at[pl.ds(b0, BB), pl.ds(g * Cp + j0, BJ)]) for g in range(G)]  # [BB, BJ] f32
            u = hs[0]
            if has_bias:
                u = u + plgpu.load(b_ref.at[layer, rows], mask=live, other=0).astype(jnp.float32)[None, :]
            h = _activate(hs[1], "silu") * u if has_gate else _activate(u, activation)
            h = h.astype(x_ref.dtype)  # the down dot's operand dtype, as h is in HBM on the two-kernel path
            w_mask = live[:, None] & (dd < D)[None, :] if mask_d else jnp.broadcast_to(live[:, None], (BJ, BD))
            wt = plgpu.load(wd_ref.at[layer, jnp.broadcast_to(rows[:, None], (BJ, BD)), dd2], mask=w_mask,
                            other=0)                                               # [BJ, BD] gathered rows
            return acc + dot(h, wt, trans_b=False), ids(jnp.minimum(j0 + BJ, Cp - BJ), BJ)

        acc, _ = lax.fori_loop(j, j + end - t, step, (jnp.zeros((BB, BD), jnp.float32), ids(j * BJ, BJ)))
        plgpu.atomic_add(s_ref, (pl.ds(b0, BB), pl.ds(y0 + d0, BD)), acc)
        return end

    if phase in ("down", "both"):
        lax.while_loop(lambda t: t < down_hi, down_segment, down_lo)


def sm_count() -> int | None:
    """The SM count of the default device (None where it is not known)."""
    try:
        n = getattr(jax.devices()[0], "core_count", None)
    except RuntimeError:
        return None
    return int(n) if n else None


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
    if interpret:
        P = config.programs or config.per_sm * NUM_SMS
    else:
        sms = sm_count()
        if sms is None:  # a grid larger than the device holds at once would wait forever at the barrier
            raise NotImplementedError("the fused MLP needs the device's SM count (jax.Device.core_count)")
        P = config.programs or config.per_sm * sms
        P = min(P, sms) if config.barrier else P
    BB, BD = config.block_b, config.block_d
    G = 2 if gated else 1
    wide = max(config.block_n, config.block_j)
    Bp, Cp, Dp = pl.cdiv(B, BB) * BB, pl.cdiv(C, wide) * wide, pl.cdiv(D, BD) * BD
    y_init = jnp.zeros((Bp, Dp), jnp.float32)
    if b_down is not None:
        bias = jnp.pad(lax.dynamic_index_in_dim(b_down, layer, 0, keepdims=False).astype(jnp.float32), (0, Dp - D))
        y_init = y_init + bias[None, :]
    scratch = jnp.concatenate([jnp.zeros((Bp, G * Cp), jnp.float32), y_init, jnp.zeros((Bp, 1), jnp.float32)], 1)
    has_bias = b_up is not None
    args = [_scalar(count), _scalar(layer), idx.astype(jnp.int32), x, w_up, w_down]
    args += [w_gate] if gated else []
    args += [b_up] if has_bias else []

    def call(scratch, phase):
        kernel = functools.partial(_fused_kernel, cfg=config, P=P, B=B, D=D, C=C, Cp=Cp, has_gate=gated,
                                   has_bias=has_bias, activation=activation, phase=phase)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(scratch.shape, jnp.float32),
            grid=(P,),
            input_output_aliases={len(args): 0},
            interpret=interpret,
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
            name="selective_mlp_fused",
        )(*args, scratch)

    scratch = call(scratch, "both") if config.barrier and not interpret else call(call(scratch, "up"), "down")
    return scratch[:B, G * Cp:G * Cp + D].astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune)

def fused_candidates(B: int, D: int, count: int, gated: int = 0, dtype="float16") -> list[FusedConfig]:
    """The heuristic's config first, then (block_n, block_k, block_j, block_d, warps, stages) variants for
    its batch block."""
    base = fused_heuristic(B, D, count, bool(gated))
    bb = base.block_b
    if bb <= 32:  # first run on an H100 (B = 16, count 4096): 110-150 us whatever the blocks; wider tiles here
        grid = [(16, 256, 128, 64, 4, 4), (32, 128, 64, 128, 4, 4), (16, 512, 64, 128, 4, 3), (64, 256, 128, 128, 8, 3),
                (64, 128, 128, 128, 4, 4), (32, 512, 128, 128, 8, 3), (64, 256, 64, 256, 8, 3), (32, 256, 128, 128, 4, 4)]
    else:
        grid = [(32, 64, 32, 128, 8, 4), (64, 64, 128, 64, 8, 3), (32, 128, 64, 64, 8, 3), (64, 64, 128, 128, 8, 3),
                (32, 128, 64, 128, 8, 3), (64, 64, 64, 64, 8, 3)]
    cap = _pow2_at_least(D, 16)
    out = [base] + [FusedConfig(bb, bn, min(bk, cap), bj, min(bd, cap), w, st) for bn, bk, bj, bd, w, st in grid]
    if bb >= 64:
        out.append(dataclasses.replace(base, block_b=bb // 2))
    # The same blocks in two launches: where the barrier, or one program per SM, is what costs.
    out += [dataclasses.replace(c, barrier=False, per_sm=k) for c in out[:3] for k in (1, 2)]
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

"""Fused selective MLP in Pallas (Triton on GPU, the Pallas interpreter on CPU): up and down in one kernel.

The two-kernel path (triton.py) launches the up projection, then the down projection; between them the
first kernel drains and the second starts, a boundary that costs several microseconds whatever the
kernels do (benchmarks/NOTES.md, twelfth session: ~7.6 us a boundary under load against ~1.7 us for a grid
barrier). Here one persistent kernel runs both projections' tiles, the very tiles of the two-kernel path
(`triton.up_tile`, `triton.down_tile`), with a grid barrier between them:

  grid (P,): P programs, per_sm per SM of the device (all resident at once: the barrier needs that).
  1. up: tile t of the active ones (batch block, neuron block below `count`), t = p, p + P, p + 2P, ...:
     h[b0:b0+BB, n0:n0+BN] = act(x @ w_up[layer, idx[n0:n0+BN]].T + b_up) (and the gate), into an h
     buffer [B, C] that only this kernel uses (it stays in L2).
  2. the grid barrier: each program adds 1 to a counter and reads it until it holds P. The wait is
     bounded (SPIN_LIMIT reads): where the programs could not all be resident, the early ones give up
     and their down tiles come out NaN, so a config that cannot run is seen, never silently wrong, and
     nothing hangs.
  3. down: tile t (column block, split of the neuron blocks, batch block), t = p, p + P, ...: y, or with
     split > 1 f32 partial sums [split, B, D] that the caller adds (with the bias and the cast).

Interpret mode (CPU tests) runs the programs one after another, so none could wait for another: there
the phases are two calls of the same kernel (phase "up", then "down"), the same tiles and the same
strided walk, no barrier; `barrier=False` does the same on the GPU (a tuning candidate: the launch
boundary instead of the barrier). The barrier itself runs only compiled (the GPU tests;
`test_lowers_to_triton` checks its lowering on CPU).

An earlier design split the steps evenly over one program per SM, with atomic adds where shares split a
tile: 0.3-0.7x the two-kernel path on an H100 (its persistent loops, not its barrier, were slow).
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
from pallas_kernels.selective_gemm.triton import (
    NUM_SMS,
    DownConfig,
    UpConfig,
    _rows,
    _scalar,
    _static_count,
    down_candidates,
    down_config,
    down_tile,
    plus_bias,
    up_candidates,
    up_config,
    up_tile,
)
from pallas_kernels.common import check_backend

SPIN_LIMIT = 1 << 16   # counter reads a program makes at the barrier before it gives up (tens of ms)
SMEM_PER_SM = 200 << 10  # shared memory a config may plan per SM (H100 / H200: 228 KB; Triton adds its own)


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    up_block_b: int = 16     # batch rows per up tile (>= 16: Triton's dot needs M >= 16)
    up_block_n: int = 16     # neurons per up tile
    block_k: int = 256       # D chunk per up loop step
    down_block_b: int = 16   # batch rows per down tile
    down_block_n: int = 64   # neurons per down loop step
    block_d: int = 64        # output columns per down tile
    split: int = 1           # down tiles sharing a column block, each over 1/split of the neuron blocks
    num_warps: int = 4
    num_stages: int = 4
    programs: int = 0        # 0: per_sm per SM of the device
    per_sm: int = 2          # programs per SM (with the barrier all must be resident: see `fits`)
    barrier: bool = True     # one launch with a grid barrier between the phases; False: two launches

    def up(self) -> UpConfig:
        return UpConfig(self.up_block_b, self.up_block_n, self.block_k, 1, self.num_warps, self.num_stages)

    def down(self) -> DownConfig:
        return DownConfig(self.down_block_b, self.down_block_n, self.block_d, self.split, self.num_warps,
                          self.num_stages)

    def smem(self, gated: bool) -> int:
        """Shared memory the pipelined loads of the larger phase take (bytes, 16-bit dtypes)."""
        up = (self.up_block_b + self.up_block_n * (2 if gated else 1)) * self.block_k * 2
        down = (self.down_block_b * self.down_block_n + self.down_block_n * self.block_d) * 2
        return self.num_stages * max(up, down)

    def fits(self, gated: bool) -> bool:
        """Whether per_sm programs can be resident on one SM together (shared memory; registers: 4 warps a
        program leave each thread up to 255 at two programs an SM)."""
        return self.per_sm * self.smem(gated) <= SMEM_PER_SM and (self.per_sm == 1 or self.num_warps <= 4)


def fused_config(B: int, D: int, count: int, gated: bool = False, dtype=jnp.float16) -> FusedConfig:
    """Block sizes of the fused MLP (`count`: the expected number of selected neurons): the tuned entry
    of this device and shape class if there is one (pallas_kernels.autotune), else `fused_heuristic`."""
    shape = dict(B=B, D=D, count=count, gated=gated, dtype=dtype)
    return autotune.config_for("selective_mlp_fused", shape, lambda: fused_heuristic(B, D, count, gated))


def fused_heuristic(B: int, D: int, count: int, gated: bool = False) -> FusedConfig:
    """The two-kernel path's tiles (its tuned entries or heuristics; the up projection without a split of
    D), at 4 warps and as many stages (up to 6) as leave two programs an SM; where that is fewer than 3,
    the down tiles take half the neurons a step (and twice the split)."""
    up, down = up_config(B, D, count, gated), down_config(B, D, count)
    cfg = FusedConfig(up_block_b=up.block_b, up_block_n=up.block_n, block_k=up.block_k, down_block_b=down.block_b,
                      down_block_n=down.block_n, block_d=down.block_d, split=down.split, num_warps=4, num_stages=6)
    fitted = _fit(cfg, gated)
    if (fitted.num_stages < 3 or fitted.per_sm < 2) and cfg.down_block_n > 32:
        fitted = _fit(dataclasses.replace(cfg, down_block_n=cfg.down_block_n // 2, split=min(8, cfg.split * 2)), gated)
    return fitted


def _walk(T, P, p, tile):
    """tile(t) for t = p, p + P, p + 2P, ... below T (T may be traced)."""
    n = (jnp.maximum(T - p, 0) + P - 1) // P
    lax.fori_loop(0, n, lambda i, c: (tile(p + i * P), c)[1], jnp.int32(0))


def _grid_barrier(sync_ref, P: int):
    """Wait until all P programs have arrived (bounded: see the module docstring); returns the poison for
    this program's down tiles, 0 or NaN."""
    plgpu.debug_barrier()                                # this program's h stores are issued
    arrived = plgpu.atomic_add(sync_ref, (0,), 1) + 1
    seen, _ = lax.while_loop(lambda c: (c[0] < P) & (c[1] < SPIN_LIMIT),
                             lambda c: (plgpu.atomic_add(sync_ref, (0,), 0), c[1] + 1), (arrived, jnp.int32(0)))
    plgpu.debug_barrier()
    return jnp.where(seen < P, jnp.float32(jnp.nan), jnp.float32(0))


def _fused_kernel(*refs, cfg: FusedConfig, P: int, B: int, D: int, C: int, gated: bool, bias_up: bool,
                  bias_down: bool, activation: str, phase: str):
    count_ref, layer_ref, idx_ref, x_ref, wu_ref, wd_ref, *rest = refs
    g_ref = rest.pop(0) if gated else None
    bu_ref = rest.pop(0) if bias_up else None
    bd_ref = rest.pop(0) if bias_down else None
    if phase == "up":
        (h_ref,) = rest
    elif phase == "down":
        h_ref, y_ref = rest
    else:
        _, h_ref, y_ref, sync_ref = rest               # the counter's input is aliased to sync_ref
    up, down = cfg.up(), cfg.down()
    p = pl.program_id(0)
    count, layer = count_ref[0], layer_ref[0]

    if phase in ("up", "both"):
        nb = pl.cdiv(B, up.block_b)

        def up_step(t):
            up_tile(count, layer, idx_ref, x_ref, wu_ref, g_ref, bu_ref, h_ref, (t % nb) * up.block_b,
                    (t // nb) * up.block_n, 0, cfg=up, B=B, D=D, C=C, activation=activation)

        _walk(nb * pl.cdiv(count, up.block_n), P, p, up_step)    # neuron blocks at or past count: none

    poison = _grid_barrier(sync_ref, P) if phase == "both" else None

    if phase in ("down", "both"):
        nb, S = pl.cdiv(B, down.block_b), down.split

        def down_step(t):
            down_tile(count, layer, idx_ref, h_ref, wd_ref, bd_ref, y_ref, (t // (nb * S)) * down.block_d,
                      (t // nb) % S, (t % nb) * down.block_b, cfg=down, B=B, D=D, C=C, poison=poison)

        _walk(pl.cdiv(D, down.block_d) * S * nb, P, p, down_step)


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
    if B == 0 or C == 0:  # an empty grid (no rows) or an empty sum (no slots): the bias alone
        return plus_bias(jnp.zeros((B, D), jnp.float32), b_down, layer, x.dtype)
    if config is None:
        config = fused_config(B, D, _static_count(count, C), gated=gated, dtype=x.dtype)
    if interpret:
        P = config.programs or config.per_sm * NUM_SMS
    else:
        sms = sm_count()
        if sms is None:  # a grid larger than the device holds at once would wait at the barrier in vain
            raise NotImplementedError("the fused MLP needs the device's SM count (jax.Device.core_count)")
        P = config.programs or config.per_sm * sms
    S = config.split
    bias_down = b_down is not None and S == 1
    args = [_scalar(count), _scalar(layer), idx.astype(jnp.int32), x, w_up, w_down]
    args += [w_gate] if gated else []
    args += [b_up] if b_up is not None else []
    args += [b_down] if bias_down else []
    h_shape = jax.ShapeDtypeStruct((B, C), x.dtype)
    y_shape = jax.ShapeDtypeStruct((B, D) if S == 1 else (S, B, D), x.dtype if S == 1 else jnp.float32)

    def call(phase, *extra, out_shape, aliases=None):
        kernel = functools.partial(_fused_kernel, cfg=config, P=P, B=B, D=D, C=C, gated=gated,
                                   bias_up=b_up is not None, bias_down=bias_down, activation=activation, phase=phase)
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(P,), input_output_aliases=aliases or {}, interpret=interpret,
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
            name="selective_mlp_fused",
        )(*args, *extra)

    if config.barrier and not interpret:
        sync = jnp.zeros((1,), jnp.int32)
        _, y, _ = call("both", sync, out_shape=(h_shape, y_shape, jax.ShapeDtypeStruct((1,), jnp.int32)),
                       aliases={len(args): 2})
    else:
        h = call("up", out_shape=h_shape)
        args.append(h)
        y = call("down", out_shape=y_shape)
    if S == 1:
        return y
    return plus_bias(y.sum(axis=0), b_down, layer, x.dtype)  # [B, D]; XLA fuses the sum with the bias, the
    # cast and the consumer of y


# ---------------------------------------------------------------------------------------------------
# tuning (pallas_kernels.autotune)

def _fit(cfg: FusedConfig, gated: bool) -> FusedConfig:
    """cfg with fewer stages (down to 2) until its programs fit an SM together, else one program an SM."""
    while cfg.num_stages > 2 and not cfg.fits(gated):
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg if cfg.fits(gated) else dataclasses.replace(cfg, per_sm=1)


def fused_candidates(B: int, D: int, count: int, gated: int = 0, dtype="float16") -> list[FusedConfig]:
    """The heuristic's config first; then the two-kernel path's first up candidates (without a split of
    D) and down candidates in its place, each with as many stages as fit; then the heuristic's tiles at
    one program an SM, and in two launches."""
    base = fused_heuristic(B, D, count, bool(gated))
    out = [base]
    for u in [u for u in up_candidates(B, D, count, gated) if u.split_k == 1][:4]:
        out.append(_fit(dataclasses.replace(base, up_block_b=u.block_b, up_block_n=u.block_n, block_k=u.block_k,
                                            num_stages=6), bool(gated)))
    for d in down_candidates(B, D, count)[:4]:
        out.append(_fit(dataclasses.replace(base, down_block_b=d.block_b, down_block_n=d.block_n, block_d=d.block_d,
                                            split=d.split, num_stages=6), bool(gated)))
    out += [_fit(dataclasses.replace(base, per_sm=1, num_stages=6), bool(gated)), dataclasses.replace(base, barrier=False)]
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

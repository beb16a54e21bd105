"""add_and_norm in Pallas, lowered through Triton (GPU) or run by the Pallas interpreter (CPU).

One program per row b: the S partial sums of the update (a split GEMM's f32 partials, or its finished output
as S = 1), plus the bias, rounded to the residual's dtype and added to the residual row, written out; then
the row's norm (statistics in f32 over the whole row, held in registers) written beside it. Two XLA kernels
of a decode layer (the split's sum with the residual add, then the norm) become one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_backend


def _kernel(layer_ref, r_ref, u_ref, *refs, S: int, D: int, Dp: int, kind: str, eps: float, has_bias: bool,
            has_shift: bool):
    b_ref = refs[0] if has_bias else None
    scale_ref = refs[int(has_bias)]
    shift_ref = refs[int(has_bias) + 1] if has_shift else None
    x_ref, n_ref = refs[-2:]
    row, layer = pl.program_id(0), layer_ref[0]
    dd = jnp.arange(Dp)
    mask = dd < D if Dp != D else None
    zero = 0 if mask is not None else None

    def vec(ref, *at):  # ref[*at, :D] as f32 [Dp] (0 past D)
        return plgpu.load(ref.at[(*at, pl.ds(0, Dp))], mask=mask, other=zero).astype(jnp.float32)

    y = vec(u_ref, jnp.int32(0), row)
    for s in range(1, S):
        y = y + vec(u_ref, jnp.int32(s), row)
    if has_bias:
        y = y + vec(b_ref, layer)
    dtype = x_ref.dtype
    x = (vec(r_ref, row) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
    plgpu.store(x_ref.at[row, pl.ds(0, Dp)], x, mask=mask)
    xf = x.astype(jnp.float32)
    if kind == "layer":
        xf = xf - jnp.sum(xf) / D
        if mask is not None:
            xf = jnp.where(mask, xf, 0.0)
    normed = xf * jax.lax.rsqrt(jnp.sum(xf * xf) / D + eps)
    if kind == "layer":
        normed = (normed * vec(scale_ref, layer) + vec(shift_ref, layer)).astype(dtype)
    else:  # HF LlamaRMSNorm: round to the dtype, then scale (in the dtype)
        normed = (normed.astype(dtype).astype(jnp.float32) * vec(scale_ref, layer)).astype(dtype)
    plgpu.store(n_ref.at[row, pl.ds(0, Dp)], normed, mask=mask)


def add_and_norm(residual, update, norm, *, bias=None, layer=None, impl=None, interpret=None):
    """Arguments already validated by the API; bias / norm.scale / norm.shift are stacked [L, D] here."""
    del impl
    interpret = check_backend(interpret)
    if norm.kind == "rms" and norm.scale.dtype != residual.dtype:
        raise NotImplementedError("RMSNorm gains in another dtype than the activations (the kernel scales in the "
                                  "activations' dtype, as HF does when they agree)")
    B, D = residual.shape
    S = update.shape[0]
    Dp = 1 << (D - 1).bit_length()  # the row as one power-of-two vector (masked past D)
    has_shift = norm.kind == "layer"
    args = [jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), residual, update]
    args += [bias] if bias is not None else []
    args += [norm.scale] + ([norm.shift] if has_shift else [])
    kernel = functools.partial(_kernel, S=S, D=D, Dp=Dp, kind=norm.kind, eps=float(norm.eps),
                               has_bias=bias is not None, has_shift=has_shift)
    out = jax.ShapeDtypeStruct((B, D), residual.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out),
        grid=(B,),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4 if Dp <= 4096 else 8, num_stages=1),
        name="add_and_norm",
    )(*args)

"""A projection's output added to the residual stream, and the sum normalised: one kernel in a decode layer.

  add_and_norm(residual, update, norm, *, bias=None, layer=None, impl=None, interpret=None) -> (x, normed)

  x      = residual + (sum_s update[s] + bias), the update rounded to residual's dtype before the add
  normed = norm(x): RMSNorm (HF LlamaRMSNorm: x / RMS(x) in f32, rounded, times the gains) or LayerNorm
           (statistics in f32, times the gains plus the shift), in residual's dtype

Shapes and dtypes:
  residual  [B, D] float16 | bfloat16 | float32
  update    [S, B, D]: a split GEMM's S partial sums (f32), or S = 1 and its finished output
  norm      Norm(kind "rms" | "layer", scale, shift (LayerNorm only, else None), eps): scale / shift [D], or
            [L, D] together with `layer`
  bias      None, or [D] / [L, D]: added to the update before it is rounded (a split GEMM's bias)
  layer     int32 scalar (may be traced) selecting the row of stacked [L, D] parameters

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernel, one program per row; CUDA GPU, or the Pallas interpreter with interpret=True),
  "xla" (the pure-jnp reference: what XLA ran as two kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import DTYPES, check_layer, dispatch, shape_of
from pallas_kernels.residual_norm import reference
from pallas_kernels.residual_norm import triton as triton_impl

IMPLS = {
    "triton": triton_impl.add_and_norm,
    "xla": reference.add_and_norm,
}


class Norm(NamedTuple):
    kind: str                 # "rms" | "layer"
    scale: jax.Array          # [D] or [L, D]
    shift: jax.Array | None   # [D] or [L, D] (LayerNorm), None (RMSNorm)
    eps: float


def check_contract(residual, update, norm, bias, layer):
    """Raise ValueError/TypeError naming the problem."""
    if residual.ndim != 2:
        raise ValueError(f"residual has shape {shape_of(residual)}; expected [B, D]")
    if not any(residual.dtype == d for d in DTYPES):
        raise TypeError(f"residual has dtype {residual.dtype}; expected float16, bfloat16 or float32")
    if update.ndim != 3 or update.shape[1:] != residual.shape:
        raise ValueError(f"update has shape {shape_of(update)}; expected [S, B, D] with [B, D]={shape_of(residual)}")
    if not isinstance(norm, Norm) or norm.kind not in ("rms", "layer"):
        raise ValueError(f"norm must be a Norm with kind 'rms' or 'layer', got {norm!r}"[:200])
    if (norm.shift is None) != (norm.kind == "rms"):
        raise ValueError("a LayerNorm takes a shift and an RMSNorm none")
    if not isinstance(norm.eps, (int, float)) or not norm.eps > 0:
        raise ValueError(f"norm eps must be a positive Python float, got {norm.eps!r}")
    D = residual.shape[1]
    stacked = jnp.ndim(norm.scale) == 2
    if stacked != (layer is not None):
        raise ValueError(f"norm scale has shape {shape_of(norm.scale)}: pass layer with stacked [L, D] parameters "
                         "and only with them")
    L = norm.scale.shape[0] if stacked else None
    want = (L, D) if stacked else (D,)
    for name, a in (("norm scale", norm.scale), ("norm shift", norm.shift), ("bias", bias)):
        if a is not None and shape_of(a) != want:
            raise ValueError(f"{name} has shape {shape_of(a)}; expected {want}")
    if stacked:
        check_layer(layer, L)


def add_and_norm(residual, update, norm: Norm, *, bias=None, layer=None, impl=None, interpret=None):
    """(x, normed), both [B, D] in residual's dtype: see the module docstring."""
    check_contract(residual, update, norm, bias, layer)

    def call(name):
        if name == "triton" and layer is None:  # the kernel indexes stacked parameters
            lift = lambda a: None if a is None else a[None]
            return IMPLS[name](residual, update, Norm(norm.kind, lift(norm.scale), lift(norm.shift), norm.eps),
                               bias=lift(bias), layer=0, interpret=interpret)
        return IMPLS[name](residual, update, norm, bias=bias, layer=layer, interpret=interpret)

    return dispatch(IMPLS, impl, call)

"""Pure-jnp reference for add_and_norm (same signature as the public function): what the model computed as two
XLA kernels, a residual add (with the sum of a split GEMM's partials and its bias) and a norm."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _at(a, layer):
    return a if a is None or layer is None else lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)


def normalize(x, norm, layer=None):
    """LayerNorm or RMSNorm (HF LlamaRMSNorm) of x over its last axis, statistics in f32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    scale, shift = _at(norm.scale, layer), _at(norm.shift, layer)
    if norm.kind == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
        y = xf * lax.rsqrt((xf * xf).mean(-1, keepdims=True) + norm.eps)
        return (y * scale.astype(jnp.float32) + shift.astype(jnp.float32)).astype(x.dtype)
    y = (xf * lax.rsqrt((xf * xf).mean(-1, keepdims=True) + norm.eps)).astype(x.dtype)
    return scale * y  # HF LlamaRMSNorm: cast back to the input dtype, then scale


def add_and_norm(residual, update, norm, *, bias=None, layer=None, impl=None, interpret=None):
    del impl, interpret
    y = update.astype(jnp.float32).sum(axis=0)
    if bias is not None:
        y = y + _at(bias, layer).astype(jnp.float32)
    x = residual + y.astype(residual.dtype)
    return x, normalize(x, norm, layer)

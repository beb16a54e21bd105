"""Pure-jnp references for the selective GEMM (same signatures as the public functions), and the dense
path the API takes where reading every weight beats gathering most of them.

The references gather `W[idx]` (materialised: fine for a reference) and compute in f32; the result is
cast to the input dtype. The dense path computes the same function over all F neurons with a 0/1
neuron mask built from (idx, count), so switching between sparse and dense never changes the result.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def activate(h, activation: str):
    """relu | gelu (tanh approximation, as jax.nn.gelu's default) | silu | none, in h's dtype."""
    if activation == "relu":
        return jnp.maximum(h, 0)
    if activation == "gelu":
        return 0.5 * h * (1.0 + jnp.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    if activation == "silu":
        return h / (1.0 + jnp.exp(-h))
    if activation == "none":
        return h
    raise ValueError(f"unknown activation {activation!r}")


def _layer(w, layer):
    return w if layer is None else lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def selective_up(x, w_up, idx, count, *, b_up=None, w_gate=None, activation="relu", layer=None, impl=None,
                 interpret=None):
    del impl, interpret
    C = idx.shape[0]
    xf = x.astype(jnp.float32)
    up = jnp.take(_layer(w_up, layer), idx, axis=0).astype(jnp.float32)          # [C, D]
    h = jnp.einsum("bd,cd->bc", xf, up, precision=_HI)                           # [B, C]
    if b_up is not None:
        h = h + jnp.take(_layer(b_up, layer), idx).astype(jnp.float32)
    if w_gate is not None:
        gate = jnp.take(_layer(w_gate, layer), idx, axis=0).astype(jnp.float32)  # [C, D]
        h = activate(jnp.einsum("bd,cd->bc", xf, gate, precision=_HI), "silu") * h
    else:
        h = activate(h, activation)
    h = jnp.where(jnp.arange(C) < count, h, 0.0)
    return h.astype(x.dtype)


def selective_down(h, w_down, idx, count, *, b_down=None, layer=None, impl=None, interpret=None):
    del impl, interpret
    C = idx.shape[0]
    hf = jnp.where(jnp.arange(C) < count, h.astype(jnp.float32), 0.0)             # ignore columns >= count
    down = jnp.take(_layer(w_down, layer), idx, axis=0).astype(jnp.float32)      # [C, D]
    y = jnp.einsum("bc,cd->bd", hf, down, precision=_HI)
    if b_down is not None:
        y = y + _layer(b_down, layer).astype(jnp.float32)
    return y.astype(h.dtype)


def selective_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu",
                  layer=None, impl=None, interpret=None):
    h = selective_up(x, w_up, idx, count, b_up=b_up, w_gate=w_gate, activation=activation, layer=layer)
    return selective_down(h, w_down, idx, count, b_down=b_down, layer=layer)


# ---- dense path: every weight read once at library-GEMM speed, same function through a neuron mask ----
# The matmuls produce the activations' dtype (cuBLAS still accumulates in f32), exactly as the plain XLA
# MLP `act(x @ W1.T + b1) @ W2 + b2` does: measured on an H200, asking XLA for f32 outputs instead made
# the dense path up to 25% slower than that baseline at B=1 and 5% at B=256.

def _mm(spec, a, b):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # f32: no TF32 on GPU
    return jnp.einsum(spec, a, b, precision=precision)


def neuron_mask(idx, count, F: int, dtype):
    """[F] 0/1 mask of the neurons idx[:count] (positions >= count are ignored)."""
    live = (jnp.arange(idx.shape[0]) < count).astype(dtype)
    return jnp.zeros((F,), dtype).at[idx].max(live)


def _dense_hidden(x, w_up, b_up, w_gate, activation, layer):
    """act(x @ w_up.T + b_up) over all F neurons, in x's dtype (XLA: one GEMM + a fused epilogue)."""
    h = _mm("bd,fd->bf", x, _layer(w_up, layer))                                 # [B, F]
    if b_up is not None:
        h = h + _layer(b_up, layer)
    if w_gate is not None:
        return activate(_mm("bd,fd->bf", x, _layer(w_gate, layer)), "silu") * h
    return activate(h, activation)


def dense_up(x, w_up, idx, count, *, b_up=None, w_gate=None, activation="relu", layer=None, impl=None,
             interpret=None):
    del impl, interpret
    C = idx.shape[0]
    h = jnp.take(_dense_hidden(x, w_up, b_up, w_gate, activation, layer), idx, axis=1)  # [B, C]
    return jnp.where(jnp.arange(C) < count, h, jnp.zeros((), x.dtype))


def dense_down(h, w_down, idx, count, *, b_down=None, layer=None, impl=None, interpret=None):
    del impl, interpret
    B, C = h.shape
    F = w_down.shape[-2]
    hc = jnp.where(jnp.arange(C) < count, h, jnp.zeros((), h.dtype))
    # Positions >= count hold zeros, so a scatter-add of them (wherever idx points) adds nothing.
    hf = jnp.zeros((B, F), h.dtype).at[:, idx].add(hc)                           # [B, F]
    y = _mm("bf,fd->bd", hf, _layer(w_down, layer))
    return y if b_down is None else y + _layer(b_down, layer)


def dense_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu",
              layer=None, impl=None, interpret=None, all_selected: bool = False):
    """The MLP over all F neurons, masked to idx[:count]; `all_selected` (count == F known) skips the mask."""
    del impl, interpret
    F = w_up.shape[-2]
    h = _dense_hidden(x, w_up, b_up, w_gate, activation, layer)                  # [B, F]
    if not all_selected:
        h = h * neuron_mask(idx, count, F, h.dtype)
    y = _mm("bf,fd->bd", h, _layer(w_down, layer))
    return y if b_down is None else y + _layer(b_down, layer)

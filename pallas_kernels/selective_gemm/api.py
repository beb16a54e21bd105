"""Selective GEMM for the sparse MLP: public functions, contract checks and dispatch.

  selective_up(x, w_up, idx, count, *, b_up, w_gate, activation, layer) -> h [B, C]
      h[:, j] = act(x @ w_up[idx[j]] + b_up[idx[j]]) for j < count; columns >= count are exactly 0.
      Gated (w_gate given): h = silu(x @ w_gate[idx].T) * (x @ w_up[idx].T + b_up[idx]), one pass over x.
  selective_down(h, w_down, idx, count, *, b_down, layer) -> y [B, D]
      y = sum_{j < count} h[:, j] * w_down[idx[j]] + b_down
  selective_mlp(x, w_up, w_down, idx, count, ...) -> y [B, D]: up then down.

Shapes and dtypes:
  x [B, D] and h [B, C]: float16 | bfloat16 | float32; weights in the same dtype.
  w_up, w_gate, w_down: [F, D] (neuron-major), or [L, F, D] together with `layer` (an int32 scalar that
      may be traced, e.g. inside lax.scan over layers: the kernels index the stacked array themselves,
      so no per-layer copy of the weights is made). b_up [F] / [L, F], b_down [D] / [L, D].
  idx [C] int32: the selected neuron ids (the union over the batch), distinct among positions < count,
      padded to a static capacity C; positions >= count are ignored but must hold ids in [0, F).
  count: int32 scalar <= C, may be traced. Work is proportional to count, not to C.
  activation: "relu" | "gelu" (tanh approximation) | "none"; ignored (silu gate) when w_gate is given.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernels lowered through Triton; CUDA GPU, or the Pallas interpreter with
  interpret=True), "xla" (the pure-jnp reference, last resort). "fused" (only by impl="fused"; same
  backend as "triton") runs selective_mlp as one persistent kernel, the two-kernel path's up tiles, a
  grid barrier, then its down tiles (fused.py; slightly slower than "triton" on an H100, see
  benchmarks/results/kernels_mlp_fused.md); for selective_up / selective_down alone it is "triton".
  "dense" computes the same function over all F neurons through a neuron mask with library GEMMs;
  impl=None takes it where the selected fraction is high enough that gathering would be slower than
  reading everything (see `dense_is_faster`). A concrete count decides at trace time. A traced count whose capacity C could
  reach that fraction decides on the device: a `lax.cond` on the dynamic count between the dense path
  and the sparse kernels, so a large capacity (e.g. C = F) with a small union still runs sparse. Where
  even C is below the fraction, the sparse kernels run without a cond.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import check_float, check_layer, concrete
from pallas_kernels.selective_gemm import fused as fused_impl
from pallas_kernels.selective_gemm import reference
from pallas_kernels.selective_gemm import triton as triton_impl

ACTIVATIONS = ("relu", "gelu", "none")

IMPLS = {
    "triton": {"up": triton_impl.selective_up, "down": triton_impl.selective_down, "mlp": triton_impl.selective_mlp},
    # A single projection has nothing to fuse: "fused" runs the Triton kernel there.
    "fused": {"up": triton_impl.selective_up, "down": triton_impl.selective_down, "mlp": fused_impl.fused_mlp},
    "dense": {"up": reference.dense_up, "down": reference.dense_down, "mlp": reference.dense_mlp},
    "xla": {"up": reference.selective_up, "down": reference.selective_down, "mlp": reference.selective_mlp},
}

# Selected fraction of F above which the dense path is faster than the sparse kernels. Measured on an
# H200 (fp16, kernel time, benchmarks/results/kernels_mlp.md): sparse time against density crosses the
# dense time near 1.0 at B <= 16; at B=64 near 0.9 (D=8192) / 0.7 (D=4096); at B=128 near 0.8 / 0.58;
# at B=256, where the selective GEMMs turn compute-bound, near 0.7 / 0.44. The limits sit ~0.1 below.
def dense_is_faster(B: int, D: int, F: int, count: int) -> bool:
    big = D >= 8192
    if B <= 32:
        limit = 0.8
    elif B <= 64:
        limit = 0.8 if big else 0.6
    elif B <= 128:
        limit = 0.7 if big else 0.5
    else:
        limit = 0.6 if big else 0.35
    return count > limit * F


# ---------------------------------------------------------------------------------------------------
# contract checks

def _check_weight(name, w, D, dtype, layer):
    """Return (F, stacked) for a [F, D] or [L, F, D] weight."""
    if w.dtype != dtype:
        raise TypeError(f"{name} has dtype {w.dtype}, but the activations are {dtype}")
    if w.ndim == 2:
        if layer is not None:
            raise ValueError(f"layer={layer!r} was given but {name} is 2-D {tuple(w.shape)}; pass the stacked "
                             "[L, F, D] weights with layer, or [F, D] without")
    elif w.ndim == 3:
        if layer is None:
            raise ValueError(f"{name} is stacked {tuple(w.shape)} ([L, F, D]) but no layer was given")
    else:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; expected [F, D] or [L, F, D]")
    if w.shape[-1] != D:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, model dim D={D} expected last")
    return w.shape[-2]


def _check_idx(idx, count, F):
    if idx.ndim != 1:
        raise ValueError(f"idx has shape {tuple(idx.shape)}; expected [C]")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"idx has dtype {idx.dtype}; expected int32")
    C = idx.shape[0]
    if jnp.ndim(count) != 0:
        raise ValueError(f"count must be a scalar, got shape {jnp.shape(count)}")
    c = concrete(count)
    if c is not None and not 0 <= int(c) <= C:
        raise ValueError(f"count={int(c)} must be in [0, C={C}] (the capacity of idx)")
    v = concrete(idx)
    if v is not None and C and (v.min() < 0 or v.max() >= F):
        bad = v[(v < 0) | (v >= F)]
        raise ValueError(f"idx holds neuron ids outside [0, F={F}): {bad[:8].tolist()}")
    return C


def _check_bias(name, b, n, dtype, stacked, L):
    if b is None:
        return
    want = (L, n) if stacked else (n,)
    if tuple(b.shape) != want:
        raise ValueError(f"{name} has shape {tuple(b.shape)}; expected {want}")
    if b.dtype != dtype:
        raise TypeError(f"{name} has dtype {b.dtype}, but the activations are {dtype}")


def _check_up(x, w_up, idx, count, b_up, w_gate, activation, layer):
    if x.ndim != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, D]")
    check_float("x", x)
    D = x.shape[1]
    F = _check_weight("w_up", w_up, D, x.dtype, layer)
    if w_gate is not None:
        _check_weight("w_gate", w_gate, D, x.dtype, layer)
        if w_gate.shape != w_up.shape:
            raise ValueError(f"w_gate has shape {tuple(w_gate.shape)} but w_up has {tuple(w_up.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    stacked = w_up.ndim == 3
    L = w_up.shape[0] if stacked else 1
    check_layer(layer, L)
    _check_bias("b_up", b_up, F, x.dtype, stacked, L)
    _check_idx(idx, count, F)
    return F


def _check_down(h, w_down, idx, count, b_down, layer):
    if h.ndim != 2:
        raise ValueError(f"h has shape {tuple(h.shape)}; expected [B, C]")
    check_float("h", h)
    if w_down.ndim not in (2, 3):
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}; expected [F, D] or [L, F, D]")
    D = w_down.shape[-1]
    F = _check_weight("w_down", w_down, D, h.dtype, layer)
    stacked = w_down.ndim == 3
    L = w_down.shape[0] if stacked else 1
    check_layer(layer, L)
    _check_bias("b_down", b_down, D, h.dtype, stacked, L)
    C = _check_idx(idx, count, F)
    if h.shape[1] != C:
        raise ValueError(f"h has {h.shape[1]} columns but idx has capacity C={C}")
    return F, D


# ---------------------------------------------------------------------------------------------------
# dispatch

SPARSE = ["triton", "xla"]   # impl=None; "fused" is opt-in: slower on an H100 (benchmarks/bench_mlp.py --fused)
PALLAS = ("triton", "fused")  # backends that take stacked [L, F, D] weights and an int32 layer


def _dispatch(op, order, call):
    """call(name, fn) runs one implementation; the first that does not raise NotImplementedError wins."""
    for i, name in enumerate(order):
        try:
            return call(name, IMPLS[name][op])
        except NotImplementedError:
            if i == len(order) - 1:
                raise
    raise AssertionError("unreachable")


def _run(op, impl, B, D, F, count, C, call):
    """Dispatch `op`: a forced impl; else dense or sparse by the count (see the module docstring)."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {tuple(IMPLS)} or None")
        return _dispatch(op, [impl], call)
    c = concrete(count)
    if c is not None:
        return _dispatch(op, ["dense"] if dense_is_faster(B, D, F, int(c)) else SPARSE, call)
    if not dense_is_faster(B, D, F, C):
        return _dispatch(op, SPARSE, call)
    # Traced count, capacity in dense territory: choose on the device. Both branches are compiled;
    # only the taken one runs (the sparse kernels' work follows the dynamic count).
    return lax.cond(dense_is_faster(B, D, F, count), lambda: _dispatch(op, ["dense"], call),
                    lambda: _dispatch(op, SPARSE, call))


def _stack(w, layer):
    """The Triton backend sees [L, F, D] weights and a layer scalar; 2-D becomes L = 1 (a free reshape)."""
    if w is None or layer is not None:
        return w
    return w[None]


def _layer_arg(name, layer):
    if name in PALLAS:
        return jnp.int32(0) if layer is None else layer
    return layer


def selective_up(x, w_up, idx, count, *, b_up=None, w_gate=None, activation="relu", layer=None, impl=None,
                 interpret=None):
    """h [B, C] in x's dtype: column j < count is act(x @ w_up[idx[j]] + b_up[idx[j]]), the rest 0.

    See the module docstring for shapes; `impl` picks a backend ("triton", "fused", "dense", "xla"),
    `interpret` runs the Triton kernels in the Pallas interpreter.
    """
    F = _check_up(x, w_up, idx, count, b_up, w_gate, activation, layer)
    B, D = x.shape

    def call(name, fn):
        st = (lambda a: _stack(a, layer)) if name in PALLAS else (lambda a: a)
        return fn(x, st(w_up), idx, count, b_up=st(b_up), w_gate=st(w_gate), activation=activation,
                  layer=_layer_arg(name, layer), interpret=interpret)

    return _run("up", impl, B, D, F, count, idx.shape[0], call)


def selective_down(h, w_down, idx, count, *, b_down=None, layer=None, impl=None, interpret=None):
    """y [B, D] in h's dtype: sum_{j < count} h[:, j] * w_down[idx[j]] + b_down (see the module docstring)."""
    F, D = _check_down(h, w_down, idx, count, b_down, layer)
    B = h.shape[0]

    def call(name, fn):
        st = (lambda a: _stack(a, layer)) if name in PALLAS else (lambda a: a)
        return fn(h, st(w_down), idx, count, b_down=st(b_down), layer=_layer_arg(name, layer),
                  interpret=interpret)

    return _run("down", impl, B, D, F, count, idx.shape[0], call)


def selective_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu",
                  layer=None, impl=None, interpret=None):
    """y [B, D] = selective_down(selective_up(x, ...), ...): the sparse MLP of one layer.

    impl="fused" runs it as one persistent kernel (fused.py).
    Takes the dense path (all F neurons, same function) where that is faster, see `dense_is_faster`;
    with a traced count and a large capacity that choice is a `lax.cond` on the device.
    """
    F = _check_up(x, w_up, idx, count, b_up, w_gate, activation, layer)
    Fd, D = _check_down(jax.ShapeDtypeStruct((x.shape[0], idx.shape[0]), x.dtype), w_down, idx, count, b_down, layer)
    if Fd != F or w_down.shape != w_up.shape:
        raise ValueError(f"w_down has shape {tuple(w_down.shape)} but w_up has {tuple(w_up.shape)}")
    B = x.shape[0]
    c = concrete(count)

    def call(name, fn):
        st = (lambda a: _stack(a, layer)) if name in PALLAS else (lambda a: a)
        extra = {}
        if name == "dense" and c is not None and int(c) == F:
            extra["all_selected"] = True  # idx[:F] distinct = every neuron: the plain dense MLP, no mask
        return fn(x, st(w_up), st(w_down), idx, count, b_up=st(b_up), b_down=st(b_down), w_gate=st(w_gate),
                  activation=activation, layer=_layer_arg(name, layer), interpret=interpret, **extra)

    return _run("mlp", impl, B, D, F, count, idx.shape[0], call)

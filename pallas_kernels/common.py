"""What the Pallas kernels and their APIs share: the backend check, the dot, host values of inputs, raw bits."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_backend(interpret):
    """Interpret mode anywhere; compiled only on a CUDA GPU (elsewhere the API falls back)."""
    if interpret is None:
        interpret = False
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError("the Triton backend needs a CUDA GPU (pass interpret=True to run it on CPU)")
    return interpret


def dot(a, b, *, trans_b: bool):
    """a @ b (or a @ b.T) inside a kernel, fp32 accumulation; fp32 operands in IEEE f32, not TF32."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def raw_bits(a):
    """A 16-bit float array's bits as uint16 on the CPU; other arrays, and any array elsewhere, as they are. The
    jnp references gather from and scatter into whole KV pools through these: XLA's CPU backend converts a
    bf16 gather's or scatter's whole operand to f32 and back, which made a decode step cost O(pool), not
    O(pages touched). f32 needs no bits (the CPU gathers and scatters it as it is), and the bits are no view:
    a pool converted at a program's edge, or at a loop's, is a copy of all of it, so callers that keep a pool
    across steps or layers keep it as bits (polar_jax.model's layer scan, the engine's ModelRunner)."""
    if a.dtype.itemsize != 2 or not jnp.issubdtype(a.dtype, jnp.floating) or jax.default_backend() != "cpu":
        return a
    return lax.bitcast_convert_type(a, jnp.uint16)


def from_raw_bits(a, dtype):
    """The inverse of raw_bits, for an array that had `dtype`."""
    return a if a.dtype == dtype else lax.bitcast_convert_type(a, dtype)


def concrete(v):
    """The numpy value of v if it is known at trace time (not traced, not None), else None."""
    if v is None or isinstance(v, jax.core.Tracer):
        return None
    try:
        return np.asarray(v)
    except Exception:  # noqa: BLE001  (anything that cannot be read on the host)
        return None


# ---------------------------------------------------------------------------------------------------
# contract checks and dispatch shared by the attention APIs (contiguous, paged decode, paged prefill)

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def shape_of(a) -> tuple:
    return tuple(a.shape)


def check_float(name: str, a) -> None:
    """a's dtype is one the kernels take (float16, bfloat16, float32)."""
    if not any(a.dtype == d for d in DTYPES):
        raise TypeError(f"{name} has dtype {a.dtype}; expected float16, bfloat16 or float32")


def check_query(q, want: str) -> None:
    """q's rank (len of the [..] in `want`), dtype and head dim (its last axis)."""
    if jnp.ndim(q) != want.count(",") + 1:
        raise ValueError(f"q has shape {shape_of(q)}; expected {want}")
    check_float("q", q)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} unsupported; supported: {', '.join(map(str, HEAD_DIMS))}")


def check_stacked_kv(q, k, v, layer, names: tuple[str, str], layout: str, what: str):
    """K and V in q's dtype, equal shapes, 4-D `layout` or 5-D [L, `layout`] with `layer`; returns L or None."""
    for name, c in zip(names, (k, v)):
        if c.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {c.dtype}, but q is {q.dtype}")
    if shape_of(v) != shape_of(k):
        raise ValueError(f"{names[1]} has shape {shape_of(v)} but {names[0]} has {shape_of(k)}")
    stacked = f"[L, {layout[1:]}"
    if k.ndim == 4:
        if layer is not None:
            raise ValueError(f"layer={layer!r} was given but {names[0]} is 4-D {shape_of(k)}; pass the "
                             f"stacked {stacked} {what} with layer, or {layout} without")
        return None
    if k.ndim == 5:
        if layer is None:
            raise ValueError(f"{names[0]} is stacked {shape_of(k)} ({stacked}) but no layer was given")
        return k.shape[0]
    raise ValueError(f"{names[0]} has shape {shape_of(k)}; expected {layout} or {stacked}")


def check_layer(layer, L) -> None:
    if layer is None:
        return
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise TypeError(f"layer must be an integer scalar, got {layer!r}")
    v = concrete(layer)
    if v is not None and not 0 <= int(v) < L:
        raise ValueError(f"layer={int(v)} is out of range for {L} stacked layers")


def check_sm_scale(sm_scale) -> None:
    if sm_scale is not None:
        try:
            float(sm_scale)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(f"sm_scale must be a Python float (static), got {sm_scale!r}") from e


def check_head_idx(head_idx, B: int) -> None:
    if jnp.ndim(head_idx) != 2 or head_idx.shape[0] != B:
        raise ValueError(f"head_idx has shape {shape_of(head_idx)}; expected [B, C] with B={B}")
    if not jnp.issubdtype(head_idx.dtype, jnp.integer):
        raise TypeError(f"head_idx has dtype {head_idx.dtype}; expected int32")


def check_per_sequence(name: str, a, B: int) -> None:
    if shape_of(a) != (B,):
        raise ValueError(f"{name} has shape {shape_of(a)}; expected [B]=({B},)")
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{name} has dtype {a.dtype}; expected int32")


def dispatch(impls: dict, impl, call):
    """call(name) for each implementation in order until one does not raise NotImplementedError."""
    if impl is not None:
        if impl not in impls:
            raise ValueError(f"unknown impl {impl!r}; expected one of {tuple(impls)} or None")
        order = [impl]
    else:
        order = list(impls)
    for i, name in enumerate(order):
        try:
            return call(name)
        except NotImplementedError:
            if i == len(order) - 1:
                raise
    raise AssertionError("unreachable")

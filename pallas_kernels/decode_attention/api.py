"""Selective-head decode attention: public function, contract checks and dispatch.

  decode_attention(q, k_cache, v_cache, lengths, head_idx=None, *, layer=None, sm_scale=None,
                   impl=None, interpret=None) -> o [B, N, H]

Shapes and dtypes:
  q        [B, N, H]  float16 | bfloat16 | float32; H in {64, 80, 96, 128}.
  k_cache  [B, K, S, H] in q's dtype, or the stacked [L, B, K, S, H] together with `layer`; N % K == 0
           (G = N // K query heads share a KV head: MHA G = 1, GQA G > 1).
  v_cache  same shape and dtype as k_cache.
  lengths  [B] int32 in [0, S]: sequence b attends to cache positions [0, lengths[b]); 0 gives zeros.
  head_idx None (every KV head), or [B, C] int32: the selected KV heads (GQA: KV groups, all G query
           heads of a group are computed while its K/V slab is read once). -1 marks an empty slot, so a
           static capacity C can hold a varying count; other ids must lie in [0, K). Query heads whose
           KV head is not selected come out exactly 0.
  layer    int32 scalar selecting the layer of a stacked cache; may be traced (lax.scan over layers).
           The kernel receives the whole stacked cache and indexes the layer itself: slicing it first
           would, inside a jitted scan, materialise the slice as a copy before the custom call.
  sm_scale softmax scale, a Python float (default 1/sqrt(H)).
  returns  o [B, N, H] in q's dtype, f32 accumulation.

Checks: shapes, dtypes, head dim and the layer/cache rank agreement are checked always (they are static).
Values (head_idx ids in [-1, K), lengths in [0, S], layer in [0, L)) are checked only when the array is
concrete: under jit they are tracers and the checks are skipped. Both implementations stay safe for any
values there: a length outside [0, S] acts as the nearest bound (a length past S attends to all S
positions, never the next head's slab), an id outside [0, K) acts as an empty slot (nothing read or
written for it; its heads are 0 unless another slot selects them). A traced layer must lie in [0, L).

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas flash-decoding kernel lowered through Triton on a CUDA GPU, or run by the Pallas
  interpreter with interpret=True), "xla" (the pure-jnp reference, last resort). `impl` forces one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import concrete
from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention import triton as triton_impl

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)

IMPLS = {
    "triton": triton_impl.decode_attention,
    "xla": reference.decode_attention,
}


def _shape(a):
    return tuple(a.shape)


def check_contract(q, k_cache, v_cache, lengths, head_idx=None, layer=None, sm_scale=None):
    """Raise ValueError/TypeError naming the problem; return (B, N, K, S, H, C)."""
    if jnp.ndim(q) != 3:
        raise ValueError(f"q has shape {_shape(q)}; expected [B, N, H]")
    if not any(q.dtype == d for d in DTYPES):
        raise TypeError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    B, N, H = q.shape
    if H not in HEAD_DIMS:
        raise ValueError(f"head_dim={H} unsupported; supported: {', '.join(map(str, HEAD_DIMS))}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {c.dtype}, but q is {q.dtype}")
    if _shape(v_cache) != _shape(k_cache):
        raise ValueError(f"v_cache has shape {_shape(v_cache)} but k_cache has {_shape(k_cache)}")
    if k_cache.ndim == 4:
        if layer is not None:
            raise ValueError(f"layer={layer!r} was given but k_cache is 4-D {_shape(k_cache)}; pass the "
                             "stacked [L, B, K, S, H] cache with layer, or [B, K, S, H] without")
        L = None
    elif k_cache.ndim == 5:
        if layer is None:
            raise ValueError(f"k_cache is stacked {_shape(k_cache)} ([L, B, K, S, H]) but no layer was given")
        L = k_cache.shape[0]
    else:
        raise ValueError(f"k_cache has shape {_shape(k_cache)}; expected [B, K, S, H] or [L, B, K, S, H]")
    Bc, K, S, Hc = k_cache.shape[-4:]
    if Bc != B or Hc != H:
        raise ValueError(f"k_cache has shape {_shape(k_cache)} (B={Bc}, H={Hc}) but q has {_shape(q)} "
                         f"(B={B}, H={H})")
    if K == 0 or N % K != 0:
        raise ValueError(f"q has N={N} heads, not a multiple of the cache's K={K} KV heads")
    if _shape(lengths) != (B,):
        raise ValueError(f"lengths has shape {_shape(lengths)}; expected [B]=({B},)")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths has dtype {lengths.dtype}; expected int32")
    lv = concrete(lengths)
    if lv is not None and B and (lv.min() < 0 or lv.max() > S):
        bad = lv[(lv < 0) | (lv > S)]
        raise ValueError(f"lengths must lie in [0, S={S}]; got {bad[:8].tolist()}")
    if layer is not None:
        if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise TypeError(f"layer must be an integer scalar, got {layer!r}")
        v = concrete(layer)
        if v is not None and not 0 <= int(v) < L:
            raise ValueError(f"layer={int(v)} is out of range for {L} stacked layers")
    C = K
    if head_idx is not None:
        if jnp.ndim(head_idx) != 2 or head_idx.shape[0] != B:
            raise ValueError(f"head_idx has shape {_shape(head_idx)}; expected [B, C] with B={B}")
        if not jnp.issubdtype(head_idx.dtype, jnp.integer):
            raise TypeError(f"head_idx has dtype {head_idx.dtype}; expected int32")
        C = head_idx.shape[1]
        hv = concrete(head_idx)
        if hv is not None and hv.size and (hv.min() < -1 or hv.max() >= K):
            bad = hv[(hv < -1) | (hv >= K)]
            raise ValueError(f"head_idx holds ids outside [-1, K={K}): {bad[:8].tolist()}")
    if sm_scale is not None:
        try:
            float(sm_scale)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(f"sm_scale must be a Python float (static), got {sm_scale!r}") from e
    return B, N, K, S, H, C


def _order(impl):
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {tuple(IMPLS)} or None")
        return [impl]
    return ["triton", "xla"]


def decode_attention(q, k_cache, v_cache, lengths, head_idx=None, *, layer=None, sm_scale=None, impl=None,
                     interpret=None):
    """o [B, N, H]: one decode step of (selective-head) attention over a KV cache.

    See the module docstring for the contract. `impl` picks a backend ("triton", "xla"); `interpret`
    runs the Triton kernel in the Pallas interpreter (CPU tests). Without a GPU and with interpret not
    set, impl=None falls back to the XLA reference.
    """
    check_contract(q, k_cache, v_cache, lengths, head_idx, layer, sm_scale)
    if sm_scale is not None:
        sm_scale = float(sm_scale)
    order = _order(impl)
    for i, name in enumerate(order):
        try:
            if name == "triton":
                kc, vc = (k_cache, v_cache) if layer is not None else (k_cache[None], v_cache[None])
                return IMPLS[name](q, kc, vc, lengths, head_idx, layer=0 if layer is None else layer,
                                   sm_scale=sm_scale, interpret=interpret)
            return IMPLS[name](q, k_cache, v_cache, lengths, head_idx, layer=layer, sm_scale=sm_scale,
                               interpret=interpret)
        except NotImplementedError:
            if i == len(order) - 1:
                raise
    raise AssertionError("unreachable")

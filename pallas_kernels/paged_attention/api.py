"""Paged selective-head decode attention: public function, contract checks and dispatch.

  paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                         sm_scale=None, impl=None, interpret=None) -> o [B, N, H]

Shapes and dtypes:
  q          [B, N, H]  float16 | bfloat16 | float32; H in {64, 80, 96, 128}.
  k_pages    [P, K, Z, H] in q's dtype (P pages of Z positions, head-major inside a page), or the
             stacked [L, P, K, Z, H] together with `layer`; Z in {8, 16, 32, 64, 128}; N % K == 0.
  v_pages    same shape and dtype as k_pages.
  lengths    [B] int32: sequence b attends to its positions [0, lengths[b]); 0 gives zeros. Values are
             clamped into [0, M*Z] inside the kernel (never checked: they are traced under jit).
  page_table [B, M] int32: position s of sequence b is at page page_table[b, s // Z], offset s % Z.
             Entries past a sequence's length are never read; ids are clamped into [0, P), so no load
             leaves the pool whatever the table holds.
  head_idx   None (every KV head), or [B, C] int32: the selected KV heads (GQA: KV groups). -1 marks an
             empty slot; any id outside [0, K) is treated as unselected (never read or written). Query
             heads whose KV head is not selected come out exactly 0.
  layer      int32 scalar selecting the layer of a stacked pool; may be traced (lax.scan over layers):
             the kernel indexes the layer itself, so a jitted scan never copies a layer.
  sm_scale   softmax scale, a Python float (default 1/sqrt(H)).
  returns    o [B, N, H] in q's dtype, f32 accumulation.

Checks: shapes, dtypes, head dim, page size and the layer/pool rank agreement always (they are static);
layer in [0, L) when concrete.

Implementations, tried in order until one accepts the inputs (backends raise NotImplementedError):
  "triton" (Pallas kernel lowered through Triton on a CUDA GPU, or the Pallas interpreter with
  interpret=True), "xla" (the pure-jnp reference, last resort). `impl` forces one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import concrete
from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import triton as triton_impl

HEAD_DIMS = (64, 80, 96, 128)
PAGE_SIZES = (8, 16, 32, 64, 128)
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)

IMPLS = {
    "triton": triton_impl.paged_decode_attention,
    "xla": reference.paged_decode_attention,
}


def _shape(a):
    return tuple(a.shape)


def check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, *, q_rank: int):
    """Checks shared with paged prefill. Return (B, N, H, L, P, K, Z, M); L is None for a 4-D pool."""
    if jnp.ndim(q) != q_rank:
        want = "[B, N, H]" if q_rank == 3 else "[B, T, N, H]"
        raise ValueError(f"q has shape {_shape(q)}; expected {want}")
    if not any(q.dtype == d for d in DTYPES):
        raise TypeError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
    if H not in HEAD_DIMS:
        raise ValueError(f"head_dim={H} unsupported; supported: {', '.join(map(str, HEAD_DIMS))}")
    for name, c in (("k_pages", k_pages), ("v_pages", v_pages)):
        if c.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {c.dtype}, but q is {q.dtype}")
    if _shape(v_pages) != _shape(k_pages):
        raise ValueError(f"v_pages has shape {_shape(v_pages)} but k_pages has {_shape(k_pages)}")
    if k_pages.ndim == 4:
        if layer is not None:
            raise ValueError(f"layer={layer!r} was given but k_pages is 4-D {_shape(k_pages)}; pass the "
                             "stacked [L, P, K, Z, H] pool with layer, or [P, K, Z, H] without")
        L = None
    elif k_pages.ndim == 5:
        if layer is None:
            raise ValueError(f"k_pages is stacked {_shape(k_pages)} ([L, P, K, Z, H]) but no layer was given")
        L = k_pages.shape[0]
    else:
        raise ValueError(f"k_pages has shape {_shape(k_pages)}; expected [P, K, Z, H] or [L, P, K, Z, H]")
    P, K, Z, Hc = k_pages.shape[-4:]
    if Hc != H:
        raise ValueError(f"k_pages has shape {_shape(k_pages)} (H={Hc}) but q has {_shape(q)} (H={H})")
    if Z not in PAGE_SIZES:
        raise ValueError(f"page size Z={Z} unsupported; supported: {', '.join(map(str, PAGE_SIZES))}")
    if P == 0:
        raise ValueError(f"k_pages has shape {_shape(k_pages)}: an empty pool (P=0)")
    if K == 0 or N % K != 0:
        raise ValueError(f"q has N={N} heads, not a multiple of the pool's K={K} KV heads")
    if jnp.ndim(page_table) != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table has shape {_shape(page_table)}; expected [B, M] with B={B}")
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise TypeError(f"page_table has dtype {page_table.dtype}; expected int32")
    if layer is not None:
        if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise TypeError(f"layer must be an integer scalar, got {layer!r}")
        v = concrete(layer)
        if v is not None and not 0 <= int(v) < L:
            raise ValueError(f"layer={int(v)} is out of range for {L} stacked layers")
    if sm_scale is not None:
        try:
            float(sm_scale)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(f"sm_scale must be a Python float (static), got {sm_scale!r}") from e
    return B, N, H, L, P, K, Z, page_table.shape[1]


def check_per_sequence(name: str, a, B: int):
    if _shape(a) != (B,):
        raise ValueError(f"{name} has shape {_shape(a)}; expected [B]=({B},)")
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{name} has dtype {a.dtype}; expected int32")


def check_contract(q, k_pages, v_pages, lengths, page_table, head_idx=None, layer=None, sm_scale=None):
    """Raise ValueError/TypeError naming the problem; return (B, N, K, Z, M, H, C)."""
    B, N, H, _, _, K, Z, M = check_pages(q, k_pages, v_pages, page_table, layer, sm_scale, q_rank=3)
    check_per_sequence("lengths", lengths, B)
    C = K
    if head_idx is not None:
        if jnp.ndim(head_idx) != 2 or head_idx.shape[0] != B:
            raise ValueError(f"head_idx has shape {_shape(head_idx)}; expected [B, C] with B={B}")
        if not jnp.issubdtype(head_idx.dtype, jnp.integer):
            raise TypeError(f"head_idx has dtype {head_idx.dtype}; expected int32")
        C = head_idx.shape[1]
    return B, N, K, Z, M, H, C


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


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, head_idx=None, *, layer=None,
                           sm_scale=None, impl=None, interpret=None):
    """o [B, N, H]: one decode step of (selective-head) attention over a paged KV cache.

    See the module docstring for the contract. `impl` picks a backend ("triton", "xla"); `interpret`
    runs the Triton kernel in the Pallas interpreter (CPU tests). Without a GPU and with interpret not
    set, impl=None falls back to the XLA reference.
    """
    check_contract(q, k_pages, v_pages, lengths, page_table, head_idx, layer, sm_scale)
    if sm_scale is not None:
        sm_scale = float(sm_scale)

    def call(name):
        if name == "triton":
            kp, vp = (k_pages, v_pages) if layer is not None else (k_pages[None], v_pages[None])
            return IMPLS[name](q, kp, vp, lengths, page_table, head_idx, layer=0 if layer is None else layer,
                               sm_scale=sm_scale, interpret=interpret)
        return IMPLS[name](q, k_pages, v_pages, lengths, page_table, head_idx, layer=layer, sm_scale=sm_scale,
                           interpret=interpret)

    return dispatch(IMPLS, impl, call)

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


from pallas_kernels.common import (check_head_idx, check_layer, check_per_sequence, check_query, check_sm_scale,
                                   check_stacked_kv, concrete, dispatch, shape_of)
from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention import triton as triton_impl

IMPLS = {
    "triton": triton_impl.decode_attention,
    "xla": reference.decode_attention,
}


def check_contract(q, k_cache, v_cache, lengths, head_idx=None, layer=None, sm_scale=None):
    """Raise ValueError/TypeError naming the problem; return (B, N, K, S, H, C)."""
    check_query(q, "[B, N, H]")
    B, N, H = q.shape
    L = check_stacked_kv(q, k_cache, v_cache, layer, ("k_cache", "v_cache"), "[B, K, S, H]", "cache")
    Bc, K, S, Hc = k_cache.shape[-4:]
    if Bc != B or Hc != H:
        raise ValueError(f"k_cache has shape {shape_of(k_cache)} (B={Bc}, H={Hc}) but q has {shape_of(q)} "
                         f"(B={B}, H={H})")
    if K == 0 or N % K != 0:
        raise ValueError(f"q has N={N} heads, not a multiple of the cache's K={K} KV heads")
    check_per_sequence("lengths", lengths, B)
    lv = concrete(lengths)
    if lv is not None and B and (lv.min() < 0 or lv.max() > S):
        bad = lv[(lv < 0) | (lv > S)]
        raise ValueError(f"lengths must lie in [0, S={S}]; got {bad[:8].tolist()}")
    check_layer(layer, L)
    C = K
    if head_idx is not None:
        check_head_idx(head_idx, B)
        C = head_idx.shape[1]
        hv = concrete(head_idx)
        if hv is not None and hv.size and (hv.min() < -1 or hv.max() >= K):
            bad = hv[(hv < -1) | (hv >= K)]
            raise ValueError(f"head_idx holds ids outside [-1, K={K}): {bad[:8].tolist()}")
    check_sm_scale(sm_scale)
    return B, N, K, S, H, C


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

    def call(name):
        if name == "triton":
            kc, vc = (k_cache, v_cache) if layer is not None else (k_cache[None], v_cache[None])
            return IMPLS[name](q, kc, vc, lengths, head_idx, layer=0 if layer is None else layer,
                               sm_scale=sm_scale, interpret=interpret)
        return IMPLS[name](q, k_cache, v_cache, lengths, head_idx, layer=layer, sm_scale=sm_scale,
                           interpret=interpret)

    return dispatch(IMPLS, impl, call)

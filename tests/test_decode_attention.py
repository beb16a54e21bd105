"""Selective-head decode attention kernel against the f32 reference.

Every kernel test runs the Triton kernel: in the Pallas interpreter on CPU (`interpret=True`), compiled
where a CUDA GPU is present (`interpret=False`): interpret mode is a parameter of the same test.
Inputs are fresh random draws (never zeros); each compiled function is called on several draws of
(q, lengths, head_idx) with those traced, so one compile serves ragged lengths (0, 1, 7, block
multiples and not, S) and selected counts 0 / odd / capacity (-1 padding). The reference is computed
in f32 from the same rounded inputs. The interpreter starts every output buffer as NaN (Pallas'
uninitialised value), so an element the kernel forgot to write fails the finiteness check; on the GPU
the repeated calls on different inputs catch stale elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import api, decode_attention, decode_attention_reference
from pallas_kernels.decode_attention import triton as tk
from pallas_kernels.decode_attention.reference import selected_mask
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET, BoundsChecked, new_key as _key, new_seed
from tests.tolerances import assert_close



def _normal(shape, dtype):
    return jax.random.normal(_key(), shape, jnp.float32).astype(dtype)


def _f32(a):
    return a.astype(jnp.float32)


def _head_idx(B, K, C, counts):
    """[B, C]: sequence b selects counts[b] distinct random KV heads, the remaining slots are -1."""
    rng = np.random.default_rng(new_seed())
    out = np.full((B, C), -1, np.int32)
    for b in range(B):
        n = counts[b % len(counts)]
        out[b, rng.permutation(C)[:n]] = rng.permutation(K)[:n]  # -1 holes anywhere in the row
    return jnp.asarray(out)


def _lengths(B, S, menu):
    rng = np.random.default_rng(new_seed())
    return jnp.asarray([menu[b % len(menu)] if b < len(menu) else rng.integers(0, S + 1) for b in range(B)],
                       jnp.int32)


def _check(o, q, k, v, lengths, head_idx, *, layer=None):
    B, N, H = q.shape
    K = k.shape[-3]
    ref = decode_attention_reference(_f32(q), _f32(k), _f32(v), lengths, head_idx, layer=layer)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_close(o, ref, q.dtype)
    sel = np.ones((B, K), bool) if head_idx is None else np.asarray(selected_mask(head_idx, K))
    sel = sel & (np.asarray(lengths)[:, None] > 0)
    off = np.repeat(~sel, N // K, axis=1)                                               # [B, N]
    got = np.asarray(o, np.float32)[off]
    assert np.all(got == 0), f"unselected heads / empty sequences are not exactly 0 (max {np.abs(got).max()})"


# ---------------------------------------------------------------------------------------------------
# kernel vs reference over a grid of awkward shapes

CASES = [  # B, N, K, S, H, dtype, C, config (None: the heuristic's), lengths menu, counts menu
    (1, 4, 4, 40, 64, F16, 3, tk.AttentionConfig(block_s=16), (1, 7, 40), (3, 1, 0)),
    (3, 8, 2, 100, 80, BF16, 2, tk.AttentionConfig(block_s=16, splits=3), (0, 100, 33), (2, 1, 0)),
    (3, 6, 2, 64, 96, F32, None, tk.AttentionConfig(block_s=16, splits=2), (64, 7, 1), ()),
    (16, 4, 4, 48, 128, F16, 4, tk.AttentionConfig(block_s=16, splits=2), (0, 1, 7, 16, 47, 48), (4, 3, 0, 1)),
    (3, 4, 4, 50, 80, F16, 3, tk.AttentionConfig(block_s=16, use_dot=False), (50, 0, 17), (3, 1)),
    (3, 4, 4, 50, 64, F32, None, tk.AttentionConfig(block_s=16, splits=2, use_dot=False), (50, 0, 17), ()),
    (3, 16, 2, 70, 128, F16, 2, None, (70, 9, 0), (1, 2)),
    (16, 8, 8, 33, 64, BF16, None, None, (33, 0, 1, 7), ()),
    # bf16 at H = 128 (the models' head dim): MHA sparse with the heuristic's config, GQA and MHA split
    (2, 4, 4, 70, 128, BF16, 3, None, (70, 33), (3, 1)),
    (3, 8, 2, 90, 128, BF16, None, tk.AttentionConfig(block_s=32, splits=2), (90, 0, 41), ()),
    (2, 8, 8, 64, 128, BF16, 5, tk.AttentionConfig(block_s=16, splits=4), (64, 20), (5, 2)),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,N,K,S,H,dtype,C,config,len_menu,count_menu", CASES)
def test_kernel(interpret, B, N, K, S, H, dtype, C, config, len_menu, count_menu):
    k, v = _normal((B, K, S, H), dtype), _normal((B, K, S, H), dtype)

    @jax.jit
    def fn(q, lengths, head_idx):
        if config is None:  # the public function (heuristic config) on a 4-D cache
            return decode_attention(q, k, v, lengths, head_idx, impl="triton", interpret=interpret)
        return tk.decode_attention(q, k[None], v[None], lengths, head_idx, layer=0, interpret=interpret,
                                   config=config)

    for draw in range(2):
        q = _normal((B, N, H), dtype)  # fresh input every call
        lengths = _lengths(B, S, len_menu if draw == 0 else len_menu[::-1])
        head_idx = None if C is None else _head_idx(B, K, C, count_menu if draw == 0 else count_menu[::-1])
        _check(fn(q, lengths, head_idx), q, k, v, lengths, head_idx)


# ---------------------------------------------------------------------------------------------------
# memory safety for any traced values: lengths past S, head ids outside [0, K)

def _bounds_checked(interpret, monkeypatch) -> BoundsChecked:
    checked = BoundsChecked()
    if interpret:  # compiled Triton kernels take no host callbacks; the value checks still run there
        monkeypatch.setattr(tk, "plgpu", checked)
    return checked


SAFETY_CONFIGS = [tk.AttentionConfig(block_s=16), tk.AttentionConfig(block_s=16, splits=2)]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("config", SAFETY_CONFIGS, ids=["p1", "split"])
def test_lengths_past_cache(interpret, config, monkeypatch):
    """lengths > S under jit act as S; the unselected neighbouring slab (poisoned NaN) is never read."""
    checked = _bounds_checked(interpret, monkeypatch)
    B, N, K, S, H = 3, 4, 2, 40, 64
    k, v = _normal((B, K, S, H), F16), _normal((B, K, S, H), F16)
    # Head 1 of each sequence follows head 0 in memory: a load of head 0 past S would land in it.
    k, v = k.at[:, 1].set(jnp.nan), v.at[:, 1].set(jnp.nan)
    head_idx = jnp.array([[0, -1], [-1, 0], [0, -1]], jnp.int32)
    fn = jax.jit(lambda q, n: tk.decode_attention(q, k[None], v[None], n, head_idx, layer=0,
                                                  interpret=interpret, config=config))
    q = _normal((B, N, H), F16)
    at_s = fn(q, jnp.full((B,), S, jnp.int32))
    past = fn(q, jnp.array([S + 32, S + 1, 10 * S], jnp.int32))
    np.testing.assert_array_equal(np.asarray(past, np.float32), np.asarray(at_s, np.float32))
    _check(past, q, k.at[:, 1].set(0), v.at[:, 1].set(0), jnp.full((B,), S, jnp.int32), head_idx)
    # negative lengths act as 0: zeros
    assert np.all(np.asarray(fn(q, jnp.array([-1, -5, 0], jnp.int32)), np.float32) == 0)
    assert not checked.violations, checked.violations[:4]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("config", SAFETY_CONFIGS + [None], ids=["p1", "split", "heuristic"])
def test_head_ids_out_of_range(interpret, config, monkeypatch):
    """Ids K, K+5, -7 (traced: no value check) select nothing; every other head and sequence is exact,
    and no load or store leaves the arrays (see BoundsChecked: the interpreter hides such accesses)."""
    checked = _bounds_checked(interpret, monkeypatch)
    B, N, K, S, H = 4, 8, 4, 32, 64
    k, v = _normal((B, K, S, H), F16), _normal((B, K, S, H), F16)
    lengths = jnp.array([32, 17, 5, 32], jnp.int32)
    bad = jnp.array([[1, K, -7], [K + 5, 2, -1], [0, 3, K], [K, -7, 2]], jnp.int32)
    good = jnp.where((bad >= 0) & (bad < K), bad, -1)

    @jax.jit
    def fn(q, head_idx):
        if config is None:
            return decode_attention(q, k, v, lengths, head_idx, impl="triton", interpret=interpret)
        return tk.decode_attention(q, k[None], v[None], lengths, head_idx, layer=0, interpret=interpret,
                                   config=config)

    q = _normal((B, N, H), F16)
    o = fn(q, bad)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(fn(q, good), np.float32))
    _check(o, q, k, v, lengths, good)
    # the reference agrees: out-of-range ids select nothing there either
    np.testing.assert_array_equal(np.asarray(selected_mask(bad, K)), np.asarray(selected_mask(good, K)))
    assert not checked.violations, checked.violations[:4]


# ---------------------------------------------------------------------------------------------------
# the stacked [L, B, K, S, H] cache with a traced layer inside a jitted lax.scan == the 4-D path

@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("config", [None, tk.AttentionConfig(block_s=16, splits=2)], ids=["p1", "split"])
def test_layer_scan(interpret, config):
    L, B, N, K, S, H, C = 3, 3, 8, 4, 40, 64, 2
    k, v = _normal((L, B, K, S, H), F16), _normal((L, B, K, S, H), F16)
    qs = _normal((L, B, N, H), F16)
    lengths = jnp.array([40, 0, 13], jnp.int32)
    hidx = jnp.stack([_head_idx(B, K, C, (2, 1)) for _ in range(L)])                  # [L, B, C]

    def call(q, kc, vc, h, layer):
        if config is None:
            return decode_attention(q, kc, vc, lengths, h, layer=layer, impl="triton", interpret=interpret)
        return tk.decode_attention(q, kc if layer is not None else kc[None], vc if layer is not None else vc[None],
                                   lengths, h, layer=0 if layer is None else layer, interpret=interpret,
                                   config=config)

    def stacked(qs, k, v):
        return jax.lax.scan(lambda _, l: (None, call(qs[l], k, v, hidx[l], l)), None, jnp.arange(L))[1]

    outs = jax.jit(stacked)(qs, k, v)                                                 # [L, B, N, H]
    for l in range(L):
        o4 = jax.jit(lambda q, kc, vc, h: call(q, kc, vc, h, None))(qs[l], k[l], v[l], hidx[l])
        np.testing.assert_array_equal(np.asarray(outs[l], np.float32), np.asarray(o4, np.float32))
        _check(outs[l], qs[l], k, v, lengths, hidx[l], layer=l)


# ---------------------------------------------------------------------------------------------------
# reference, heuristic and dispatch (XLA only: fast)

def test_reference_against_numpy():
    B, N, K, S, H = 3, 6, 3, 20, 64
    q, k, v = _normal((B, N, H), F32), _normal((B, K, S, H), F32), _normal((B, K, S, H), F32)
    lengths = jnp.array([20, 0, 5], jnp.int32)
    hidx = jnp.array([[2, -1], [0, 1], [-1, 1]], jnp.int32)
    o = np.asarray(decode_attention_reference(q, k, v, lengths, hidx, sm_scale=0.3), np.float64)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    want = np.zeros((B, N, H))
    for b in range(B):
        for n in range(N):
            g = n // (N // K)
            if g in np.asarray(hidx[b]) and lengths[b] > 0:
                s = kn[b, g, :lengths[b]] @ qn[b, n] * 0.3
                p = np.exp(s - s.max())
                want[b, n] = p @ vn[b, g, :lengths[b]] / p.sum()
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_empty_batch(interpret, impl):
    """No sequences (B = 0) gives an empty result on both backends (the kernel crashed inside JAX)."""
    N, K, S, H = 4, 2, 16, 64
    o = decode_attention(_normal((0, N, H), F32), _normal((0, K, S, H), F32), _normal((0, K, S, H), F32),
                         jnp.zeros(0, jnp.int32), impl=impl, interpret=interpret)
    assert o.shape == (0, N, H)


def test_config_heuristic():
    for B, N, K, S, H, C in [(64, 32, 32, 2048, 128, 32), (16, 32, 32, 2048, 128, 10), (64, 32, 8, 2048, 128, 2),
                             (1, 32, 8, 8192, 80, 1), (128, 64, 64, 8192, 96, 64), (4, 9, 3, 64, 64, 3)]:
        cfg = tk.attention_heuristic(B, N, K, S, H, C, F16)
        assert cfg.splits >= 1 and cfg.block_s >= 16 and cfg.num_warps in (1, 2, 4, 8)
        assert cfg.splits == 1 or S // cfg.splits >= cfg.block_s, cfg


def test_dispatch(monkeypatch):
    B, N, K, S, H = 2, 4, 2, 16, 64
    q, k, v = _normal((B, N, H), F32), _normal((B, K, S, H), F32), _normal((B, K, S, H), F32)
    lengths = jnp.array([16, 5], jnp.int32)
    calls = []
    for name, fn in list(api.IMPLS.items()):
        monkeypatch.setitem(api.IMPLS, name, lambda *a, _n=name, _f=fn, **kw: (calls.append(_n), _f(*a, **kw))[1])
    o = decode_attention(q, k, v, lengths)
    assert calls == (["triton"] if HAS_GPU else ["triton", "xla"])
    assert_close(o, decode_attention_reference(q, k, v, lengths), F32)
    calls.clear()
    decode_attention(q, k, v, lengths, impl="xla")
    assert calls == ["xla"]


# ---------------------------------------------------------------------------------------------------
# contract violations

def test_invalid_contracts():
    B, N, K, S, H = 2, 8, 4, 16, 64
    q, k, v = _normal((B, N, H), F16), _normal((B, K, S, H), F16), _normal((B, K, S, H), F16)
    lengths = jnp.array([16, 3], jnp.int32)
    hidx = jnp.array([[0, 3], [1, -1]], jnp.int32)
    with pytest.raises(ValueError, match="head_dim=72 unsupported; supported: 64, 80, 96, 128"):
        decode_attention(_normal((B, N, 72), F16), _normal((B, K, S, 72), F16), _normal((B, K, S, 72), F16), lengths)
    with pytest.raises(TypeError, match="k_cache has dtype float32, but q is float16"):
        decode_attention(q, _f32(k), v, lengths)
    with pytest.raises(TypeError, match="q has dtype int32"):
        decode_attention(q.astype(jnp.int32), k, v, lengths)
    with pytest.raises(ValueError, match=r"v_cache has shape \(2, 4, 15, 64\) but k_cache has \(2, 4, 16, 64\)"):
        decode_attention(q, k, v[:, :, :15], lengths)
    with pytest.raises(ValueError, match=r"k_cache has shape \(3, 4, 16, 64\) \(B=3, H=64\) but q has \(2, 8, 64\)"):
        decode_attention(q, jnp.concatenate([k, k[:1]]), jnp.concatenate([v, v[:1]]), lengths)
    with pytest.raises(ValueError, match="q has N=6 heads, not a multiple of the cache's K=4"):
        decode_attention(q[:, :6], k, v, lengths)
    with pytest.raises(ValueError, match=r"layer=0 was given but k_cache is 4-D \(2, 4, 16, 64\)"):
        decode_attention(q, k, v, lengths, layer=0)
    with pytest.raises(ValueError, match=r"k_cache is stacked \(1, 2, 4, 16, 64\).*no layer"):
        decode_attention(q, k[None], v[None], lengths)
    with pytest.raises(ValueError, match="layer=1 is out of range for 1 stacked layers"):
        decode_attention(q, k[None], v[None], lengths, layer=1)
    with pytest.raises(ValueError, match=r"k_cache has shape \(4, 16, 64\); expected"):
        decode_attention(q, k[0], v[0], lengths)
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\); expected \[B\]=\(2,\)"):
        decode_attention(q, k, v, jnp.array([1, 2, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S=16\]; got \[17\]"):
        decode_attention(q, k, v, jnp.array([17, 2], jnp.int32))
    with pytest.raises(ValueError, match=r"head_idx holds ids outside \[-1, K=4\): \[4, -2\]"):
        decode_attention(q, k, v, lengths, hidx.at[0, 1].set(4).at[1, 1].set(-2))
    with pytest.raises(ValueError, match=r"head_idx has shape \(2,\); expected \[B, C\] with B=2"):
        decode_attention(q, k, v, lengths, hidx[:, 0])
    with pytest.raises(TypeError, match="head_idx has dtype float32"):
        decode_attention(q, k, v, lengths, _f32(hidx))
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        decode_attention(q, k, v, lengths, impl="cuda")
    # traced values are not checked eagerly (under jit the value checks are skipped) but still trace
    jax.jit(lambda h, n, l: decode_attention(q, k[None], v[None], n, h, layer=l))(hidx, lengths, jnp.int32(0))

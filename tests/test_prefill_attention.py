"""Paged causal prefill attention (kernel and XLA reference) against a dense masked softmax in numpy.

The kernel runs in the Pallas interpreter on CPU and compiled on a CUDA GPU (interpret is a parameter).
Each case draws a fresh pool and gives each sequence its pages in a random permutation of the pool;
everything a correct implementation must not read is NaN: pages no sequence owns and each sequence's
positions past starts[b] + n_new[b] (the tail of its last page). Page-table entries past its pages are
junk ids. The expected output gathers the pages into a contiguous [K, S, H] cache per sequence and runs
a plain dense causal softmax in float64. Cases cover MHA and GQA (G = 3 and 4), H 64 and 128, page sizes
8..128 with KV blocks smaller and larger than a page, n_new = 0, 1, T and a chunk that ends at M*Z.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.prefill_attention import api, paged_prefill_attention
from pallas_kernels.prefill_attention import reference
from pallas_kernels.prefill_attention import triton as tk
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET
from tests.test_paged_attention import _layout, _normal, _poison
from tests.tolerances import assert_close


def _expected(q, k_pages, v_pages, table, starts, n_new):
    """[B, T, N, H] float64: dense causal softmax over each sequence's gathered pages; zero rows t >= n_new."""
    q, kp, vp = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    B, T, N, H = q.shape
    _, K, Z, _ = kp.shape
    G = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        n, s0 = int(n_new[b]), int(starts[b])
        if n == 0:
            continue
        S = s0 + n
        ids = table[b, :-(-S // Z)]
        k = kp[ids].transpose(1, 0, 2, 3).reshape(K, -1, H)[:, :S]                  # [K, S, H]
        v = vp[ids].transpose(1, 0, 2, 3).reshape(K, -1, H)[:, :S]
        qb = q[b, :n].reshape(n, K, G, H)
        s = np.einsum("tkgh,ksh->tkgs", qb, k) / np.sqrt(H)                         # [n, K, G, S]
        vis = np.arange(S)[None, :] <= (s0 + np.arange(n))[:, None]                 # [n, S]
        s = np.where(vis[:, None, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b, :n] = np.einsum("tkgs,ksh->tkgh", p, v).reshape(n, N, H)
    return out


def _check(o, q, k_pages, v_pages, table, starts, n_new):
    assert o.shape == q.shape and o.dtype == q.dtype
    want = _expected(q, k_pages, v_pages, table, starts, n_new)
    assert_close(o, want, q.dtype)
    dead = np.arange(q.shape[1])[None, :] >= np.asarray(n_new)[:, None]              # [B, T]
    got = np.asarray(o, np.float32)[dead]
    assert np.all(got == 0), f"rows t >= n_new are not exactly 0 (max {np.abs(got).max()})"


CASES = [  # B, T, N, K, H, Z, M, dtype, config (None: heuristic), starts, n_new
    # MHA, KV blocks of 2 pages, two query blocks
    (2, 9, 4, 4, 64, 8, 6, F32, tk.PrefillConfig(block_t=16, block_s=16), (0, 30), (9, 5)),
    # GQA G = 4 (4 chunk rows x 4 heads = 16 dot rows), a KV block is one page; a chunk ending at M*Z
    (3, 12, 8, 2, 128, 16, 3, BF16, tk.PrefillConfig(block_t=4, block_s=16), (0, 17, 36), (12, 0, 12)),
    # G = 3 (padded to 4), H 64, the public function's heuristic config; n_new = 1 at start 0
    (3, 5, 6, 2, 64, 32, 2, F16, None, (3, 59, 0), (5, 5, 1)),
    # one 128-position page, a KV block is half a page
    (1, 16, 4, 2, 64, 128, 1, BF16, tk.PrefillConfig(block_t=8, block_s=64), (100,), (16,)),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,T,N,K,H,Z,M,dtype,config,starts,n_new", CASES)
def test_kernel(interpret, B, T, N, K, H, Z, M, dtype, config, starts, n_new):
    written = np.asarray(starts) + np.asarray(n_new)
    NP = int(sum(-(-w // Z) for w in written)) + 3
    k_pages, v_pages = _normal((NP, K, Z, H), dtype), _normal((NP, K, Z, H), dtype)

    @jax.jit
    def kernel(q, kp, vp, table, starts, n_new):
        if config is None:
            return paged_prefill_attention(q, kp, vp, table, starts, n_new, impl="triton", interpret=interpret)
        return tk.paged_prefill_attention(q, kp[None], vp[None], table, starts, n_new, layer=0,
                                          interpret=interpret, config=config)

    xla = jax.jit(lambda *a: paged_prefill_attention(*a, impl="xla"))
    table, owned = _layout(B, M, Z, NP, written)
    kp, vp = _poison(k_pages, table, owned, written), _poison(v_pages, table, owned, written)
    q = _normal((B, T, N, H), dtype)
    args = (q, kp, vp, jnp.asarray(table), jnp.asarray(starts, jnp.int32), jnp.asarray(n_new, jnp.int32))
    _check(kernel(*args), q, k_pages, v_pages, table, starts, n_new)
    _check(xla(*args), q, k_pages, v_pages, table, starts, n_new)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_layer_scan(interpret):
    """A stacked [L, P, K, Z, H] pool with the layer traced inside a jitted lax.scan reads its own layer."""
    L, B, T, N, K, H, Z, M = 2, 2, 6, 4, 2, 64, 16, 2
    starts, n_new = np.array([10, 0]), np.array([6, 4])
    written = starts + n_new
    NP = 6
    k_pages, v_pages = _normal((L, NP, K, Z, H), F16), _normal((L, NP, K, Z, H), F16)
    table, owned = _layout(B, M, Z, NP, written)
    kp, vp = _poison(k_pages, table, owned, written), _poison(v_pages, table, owned, written)
    qs = _normal((L, B, T, N, H), F16)
    config = tk.PrefillConfig(block_t=8, block_s=16)
    s, n = jnp.asarray(starts, jnp.int32), jnp.asarray(n_new, jnp.int32)

    def stacked(qs, kp, vp, table):
        def step(_, l):
            o = tk.paged_prefill_attention(qs[l], kp, vp, table, s, n, layer=l, interpret=interpret, config=config)
            r = paged_prefill_attention(qs[l], kp, vp, table, s, n, layer=l, impl="xla")
            return None, (o, r)
        return jax.lax.scan(step, None, jnp.arange(L))[1]

    outs, refs = jax.jit(stacked)(qs, kp, vp, jnp.asarray(table))                      # [L, B, T, N, H]
    for l in range(L):
        _check(outs[l], qs[l], k_pages[l], v_pages[l], table, starts, n_new)
        _check(refs[l], qs[l], k_pages[l], v_pages[l], table, starts, n_new)


def test_reference_is_blockwise():
    """The XLA fallback never holds a [T, S] score array of the whole context: no value in its program
    (loop bodies included) is as large as B*N*T*S, while a 4096-position context would need one."""
    B, T, N, K, H, Z, M = 1, 64, 4, 2, 64, 16, 256
    q = jax.ShapeDtypeStruct((B, T, N, H), BF16)
    kp = jax.ShapeDtypeStruct((40, K, Z, H), BF16)
    table = jax.ShapeDtypeStruct((B, M), jnp.int32)
    per = jax.ShapeDtypeStruct((B,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *a: reference.paged_prefill_attention(*a))(q, kp, kp, table, per, per)

    def sizes(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < B * N * T * M * Z // 4, f"an intermediate of {biggest} elements: scores of the whole context?"


def test_config_heuristic():
    for B, T, N, K, H, Z in [(1, 512, 32, 32, 128, 16), (8, 512, 32, 32, 128, 64), (4, 512, 32, 8, 128, 16),
                             (1, 1, 32, 8, 128, 16), (3, 5, 6, 2, 64, 32), (2, 9, 64, 8, 80, 8)]:
        cfg = tk.prefill_config(B, T, N, K, H, Z)
        GP = 1 << max(0, (N // K - 1).bit_length())
        assert cfg.block_t * GP >= 16 and cfg.block_t & (cfg.block_t - 1) == 0, cfg
        assert cfg.block_t * GP <= 128 and cfg.block_s >= 16 and cfg.num_warps in (4, 8), cfg


def test_dispatch(monkeypatch):
    B, T, N, K, H, Z = 1, 4, 2, 2, 64, 8
    q, kp, vp = _normal((B, T, N, H), F32), _normal((3, K, Z, H), F32), _normal((3, K, Z, H), F32)
    table, starts, n_new = jnp.array([[2, 1]], jnp.int32), jnp.array([5], jnp.int32), jnp.array([4], jnp.int32)
    calls = []
    for name, fn in list(api.IMPLS.items()):
        monkeypatch.setitem(api.IMPLS, name, lambda *a, _n=name, _f=fn, **kw: (calls.append(_n), _f(*a, **kw))[1])
    o = paged_prefill_attention(q, kp, vp, table, starts, n_new)
    assert calls == (["triton"] if HAS_GPU else ["triton", "xla"])
    _check(o, q, kp, vp, np.asarray(table), starts, n_new)


def test_invalid_contracts():
    B, T, N, K, H, Z = 2, 4, 4, 2, 64, 8
    q, kp, vp = _normal((B, T, N, H), F16), _normal((4, K, Z, H), F16), _normal((4, K, Z, H), F16)
    table, per = jnp.array([[1, 2], [3, 0]], jnp.int32), jnp.array([0, 3], jnp.int32)
    with pytest.raises(ValueError, match=r"q has shape \(4, 4, 64\); expected \[B, T, N, H\]"):
        paged_prefill_attention(q[0], kp, vp, table, per, per)
    with pytest.raises(ValueError, match=r"n_new has shape \(1,\); expected \[B\]=\(2,\)"):
        paged_prefill_attention(q, kp, vp, table, per, per[:1])
    with pytest.raises(TypeError, match="starts has dtype float16; expected int32"):
        paged_prefill_attention(q, kp, vp, table, per.astype(F16), per)
    with pytest.raises(ValueError, match="head_dim=72 unsupported"):
        paged_prefill_attention(_normal((B, T, N, 72), F16), kp, vp, table, per, per)


@pytest.mark.parametrize("N,K,H,dtype", [(8, 2, 128, BF16), (6, 6, 80, F32)])
def test_lowers_to_triton(monkeypatch, N, K, H, dtype):
    """The kernel lowers to Triton IR for CUDA (on a CPU-only machine too): catches constructs the GPU
    lowering rejects while the interpreter accepts them (e.g. an unmasked load given `other`)."""
    monkeypatch.setattr(tk, "check_backend", lambda interpret: False)
    sd = jax.ShapeDtypeStruct
    B, T, Z, M, NP, L = 2, 40, 16, 8, 20, 2
    args = [sd((B, T, N, H), dtype), sd((L, NP, K, Z, H), dtype), sd((L, NP, K, Z, H), dtype), sd((B, M), jnp.int32),
            sd((B,), jnp.int32), sd((B,), jnp.int32)]

    def fn(q, kp, vp, table, starts, n_new):
        return tk.paged_prefill_attention(q, kp, vp, table, starts, n_new, layer=1)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "paged_prefill_attention" in text

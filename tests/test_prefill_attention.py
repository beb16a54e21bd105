"""Paged causal prefill attention (kernel and XLA reference) against a dense masked softmax in numpy.

The kernel runs in the Pallas interpreter on CPU and compiled on a CUDA GPU (interpret is a parameter).
Each case draws a fresh pool and gives each sequence its pages in a random permutation of the pool;
everything a correct implementation must not read is NaN: pages no sequence owns and each sequence's
positions past starts[b] + n_new[b] (the tail of its last page). Page-table entries past its pages are
junk ids. The expected output gathers the pages into a contiguous [K, S, H] cache per sequence and runs
a plain dense causal softmax in float64. Cases cover MHA and GQA (G = 3 and 4), H 64 and 128, page sizes
8..128 with KV blocks smaller and larger than a page, n_new = 0, 1, T and a chunk that ends at M*Z.

Packed mode (q [S, N, H] with q_offsets): chunks at offsets not aligned to block_t, listed out of offset
order (a chunk that wrote past its own rows would clobber one written before it), with uncovered rows
between chunks and at the end; those rows of q are NaN (never read) and must come out exactly 0. The
expected rows are the unpacked float64 result of each chunk padded into [B, max_new, N, H].
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
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET, BoundsChecked
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


def _packed_inputs(N, K, H, Z, M, dtype, S, chunks, L=None):
    """Fresh packed inputs for chunks ((q_offset, start, n_new), ...): q [(L,) S, N, H] with NaN in rows no
    chunk covers, the pool (poisoned like test_kernel's, [L, P, K, Z, H] when L is given), the table."""
    offsets, starts, n_new = (np.array(c) for c in zip(*chunks))
    written = starts + n_new
    NP = int(sum(-(-w // Z) for w in written)) + 3
    lead = () if L is None else (L,)
    k_pages, v_pages = _normal(lead + (NP, K, Z, H), dtype), _normal(lead + (NP, K, Z, H), dtype)
    table, owned = _layout(len(chunks), M, Z, NP, written)
    kp, vp = _poison(k_pages, table, owned, written), _poison(v_pages, table, owned, written)
    q = np.array(_normal(lead + (S, N, H), dtype), np.float32)
    q[..., ~_covered(S, offsets, n_new), :, :] = np.nan
    return jnp.asarray(q).astype(dtype), k_pages, v_pages, kp, vp, table, offsets, starts, n_new


def _rows(S, off, n):
    """(t, rows): the chunk rows t < n whose token row off + t lies in [0, S), and those token rows."""
    t = np.arange(n)
    keep = (off + t >= 0) & (off + t < S)
    return t[keep], off + t[keep]


def _covered(S, offsets, n_new):
    """[S] bool: the rows some chunk owns."""
    cov = np.zeros(S, bool)
    for off, n in zip(offsets, n_new):
        cov[_rows(S, off, n)[1]] = True
    return cov


def _padded(q, offsets, n_new, T):
    """[B, T, N, H] float32: each chunk's rows of the packed q, zeros past n_new[b] (the unpacked layout)."""
    q = np.asarray(q, np.float32)
    out = np.zeros((len(offsets), T) + q.shape[1:], np.float32)
    for b, (off, n) in enumerate(zip(offsets, n_new)):
        t, rows = _rows(q.shape[0], off, n)
        out[b, t] = q[rows]
    return out


def _check_packed(o, q, k_pages, v_pages, table, starts, n_new, offsets, T):
    """Each chunk's rows against the unpacked float64 result; rows no chunk covers exactly 0."""
    assert o.shape == q.shape and o.dtype == q.dtype
    want = _expected(_padded(q, offsets, n_new, T), k_pages, v_pages, table, starts, n_new)
    got = np.asarray(o, np.float32)
    for b, (off, n) in enumerate(zip(offsets, n_new)):
        t, rows = _rows(q.shape[0], off, n)
        if len(t):
            assert_close(got[rows], want[b, t], q.dtype)
    dead = got[~_covered(q.shape[0], offsets, n_new)]
    assert np.all(dead == 0), f"rows no chunk covers are not exactly 0 (max {np.abs(dead).max()})"


PACKED_CASES = [  # N, K, H, Z, M, dtype, config (None: the public function's heuristic), S, max_new, chunks
    # GQA G = 3, H 80 (padded to 128), KV blocks of 2 pages; chunks (q_offset, start, n_new) out of offset
    # order: rows [22, 33) [3, 17) [18, 21), an n_new = 0 chunk; uncovered 0..2, 17, 21, 33..39
    (6, 2, 80, 8, 4, BF16, tk.PrefillConfig(block_t=8, block_s=16), 40, 14,
     ((22, 0, 11), (3, 13, 14), (0, 5, 0), (18, 3, 3))),
    # MHA, H 64, f32, the heuristic config (block_t 16 for max_new 13): rows [20, 33) [2, 11) [12, 17)
    (4, 4, 64, 16, 2, F32, None, 36, 13, ((20, 0, 13), (2, 17, 9), (0, 0, 0), (12, 3, 5))),
    # GQA G = 3, H 128, a KV block is one page, 4-row blocks; max_new defaults to S
    (6, 2, 128, 16, 3, F32, tk.PrefillConfig(block_t=4, block_s=16), 27, None,
     ((9, 30, 7), (1, 0, 6), (17, 4, 9))),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("N,K,H,Z,M,dtype,config,S,max_new,chunks", PACKED_CASES)
def test_packed_kernel(interpret, N, K, H, Z, M, dtype, config, S, max_new, chunks):
    q, k_pages, v_pages, kp, vp, table, offsets, starts, n_new = _packed_inputs(N, K, H, Z, M, dtype, S, chunks)
    T = S if max_new is None else max_new

    @jax.jit
    def kernel(q, kp, vp, table, starts, n_new, offsets):
        if config is None:
            return paged_prefill_attention(q, kp, vp, table, starts, n_new, q_offsets=offsets, max_new=max_new,
                                           impl="triton", interpret=interpret)
        return tk.paged_prefill_attention(q, kp[None], vp[None], table, starts, n_new, layer=0, q_offsets=offsets,
                                          max_new=max_new, interpret=interpret, config=config)

    xla = jax.jit(lambda *a: paged_prefill_attention(*a[:6], q_offsets=a[6], max_new=max_new, impl="xla"))
    args = (q, kp, vp, jnp.asarray(table), *(jnp.asarray(a, jnp.int32) for a in (starts, n_new, offsets)))
    _check_packed(kernel(*args), q, k_pages, v_pages, table, starts, n_new, offsets, T)
    _check_packed(xla(*args), q, k_pages, v_pages, table, starts, n_new, offsets, T)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_batch_invariant_rows_do_not_depend_on_the_chunking(interpret):
    """batch_invariant=True: the same query rows of one sequence (bf16, GQA) give bit-identical outputs
    whether they come as one chunk or cut into chunks at other offsets (one of them a single token, as a
    decode row), in calls of the same shapes; and the outputs are right."""
    N, K, H, Z, M, n, S, C = 8, 2, 128, 16, 8, 100, 112, 4
    k_pages, v_pages = _normal((M + 2, K, Z, H), BF16), _normal((M + 2, K, Z, H), BF16)
    table, owned = _layout(1, M, Z, M + 2, [n])
    kp, vp = _poison(k_pages, table, owned, [n]), _poison(v_pages, table, owned, [n])
    q_seq = _normal((n, N, H), BF16)  # the query row of each position 0..n-1
    tables = jnp.asarray(np.repeat(table, C, axis=0))

    def run(chunks):  # ((q_offset, start, n_new), ...) padded to C chunks; q rows laid out by the chunks
        chunks = list(chunks) + [(S - 1, 0, 0)] * (C - len(chunks))
        offsets, starts, n_new = (jnp.asarray(a, jnp.int32) for a in zip(*chunks))
        q = jnp.zeros((S, N, H), BF16)
        for off, st, m in chunks:
            q = q.at[off: off + m].set(q_seq[st: st + m])
        o = paged_prefill_attention(q, kp, vp, tables, starts, n_new, q_offsets=offsets, max_new=64,
                                    batch_invariant=True, impl="triton", interpret=interpret)
        return np.concatenate([np.asarray(o[off: off + m], np.float32) for off, st, m in chunks if m])

    one = run([(0, 0, 64), (64, 64, 36)])
    cut = run([(5, 0, 37), (42, 37, 1), (43, 38, 26), (70, 64, 36)])
    np.testing.assert_array_equal(one, cut)
    want = _expected(np.asarray(q_seq, np.float32)[None], k_pages, v_pages, table, np.zeros(1, np.int64),
                     np.array([n]))[0]
    assert_close(one, want, BF16)


@pytest.mark.parametrize("N,K,H,Z,M,dtype,config,S,max_new,chunks", PACKED_CASES)
def test_packed_reference(N, K, H, Z, M, dtype, config, S, max_new, chunks):
    """The packed XLA reference gives each chunk's rows of the unpacked reference on the padded q, zeros
    elsewhere (CPU, no interpreter)."""
    del config
    q, _, _, kp, vp, table, offsets, starts, n_new = _packed_inputs(N, K, H, Z, M, dtype, S, chunks)
    T = S if max_new is None else max_new
    table, starts_, n_new_ = jnp.asarray(table), jnp.asarray(starts, jnp.int32), jnp.asarray(n_new, jnp.int32)
    o = reference.paged_prefill_attention(q, kp, vp, table, starts_, n_new_, q_offsets=jnp.asarray(offsets, jnp.int32),
                                          max_new=max_new)
    qb = jnp.asarray(_padded(q, offsets, n_new, T)).astype(dtype)
    want = np.asarray(reference.paged_prefill_attention(qb, kp, vp, table, starts_, n_new_), np.float32)
    got = np.asarray(o, np.float32)
    assert o.shape == q.shape and o.dtype == q.dtype
    for b, (off, n) in enumerate(zip(offsets, n_new)):
        t, rows = _rows(S, off, n)
        np.testing.assert_allclose(got[rows], want[b, t], rtol=1e-6, atol=1e-6)
    assert np.all(got[~_covered(S, offsets, n_new)] == 0)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_packed_layer_scan(interpret):
    """Packed mode with a stacked [L, P, K, Z, H] pool and the layer traced inside a jitted lax.scan."""
    L, N, K, H, Z, M, S, max_new = 2, 6, 2, 64, 8, 3, 24, 10
    chunks = ((13, 7, 10), (2, 0, 9), (0, 3, 0))   # rows [13, 23) [2, 11); uncovered 0, 1, 11, 12, 23
    qs, k_pages, v_pages, kp, vp, table, offsets, starts, n_new = _packed_inputs(N, K, H, Z, M, F16, S, chunks, L=L)
    config = tk.PrefillConfig(block_t=4, block_s=16)
    s, n, off = (jnp.asarray(a, jnp.int32) for a in (starts, n_new, offsets))

    def stacked(qs, kp, vp, table):
        def step(_, l):
            o = tk.paged_prefill_attention(qs[l], kp, vp, table, s, n, layer=l, q_offsets=off, max_new=max_new,
                                           interpret=interpret, config=config)
            r = paged_prefill_attention(qs[l], kp, vp, table, s, n, layer=l, q_offsets=off, max_new=max_new,
                                        impl="xla")
            return None, (o, r)
        return jax.lax.scan(step, None, jnp.arange(L))[1]

    outs, refs = jax.jit(stacked)(qs, kp, vp, jnp.asarray(table))                      # [L, S, N, H]
    for l in range(L):
        _check_packed(outs[l], qs[l], k_pages[l], v_pages[l], table, starts, n_new, offsets, max_new)
        _check_packed(refs[l], qs[l], k_pages[l], v_pages[l], table, starts, n_new, offsets, max_new)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_packed_rows_outside_q(interpret, monkeypatch):
    """Offsets break the promise (traced: no value check): a chunk running past S and one starting at a
    negative offset are cut to their rows in [0, S), which stay right; no load or store leaves q or o (see
    BoundsChecked: the interpreter hides such accesses)."""
    checked = BoundsChecked()
    if interpret:  # compiled Triton kernels take no host callbacks
        monkeypatch.setattr(tk, "plgpu", checked)
    N, K, H, Z, M, S, max_new = 4, 4, 64, 8, 3, 20, 9
    chunks = ((15, 4, 9), (-3, 0, 8), (7, 2, 6))      # rows [15, 20) + 4 past S, [0, 5) (t >= 3), [7, 13)
    q, k_pages, v_pages, kp, vp, table, offsets, starts, n_new = _packed_inputs(N, K, H, Z, M, F32, S, chunks)
    config = tk.PrefillConfig(block_t=16, block_s=16)
    args = (q, kp[None], vp[None], jnp.asarray(table), *(jnp.asarray(a, jnp.int32) for a in (starts, n_new)))
    o = jax.jit(lambda *a: tk.paged_prefill_attention(*a[:6], layer=0, q_offsets=a[6], max_new=max_new,
                                                      interpret=interpret, config=config))(
        *args, jnp.asarray(offsets, jnp.int32))
    _check_packed(o, q, k_pages, v_pages, table, starts, n_new, offsets, max_new)
    assert not checked.violations, checked.violations[:4]
    r = reference.paged_prefill_attention(q, kp, vp, *args[3:], q_offsets=jnp.asarray(offsets, jnp.int32),
                                          max_new=max_new)
    _check_packed(r, q, k_pages, v_pages, table, starts, n_new, offsets, max_new)


@pytest.mark.parametrize("packed", [False, True])
def test_reference_is_blockwise(packed):
    """The XLA fallback never holds a [T, S] score array of the whole context: no value in its program
    (loop bodies included) is as large as B*N*T*S, while a 4096-position context would need one.
    packed: q [T, N, H] with q_offsets (one chunk), max_new = T."""
    B, T, N, K, H, Z, M = 1, 64, 4, 2, 64, 16, 256
    q = jax.ShapeDtypeStruct((T, N, H) if packed else (B, T, N, H), BF16)
    kp = jax.ShapeDtypeStruct((40, K, Z, H), BF16)
    table = jax.ShapeDtypeStruct((B, M), jnp.int32)
    per = jax.ShapeDtypeStruct((B,), jnp.int32)
    if packed:
        jaxpr = jax.make_jaxpr(lambda *a: reference.paged_prefill_attention(*a[:6], q_offsets=a[6], max_new=T))(
            q, kp, kp, table, per, per, per)
    else:
        jaxpr = jax.make_jaxpr(lambda *a: reference.paged_prefill_attention(*a))(q, kp, kp, table, per, per)

    def sizes(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < B * N * T * M * Z // 4, f"an intermediate of {biggest} elements: scores of the whole context?"


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_empty_page_table(interpret, impl):
    """A page table of no columns (M = 0: no position to attend to) gives zeros on both backends, padded and
    packed (the reference crashed inside JAX)."""
    N, K, H, Z = 4, 2, 64, 8
    kp, vp, table = _normal((3, K, Z, H), F32), _normal((3, K, Z, H), F32), jnp.zeros((2, 0), jnp.int32)
    starts, n_new = jnp.array([0, 2], jnp.int32), jnp.array([3, 1], jnp.int32)
    o = paged_prefill_attention(_normal((2, 3, N, H), F32), kp, vp, table, starts, n_new, impl=impl,
                                interpret=interpret)
    assert o.shape == (2, 3, N, H) and np.all(np.asarray(o) == 0)
    o = paged_prefill_attention(_normal((5, N, H), F32), kp, vp, table, starts, n_new, q_offsets=jnp.array([0, 3]),
                                impl=impl, interpret=interpret)
    assert o.shape == (5, N, H) and np.all(np.asarray(o) == 0)


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


def test_invalid_packed_contracts():
    B, S, N, K, H, Z = 2, 10, 4, 2, 64, 8
    q, kp, vp = _normal((S, N, H), F16), _normal((4, K, Z, H), F16), _normal((4, K, Z, H), F16)
    table, per, off = jnp.array([[1, 2], [3, 0]], jnp.int32), jnp.array([0, 3], jnp.int32), jnp.array([0, 5], jnp.int32)
    with pytest.raises(ValueError, match=r"q has shape \(2, 10, 4, 64\); expected \[S, N, H\] .*q_offsets"):
        paged_prefill_attention(_normal((B, S, N, H), F16), kp, vp, table, per, per, q_offsets=off)
    with pytest.raises(ValueError, match=r"q_offsets has shape \(3,\); expected \[B\]=\(2,\)"):
        paged_prefill_attention(q, kp, vp, table, per, per, q_offsets=jnp.array([0, 4, 8], jnp.int32))
    with pytest.raises(TypeError, match="q_offsets has dtype float32; expected int32"):
        paged_prefill_attention(q, kp, vp, table, per, per, q_offsets=off.astype(F32))
    with pytest.raises(ValueError, match=r"n_new has shape \(1,\); expected \[B\]=\(2,\)"):
        paged_prefill_attention(q, kp, vp, table, per, per[:1], q_offsets=off)
    with pytest.raises(ValueError, match="max_new=0 must be >= 1"):
        paged_prefill_attention(q, kp, vp, table, per, per, q_offsets=off, max_new=0)
    with pytest.raises(TypeError, match="max_new must be a Python int"):
        paged_prefill_attention(q, kp, vp, table, per, per, q_offsets=off, max_new=jnp.int32(4))
    with pytest.raises(ValueError, match="max_new=4 was given without q_offsets"):
        paged_prefill_attention(q.reshape(B, S // B, N, H), kp, vp, table, per, per, max_new=4)
    with pytest.raises(ValueError, match=r"k_pages has shape \(4, 2, 8, 64\) \(H=64\) but q has \(10, 4, 80\)"):
        paged_prefill_attention(_normal((S, N, 80), F16), kp, vp, table, per, per, q_offsets=off)


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


def test_lowers_to_triton_packed(monkeypatch):
    """Packed mode lowers to Triton IR for CUDA too, with the zeros buffer aliased into the output."""
    monkeypatch.setattr(tk, "check_backend", lambda interpret: False)
    sd = jax.ShapeDtypeStruct
    B, S, N, K, H, Z, M, NP, L = 3, 70, 6, 2, 80, 16, 8, 20, 2
    args = [sd((S, N, H), BF16), sd((L, NP, K, Z, H), BF16), sd((L, NP, K, Z, H), BF16), sd((B, M), jnp.int32)]
    args += [sd((B,), jnp.int32)] * 3

    def fn(q, kp, vp, table, starts, n_new, offsets):
        return tk.paged_prefill_attention(q, kp, vp, table, starts, n_new, layer=1, q_offsets=offsets, max_new=40)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "paged_prefill_attention" in text and "output_operand_aliases" in text

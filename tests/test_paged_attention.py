"""Paged selective-head decode attention (kernel and XLA reference) against an independent f32 reference.

The kernel runs in the Pallas interpreter on CPU and compiled on a CUDA GPU (interpret is a parameter).
Every case builds a fresh random page pool and gives each sequence its pages in a random permutation of
the pool (never contiguous, never in order). Everything a correct kernel must not read is poisoned with
NaN: pool pages no sequence owns, the tail of each sequence's last page past its length, and (stacked
pools) nothing else is needed since other layers hold different values. Page-table entries past a
sequence's pages hold junk ids (poisoned pages, negative, >= P). The expected output gathers each
sequence's pages in numpy into a contiguous cache (zeros past the length) and calls the contiguous
decode_attention reference in f32. Lengths cover 0, 1, non-multiples of Z and exactly M*Z (plus one
past it: clamped); head_idx covers -1 padding, count 0, count = capacity and ids outside [0, K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import api, paged_decode_attention
from pallas_kernels.paged_attention import triton as tk
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET, new_key as _key, new_seed
from tests.tolerances import assert_close


def _normal(shape, dtype):
    return jax.random.normal(_key(), shape, jnp.float32).astype(dtype)


def _layout(B, M, Z, NP, lengths):
    """(page_table [B, M], owned [NP] bool): sequence b owns cdiv(min(lengths[b], M*Z), Z) pages drawn
    from a random permutation of pages 1..NP-1; later entries of its row are junk ids."""
    rng = np.random.default_rng(new_seed())
    need = [-(-min(int(n), M * Z) // Z) for n in lengths]
    free = list(rng.permutation(np.arange(1, NP)))
    assert sum(need) <= len(free), "pool too small for the case"
    table = np.empty((B, M), np.int32)
    owned = np.zeros(NP, bool)
    for b in range(B):
        ids = [free.pop() for _ in range(need[b])]
        owned[ids] = True
        junk = rng.choice([-3, NP, NP + 7, 0] + free[:2], size=M - need[b])      # never read
        table[b] = np.concatenate([np.asarray(ids, np.int64), junk]).astype(np.int32)
    return table, owned


def _poison(pages, table, owned, lengths):
    """NaN everywhere a correct kernel must not read: unowned pages and tails of last pages."""
    p = np.array(pages, np.float32)                                                # [(L,) P, K, Z, H]
    Z = p.shape[-2]
    p[..., ~owned, :, :, :] = np.nan
    for b, n in enumerate(lengths):
        n = min(int(n), table.shape[1] * Z)
        if n % Z:
            p[..., table[b, n // Z], :, n % Z:, :] = np.nan
    return jnp.asarray(p).astype(pages.dtype)


def _contiguous(pages, table, lengths):
    """[B, K, M*Z, H] f32: the pages of each sequence in order, zeros past its length (numpy)."""
    p = np.asarray(pages, np.float32)
    B, M = table.shape
    _, K, Z, H = p.shape
    out = np.zeros((B, K, M * Z, H), np.float32)
    for b in range(B):
        n = min(int(lengths[b]), M * Z)
        for s in range(0, n, Z):
            w = min(Z, n - s)
            out[b, :, s:s + w] = p[table[b, s // Z], :, :w]
    return jnp.asarray(out)


def _head_idx(B, K, C, menu):
    """[B, C]: sequence b selects menu[b] distinct heads, -1 elsewhere; a count given as 'x' also puts
    out-of-range ids (K, -5, K + 9) in its spare slots, which must act as unselected."""
    rng = np.random.default_rng(new_seed())
    out = np.full((B, C), -1, np.int32)
    for b in range(B):
        n = menu[b % len(menu)]
        bad = isinstance(n, str)
        n = int(n.strip("x")) if bad else n
        slots = rng.permutation(C)
        out[b, slots[:n]] = rng.permutation(K)[:n]
        if bad:
            junk = [K, -5, K + 9]
            out[b, slots[n:]] = [junk[i % 3] for i in range(C - n)]
    return jnp.asarray(out)


def _selected(head_idx, B, K):
    if head_idx is None:
        return np.ones((B, K), bool)
    h = np.asarray(head_idx)
    return np.stack([np.isin(np.arange(K), h[b]) for b in range(B)])


def _check(o, q, k_pages, v_pages, table, lengths, head_idx):
    B, N, H = q.shape
    K = k_pages.shape[-3]
    M, Z = table.shape[1], k_pages.shape[-2]
    lengths = np.minimum(np.asarray(lengths), M * Z)
    k, v = _contiguous(k_pages, table, lengths), _contiguous(v_pages, table, lengths)
    hidx = None if head_idx is None else jnp.where((head_idx >= 0) & (head_idx < K), head_idx, -1)
    ref = decode_attention_reference(q.astype(F32), k, v, jnp.asarray(lengths, jnp.int32), hidx)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_close(o, ref, q.dtype)
    off = np.repeat(~(_selected(hidx, B, K) & (lengths[:, None] > 0)), N // K, axis=1)    # [B, N]
    got = np.asarray(o, np.float32)[off]
    assert np.all(got == 0), f"unselected heads / empty sequences are not exactly 0 (max {np.abs(got).max()})"


CASES = [  # B, N, K, H, Z, M, dtype, C, config (None: the heuristic's), lengths menu, counts menu
    # blocks of 2 pages; MHA; 'x': out-of-range ids in the spare slots
    (4, 4, 4, 64, 8, 5, F32, 3, tk.PagedAttentionConfig(block_s=16), (40, 1, 0, 13), (3, "x1", 0, 2)),
    # a block is half a page; GQA G=4, H=128; splits
    (3, 8, 2, 128, 32, 2, BF16, 2, tk.PagedAttentionConfig(block_s=16, splits=2), (64, 33, 0), (2, "x1", 1)),
    # dense GQA, 3 splits, lengths past M*Z are clamped
    (4, 8, 2, 64, 16, 4, F16, None, tk.PagedAttentionConfig(block_s=32, splits=3), (64, 17, 1, 65), ()),
    # 8 pages per block, count = capacity, G = 3 (padded rows)
    (3, 6, 2, 128, 8, 9, BF16, 2, tk.PagedAttentionConfig(block_s=64), (72, 9, 31), (2, 0, "x1")),
    # one 128-position page per sequence, the public function with its heuristic config
    (3, 4, 4, 64, 128, 1, F32, 4, None, (128, 100, 7), (4, 1, "x2")),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,N,K,H,Z,M,dtype,C,config,len_menu,count_menu", CASES)
def test_kernel(interpret, B, N, K, H, Z, M, dtype, C, config, len_menu, count_menu):
    NP = sum(-(-min(n, M * Z) // Z) for n in len_menu) + 4
    k_pages, v_pages = _normal((NP, K, Z, H), dtype), _normal((NP, K, Z, H), dtype)

    @jax.jit
    def kernel(q, kp, vp, lengths, table, head_idx):
        if config is None:
            return paged_decode_attention(q, kp, vp, lengths, table, head_idx, impl="triton", interpret=interpret)
        return tk.paged_decode_attention(q, kp[None], vp[None], lengths, table, head_idx, layer=0,
                                         interpret=interpret, config=config)

    xla = jax.jit(lambda *a: paged_decode_attention(*a, impl="xla"))
    for draw in range(2):
        lengths = np.asarray(len_menu if draw == 0 else len_menu[::-1], np.int32)
        table, owned = _layout(B, M, Z, NP, lengths)
        kp, vp = _poison(k_pages, table, owned, lengths), _poison(v_pages, table, owned, lengths)
        q = _normal((B, N, H), dtype)
        head_idx = None if C is None else _head_idx(B, K, C, count_menu if draw == 0 else count_menu[::-1])
        args = (q, kp, vp, jnp.asarray(lengths), jnp.asarray(table), head_idx)
        _check(kernel(*args), q, k_pages, v_pages, table, lengths, head_idx)
        _check(xla(*args), q, k_pages, v_pages, table, lengths, head_idx)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("splits", [1, 2])
def test_layer_scan(interpret, splits):
    """A stacked [L, P, K, Z, H] pool with the layer traced inside a jitted lax.scan reads its own layer."""
    L, B, N, K, H, Z, M, C = 3, 3, 4, 2, 64, 16, 3, 2
    lengths = np.array([48, 0, 21], np.int32)
    NP = 8
    k_pages, v_pages = _normal((L, NP, K, Z, H), F16), _normal((L, NP, K, Z, H), F16)
    table, owned = _layout(B, M, Z, NP, lengths)
    kp, vp = _poison(k_pages, table, owned, lengths), _poison(v_pages, table, owned, lengths)
    qs = _normal((L, B, N, H), F16)
    hidx = jnp.stack([_head_idx(B, K, C, (2, 1, "x1")) for _ in range(L)])               # [L, B, C]
    config = tk.PagedAttentionConfig(block_s=16, splits=splits)

    def stacked(qs, kp, vp, table):
        def step(_, l):
            return None, tk.paged_decode_attention(qs[l], kp, vp, jnp.asarray(lengths), table, hidx[l], layer=l,
                                                   interpret=interpret, config=config)
        return jax.lax.scan(step, None, jnp.arange(L))[1]

    outs = jax.jit(stacked)(qs, kp, vp, jnp.asarray(table))                             # [L, B, N, H]
    for l in range(L):
        _check(outs[l], qs[l], k_pages[l], v_pages[l], table, lengths, hidx[l])
    xla = paged_decode_attention(qs[1], kp, vp, jnp.asarray(lengths), jnp.asarray(table), hidx[1], layer=1,
                                 impl="xla")
    _check(xla, qs[1], k_pages[1], v_pages[1], table, lengths, hidx[1])


@pytest.mark.parametrize("interpret", INTERPRET)
def test_page_ids_clamped(interpret):
    """Table entries outside [0, P) inside a sequence's length read the clamped page (0 or P - 1), as
    the reference does: no load leaves the pool whatever the table holds."""
    B, N, K, H, Z, NP = 2, 4, 2, 64, 8, 6
    kp, vp, q = _normal((NP, K, Z, H), F32), _normal((NP, K, Z, H), F32), _normal((B, N, H), F32)
    lengths = jnp.array([24, 13], jnp.int32)
    table = jnp.array([[3, -2, NP + 5], [NP, 2, 1]], jnp.int32)
    o = paged_decode_attention(q, kp, vp, lengths, table, impl="triton", interpret=interpret)
    _check(o, q, kp, vp, np.clip(np.asarray(table), 0, NP - 1), np.asarray(lengths), None)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_empty_batch_and_empty_page_table(interpret, impl):
    """No sequences (B = 0) gives an empty result and a page table of no columns (M = 0) zeros, on both
    backends (the kernel crashed inside JAX on B = 0, the reference on M = 0)."""
    N, K, H, Z = 4, 2, 64, 8
    kp, vp = _normal((3, K, Z, H), F32), _normal((3, K, Z, H), F32)
    o = paged_decode_attention(_normal((0, N, H), F32), kp, vp, jnp.zeros(0, jnp.int32), jnp.zeros((0, 2), jnp.int32),
                               impl=impl, interpret=interpret)
    assert o.shape == (0, N, H)
    q = _normal((2, N, H), F32)
    o = paged_decode_attention(q, kp, vp, jnp.array([3, 0], jnp.int32), jnp.zeros((2, 0), jnp.int32), impl=impl,
                               interpret=interpret)
    assert o.shape == q.shape and np.all(np.asarray(o) == 0)


def test_config_heuristic():
    for B, N, K, S, H, C, Z in [(64, 32, 32, 2048, 128, 32, 16), (16, 32, 32, 2048, 128, 10, 64),
                                (64, 32, 8, 2048, 128, 2, 32), (1, 32, 8, 8192, 80, 1, 128), (4, 9, 3, 64, 64, 3, 8)]:
        cfg = tk.paged_attention_heuristic(B, N, K, S, H, C, Z, F16)
        assert cfg.splits >= 1 and cfg.block_s >= 16 and cfg.num_warps in (1, 2, 4, 8)
        assert cfg.splits == 1 or S // cfg.splits >= cfg.block_s, cfg


def test_dispatch(monkeypatch):
    B, N, K, H, Z = 2, 4, 2, 64, 8
    kp, vp, q = _normal((5, K, Z, H), F32), _normal((5, K, Z, H), F32), _normal((B, N, H), F32)
    lengths, table = jnp.array([16, 5], jnp.int32), jnp.array([[3, 1], [4, 0]], jnp.int32)
    calls = []
    for name, fn in list(api.IMPLS.items()):
        monkeypatch.setitem(api.IMPLS, name, lambda *a, _n=name, _f=fn, **kw: (calls.append(_n), _f(*a, **kw))[1])
    o = paged_decode_attention(q, kp, vp, lengths, table)
    assert calls == (["triton"] if HAS_GPU else ["triton", "xla"])
    _check(o, q, kp, vp, np.asarray(table), np.asarray(lengths), None)
    calls.clear()
    paged_decode_attention(q, kp, vp, lengths, table, impl="xla")
    assert calls == ["xla"]


def test_invalid_contracts():
    B, N, K, H, Z = 2, 8, 4, 64, 16
    q, kp, vp = _normal((B, N, H), F16), _normal((6, K, Z, H), F16), _normal((6, K, Z, H), F16)
    lengths, table = jnp.array([16, 3], jnp.int32), jnp.array([[1, 2], [3, 0]], jnp.int32)
    with pytest.raises(ValueError, match="page size Z=12 unsupported; supported: 8, 16, 32, 64, 128"):
        paged_decode_attention(q, kp[:, :, :12], vp[:, :, :12], lengths, table)
    with pytest.raises(TypeError, match="v_pages has dtype float32, but q is float16"):
        paged_decode_attention(q, kp, vp.astype(F32), lengths, table)
    with pytest.raises(ValueError, match=r"page_table has shape \(3, 2\); expected \[B, M\] with B=2"):
        paged_decode_attention(q, kp, vp, lengths, jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(TypeError, match="page_table has dtype float32; expected int32"):
        paged_decode_attention(q, kp, vp, lengths, table.astype(F32))
    with pytest.raises(ValueError, match=r"k_pages is stacked \(1, 6, 4, 16, 64\).*no layer"):
        paged_decode_attention(q, kp[None], vp[None], lengths, table)
    with pytest.raises(ValueError, match="layer=2 is out of range for 1 stacked layers"):
        paged_decode_attention(q, kp[None], vp[None], lengths, table, layer=2)
    with pytest.raises(ValueError, match="q has N=8 heads, not a multiple of the pool's K=3"):
        paged_decode_attention(q, kp[:, :3], vp[:, :3], lengths, table)
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\); expected \[B\]=\(2,\)"):
        paged_decode_attention(q, kp, vp, jnp.zeros(3, jnp.int32), table)
    with pytest.raises(ValueError, match=r"head_idx has shape \(2,\); expected \[B, C\] with B=2"):
        paged_decode_attention(q, kp, vp, lengths, table, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        paged_decode_attention(q, kp, vp, lengths, table, impl="cuda")


@pytest.mark.parametrize("config", [tk.PagedAttentionConfig(block_s=64), tk.PagedAttentionConfig(block_s=16, splits=2)],
                         ids=["p1", "split"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "selective"])
def test_lowers_to_triton(monkeypatch, config, dense):
    """The kernel lowers to Triton IR for CUDA (on a CPU-only machine too): catches constructs the GPU
    lowering rejects while the interpreter accepts them."""
    monkeypatch.setattr(tk, "check_backend", lambda interpret: False)
    sd = jax.ShapeDtypeStruct
    B, N, K, H, Z, M, NP, L = 4, 6, 2, 80, 16, 8, 40, 2
    args = [sd((B, N, H), BF16), sd((L, NP, K, Z, H), BF16), sd((L, NP, K, Z, H), BF16), sd((B,), jnp.int32),
            sd((B, M), jnp.int32)] + ([] if dense else [sd((B, 3), jnp.int32)])

    def fn(q, kp, vp, lengths, table, head_idx=None):
        return tk.paged_decode_attention(q, kp, vp, lengths, table, head_idx, layer=1, config=config)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "paged_decode_attention" in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cpu_references_touch_only_the_pages_they_use(dtype):
    """The jnp references (the CPU path) read and write a 16-bit pool as raw bits: XLA's CPU backend converted
    the whole pool to f32 around every gather and scatter, so a decode step cost O(pool), not O(pages used)."""
    from pallas_kernels.cache_write import reference as write_ref
    from pallas_kernels.paged_attention import reference as read_ref
    from pallas_kernels.prefill_attention import reference as prefill_ref

    L, P, K, Z, H, N, B = 3, 40, 2, 8, 16, 4, 2
    kq, kp, kv = jax.random.split(_key(), 3)
    pool = jax.random.normal(kp, (L, P, K, Z, H), jnp.float32).astype(dtype)
    table = jnp.asarray([[5, 9, 0], [31, 2, 7]], jnp.int32)
    q = jax.random.normal(kq, (B, N, H), jnp.float32).astype(dtype)
    qkv = jax.random.normal(kv, (B, 1, (N + 2 * K) * H), jnp.float32).astype(dtype)
    read = jax.jit(lambda q, k, v: read_ref.paged_decode_attention(q, k, v, jnp.asarray([20, 13]), table, layer=1))
    write = jax.jit(lambda qkv, k, v: write_ref.rope_and_cache_write(
        qkv, k, v, jnp.asarray([[9], [2]]), jnp.asarray([[3], [4]]), n_heads=N, layer=1))
    # the prefill reference too (its gather inside a loop over KV blocks once converted the pool before the loop)
    prefill = jax.jit(lambda q, k, v: prefill_ref.paged_prefill_attention(
        q, k, v, table, jnp.asarray([4, 0]), jnp.asarray([3, 5]), layer=1))
    pool_f32 = "f32[" + ",".join(map(str, pool.shape)) + "]"
    for fn, args in ((read, (q, pool, pool)), (write, (qkv, pool, pool)),
                     (prefill, (jnp.stack([q] * 5, axis=1), pool, pool))):
        hlo = fn.lower(*args).compile().as_text()
        assert not [l for l in hlo.splitlines() if pool_f32 in l], "a whole-pool f32 copy"
    # and the values are the pages', bit for bit
    gathered = read_ref.gather_pages(pool, table, 1)
    want = np.asarray(pool[1].astype(jnp.float32))[np.asarray(table)].transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)
    np.testing.assert_array_equal(np.asarray(gathered.astype(jnp.float32)), want)
    _, k_new, _ = write(qkv, pool, pool)
    kk = np.asarray(qkv[:, 0, N * H:(N + K) * H].reshape(B, K, H).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(k_new[1, 9, :, 3].astype(jnp.float32)), kk[0])
    np.testing.assert_array_equal(np.asarray(k_new[1, 2, :, 4].astype(jnp.float32)), kk[1])
    untouched = np.ones(pool.shape, bool)
    untouched[1, 9, :, 3] = untouched[1, 2, :, 4] = False
    np.testing.assert_array_equal(np.asarray(k_new.astype(jnp.float32))[untouched],
                                  np.asarray(pool.astype(jnp.float32))[untouched])

"""rope_and_cache_write: the Pallas kernel (interpret mode here, compiled on a GPU) against the jnp
reference and against values worked out independently: which query heads come back rotated by which
position, which page and offset each token's k and v land on, and that no other slot of the pool changes
(padding tokens, page ids outside the pool, offsets outside the page)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cache_write import IMPLS, apply_rope, rope_and_cache_write
from tests.kernel_cases import BF16, F32, INTERPRET, new_key, normal

N, K, H, Z, L, P = 6, 2, 64, 8, 3, 7


def _tables(B, T, H):
    """cos, sin [B, T, H] of distinct positions (HF rotate-half layout)."""
    pos = jax.random.randint(new_key(), (B, T), 0, 4000).astype(jnp.float32)
    freqs = pos[..., None] / (10000.0 ** (jnp.arange(0, H, 2) / H))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _case(B, T, dtype, stacked=True):
    qkv = normal((B, T, (N + 2 * K) * H), dtype)
    shape = ((L,) if stacked else ()) + (P, K, Z, H)
    k_pages, v_pages = normal(shape, dtype), normal(shape, dtype)  # stale values that must survive
    rng = np.random.default_rng(int(jax.random.randint(new_key(), (), 0, 1 << 30)))
    slots = rng.permutation(P * Z)[: B * T]  # distinct (page, offset) per token
    page = (slots // Z).reshape(B, T).astype(np.int32)
    off = (slots % Z).reshape(B, T).astype(np.int32)
    page[0, -1] = P   # padding: past the pool
    page[-1, 0] = -1  # and negative: neither may write anywhere
    off[1, 0], off[-1, -1] = -1, Z  # offsets outside the page drop their write too (a -1 once wrapped to Z - 1)
    return qkv, k_pages, v_pages, jnp.asarray(page), jnp.asarray(off)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("rope", [True, False])
def test_kernel_matches_worked_values(interpret, dtype, rope):
    B, T, layer = 3, 2, 1
    qkv, k_pages, v_pages, page, off = _case(B, T, dtype)
    tables = _tables(B, T, H) if rope else None
    q, k_new, v_new = rope_and_cache_write(qkv, k_pages, v_pages, page, off, tables, n_heads=N, layer=jnp.int32(layer),
                                           impl="triton", interpret=interpret)
    heads = np.asarray(qkv, np.float32).reshape(B, T, N + 2 * K, H)
    q_want, k_want = heads[:, :, :N], heads[:, :, N:N + K]
    if rope:  # rotate-half by each token's own position, in numpy
        c, s = (np.asarray(a)[:, :, None] for a in tables)
        rot = lambda x: x * c + np.concatenate([-x[..., H // 2:], x[..., :H // 2]], axis=-1) * s
        q_want, k_want = rot(q_want), rot(k_want)
    tol = 1e-6 if dtype == F32 else 1e-2
    np.testing.assert_allclose(np.asarray(q, np.float32), q_want, rtol=tol, atol=tol)
    k_exp, v_exp = np.asarray(k_pages, np.float32).copy(), np.asarray(v_pages, np.float32).copy()
    for b in range(B):
        for t in range(T):
            if 0 <= page[b, t] < P and 0 <= off[b, t] < Z:
                k_exp[layer, page[b, t], :, off[b, t]] = k_want[b, t]
                v_exp[layer, page[b, t], :, off[b, t]] = heads[b, t, N + K:]
    np.testing.assert_allclose(np.asarray(k_new, np.float32), k_exp, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(v_new, np.float32), v_exp)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("stacked", [True, False])
def test_kernel_equals_reference(interpret, stacked):
    B, T = 5, 1
    qkv, k_pages, v_pages, page, off = _case(B, T, BF16, stacked)
    tables = _tables(B, T, H)
    layer = jnp.int32(2) if stacked else None
    run = lambda impl: rope_and_cache_write(qkv, k_pages, v_pages, page, off, tables, n_heads=N, layer=layer,
                                            impl=impl, interpret=interpret if impl == "triton" else None)
    for got, want in zip(run("triton"), run("xla")):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T,order", [(1, ["triton", "xla"]), (4, ["xla"])])
def test_auto_takes_the_kernel_for_decode_rows_only(monkeypatch, T, order):
    """impl=None: decode rows (T = 1) try the kernel first; a prefill chunk (T > 1) goes to XLA's scatters, where
    the kernel measured slower. The kernel stand-in declines, as it does off a GPU."""
    tried = []

    def declining(*a, **kw):
        tried.append("triton")
        raise NotImplementedError("stand-in")

    def reference(*a, **kw):
        tried.append("xla")
        return xla(*a, **kw)

    xla = IMPLS["xla"]
    monkeypatch.setitem(IMPLS, "triton", declining)
    monkeypatch.setitem(IMPLS, "xla", reference)
    qkv, k_pages, v_pages, page, off = _case(2, T, F32)
    q, _, _ = rope_and_cache_write(qkv, k_pages, v_pages, page, off, n_heads=N, layer=0)
    assert tried == order and q.shape == (2, T, N, H)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_no_tokens(interpret, impl):
    """No tokens (B = 0) gives an empty q and the pools unchanged on both backends (the kernel crashed
    inside JAX)."""
    qkv, k_pages, v_pages, page, off = _case(2, 1, F32)
    q, k2, v2 = rope_and_cache_write(qkv[:0], k_pages, v_pages, page[:0], off[:0], _tables(0, 1, H), n_heads=N,
                                     layer=1, impl=impl, interpret=interpret)
    assert q.shape == (0, 1, N, H)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k_pages))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v_pages))


def test_reference_rope_is_hf_rotate_half():
    x = normal((2, 3, 4, H), F32)
    cos, sin = _tables(2, 3, H)
    x1, x2 = np.split(np.asarray(x), 2, axis=-1)
    c, s = np.asarray(cos)[:, :, None], np.asarray(sin)[:, :, None]
    want = np.concatenate([x1 * c[..., :H // 2] - x2 * s[..., :H // 2], x2 * c[..., H // 2:] + x1 * s[..., H // 2:]], -1)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos, sin)), want, rtol=1e-6, atol=1e-6)


def test_contract_errors_name_the_problem():
    qkv, k_pages, v_pages, page, off = _case(2, 1, F32)
    with pytest.raises(ValueError, match="need"):
        rope_and_cache_write(qkv, k_pages, v_pages, page, off, n_heads=N + 1, layer=0)
    with pytest.raises(ValueError, match="layer"):
        rope_and_cache_write(qkv, k_pages, v_pages, page, off, n_heads=N)
    with pytest.raises(ValueError, match="write_off"):
        rope_and_cache_write(qkv, k_pages, v_pages, page, off[:, :0], n_heads=N, layer=0)
    with pytest.raises(TypeError, match="qkv has dtype int32"):
        rope_and_cache_write(qkv.astype(jnp.int32), k_pages, v_pages, page, off, n_heads=N, layer=0)
    with pytest.raises(ValueError, match="cos"):
        rope_and_cache_write(qkv, k_pages, v_pages, page, off, _tables(2, 1, H // 2), n_heads=N, layer=0)
    assert set(IMPLS) == {"triton", "xla"}

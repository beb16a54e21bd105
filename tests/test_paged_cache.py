"""The paged KV cache under the model: pages anywhere in the pool give the same logits as the static
layout, each token's K/V land on the page and offset its page table names, and nothing is written or
counted past a sequence's capacity."""

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax import forward, init_cache, init_params, preset
from polar_jax.cache import KVCache, init_pool

CFG = preset("tiny-llama-gqa")
Z = 8


def scattered_cache(cfg, B, M, rng, pool=None, stale=0.0):
    """B sequences of M pages each, drawn from a shuffled pool with spare pages (poisoned with NaN); the
    owned pages hold `stale` (a previous owner's leftovers that must never be attended to)."""
    P = pool or B * M + 5
    k, v = init_pool(cfg, P, Z, jnp.float32)
    k, v = k.at[:].set(jnp.nan), v.at[:].set(jnp.nan)  # every page a sequence does not own must stay unread
    table = rng.permutation(P)[: B * M].reshape(B, M).astype(np.int32)
    k = k.at[:, table.ravel()].set(stale)
    v = v.at[:, table.ravel()].set(stale)
    return KVCache(k, v, jnp.asarray(table), jnp.zeros((B,), jnp.int32))


def test_scattered_pages_equal_the_static_layout():
    rng = np.random.default_rng(0)
    params = init_params(CFG, jax.random.key(1), jnp.float32)
    B, M, T = 3, 4, 11
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)))
    n_new = jnp.asarray([11, 4, 7])
    ref_logits, ref_cache, _ = forward(CFG, params, tokens, init_cache(CFG, B, M * Z, jnp.float32, Z), n_new=n_new)
    cache = scattered_cache(CFG, B, M, rng, stale=1e3)
    logits, cache, _ = forward(CFG, params, tokens, cache, n_new=n_new)
    live = np.arange(T)[None, :] < np.asarray(n_new)[:, None]
    np.testing.assert_allclose(np.asarray(logits)[live], np.asarray(ref_logits)[live], rtol=1e-5, atol=1e-5)
    # Then decode steps through the paged decode path.
    nxt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 1)))
    ref_step, _, _ = forward(CFG, params, nxt, ref_cache)
    step, cache, _ = forward(CFG, params, nxt, cache)
    np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(n_new) + 1)


def test_tokens_land_on_the_named_page_and_offset():
    rng = np.random.default_rng(2)
    params = init_params(CFG, jax.random.key(3), jnp.float32)
    B, M = 2, 3
    cache = scattered_cache(CFG, B, M, rng)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 10)))
    _, out, _ = forward(CFG, params, tokens, cache, n_new=jnp.asarray([10, 3]))
    k = np.asarray(out.k)  # [L, P, K, Z, H]
    table = np.asarray(cache.page_table)
    for b, n in ((0, 10), (1, 3)):
        for s in range(M * Z):
            slab = k[:, table[b, s // Z], :, s % Z]
            assert np.isfinite(slab).all() and (np.abs(slab).sum() > 0) == (s < n), (b, s)
    owned = set(table.ravel().tolist())
    spare = [p for p in range(k.shape[1]) if p not in owned]
    assert np.isnan(k[:, spare]).all(), "a page no sequence owns was written"


def test_full_sequences_stop_at_capacity():
    """A sequence at capacity takes more tokens without writing them (no page past its own is touched) and
    its length stays at capacity; the other sequences go on."""
    rng = np.random.default_rng(4)
    params = init_params(CFG, jax.random.key(5), jnp.float32)
    B, M = 2, 2
    cache = scattered_cache(CFG, B, M, rng)
    _, cache, _ = forward(CFG, params, jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 16))), cache,
                          n_new=jnp.asarray([16, 5]))
    before = np.asarray(cache.k)
    tok = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 1)))
    logits, cache, _ = forward(CFG, params, tok, cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [16, 6])
    after = np.asarray(cache.k)
    table = np.asarray(cache.page_table)
    np.testing.assert_array_equal(after[:, table[0]], before[:, table[0]])  # the full sequence: untouched
    assert np.isfinite(np.asarray(logits)).all()

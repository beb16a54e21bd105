"""Paged KV cache: one format for the static batch and the serving engine.

K and V live in a pool of fixed-size pages, `[L, P, K, Z, H]`: a page holds Z consecutive positions of one
sequence for every layer and KV head, head-major inside the page, so one selected KV head of one page is a
contiguous [Z, H] slab (selective heads read only their own bytes). Sequence b owns the pages
`page_table[b, :]` in order: position s lives at page `page_table[b, s // Z]`, offset `s % Z`.

The static batch (`init_cache`) is the special case where sequence b owns pages b*M .. b*M + M - 1; the
serving engine owns a pool of pages and hands them out from a host-side free list (polar_jax/engine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from polar_jax.config import ModelConfig

# Positions per page. benchmarks/results/kernels_paged_decode.md (H100): 32 reads as fast as the contiguous
# kernel (0.97-1.00x) with the best selective speedup for GQA (2.81x at 2 of 8 groups); 16 and 64 within 2%.
PAGE_SIZE = 32


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, P, K, Z, H]
    v: jax.Array  # [L, P, K, Z, H]
    page_table: jax.Array  # [B, M] int32: the pages of each sequence, in position order
    lengths: jax.Array  # [B] int32: valid positions per sequence

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        """Positions one sequence can hold: M pages of Z."""
        return self.page_table.shape[1] * self.page_size

def init_pool(cfg: ModelConfig, num_pages: int, page_size: int = PAGE_SIZE, dtype=jnp.bfloat16):
    """(k, v) page pools [L, P, K, Z, H] of zeros.

    Zeros, not empty: uninitialised memory can hold NaN, and a masked-out 0 * NaN is still NaN.
    """
    shape = (cfg.n_layers, num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)  # [L, P, K, Z, H]
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def pages_for(max_len: int, page_size: int = PAGE_SIZE) -> int:
    return -(-max_len // page_size)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, page_size: int = PAGE_SIZE) -> KVCache:
    """A static batch: `batch` sequences of up to `max_len` positions (rounded up to whole pages), each owning
    its own M consecutive pages."""
    M = pages_for(max_len, page_size)
    k, v = init_pool(cfg, batch * M, page_size, dtype)
    table = jnp.arange(batch * M, dtype=jnp.int32).reshape(batch, M)
    return KVCache(k, v, table, jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, page_size: int = PAGE_SIZE) -> int:
    """Bytes of K and V for `batch` sequences of `max_len` positions (whole pages)."""
    return batch * pages_for(max_len, page_size) * page_bytes(cfg, page_size, dtype)


def page_bytes(cfg: ModelConfig, page_size: int = PAGE_SIZE, dtype=jnp.bfloat16) -> int:
    """Bytes of one page of K and V over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * np.dtype(dtype).itemsize

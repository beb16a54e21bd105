"""Head-major KV cache: one (sequence, kv head) is one contiguous [S, H] slab."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from polar_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # [B] int32: valid positions per sequence

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    # Zeros, not empty: uninitialised memory can hold NaN, and masked-out 0 * NaN is still NaN.
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> int:
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * max_len * cfg.head_dim * jnp.dtype(dtype).itemsize

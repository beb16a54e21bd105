"""New tokens' q/k/v into the paged KV cache: split the fused projection, rotate q and k (RoPE), write k and v."""

from pallas_kernels.cache_write.api import IMPLS, rope_and_cache_write
from pallas_kernels.cache_write.reference import apply_rope

__all__ = ["rope_and_cache_write", "apply_rope", "IMPLS"]

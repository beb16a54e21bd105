"""Causal flash attention of a chunk of new tokens over a paged KV cache (chunked prefill)."""

from pallas_kernels.prefill_attention.api import IMPLS, check_contract, paged_prefill_attention
from pallas_kernels.prefill_attention.reference import paged_prefill_attention as paged_prefill_attention_reference
from pallas_kernels.prefill_attention.triton import PrefillConfig, prefill_config

__all__ = ["paged_prefill_attention", "paged_prefill_attention_reference", "IMPLS", "check_contract",
           "PrefillConfig", "prefill_config"]

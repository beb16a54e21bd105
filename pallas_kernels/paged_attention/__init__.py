"""Selective-head flash-decoding attention over a paged KV cache ([L, P, K, Z, H] pages + page table)."""

from pallas_kernels.paged_attention.api import IMPLS, check_contract, paged_decode_attention
from pallas_kernels.paged_attention.reference import gather_pages
from pallas_kernels.paged_attention.reference import paged_decode_attention as paged_decode_attention_reference
from pallas_kernels.paged_attention.triton import PagedAttentionConfig, paged_attention_config

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "gather_pages", "IMPLS",
           "check_contract", "PagedAttentionConfig", "paged_attention_config"]

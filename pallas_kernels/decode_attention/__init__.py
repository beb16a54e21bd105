"""Selective-head flash-decoding attention over a head-major KV cache (per-sequence head sparsity)."""

from pallas_kernels.decode_attention.api import IMPLS, check_contract, decode_attention
from pallas_kernels.decode_attention.reference import decode_attention as decode_attention_reference
from pallas_kernels.decode_attention.triton import AttentionConfig, attention_config

__all__ = ["decode_attention", "decode_attention_reference", "IMPLS", "check_contract", "AttentionConfig",
           "attention_config"]

"""Selective GEMM for the sparse MLP: gather-fused up / down projections over a dynamic neuron set."""

from pallas_kernels.selective_gemm.api import (
    IMPLS,
    dense_is_faster,
    selective_down,
    selective_mlp,
    selective_up,
)
from pallas_kernels.selective_gemm.fused import FusedConfig, fused_config, fused_mlp
from pallas_kernels.selective_gemm.reference import (
    dense_down,
    dense_mlp,
    dense_up,
)
from pallas_kernels.selective_gemm.reference import selective_down as selective_down_reference
from pallas_kernels.selective_gemm.reference import selective_mlp as selective_mlp_reference
from pallas_kernels.selective_gemm.reference import selective_up as selective_up_reference
from pallas_kernels.selective_gemm.triton import DownConfig, UpConfig, down_config, up_config

__all__ = [
    "IMPLS", "dense_is_faster", "selective_up", "selective_down", "selective_mlp",
    "selective_up_reference", "selective_down_reference", "selective_mlp_reference",
    "dense_up", "dense_down", "dense_mlp", "UpConfig", "DownConfig", "up_config", "down_config",
    "fused_mlp", "FusedConfig", "fused_config",
]

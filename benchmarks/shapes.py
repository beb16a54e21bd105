"""Benchmark shapes, declared once for the kernel and end-to-end benchmarks."""

# End to end, dense decode (issue 2): model, batch, context.
DENSE_CASES = [(m, B, ctx) for m in ("llama-2-7b", "smollm2-135m") for B in (64, 16, 1) for ctx in (2048, 512)]

# End to end, dense vs sparse heads (issue 3): the models whose shapes the reference paper reports.
SPARSE_CASES = [(m, B, 2048) for m in ("llama-2-7b", "llama-3-8b", "opt-6.7b") for B in (64, 16, 128)]
SPARSE_MODES = [("dense", 1.0), ("random", 0.5), ("random", 0.3), ("router", 0.5), ("oracle", 0.5)]

# Kernels (issue 3): attention (N, K) pairs at head dim 128, and MLP model dims.
ATTN_HEADS = [(32, 32), (64, 64), (32, 8), (64, 8)]
ATTN_BATCHES = (16, 64, 128)
ATTN_CONTEXTS = (2048, 8192)
ATTN_DENSITIES = (0.1, 0.3, 0.5, 1.0)
MLP_DIMS = (4096, 8192)
MLP_BATCHES = (1, 16, 64, 128, 256)
MLP_DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)

"""Fused selective MLP written in Triton's own language and called from jit through jax-triton.

Issue 11 item 3's second route: Pallas exposes only acquire-release atomics (fused.py), while Triton's
`tl.atomic_add(..., sem="relaxed")` compiles to fire-and-forget `red` instructions. One kernel, no grid
barrier, no hidden activations in HBM:

  grid (B / block_b, C / block_n): program (b, j) owns batch rows b*BB : (b+1)*BB and the selected neurons
  idx[j*BN : (j+1)*BN]; the batch blocks of one neuron block are launched together, so all but the first
  find its weight rows in L2.
  1. up: h[BB, BN] = act(x[BB, :] @ w_up[layer, ids].T + b_up[layer, ids]) over D in block_k chunks (gated:
     silu(x @ w_gate[ids].T) * (x @ w_up[ids].T + b_up)); rows past `count` are zero. h is rounded to x's
     dtype, as the two-kernel path writes it.
  2. down: for each block_d chunk of D: y[BB, chunk] += h @ w_down[layer, ids, chunk], a relaxed atomic add
     into y (f32, zeroed before the launch).
  Programs whose neuron block starts at or past `count` return at once, so work follows the dynamic count.

The atomics move B * D * 4 bytes per neuron block against the block's 2 * BN * D * 2 (3 gated) weight bytes:
B / BN of the weight traffic (B = 16, BN = 32: a half), all of it to L2. b_down is added by the caller in
the cast of y (one small fusion with y's consumer).

Needs a CUDA GPU and the `jax-triton` and `triton` packages (`pip install 'polar-jax[jax-triton]'`);
elsewhere it raises NotImplementedError. The kernel body itself also runs on CPU under Triton's
interpreter (TRITON_INTERPRET=1, torch tensors): tests/test_fused_jax_triton.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_gemm.triton import _pow2_at_least

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is defined only where Triton is installed
    triton = tl = None

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}


@dataclasses.dataclass(frozen=True)
class JtFusedConfig:
    block_b: int = 16     # batch rows per program (>= 16: tl.dot needs M >= 16; padded rows are masked)
    block_n: int = 32     # selected neurons per program (the atomics are B / block_n of the weight bytes)
    block_k: int = 256    # D chunk per up step
    block_d: int = 128    # output columns per down step (one atomic add of [block_b, block_d] f32 each)
    num_warps: int = 4
    num_stages: int = 4


if triton is not None:
    @triton.jit
    def fused_mlp_kernel(count_ptr, layer_ptr, idx_ptr, x_ptr, wu_ptr, wg_ptr, bu_ptr, wd_ptr, y_ptr,
                         B: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr):
        count = tl.load(count_ptr)
        n0 = tl.program_id(1) * BLOCK_N
        if n0 >= count:
            return
        layer = tl.load(layer_ptr).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)                         # [BN]
        live = offs_n < count
        ids = tl.load(idx_ptr + offs_n, mask=live, other=0).to(tl.int64)
        rows = (layer * F + ids) * D                                  # [BN] element offsets of the weight rows
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
        in_b = offs_b < B
        x_rows = x_ptr + offs_b[:, None] * D

        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + offs_k[None, :], mask=in_b[:, None], other=0.0)            # [BB, BK]
            wt = tl.load(wu_ptr + rows[:, None] + offs_k[None, :], mask=live[:, None], other=0.0)  # [BN, BK]
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
            if GATED:
                gt = tl.load(wg_ptr + rows[:, None] + offs_k[None, :], mask=live[:, None], other=0.0)
                acc_g = tl.dot(xt, tl.trans(gt), acc_g, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bu_ptr + layer * F + ids, mask=live, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc = acc_g / (1.0 + tl.exp(-acc_g)) * acc
        elif ACT == 1:
            acc = tl.maximum(acc, 0.0)
        elif ACT == 2:  # tanh approximation, tanh(z) = 2 / (1 + exp(-2z)) - 1
            z = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (2.0 / (1.0 + tl.exp(-2.0 * z)))
        h = tl.where(live[None, :], acc, 0.0).to(x_ptr.dtype.element_ty)                   # [BB, BN]

        y_rows = y_ptr + offs_b[:, None] * D
        for d in range(0, D, BLOCK_D):
            offs_d = d + tl.arange(0, BLOCK_D)
            wt = tl.load(wd_ptr + rows[:, None] + offs_d[None, :], mask=live[:, None], other=0.0)  # [BN, BD]
            tl.atomic_add(y_rows + offs_d[None, :], tl.dot(h, wt, input_precision=PRECISION), mask=in_b[:, None], sem="relaxed")


def default_config(B: int, D: int) -> JtFusedConfig:
    return JtFusedConfig(block_b=min(_pow2_at_least(B, 16), 64), block_k=min(256, D), block_d=min(128, D))


def check_config(cfg: JtFusedConfig, D: int) -> None:
    for name in ("block_k", "block_d"):
        if D % getattr(cfg, name):
            raise NotImplementedError(f"{name}={getattr(cfg, name)} does not divide D={D}")


def precision(dtype) -> str:
    """tl.dot's input precision: f32 operands as full f32 ("ieee"; Triton's default is tf32), as the other
    backends compute them."""
    return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def fused_mlp(x, w_up, w_down, idx, count, *, b_up=None, b_down=None, w_gate=None, activation="relu", layer=None,
              impl=None, interpret=None, config: JtFusedConfig | None = None):
    """y [B, D] = act(x @ w_up[layer, idx[:count]].T + b_up) @ w_down[layer, idx[:count]] + b_down[layer].

    Same contract as fused.fused_mlp (weights [L, F, D], b_up [L, F], b_down [L, D], int32 `layer`).
    Raises NotImplementedError without a CUDA GPU or without jax-triton / triton.
    """
    del impl
    if interpret or jax.default_backend() != "gpu":
        raise NotImplementedError("the jax-triton fused MLP runs on a CUDA GPU only")
    if triton is None:
        raise NotImplementedError("the jax-triton fused MLP needs the triton package")
    try:
        import jax_triton as jt
    except ImportError as e:
        raise NotImplementedError(f"the jax-triton fused MLP needs the jax-triton package ({e})") from e
    B, D = x.shape
    F = w_up.shape[1]
    C = idx.shape[0]
    cfg = config or default_config(B, D)
    check_config(cfg, D)
    gated = w_gate is not None
    layer = jnp.zeros((), jnp.int32) if layer is None else layer
    scalar = lambda v: jnp.reshape(jnp.asarray(v, jnp.int32), (1,))
    y = jt.triton_call(
        scalar(count), scalar(layer), idx.astype(jnp.int32), x, w_up, w_gate if gated else w_up,
        b_up if b_up is not None else x, w_down,
        kernel=fused_mlp_kernel, out_shape=jax.ShapeDtypeStruct((B, D), jnp.float32),
        grid=(triton.cdiv(B, cfg.block_b), triton.cdiv(C, cfg.block_n)), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, zeroed_outputs=(0,), name="selective_mlp_fused_jax_triton",
        B=B, D=D, F=F, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        GATED=gated, HAS_BIAS=b_up is not None, ACT=ACTIVATION_CODES[activation], PRECISION=precision(x.dtype))
    if b_down is not None:
        y = y + lax.dynamic_index_in_dim(b_down, layer, 0, keepdims=False).astype(jnp.float32)[None, :]
    return y.astype(x.dtype)

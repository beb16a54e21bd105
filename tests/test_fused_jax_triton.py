"""The jax-triton fused selective MLP (fused_jax_triton.py) against the f32 reference.

On CPU the kernel body runs under Triton's interpreter on torch tensors (the same @triton.jit function
that jax-triton compiles on the GPU); where a CUDA GPU and jax-triton are present the public call runs
compiled. Inputs: fresh random draws, a stacked [L, F, D] weight read at layer 1, a capacity C whose last
neuron block is partly past `count`, padded idx positions holding real neuron ids, and non-zero biases:
a neuron past `count` that leaked into y, a dropped or repeated atomic add, a batch row past B written,
or the wrong layer all move y by far more than the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_gemm import fused_jax_triton as fjt
from pallas_kernels.selective_gemm import reference
from tests.kernel_cases import F16, F32, HAS_GPU, mlp_inputs
from tests.tolerances import assert_close

triton = pytest.importorskip("triton", reason="the kernel is written in Triton (pip install triton)")
torch = pytest.importorskip("torch")

CASES = [  # B, D, F, C, count, dtype, activation, gated, bias, config
    (20, 192, 300, 80, 45, F32, "relu", False, True, fjt.JtFusedConfig(16, 16, 64, 64, 4, 2)),
    (5, 128, 200, 64, 64, F16, "gelu", False, True, fjt.JtFusedConfig(16, 32, 64, 32, 4, 2)),
    (17, 64, 150, 48, 37, F16, "none", True, False, fjt.JtFusedConfig(32, 16, 32, 64, 4, 2)),
    (3, 64, 100, 32, 0, F32, "relu", False, True, fjt.JtFusedConfig(16, 16, 64, 64, 4, 2)),
]


def _reference(a, count, activation):
    h = reference.selective_up(a["x"], a["w_up"], a["idx"], count, b_up=a["b_up"], w_gate=a["w_gate"],
                               activation=activation, layer=1)
    return reference.selective_down(h, a["w_down"], a["idx"], count, b_down=a["b_down"], layer=1)


def _interpreted(a, count, activation, cfg):
    """y in f32 from the kernel under Triton's interpreter (b_down added as fused_mlp adds it)."""
    t = lambda v: None if v is None else torch.from_numpy(np.asarray(jnp.asarray(v, jnp.float32)).copy()).to(
        torch.float16 if a["x"].dtype == F16 else torch.float32)
    B, D = a["x"].shape
    F, C = a["w_up"].shape[1], a["idx"].shape[0]
    x, w_up, w_down = t(a["x"]), t(a["w_up"]), t(a["w_down"])
    w_gate = t(a["w_gate"]) if a["w_gate"] is not None else w_up
    b_up = t(a["b_up"]) if a["b_up"] is not None else x
    y = torch.zeros((B, D), dtype=torch.float32)
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(C, cfg.block_n))
    fjt.fused_mlp_kernel[grid](torch.tensor([count], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                 torch.from_numpy(np.asarray(a["idx"]).copy()), x, w_up, w_gate, b_up, w_down, y,
                 B=B, D=D, F=F, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
                 GATED=a["w_gate"] is not None, HAS_BIAS=a["b_up"] is not None,
                 ACT=fjt.ACTIVATION_CODES[activation], PRECISION=fjt.precision(a["x"].dtype))
    y = jnp.asarray(y.numpy())
    if a["b_down"] is not None:
        y = y + a["b_down"][1].astype(jnp.float32)
    return y


@pytest.mark.skipif(HAS_GPU, reason="Triton compiles for the GPU there (tests/conftest.py)")
@pytest.mark.parametrize("B,D,F,C,count,dtype,activation,gated,bias,cfg", CASES)
def test_kernel_under_the_triton_interpreter(B, D, F, C, count, dtype, activation, gated, bias, cfg):
    a = mlp_inputs(B, D, F, C, dtype, gated=gated, bias=bias, L=2, bias_scale=0.5)
    ref = _reference(a, count, activation).astype(jnp.float32)
    out = _interpreted(a, count, activation, cfg)
    assert_close(out, ref, dtype)
    if count == 0 and bias:  # no neuron selected: y is exactly b_down, every batch row
        np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.asarray(a["b_down"][1], np.float32), (B, D)))


def test_declines_off_gpu_and_checks_its_blocks():
    a = mlp_inputs(4, 64, 50, 16, F32, L=1)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="CUDA GPU"):
            fjt.fused_mlp(a["x"], a["w_up"], a["w_down"], a["idx"], 16, layer=jnp.int32(0))
    with pytest.raises(NotImplementedError, match="block_k=48 does not divide D=64"):
        fjt.check_config(fjt.JtFusedConfig(block_k=48), 64)
    # the default: batch block the batch rounded up to a power of two in [16, 64], chunks at most D
    assert fjt.default_config(3, 64) == fjt.JtFusedConfig(block_b=16, block_k=64, block_d=64)
    assert fjt.default_config(48, 4096) == fjt.JtFusedConfig(block_b=64, block_k=256, block_d=128)
    assert fjt.default_config(200, 8192).block_b == 64


@pytest.mark.skipif(not HAS_GPU, reason="compiled through jax-triton on a CUDA GPU only")
@pytest.mark.parametrize("B,D,F,C,count,dtype,activation,gated,bias,cfg", CASES)
def test_compiled_through_jax_triton(B, D, F, C, count, dtype, activation, gated, bias, cfg):
    pytest.importorskip("jax_triton")
    a = mlp_inputs(B, D, F, C, dtype, gated=gated, bias=bias, L=2, bias_scale=0.5)
    run = jax.jit(lambda a, n: fjt.fused_mlp(a["x"], a["w_up"], a["w_down"], a["idx"], n, b_up=a["b_up"],
                                             b_down=a["b_down"], w_gate=a["w_gate"], activation=activation,
                                             layer=jnp.int32(1), config=cfg))
    out = run(a, jnp.int32(count))
    assert_close(out.astype(jnp.float32), _reference(a, count, activation).astype(jnp.float32), dtype)

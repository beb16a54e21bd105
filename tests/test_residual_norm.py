"""add_and_norm: the Pallas kernel (interpret mode here, compiled on a GPU) against the jnp reference and
against numpy: the residual sum each row gets (all S partials and the bias counted once), and its RMSNorm /
LayerNorm with the layer's own gains."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.residual_norm import IMPLS, Norm, add_and_norm
from tests.kernel_cases import BF16, F32, INTERPRET, normal
from tests.tolerances import assert_close

L = 3


def _norm(kind, D, dtype, stacked=True):
    lead = (L,) if stacked else ()
    scale = (1.0 + 0.5 * normal(lead + (D,), F32)).astype(dtype)
    shift = normal(lead + (D,), dtype, 0.3) if kind == "layer" else None
    return Norm(kind, scale, shift, 1e-5)


def _numpy(residual, update, norm, bias, layer):
    f = lambda a: np.asarray(a, np.float64)
    pick = lambda a: f(a)[layer] if layer is not None else f(a)
    x = f(residual) + f(update).sum(0) + (0 if bias is None else pick(bias))
    xc = x - x.mean(-1, keepdims=True) if norm.kind == "layer" else x
    y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + norm.eps) * pick(norm.scale)
    return x, y + (pick(norm.shift) if norm.kind == "layer" else 0)


CASES = [  # B, D, S, kind, dtype, bias
    (3, 200, 3, "rms", F32, True),      # a D that is no power of two: masked lanes
    (5, 128, 1, "rms", BF16, False),    # S = 1: a finished GEMM output in the activations' dtype
    (16, 96, 2, "layer", F32, True),
    (4, 256, 4, "layer", BF16, False),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,S,kind,dtype,bias", CASES)
def test_kernel_matches_numpy(interpret, B, D, S, kind, dtype, bias):
    layer = 2
    residual = normal((B, D), dtype, 3.0)  # an RMS of about 3: a kernel that skips the division is far off
    update = normal((S, B, D), F32 if S > 1 else dtype)
    b = normal((L, D), dtype, 0.5) if bias else None
    norm = _norm(kind, D, dtype)
    x, normed = add_and_norm(residual, update, norm, bias=b, layer=jnp.int32(layer), impl="triton",
                             interpret=interpret)
    x_want, n_want = _numpy(residual, update, norm, b, layer)
    assert x.dtype == normed.dtype == dtype
    assert_close(x, x_want, dtype)
    assert_close(normed, n_want, dtype)
    ref_x, ref_n = add_and_norm(residual, update, norm, bias=b, layer=jnp.int32(layer), impl="xla")
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(ref_x, np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(ref_n, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_unstacked_parameters(interpret):
    residual, update = normal((2, 64), F32), normal((2, 2, 64), F32)
    norm = _norm("rms", 64, F32, stacked=False)
    got = add_and_norm(residual, update, norm, impl="triton", interpret=interpret)
    want = _numpy(residual, update, norm, None, None)
    for g, w in zip(got, want):
        assert_close(g, w, F32)


def test_contract_errors_name_the_problem():
    residual, update = normal((2, 64), F32), normal((2, 2, 64), F32)
    norm = _norm("rms", 64, F32)
    with pytest.raises(ValueError, match="layer"):
        add_and_norm(residual, update, norm)
    with pytest.raises(ValueError, match="update"):
        add_and_norm(residual, update[:, :1], norm, layer=0)
    with pytest.raises(ValueError, match="shift"):
        add_and_norm(residual, update, Norm("layer", norm.scale, None, 1e-5), layer=0)
    with pytest.raises(ValueError, match="bias"):
        add_and_norm(residual, update, norm, bias=normal((64,), F32), layer=0)
    assert set(IMPLS) == {"triton", "xla"}

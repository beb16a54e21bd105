"""The fused selective MLP kernel (up + down in one pass, fused.py) against the f32 reference.

Runs in the Pallas interpreter on CPU and compiled where a CUDA GPU is present (one test either way).
Inputs are fresh random draws, idx a duplicate-free draw, `count` traced so one compile serves counts
0, 1, 37 and the capacity; biases are non-zero, so a neuron past `count` that leaked act(b_up) into the
output, a bias added twice, or a neuron block dropped from the accumulation all move y by far more
than the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import autotune
from pallas_kernels.selective_gemm import (
    api,
    fused,
    selective_mlp,
    selective_mlp_reference,
)
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET
from tests.kernel_cases import as_f32 as _f32, mlp_inputs, neuron_ids, normal as _normal
from tests.tolerances import assert_close


def _make(B, D, F, C, dtype, *, gated, bias, L=None):
    return mlp_inputs(B, D, F, C, dtype, gated=gated, bias=bias, L=L, bias_scale=0.5)  # biases that show


def _counts(C):
    return sorted({0, 1, 37, C} & set(range(C + 1)))


CASES = [  # B, D, F, C, dtype, activation, gated, bias
    (3, 48, 200, 60, F32, "relu", False, True),
    (5, 80, 200, 64, BF16, "gelu", False, True),
    (3, 80, 200, 45, F16, "relu", False, False),
    (5, 48, 200, 50, F32, "none", True, False),
    (3, 80, 200, 40, BF16, "none", True, True),
    (1, 48, 200, 200, F16, "gelu", False, True),   # batch 1, every neuron a candidate (C = F)
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,dtype,activation,gated,bias", CASES)
def test_fused_mlp(interpret, B, D, F, C, dtype, activation, gated, bias):
    p = _make(B, D, F, C, dtype, gated=gated, bias=bias)
    fn = jax.jit(lambda x, count: selective_mlp(
        x, p["w_up"], p["w_down"], p["idx"], count, b_up=p["b_up"], b_down=p["b_down"], w_gate=p["w_gate"],
        activation=activation, impl="fused", interpret=interpret))
    for count in _counts(C):
        x = _normal((B, D), dtype)  # fresh input every call
        y = fn(x, jnp.int32(count))
        ref = selective_mlp_reference(_f32(x), _f32(p["w_up"]), _f32(p["w_down"]), p["idx"], count,
                                      b_up=_f32(p["b_up"]), b_down=_f32(p["b_down"]), w_gate=_f32(p["w_gate"]),
                                      activation=activation)
        assert y.shape == (B, D) and y.dtype == dtype
        assert_close(y, ref, dtype)
        if count == 0:  # nothing selected: exactly the bias (or 0), nothing accumulated
            want = np.zeros((B, D)) if p["b_down"] is None else np.broadcast_to(np.asarray(p["b_down"], np.float32),
                                                                                (B, D))
            np.testing.assert_array_equal(np.asarray(y, np.float32), want)


# Explicit blocks: D not a multiple of block_k / block_d (masked tails), several batch blocks (B > block_b)
# of different sizes in the two phases, neuron blocks straddling count, splits of the down projection, and
# program counts that leave some programs one tile more than others (and some none).
def _cfg(ub, un, bk, db, dn, bd, split, programs, **kw):
    return fused.FusedConfig(up_block_b=ub, up_block_n=un, block_k=bk, down_block_b=db, down_block_n=dn, block_d=bd,
                             split=split, programs=programs, **kw)


CONFIG_CASES = [  # B, D, F, C, gated, FusedConfig
    (20, 80, 200, 70, False, _cfg(16, 16, 32, 32, 16, 32, 1, 7)),
    (5, 80, 200, 100, True, _cfg(16, 32, 64, 16, 32, 64, 2, 5)),
    (3, 48, 200, 130, False, _cfg(16, 64, 16, 16, 16, 32, 4, 3)),
    (3, 48, 200, 130, True, _cfg(16, 16, 32, 16, 64, 16, 1, 1)),
    (40, 80, 200, 70, True, _cfg(32, 16, 32, 16, 16, 16, 3, 9, barrier=False)),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,gated,cfg", CONFIG_CASES)
def test_configs(interpret, B, D, F, C, gated, cfg):
    p = _make(B, D, F, C, F16, gated=gated, bias=True, L=2)
    fn = jax.jit(lambda x, count: fused.fused_mlp(
        x, p["w_up"], p["w_down"], p["idx"], count, b_up=p["b_up"], b_down=p["b_down"], w_gate=p["w_gate"],
        activation="gelu", layer=jnp.int32(1), interpret=interpret, config=cfg))
    for count in _counts(C):
        x = _normal((B, D), F16)
        ref = selective_mlp_reference(_f32(x), _f32(p["w_up"]), _f32(p["w_down"]), p["idx"], count,
                                      b_up=_f32(p["b_up"]), b_down=_f32(p["b_down"]), w_gate=_f32(p["w_gate"]),
                                      activation="gelu", layer=1)
        assert_close(fn(x, jnp.int32(count)), ref, F16)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("gated", [False, True])
def test_layer_scan(interpret, gated):
    """Stacked [L, F, D] weights with the layer traced inside a jitted lax.scan: layer l uses its own rows."""
    B, D, F, C, L = 5, 48, 200, 64, 3
    p = _make(B, D, F, C, F16, gated=gated, bias=not gated, L=L)
    idx = jnp.stack([neuron_ids(F, C) for _ in range(L)])  # [L, C]
    counts = jnp.array([37, C, 1], jnp.int32)

    def stacked(x):
        def step(x, l):
            y = selective_mlp(x, p["w_up"], p["w_down"], idx[l], counts[l], b_up=p["b_up"], b_down=p["b_down"],
                              w_gate=p["w_gate"], layer=l, impl="fused", interpret=interpret)
            return x + y, y
        return jax.lax.scan(step, x, jnp.arange(L))[1]                        # [L, B, D]

    x = _normal((B, D), F16)
    ys = jax.jit(stacked)(x)
    for l in range(L):  # each layer's input formed as the scan forms it, so errors do not compound
        ref = selective_mlp_reference(_f32(x), _f32(p["w_up"]), _f32(p["w_down"]), idx[l], int(counts[l]),
                                      b_up=_f32(p["b_up"]), b_down=_f32(p["b_down"]), w_gate=_f32(p["w_gate"]),
                                      layer=l)
        assert_close(ys[l], ref, F16)
        x = x + ys[l]


def test_dispatch_by_impl_only(monkeypatch):
    """impl="fused" runs the fused kernel; impl=None keeps the sparse order (triton, xla) without it."""
    B, D, F, C = 2, 32, 64, 16
    p = _make(B, D, F, C, F32, gated=False, bias=True)
    x = _normal((B, D), F32)
    ran = []
    for name in api.IMPLS:
        fn = api.IMPLS[name]["mlp"]
        monkeypatch.setitem(api.IMPLS[name], "mlp", lambda *a, _n=name, _f=fn, **k: (ran.append(_n), _f(*a, **k))[1])
    args = (x, p["w_up"], p["w_down"], p["idx"], 5)
    ref = selective_mlp_reference(*args, b_up=p["b_up"], b_down=p["b_down"])
    assert_close(selective_mlp(*args, b_up=p["b_up"], b_down=p["b_down"], impl="fused", interpret=True), ref, F32)
    assert ran == ["fused"]
    ran.clear()
    selective_mlp(*args, b_up=p["b_up"], b_down=p["b_down"])
    assert "fused" not in ran and ran[0] == "triton"
    if not HAS_GPU:  # compiled Triton needs a GPU: the forced backend declines with the usual message
        with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
            selective_mlp(*args, impl="fused")


def test_heuristic_and_candidates():
    """Powers of two >= 16 (Triton's dot), the heuristic first among the candidates, registered for tuning."""
    for B in (1, 3, 16, 48, 128, 256):
        for D in (48, 80, 4096, 8192):
            for count in (1, 100, 3328, 6656):
                for gated in (False, True):
                    cands = fused.fused_candidates(B, D, count, gated)
                    assert cands[0] == fused.fused_heuristic(B, D, count, gated)
                    for c in cands:
                        blocks = (c.up_block_b, c.up_block_n, c.block_k, c.down_block_b, c.down_block_n, c.block_d)
                        assert all(v >= 16 and v & (v - 1) == 0 for v in blocks), (B, D, count, c)
                        assert c.fits(gated) or c.per_sm == 1, c  # the barrier's programs must all be resident
    t = autotune.KERNELS["selective_mlp_fused"]
    assert t.config_cls is fused.FusedConfig
    assert t.bucket(B=40, D=80, count=100, gated=True, dtype=F16) == dict(B=48, D=80, count=128, gated=1,
                                                                          dtype="float16")


def test_autotune_candidates_agree():
    """The tuner's own check: two candidates at a tiny shape class compute the same y (interpret mode)."""
    sc = fused.fused_bucket(B=3, D=48, count=40, gated=True, dtype=F32)
    timings = []
    result = autotune.tune("selective_mlp_fused", sc, max_candidates=2, reps=1, inner=1, log=timings.append)
    assert timings == [] and len(result["entry"]["timings"]) == 2


@pytest.mark.parametrize("B,D,F,count,gated", [(16, 8192, 32768, 3328, False), (128, 8192, 32768, 3328, False),
                                               (48, 8192, 22016, 6656, True), (5, 80, 200, 40, True)])
def test_lowers_to_triton(monkeypatch, B, D, F, count, gated):
    """The kernel (its heuristic config at issue 11's target shapes, and an awkward tiny one) lowers to
    Triton IR for CUDA, the grid barrier included, on a CPU-only machine too: catches constructs the GPU
    lowering rejects while the interpreter accepts them. Only shapes are traced; nothing is allocated."""
    monkeypatch.setattr(fused, "check_backend", lambda interpret: False)
    monkeypatch.setattr(fused, "sm_count", lambda: 132)
    sd = jax.ShapeDtypeStruct
    w = sd((2, F, D), F16)
    cfg = fused.fused_heuristic(B, D, count, gated)

    def fn(x, wu, wd, wg, bu, bd, idx, count, layer):
        return fused.fused_mlp(x, wu, wd, idx, count, b_up=bu, b_down=bd, w_gate=wg, activation="gelu",
                               layer=layer, config=cfg)

    args = (sd((B, D), F16), w, w, w if gated else None, sd((2, F), F16), sd((2, D), F16), sd((count,), jnp.int32),
            sd((), jnp.int32), sd((), jnp.int32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_mlp_fused" in text and "triton" in text

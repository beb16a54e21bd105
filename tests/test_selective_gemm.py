"""Selective GEMM (sparse MLP) kernels against the f32 reference.

Every kernel test runs the Triton kernels in the Pallas interpreter on CPU (`interpret=True`) and, where a
CUDA GPU is present, compiled (`interpret=False`): interpret mode is a parameter of the same test.
Inputs are fresh random draws (never zeros), idx is a duplicate-free random draw, and each compiled
kernel is run at several dynamic counts (0, 1, odd, capacity) with `count` traced, so one compile
serves all of them. Outputs are compared over all columns (those >= count must be exactly 0) with the
reference computed in f32 from the same rounded inputs. The interpreter starts every output buffer as
NaN (Pallas' uninitialised value), so an element the kernel forgot to write fails the finiteness check;
on the GPU a second call on different inputs catches stale elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_gemm import api, reference
from pallas_kernels.selective_gemm import triton as tk
from pallas_kernels.selective_gemm import (
    selective_down, selective_down_reference, selective_mlp, selective_mlp_reference, selective_up,
    selective_up_reference,
)
from tests.kernel_cases import BF16, F16, F32, HAS_GPU, INTERPRET
from tests.kernel_cases import as_f32 as _f32, mlp_inputs as _make, neuron_ids as _idx, normal as _normal
from tests.tolerances import assert_close



def _counts(C):
    return sorted({0, 1, (C // 2) | 1, C} & set(range(C + 1)))


def _typical_norm(x, w_up, w_gate, idx, count):
    """The norm of the up projection's live outputs if their D products did not cancel more than a random sum's
    (|x| @ |w|.T / sqrt(D), times the gate's when gated): the floor of assert_close's denominator, since a relu
    of a few sums can leave one value near 0 (seen: 8.9e-4 from terms of size ~1, a relative error of 1e-4 in
    f32 from correct rounding)."""
    rows = np.asarray(idx)[:count]
    xa = np.abs(np.asarray(x, np.float64))
    s = xa @ np.abs(np.asarray(w_up, np.float64).reshape(-1, xa.shape[1]))[rows].T / np.sqrt(xa.shape[1])
    if w_gate is not None:
        s = s * (xa @ np.abs(np.asarray(w_gate, np.float64).reshape(-1, xa.shape[1]))[rows].T / np.sqrt(xa.shape[1]))
    return float(np.linalg.norm(s))


def _check_zero_tail(h, count):
    tail = np.asarray(h[:, count:], np.float32)
    assert np.all(tail == 0), f"columns >= count={count} are not exactly 0 (max |.| {np.abs(tail).max()})"


# ---------------------------------------------------------------------------------------------------
# up projection

UP_CASES = [  # B, D, F, C, dtype, activation, gated, bias
    (1, 64, 96, 33, F16, "relu", False, True),
    (3, 200, 96, 40, F16, "gelu", False, False),
    (16, 72, 128, 17, BF16, "none", False, True),
    (3, 128, 64, 64, F32, "relu", False, False),
    (1, 200, 80, 21, BF16, "relu", True, True),
    (16, 64, 96, 48, F16, "relu", True, False),
    (3, 96, 128, 35, F32, "gelu", True, True),
    (20, 64, 64, 24, F16, "relu", False, True),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,dtype,activation,gated,bias", UP_CASES)
def test_up(interpret, B, D, F, C, dtype, activation, gated, bias):
    p = _make(B, D, F, C, dtype, gated=gated, bias=bias)
    fn = jax.jit(lambda x, w, idx, count, b, g: selective_up(
        x, w, idx, count, b_up=b, w_gate=g, activation=activation, impl="triton", interpret=interpret))
    for count in _counts(C):
        p["x"] = _normal((B, D), dtype)  # fresh input every call
        h = fn(p["x"], p["w_up"], p["idx"], jnp.int32(count), p["b_up"], p["w_gate"])
        ref = selective_up_reference(_f32(p["x"]), _f32(p["w_up"]), p["idx"], count, b_up=_f32(p["b_up"]),
                                     w_gate=_f32(p["w_gate"]), activation=activation)
        assert h.shape == (B, C) and h.dtype == dtype
        assert_close(h, ref, dtype, _typical_norm(p["x"], p["w_up"], p["w_gate"], p["idx"], count))
        _check_zero_tail(h, count)


# ---------------------------------------------------------------------------------------------------
# down projection

DOWN_CASES = [  # B, D, F, C, dtype, bias
    (1, 200, 96, 33, F16, True),
    (3, 64, 128, 70, BF16, False),
    (16, 72, 96, 17, F32, True),
    (20, 128, 64, 64, F16, False),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,dtype,bias", DOWN_CASES)
def test_down(interpret, B, D, F, C, dtype, bias):
    p = _make(B, D, F, C, dtype, bias=bias)
    fn = jax.jit(lambda h, w, idx, count, b: selective_down(
        h, w, idx, count, b_down=b, impl="triton", interpret=interpret))
    for count in _counts(C):
        h = _normal((B, C), dtype)
        h = h.at[:, count:].set(jnp.nan)  # positions >= count must be ignored, whatever they hold
        y = fn(h, p["w_down"], p["idx"], jnp.int32(count), p["b_down"])
        ref = selective_down_reference(_f32(h), _f32(p["w_down"]), p["idx"], count, b_down=_f32(p["b_down"]))
        assert y.shape == (B, D) and y.dtype == dtype
        assert_close(y, ref, dtype)


# ---------------------------------------------------------------------------------------------------
# explicit block configurations: several K steps with a masked tail, several batch blocks, split down

CONFIG_CASES = [  # B, D, F, C, UpConfig, DownConfig
    (3, 200, 96, 45, tk.UpConfig(block_n=16, block_k=64), tk.DownConfig(block_n=16, block_d=32, split=2)),
    (20, 96, 64, 40, tk.UpConfig(block_b=16, block_n=32, block_k=32), tk.DownConfig(block_n=16, block_d=64,
                                                                                    split=3)),
    (5, 200, 96, 50, tk.UpConfig(block_n=16, block_k=32, split_k=3), tk.DownConfig(block_n=32, block_d=128)),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,up_cfg,down_cfg", CONFIG_CASES)
def test_configs(interpret, B, D, F, C, up_cfg, down_cfg):
    p = _make(B, D, F, C, F16, gated=True, bias=True, L=2)
    fn = jax.jit(lambda x, wu, wg, wd, bu, bd, idx, count: tk.selective_mlp(
        x, wu, wd, idx, count, b_up=bu, b_down=bd, w_gate=wg, layer=jnp.int32(1), interpret=interpret,
        up_cfg=up_cfg, down_cfg=down_cfg))
    for count in _counts(C):
        y = fn(p["x"], p["w_up"], p["w_gate"], p["w_down"], p["b_up"], p["b_down"], p["idx"], jnp.int32(count))
        ref = selective_mlp_reference(*map(_f32, (p["x"], p["w_up"], p["w_down"])), p["idx"], count,
                                      b_up=_f32(p["b_up"]), b_down=_f32(p["b_down"]), w_gate=_f32(p["w_gate"]),
                                      layer=1)
        assert_close(y, ref, F16)


# ---------------------------------------------------------------------------------------------------
# the heuristics' own rules at the batches the model and the benchmarks run (64, 128): D, F and C kept
# small for the interpreter but chosen so that the rules take the branches they take at model shapes
# (block_b 64 / 128 with block_n 64, split_k and down splits > 1, and the unsplit B = 64 case)

BATCH_CASES = [  # B, D, F, C, dtype, gated, expected (up block_b, split_k), (down block_b, split)
    (64, 512, 480, 400, BF16, True, (64, 2), (64, 2)),
    (64, 256, 320, 200, F16, False, (64, 1), (64, 1)),
    (128, 1024, 640, 600, F16, False, (128, 4), (128, 2)),
    (128, 512, 256, 200, BF16, True, (128, 2), (128, 1)),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("B,D,F,C,dtype,gated,up_rule,down_rule", BATCH_CASES)
def test_batch_rules(interpret, B, D, F, C, dtype, gated, up_rule, down_rule):
    u, d = tk.up_heuristic(B, D, C, gated), tk.down_heuristic(B, D, C)  # what they pick for a traced count
    assert (u.block_b, u.split_k) == up_rule and u.block_n == 64, u
    assert (d.block_b, d.split) == down_rule, d
    p = _make(B, D, F, C, dtype, gated=gated, bias=not gated)
    fn = jax.jit(lambda x, count: selective_mlp(
        x, p["w_up"], p["w_down"], p["idx"], count, b_up=p["b_up"], b_down=p["b_down"], w_gate=p["w_gate"],
        activation="relu", impl="triton", interpret=interpret))
    for count in (1, 131, C):  # within one block, a ragged block count, the capacity
        x = _normal((B, D), dtype)
        ref = selective_mlp_reference(_f32(x), _f32(p["w_up"]), _f32(p["w_down"]), p["idx"], count,
                                      b_up=_f32(p["b_up"]), b_down=_f32(p["b_down"]), w_gate=_f32(p["w_gate"]))
        assert_close(fn(x, jnp.int32(count)), ref, dtype)


def test_heuristics_at_decode_shapes():
    """The branches measured in benchmarks/results/probe_heuristics_ab.json, at model shapes (no kernel runs):
    batch 33-64 up projections take 32-row neuron blocks exactly where 64-row ones leave SMs idle and 32-row
    ones do not, and split D only below the SMs (half of them gated); the down projection takes 128-row
    tiles only while all its programs are resident at once."""
    up, down = tk.up_heuristic, tk.down_heuristic
    thin = up(64, 4096, 6144, False)                       # llama-3-8b q/k/v: 96 blocks of 64, 192 of 32
    assert (thin.block_n, thin.block_k, thin.split_k) == (32, 128, 1), thin
    assert (up(64, 4096, 12288, False).block_n, up(64, 4096, 12288, False).split_k) == (64, 1)
    small = up(64, 4096, 2048, False)                      # 64 blocks of 32 would not cover the SMs either
    assert (small.block_n, small.split_k) == (64, 4), small
    gated = up(48, 8192, 6656, True)                       # 104 programs >= 132 / 2
    assert (gated.block_n, gated.split_k) == (64, 1), gated
    assert up(48, 4096, 1152, True).split_k == 4           # 18 programs
    one_wave = down(48, 4096, 6144)                        # 64 column blocks x split 4 = 256 <= 2 x 132
    assert (one_wave.block_n, one_wave.split, one_wave.num_stages) == (128, 4, 3), one_wave
    assert down(48, 5120, 6144).block_n == 64              # 80 x 4 = 320 programs: a second wave
    assert down(48, 4096, 2048).block_n == 64              # below 4,096 rows
    wide = down(128, 8192, 3328)                           # 64 x 2 = 128 <= 132, one program of 8 warps per SM
    assert (wide.block_n, wide.split, wide.num_warps, wide.num_stages) == (128, 2, 8, 3), wide
    narrow = down(128, 5120, 6144)                         # 80 x 2 = 160 > 132
    assert (narrow.block_n, narrow.num_warps) == (64, 4), narrow


# ---------------------------------------------------------------------------------------------------
# the stacked [L, F, D] path inside a jitted lax.scan equals the 2-D path layer by layer

@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("gated", [False, True])
def test_layer_scan(interpret, gated):
    B, D, F, C, L, count = 3, 64, 96, 40, 3, 29
    p = _make(B, D, F, C, F16, gated=gated, bias=not gated, L=L)
    idx = jnp.stack([_idx(F, C) for _ in range(L)])                           # [L, C]
    counts = jnp.array([count, C, 1], jnp.int32)

    def stacked(x):
        def step(x, l):
            y = selective_mlp(x, p["w_up"], p["w_down"], idx[l], counts[l], b_up=p["b_up"], b_down=p["b_down"],
                              w_gate=p["w_gate"], layer=l, impl="triton", interpret=interpret)
            return x + y, y
        return jax.lax.scan(step, x, jnp.arange(L))[1]                        # [L, B, D]

    ys = jax.jit(stacked)(p["x"])
    # Independent: a per-layer numpy loop (float64) over the layer's own selected rows; each layer's input is
    # the kernel's running sum, formed as the scan forms it (x + y in f16), so errors do not compound.
    f64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in p.items()}
    x = p["x"]
    for l in range(L):
        sel = np.asarray(idx[l])[: int(counts[l])]
        xn = np.asarray(x, np.float64)
        up = xn @ f64["w_up"][l][sel].T + (0 if f64["b_up"] is None else f64["b_up"][l][sel])  # [B, count]
        if gated:
            g = xn @ f64["w_gate"][l][sel].T
            act = g / (1 + np.exp(-g)) * up  # silu(gate) * up
        else:
            act = np.maximum(up, 0)  # selective_mlp's default activation: relu
        want = act @ f64["w_down"][l][sel] + (0 if f64["b_down"] is None else f64["b_down"][l])  # [B, D]
        assert_close(ys[l], want, F16)
        x = x + ys[l]


# ---------------------------------------------------------------------------------------------------
# dense path and dispatch (XLA only: fast)

@pytest.mark.parametrize("gated,bias,dtype", [(False, True, F32), (True, False, F32), (False, True, F16),
                                               (True, True, BF16)])
def test_dense_equals_reference(gated, bias, dtype):
    B, D, F, C = 5, 48, 64, 40
    p = _make(B, D, F, C, dtype, gated=gated, bias=bias)
    f = {k: _f32(v) if k != "idx" else v for k, v in p.items()}
    for count in (0, 17, C):
        args, args_f = dict(b_up=p["b_up"], w_gate=p["w_gate"]), dict(b_up=f["b_up"], w_gate=f["w_gate"])
        assert_close(reference.dense_up(p["x"], p["w_up"], p["idx"], count, **args),
                     selective_up_reference(f["x"], f["w_up"], p["idx"], count, **args_f), dtype)
        h = _normal((B, C), dtype)
        assert_close(reference.dense_down(h, p["w_down"], p["idx"], count, b_down=p["b_down"]),
                     selective_down_reference(_f32(h), f["w_down"], p["idx"], count, b_down=f["b_down"]), dtype)
        assert_close(reference.dense_mlp(p["x"], p["w_up"], p["w_down"], p["idx"], count, b_down=p["b_down"], **args),
                     selective_mlp_reference(f["x"], f["w_up"], f["w_down"], p["idx"], count, b_down=f["b_down"],
                                             **args_f), dtype)
    # count == F with every neuron selected: the unmasked dense MLP
    idx = _idx(F, F)
    assert_close(reference.dense_mlp(p["x"], p["w_up"], p["w_down"], idx, F, all_selected=True, **args),
                 selective_mlp_reference(f["x"], f["w_up"], f["w_down"], idx, F, **args_f), dtype)


def test_dispatch(monkeypatch):
    B, D, F, C = 2, 32, 64, 64
    p = _make(B, D, F, C, F32, bias=True)
    calls = []
    for name in api.IMPLS:
        fn = api.IMPLS[name]["mlp"]
        monkeypatch.setitem(api.IMPLS[name], "mlp", lambda *a, _n=name, _f=fn, **k: (calls.append(_n), _f(*a, **k))[1])
    args = (p["x"], p["w_up"], p["w_down"], p["idx"])
    ref = selective_mlp_reference(*args, 8, b_up=p["b_up"])
    # low density: Triton; without a GPU (and interpret not asked) it declines and the reference runs
    y = selective_mlp(*args, 8, b_up=p["b_up"])
    assert calls == (["triton"] if HAS_GPU else ["triton", "xla"])
    assert_close(y, ref, F32)
    # high density (concrete count): the dense path, same function
    y = selective_mlp(*args, C, b_up=p["b_up"])
    assert calls[-1] == "dense"
    assert_close(y, selective_mlp_reference(*args, C, b_up=p["b_up"]), F32)
    assert api.dense_is_faster(B, D, F, C) and not api.dense_is_faster(B, D, F, F // 10)


def _has_cond_outside_kernels(jaxpr) -> bool:
    """Whether a lax.cond appears anywhere in the jaxpr but inside a Pallas kernel body (a kernel's own
    pl.when is a cond too, and belongs to the kernel, not to the dispatch)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            return True
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns") and _has_cond_outside_kernels(sub):
                    return True
    return False


@pytest.mark.parametrize("op", ["mlp", "up", "down"])
def test_traced_count_decides_on_device(monkeypatch, op):
    """A traced count with capacity C = F: the union size picks the branch at run time (a lax.cond),
    so a small union runs the sparse kernels and a large one the dense path; both give the reference."""
    B, D, F = 3, 32, 64
    p = _make(B, D, F, F, F32, bias=True)
    ran = []
    for name in api.IMPLS:
        fn = api.IMPLS[name][op]

        def recorded(*a, _n=name, _f=fn, **k):
            out = _f(*a, **k)  # a backend that declines raises here, before it is recorded
            jax.debug.callback(lambda: ran.append(_n))  # fires only where this branch executes
            return out

        monkeypatch.setitem(api.IMPLS[name], op, recorded)
    h = _normal((B, F), F32)
    calls = {
        "mlp": lambda c: selective_mlp(p["x"], p["w_up"], p["w_down"], p["idx"], c, b_up=p["b_up"],
                                       b_down=p["b_down"]),
        "up": lambda c: selective_up(p["x"], p["w_up"], p["idx"], c, b_up=p["b_up"]),
        "down": lambda c: selective_down(h, p["w_down"], p["idx"], c, b_down=p["b_down"]),
    }
    refs = {
        "mlp": lambda c: selective_mlp_reference(p["x"], p["w_up"], p["w_down"], p["idx"], c, b_up=p["b_up"],
                                                 b_down=p["b_down"]),
        "up": lambda c: selective_up_reference(p["x"], p["w_up"], p["idx"], c, b_up=p["b_up"]),
        "down": lambda c: selective_down_reference(h, p["w_down"], p["idx"], c, b_down=p["b_down"]),
    }
    fn = jax.jit(calls[op])
    assert _has_cond_outside_kernels(jax.make_jaxpr(calls[op])(jnp.int32(1)).jaxpr)
    sparse = ["triton"] if HAS_GPU else ["xla"]  # without a GPU the Triton backend declines at trace time
    for count, want in [(3, sparse), (F // 10, sparse), (F - 1, ["dense"]), (F, ["dense"])]:
        ran.clear()
        y = fn(jnp.int32(count))
        jax.effects_barrier()
        assert ran == want, (count, ran)
        assert_close(y, refs[op](count), F32)
    # a capacity below the dense threshold never needs the dense path: no cond
    small = F // 10
    jaxpr = jax.make_jaxpr(lambda c: selective_up(p["x"], p["w_up"], p["idx"][:small], c))(jnp.int32(1))
    assert not _has_cond_outside_kernels(jaxpr.jaxpr)


# ---------------------------------------------------------------------------------------------------
# contract violations

@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("impl", ["triton", "fused", "xla"])
def test_empty_batch_and_capacity(interpret, impl):
    """No rows (B = 0) or no neuron slots (C = 0) give empty results, and y the bias alone, on both backends
    (the kernels failed on their empty grids)."""
    B, D, F = 3, 64, 96
    p = _make(B, D, F, 5, F32, gated=True, bias=True)
    kw = dict(impl=impl, interpret=interpret)
    none = jnp.zeros((0,), jnp.int32)
    h = selective_up(p["x"], p["w_up"], none, 0, b_up=p["b_up"], w_gate=p["w_gate"], **kw)
    assert h.shape == (B, 0)
    y = selective_down(h, p["w_down"], none, 0, b_down=p["b_down"], **kw)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(p["b_down"]), (B, D)))
    y = selective_mlp(p["x"], p["w_up"], p["w_down"], none, 0, b_up=p["b_up"], b_down=p["b_down"],
                      w_gate=p["w_gate"], **kw)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(p["b_down"]), (B, D)))
    x0 = p["x"][:0]
    assert selective_up(x0, p["w_up"], p["idx"], 5, w_gate=p["w_gate"], **kw).shape == (0, 5)
    assert selective_down(_normal((0, 5), F32), p["w_down"], p["idx"], 5, **kw).shape == (0, D)
    assert selective_mlp(x0, p["w_up"], p["w_down"], p["idx"], 5, b_down=p["b_down"], **kw).shape == (0, D)


def test_invalid_contracts():
    B, D, F, C = 2, 32, 64, 16
    p = _make(B, D, F, C, F16, bias=True, L=2)
    x, wu, wd, idx = p["x"], p["w_up"], p["w_down"], p["idx"]
    with pytest.raises(ValueError, match=r"count=17 must be in \[0, C=16\]"):
        selective_up(x, wu, idx, 17, layer=0)
    with pytest.raises(ValueError, match=r"outside \[0, F=64\): \[64\]"):
        selective_up(x, wu, idx.at[3].set(64), 4, layer=0)
    with pytest.raises(ValueError, match=r"outside \[0, F=64\): \[-1\]"):
        selective_down(_normal((B, C), F16), wd, idx.at[0].set(-1), 4, layer=0)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        selective_up(x, wu, idx, 4, layer=0, activation="swish")
    with pytest.raises(ValueError, match=r"layer=0 was given but w_up is 2-D \(64, 32\)"):
        selective_up(x, wu[0], idx, 4, layer=0)
    with pytest.raises(ValueError, match=r"w_up is stacked \(2, 64, 32\).*no layer"):
        selective_up(x, wu, idx, 4)
    with pytest.raises(ValueError, match="layer=2 is out of range for 2 stacked layers"):
        selective_up(x, wu, idx, 4, layer=2)
    with pytest.raises(TypeError, match="w_up has dtype float32, but the activations are float16"):
        selective_up(x, wu.astype(F32), idx, 4, layer=0)
    with pytest.raises(TypeError, match="x has dtype int32"):
        selective_up(x.astype(jnp.int32), wu.astype(jnp.int32), idx, 4, layer=0)
    with pytest.raises(ValueError, match=r"w_up has shape \(2, 64, 32\), model dim D=16"):
        selective_up(x[:, :16], wu, idx, 4, layer=0)
    with pytest.raises(ValueError, match=r"b_up has shape \(64,\); expected \(2, 64\)"):
        selective_up(x, wu, idx, 4, layer=0, b_up=p["b_up"][0])
    with pytest.raises(ValueError, match=r"w_gate has shape \(2, 32, 32\) but w_up has \(2, 64, 32\)"):
        selective_up(x, wu, idx, 4, layer=0, w_gate=wu[:, :32])
    with pytest.raises(ValueError, match="h has 15 columns but idx has capacity C=16"):
        selective_down(_normal((B, C - 1), F16), wd, idx, 4, layer=0)
    with pytest.raises(ValueError, match=r"b_down has shape \(2, 31\); expected \(2, 32\)"):
        selective_down(_normal((B, C), F16), wd, idx, 4, layer=0, b_down=p["b_down"][:, :31])
    with pytest.raises(ValueError, match=r"idx has shape \(2, 8\); expected \[C\]"):
        selective_up(x, wu, idx.reshape(2, 8), 4, layer=0)
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        selective_mlp(x, wu, wd, idx, 4, layer=0, impl="cuda")
    with pytest.raises(ValueError, match=r"w_down has shape \(2, 64, 16\) but w_up has \(2, 64, 32\)"):
        selective_mlp(x, wu, wd[..., :16], idx, 4, layer=0)
    # traced values are not checked eagerly but still trace
    jax.jit(lambda c: selective_up(x, wu, idx, c, layer=1))(jnp.int32(3))


def test_heuristic_configs():
    """Block sizes are powers of two, batch blocks >= 16 (Triton's dot), splits leave work to every program."""
    for B in (1, 3, 16, 64, 128, 256):
        for D in (64, 200, 576, 4096, 8192):
            for count in (1, 100, 1664, 3328, 32768):
                for gated in (False, True):
                    u = tk.up_heuristic(B, D, count, gated)
                    assert u.block_b >= 16 and u.block_n >= 16 and u.block_k >= 16, u
                    assert all(v & (v - 1) == 0 for v in (u.block_b, u.block_n, u.block_k, u.split_k)), u
                    assert u.split_k == 1 or pl_cdiv(D, u.block_k) >= 2 * u.split_k, (B, D, count, u)
                d = tk.down_heuristic(B, D, count)
                assert d.block_b >= 16 and d.block_n >= 16 and d.block_d >= 16 and d.split >= 1, d
                assert d.split == 1 or pl_cdiv(count, d.block_n * d.split) >= 3, (B, D, count, d)


def pl_cdiv(a, b):
    return -(-a // b)

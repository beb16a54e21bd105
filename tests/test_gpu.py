"""GPU test set (`pytest -m gpu`; deselected by default, skipped without a CUDA GPU).

CI runs on CPU, where every decode call falls back to the XLA reference or runs the kernels in the
Pallas interpreter. These tests run the compiled Triton kernels:
  - the model's decode path through the Pallas kernels against the same path with every kernel API's
    "triton" entry pointed at its XLA reference, at llama-2-7b (MHA) and llama-3-8b (GQA) layer shapes
    with a few layers, fp16 and bf16, dense and sparse (random) heads and neurons, random weights;
  - a prefill program compiled with PREFILL_COMPILER_OPTIONS has no XLA Triton GEMM in it (cuBLAS only);
  - the kernels at the benchmark shapes (benchmarks/shapes.py), impl="triton" against impl="xla";
  - the sparse MLP with a traced count and a capacity of F runs the sparse kernels for a small union
    (item 22 of issue 7): it is timed against capacity = count and against the dense path.
Only public APIs: polar_jax.forward / init_cache / init_params / preset / SparsityConfig, the kernel
APIs and their IMPLS tables.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
import polar_jax
from benchmarks.bench_mlp import mlp_width
from benchmarks.shapes import ATTN_BATCHES, ATTN_CONTEXTS, ATTN_HEADS, MLP_DIMS
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.selective_gemm import selective_mlp
from polar_jax.model import PREFILL_COMPILER_OPTIONS
from tests.kernel_cases import BF16, F16, HAS_GPU
from tests.tolerances import assert_close, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

# What a Pallas Triton kernel lowers to (jax's Triton lowering, either calling convention).
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


def _key(*path):
    """A key named by its path: reproducible across runs (str hashes are salted per process)."""
    return jax.random.key(zlib.crc32(repr(path).encode()))


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _runs_triton(fn, *args) -> bool:
    text = jax.jit(fn).lower(*args).as_text()
    return any(t in text for t in TRITON_CALLS)


def _xla_everywhere(monkeypatch):
    """Point every kernel API's "triton" entry at its "xla" reference (all pallas_kernels packages with an
    IMPLS table): forward's decode path then runs XLA end to end through the same API calls."""
    for m in pkgutil.iter_modules(pallas_kernels.__path__):
        impls = getattr(importlib.import_module(f"pallas_kernels.{m.name}"), "IMPLS", None) if m.ispkg else None
        if impls and "triton" in impls:
            monkeypatch.setitem(impls, "triton", impls["xla"])


# ---------------------------------------------------------------------------------------------------
# the model's decode path: Pallas kernels vs XLA

MODEL_TOL = {"float16": 1e-2, "bfloat16": 6e-2}  # logits after a few layers of fp16/bf16 rounding


# Each case compiles two 3-layer models; four cover MHA / GQA, fp16 / bf16 and dense / sparse in pairs.
MODEL_CASES = [("llama-2-7b", F16, False), ("llama-2-7b", BF16, True), ("llama-3-8b", F16, True),
               ("llama-3-8b", BF16, False)]


@pytest.mark.parametrize("model,dtype,sparse", MODEL_CASES)
def test_model_decode_kernels_vs_xla(monkeypatch, model, dtype, sparse):
    cfg = dataclasses.replace(polar_jax.preset(model), n_layers=3, vocab_size=1024)
    B, S, T0, steps = 16, 256, 40, 4
    params = polar_jax.init_params(cfg, _key(model, "params"), dtype)
    prompt = jax.random.randint(_key("prompt"), (B, T0), 3, cfg.vocab_size, jnp.int32)
    n_new = jnp.asarray(np.random.default_rng(0).integers(1, T0 + 1, B), jnp.int32).at[0].set(T0)
    _, cache0, _ = jax.jit(lambda p, t, c, n: polar_jax.forward(cfg, p, t, c, n_new=n, last_only=True))(
        params, prompt, polar_jax.init_cache(cfg, B, S, dtype), n_new)
    fed = jax.random.randint(_key("fed"), (steps, B, 1), 3, cfg.vocab_size, jnp.int32)  # same tokens both runs
    sp = (polar_jax.SparsityConfig(attn="random", attn_density=0.5, mlp="random", mlp_k=cfg.mlp_dim // 8,
                                   dense_layers=(0,)) if sparse else polar_jax.SparsityConfig())

    def decode():
        def step(p, tok, cache, key):  # a new function per run: jit's caches must not carry over
            logits, cache, _ = polar_jax.forward(cfg, p, tok, cache, sparsity=sp, key=key)
            return logits, cache

        fn, cache, out = jax.jit(step), cache0, []
        for i in range(steps):
            logits, cache = fn(params, fed[i], cache, jax.random.key(i))
            out.append(np.asarray(logits, np.float32))
        return np.stack(out), _runs_triton(step, params, fed[0], cache0, jax.random.key(0))

    got, kernels_ran = decode()
    with monkeypatch.context() as m:
        _xla_everywhere(m)
        want, xla_kernels = decode()
    assert kernels_ran, "the decode step launched no Pallas Triton kernel"
    assert not xla_kernels, "the XLA run still launched a Triton kernel: the comparison would be vacuous"
    assert np.all(np.isfinite(got))
    for i in range(steps):
        err = rel_error(got[i], want[i])
        assert err <= MODEL_TOL[np.dtype(dtype).name], f"step {i}: logits differ by {err:.3e} (relative)"


@pytest.mark.parametrize("model", ["llama-3-8b", "opt-6.7b"])
def test_decode_step_writes_the_pool_in_place(model):
    """The decode step's K/V writes (rope_and_cache_write, aliased to the pool) leave the donated pool in place:
    the compiled step's outputs alias it, and no temporary is anywhere near its size (a copy per layer would
    be). Also: the step launches that kernel, and no XLA scatter into the pool is left."""
    cfg = dataclasses.replace(polar_jax.preset(model), n_layers=3, vocab_size=1024)
    B, S = 8, 4096
    params = polar_jax.init_params(cfg, _key(model, "inplace"), BF16)
    cache = polar_jax.init_cache(cfg, B, S, BF16)
    step = jax.jit(lambda p, t, c: polar_jax.forward(cfg, p, t, c)[:2], donate_argnums=2)
    compiled = step.lower(params, jnp.ones((B, 1), jnp.int32), cache).compile()
    pool = cache.k.nbytes + cache.v.nbytes
    m = compiled.memory_analysis()
    assert m.alias_size_in_bytes >= pool
    assert m.temp_size_in_bytes < pool / 16, f"{m.temp_size_in_bytes} bytes of temporaries beside a {pool}-byte pool"
    text = compiled.as_text()
    assert text.count("rope_and_cache_write") >= cfg.n_layers
    assert not re.search(r"\bscatter\(", text), "an XLA scatter is still in the decode step"


def test_prefill_compiles_its_gemms_to_cublas():
    """PREFILL_COMPILER_OPTIONS keeps XLA's Triton GEMMs out of a prefill program (with them enabled the
    layer scan copies each layer's weights before its GEMM); without the options XLA picks some here, and
    the logits agree."""
    cfg = dataclasses.replace(polar_jax.preset("llama-3-8b"), n_layers=2, vocab_size=1024)
    B, T = 2, 512
    params = polar_jax.init_params(cfg, _key("prefill-gemm"), BF16)
    tokens = jax.random.randint(_key("prefill-tokens"), (B, T), 3, cfg.vocab_size, jnp.int32)
    cache = polar_jax.init_cache(cfg, B, T, BF16)

    def prefill(p, t, c):
        return polar_jax.forward(cfg, p, t, c, last_only=True)[0]

    texts, logits = {}, {}
    for name, options in (("prefill", PREFILL_COMPILER_OPTIONS), ("default", {})):
        compiled = jax.jit(prefill, compiler_options=options).lower(params, tokens, cache).compile()
        texts[name], logits[name] = compiled.as_text(), np.asarray(compiled(params, tokens, cache), np.float32)
    triton_gemms = {name: len(re.findall(r'"kind":"__triton[a-z_]*gemm', text)) for name, text in texts.items()}
    assert triton_gemms["default"] > 0, "XLA chose no Triton GEMM here: the check is vacuous"
    assert triton_gemms["prefill"] == 0
    assert rel_error(logits["prefill"], logits["default"]) <= MODEL_TOL["bfloat16"]


# ---------------------------------------------------------------------------------------------------
# kernels at the benchmark shapes: impl="triton" vs impl="xla"

# Every head layout at the headline batch and context, plus the other batches, the long context and bf16
# once each (each case is a compile; the whole file must fit one device call with the other GPU tests).
ATTN_CASES = ([(N, K, ATTN_BATCHES[1], ATTN_CONTEXTS[0], F16) for N, K in ATTN_HEADS]
              + [(32, 8, ATTN_BATCHES[0], ATTN_CONTEXTS[-1], BF16), (32, 32, ATTN_BATCHES[-1], ATTN_CONTEXTS[0], BF16)])


@pytest.mark.parametrize("N,K,B,S,dtype", ATTN_CASES)
def test_attention_benchmark_shapes(N, K, B, S, dtype):
    H = 128
    k = _normal(_key("k", N, K, B, S), (B, K, S, H), dtype)
    v = _normal(_key("v", N, K, B, S), (B, K, S, H), dtype)
    q = _normal(_key("q", N, K, B, S), (B, N, H), dtype)
    lengths = jax.random.randint(_key("len", B, S), (B,), 1, S + 1, jnp.int32).at[0].set(S)
    count = max(1, int(round(0.3 * K)))
    rng = np.random.default_rng(B * S + K)
    head_idx = jnp.asarray(np.stack([np.concatenate([rng.permutation(K)[:count], -np.ones(K - count, int)])
                                     for _ in range(B)]).astype(np.int32))                    # [B, K], -1 padded
    fn = jax.jit(decode_attention, static_argnames=("impl",))
    for hidx in (None, head_idx):
        o = fn(q, k, v, lengths, hidx, impl="triton")
        assert_close(o, fn(q, k, v, lengths, hidx, impl="xla"), dtype)
    # Everything as an argument: a closed-over array would be baked into the program as a constant.
    assert _runs_triton(lambda *a: decode_attention(*a, impl="triton"), q, k, v, lengths, head_idx)


MLP_CASES = [(variant, D, B) for variant in ("relu", "gated") for D, B in ((MLP_DIMS[0], 128), (MLP_DIMS[-1], 16))]


@pytest.mark.parametrize("variant,D,B", MLP_CASES)
def test_mlp_benchmark_shapes(variant, D, B):
    F, dtype = mlp_width(variant, D), F16
    w_up = _normal(_key("up", variant, D), (F, D), dtype, D ** -0.5)
    w_down = _normal(_key("down", variant, D), (F, D), dtype, F ** -0.5)
    w_gate = _normal(_key("gate", variant, D), (F, D), dtype, D ** -0.5) if variant == "gated" else None
    act = "none" if variant == "gated" else "relu"
    x = _normal(_key("x", variant, D, B), (B, D), dtype)
    for density in (0.1, 1.0):
        C = int(density * F)
        idx = jax.random.permutation(_key("idx", D, C), F)[:C].astype(jnp.int32)
        # Weights as arguments: closed over, 0.5 GB matrices would be compiled in as constants.
        fn = jax.jit(lambda x, w_up, w_down, w_gate, idx, c, impl: selective_mlp(
            x, w_up, w_down, idx, c, w_gate=w_gate, activation=act, impl=impl), static_argnames=("impl",))
        for count in (C, C // 2 + 1):  # traced: one compile serves both
            args = (x, w_up, w_down, w_gate, idx, jnp.int32(count))
            assert_close(fn(*args, impl="triton"), fn(*args, impl="xla"), dtype)


# ---------------------------------------------------------------------------------------------------
# item 22: with a traced count, a capacity of F and a small union run the sparse kernels

def test_small_union_with_capacity_f_reads_only_the_selected_rows():
    """D=8192, F=32768, B=16, 10% selected, capacity F and a traced count (the issue's case: before its fix
    the sparse kernels' work followed the capacity, 0.418 ms against 0.059): the weight rows past the count
    hold NaN, so any path that reads them (the dense one does, below) returns NaN; the selective MLP must give
    the result of capacity = count, finite. (test_selective_gemm's test_traced_count_decides_on_device checks
    which branch runs.)"""
    D, F, B, dtype = 8192, 32768, 16, F16
    count = F // 10
    perm = jax.random.permutation(_key("gap-idx"), F).astype(jnp.int32)                       # [F]
    unused = jnp.zeros(F, bool).at[perm[count:]].set(True)[:, None]                           # [F, 1]
    w_up = jnp.where(unused, jnp.nan, _normal(_key("gap-up"), (F, D), dtype, D ** -0.5)).astype(dtype)
    w_down = jnp.where(unused, jnp.nan, _normal(_key("gap-down"), (F, D), dtype, F ** -0.5)).astype(dtype)
    x = _normal(_key("gap-x"), (B, D), dtype)
    # Weights as arguments (closed over, they would be compiled in as constants).
    mlp = jax.jit(lambda x, w_up, w_down, idx, c, impl=None: selective_mlp(x, w_up, w_down, idx, c, impl=impl),
                  static_argnames=("impl",))
    wide = mlp(x, w_up, w_down, perm, jnp.int32(count))
    assert bool(jnp.isnan(mlp(x, w_up, w_down, perm, jnp.int32(count), impl="dense")).any())
    assert bool(jnp.isfinite(wide).all()), "capacity F with a small union read weight rows past the count"
    assert_close(wide, mlp(x, w_up, w_down, perm[:count], jnp.int32(count)), dtype)

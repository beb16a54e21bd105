"""Dense GQA decode attention in Pallas Mosaic GPU (Hopper): a prototype of the path past the Pallas
Triton backend, which JAX 0.11 deprecates (benchmarks/NOTES.md, "The Pallas Triton deprecation").

Not wired into the public `decode_attention` dispatch: it is measured against it by
`benchmarks/mosaic_probe.py` on a GPU. Without one (tests/test_mosaic_probe.py) it is checked in the Mosaic
GPU interpreter (with the two wgmma products as plain dots) and lowered for cuda to a Mosaic GPU custom call;
it has not yet been compiled to a cubin or run on a GPU. Same inputs and output as the reference for the
dense case (head_idx=None); head selection, splits over S and H in {80, 96} are follow-ups.

Kernel (`plgpu.kernel`, grid (K, B), one warpgroup per program): program (k, b) copies the G query rows
of group k (padded to 64 rows, the M of a Hopper wgmma, by the wrapper) into shared memory with TMA,
then `plgpu.emit_pipeline` streams the [S, H] K/V slab of (b, k) in `block_s`-position blocks through
shared memory (TMA, `max_concurrent_steps` blocks in flight) while the warpgroup computes
  s = q @ k_blk.T   (wgmma, [64, block_s] f32 accumulator)
  online softmax in f32 (exp2 with the scale folded in), positions >= lengths[b] masked to -inf
  o = o * alpha + p @ v_blk   (wgmma with p from registers)
and finally writes o / l for all 64 rows; the wrapper keeps the first G. Padding rows to 64 wastes
tensor-core work (64 / G times the needed FLOPs) but decode attention is bound by the K/V reads; the
padded q in and o out add 2 x B*K*64*H elements of traffic (~3% at the probe's shapes).

Blocks past lengths[b] are not fetched (the pipeline grid is cdiv(length, block_s), at least 1) unless
`dynamic_grid=False`, which streams all S positions and masks (a fallback in case a dynamic pipeline
grid fails to compile on the GPU).

Importing this module is safe anywhere: `jax.experimental.pallas.mosaic_gpu` is imported inside the
call, which raises NotImplementedError where Mosaic GPU cannot run (no CUDA GPU of compute capability
9.0 or later, or a JAX without the module) unless an interpreter is requested.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

ROWS = 64  # M of one warpgroup's wgmma: the G query rows of a group are padded to this


@dataclasses.dataclass(frozen=True)
class MosaicAttentionConfig:
    block_s: int = 128             # cache positions per pipeline step (a multiple of 64)
    max_concurrent_steps: int = 2  # K/V blocks in flight (shared memory: 2 x block_s x H x 2 bytes each)
    dynamic_grid: bool = True      # pipeline over cdiv(lengths[b], block_s) blocks; False: all S, masked


def _plgpu():
    """The jax.experimental.pallas.mosaic_gpu module, imported on first use (NotImplementedError if absent)."""
    try:
        from jax.experimental.pallas import mosaic_gpu
    except ImportError as e:
        raise NotImplementedError(f"this JAX has no Pallas Mosaic GPU backend ({e})") from e
    return mosaic_gpu


def mosaic_available() -> str | None:
    """None if Mosaic GPU kernels can compile here, else the reason (one line)."""
    try:
        _plgpu()
    except NotImplementedError as e:
        return str(e)
    if jax.default_backend() != "gpu":
        return f"Pallas Mosaic GPU needs a CUDA GPU; the default backend is {jax.default_backend()}"
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return f"cannot read the GPU's compute capability ({cc!r})"
    if major < 9:
        return f"Pallas Mosaic GPU kernels use wgmma and TMA (sm_90+, Hopper); this GPU is compute capability {cc}"
    return None


def _interpret_params(interpret):
    """interpret=True -> the Mosaic GPU interpreter's default parameters (a private class in jax 0.10)."""
    if interpret is not True:
        return interpret
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        raise NotImplementedError(f"this JAX has no Mosaic GPU interpreter ({e})") from e
    return InterpretGPUParams()


def _check_supported(q, k_cache, head_idx, cfg: MosaicAttentionConfig):
    """Raise NotImplementedError for what the prototype does not handle (the caller falls back)."""
    _, N, H = q.shape
    S = k_cache.shape[-2]
    if head_idx is not None:
        raise NotImplementedError("the Mosaic GPU prototype computes every head (head_idx=None) only")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"the Mosaic GPU prototype takes float16/bfloat16, not {q.dtype}")
    if H % 64:
        raise NotImplementedError(f"the Mosaic GPU prototype needs H % 64 == 0 (128-byte swizzled rows); {H=}")
    if cfg.block_s % 64 or S % cfg.block_s:
        raise NotImplementedError(f"the Mosaic GPU prototype needs S % block_s == 0 and block_s % 64 == 0; "
                                  f"{S=}, block_s={cfg.block_s}")
    if N // k_cache.shape[-3] > ROWS:
        raise NotImplementedError(f"more than {ROWS} query heads per KV head")


def decode_attention(q, k_cache, v_cache, lengths, head_idx=None, *, layer=None, sm_scale=None, impl=None,
                     interpret=None, config: MosaicAttentionConfig | None = None):
    """o [B, N, H] in q's dtype: one dense decode step of GQA attention, f32 softmax and accumulation.

    q [B, N, H] float16/bfloat16 (H a multiple of 64); k_cache, v_cache [B, K, S, H] (or [L, B, K, S, H]
    with `layer`; the layer is sliced before the kernel, a copy under jit: a follow-up indexes it inside);
    lengths [B] int32 (clamped to [0, S]; 0 gives zeros); head_idx must be None.
    interpret: None/False compiles for the GPU (NotImplementedError elsewhere); True (or interpreter
    parameters) runs the Mosaic GPU interpreter on CPU, where the two wgmma products become plain dots
    (the interpreter's wgmma ignores transpose_ref and register operands): small shapes only.
    """
    del impl
    cfg = config or MosaicAttentionConfig()
    _check_supported(q, k_cache, head_idx, cfg)
    if not interpret and (why := mosaic_available()) is not None:
        raise NotImplementedError(why)
    if layer is not None:
        k_cache = lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        v_cache = lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
    B, N, H = q.shape
    K = k_cache.shape[1]
    o_pad = padded_attention(pad_queries(q, K), k_cache, v_cache, lengths, sm_scale=sm_scale, config=cfg,
                             interpret=interpret)                                      # [B, K, 64, H]
    return o_pad[:, :, :N // K].reshape(B, N, H)


def pad_queries(q, K: int):
    """q [B, N, H] -> [B, K, 64, H]: the G = N / K query rows of each KV group, then zero rows."""
    B, N, H = q.shape
    G = N // K
    return jnp.zeros((B, K, ROWS, H), q.dtype).at[:, :, :G].set(q.reshape(B, K, G, H))


def padded_attention(q_pad, k_cache, v_cache, lengths, *, sm_scale=None, config: MosaicAttentionConfig | None = None,
                     interpret=None):
    """The kernel alone: o_pad [B, K, 64, H] (rows past G are attention of the zero rows, to be dropped).

    q_pad [B, K, 64, H] from `pad_queries`; k_cache, v_cache [B, K, S, H]; lengths [B] (clamped to [0, S]).
    No support checks (see `decode_attention`): the benchmarks time this without the padding around it.
    """
    cfg = config or MosaicAttentionConfig()
    H = q_pad.shape[-1]
    S = k_cache.shape[2]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)
    return _call(_plgpu(), q_pad, k_cache, v_cache, lengths, cfg=cfg,
                 sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale),
                 interpret=_interpret_params(interpret) or None)


def _call(plgpu, q_pad, k_cache, v_cache, lengths, *, cfg: MosaicAttentionConfig, sm_scale: float, interpret):
    B, K, _, H = q_pad.shape
    S = k_cache.shape[2]
    BS = cfg.block_s
    dtype = q_pad.dtype
    # 128-byte swizzle over (8, 64)-element tiles of 16-bit rows: the shared-memory layout wgmma reads
    # without bank conflicts and TMA writes directly.
    transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))
    scale_log2 = sm_scale * math.log2(math.e)  # softmax in base 2: exp2 is the hardware instruction
    # Register layouts only annotate the GPU lowering; the interpreter has no rule for layout_cast.
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    iota = (lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)) if interpret else (
        lambda dt, shape, dim, layout: plgpu.broadcasted_iota(dt, shape, dim, layout=layout))

    def body(lengths_ref, q_ref, k_ref, v_ref, o_ref, qo_smem, q_barrier):
        k, b = lax.axis_index("k"), lax.axis_index("b")
        length = lengths_ref[b]
        plgpu.copy_gmem_to_smem(q_ref.at[b, k], qo_smem, q_barrier)
        plgpu.barrier_wait(q_barrier)

        def step(idx, k_smem, v_smem, carry):
            acc, m, l = carry                     # [64, H] f32, [64] f32, [64] f32 (WGMMA row layout)
            (j,) = idx

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem, (1, 0)))
                return acc_ref[...]

            if interpret:  # the interpreter's wgmma ignores transpose_ref (jax 0.10.2): the same product
                s = jnp.dot(qo_smem[...].astype(jnp.float32), k_smem[...].astype(jnp.float32).T)
            else:
                s = pl.run_scoped(scores, plgpu.ACC((ROWS, BS), jnp.float32))                # [64, BS]
            s = s * scale_log2
            pos = j * BS + iota(jnp.int32, (ROWS, BS), 1, plgpu.Layout.WGMMA)
            s = jnp.where(pos < length, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # A row with nothing live yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
            m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m - m_sub)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem)
                return acc_ref[...]

            # A fresh accumulator plus an add, not wgmma into the running one (pl.run_state with
            # plgpu.ACC.init): the Mosaic GPU interpreter has no run_state, and the add is 64 registers.
            if interpret:  # nor does it take a wgmma operand from registers
                pv = jnp.dot(p.astype(dtype).astype(jnp.float32), v_smem[...].astype(jnp.float32))
            else:
                pv = pl.run_scoped(values, plgpu.ACC((ROWS, H), jnp.float32))               # [64, H]
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            return acc, m_new, l

        acc = cast(jnp.zeros((ROWS, H), jnp.float32), plgpu.Layout.WGMMA)
        m = cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        n_blocks = jnp.maximum(lax.div(length + BS - 1, BS), 1) if cfg.dynamic_grid else S // BS
        spec = plgpu.BlockSpec((BS, H), lambda j: (j, 0), transforms=transforms)
        acc, m, l = plgpu.emit_pipeline(
            step, grid=(n_blocks,), in_specs=[spec, spec], max_concurrent_steps=cfg.max_concurrent_steps,
            init_carry=(acc, m, l),
        )(k_ref.at[b, k], v_ref.at[b, k])
        l = jnp.where(l > 0, l, 1.0)              # empty sequence: acc is 0, the output 0
        qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, k])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((B, K, ROWS, H), dtype),
        scratch_types=[plgpu.SMEM((ROWS, H), dtype, transforms=transforms), plgpu.Barrier(num_barriers=1)],
        grid=(K, B),
        grid_names=("k", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return kernel(lengths, q_pad, k_cache, v_cache)


"""The decoder shared by OPT and LLaMA: one functional forward over the parameter pytree.

`forward` appends T tokens to every sequence of a paged KV cache (polar_jax/cache.py) and returns their
logits. T > 1 is prefill (dense; causal flash attention over the sequence's pages); T == 1 is a decode step
through the Pallas kernels, where sparsity enters (polar_jax/sparsity.py). `forward_packed` prefills chunks
packed back to back on one token axis (no padding between them), with decode rows optionally riding along
(the serving engine's steps): the riders' projections and dense MLP join the prefill's GEMMs, their
attention and sparsity are the decode path's. Layers run under one `lax.scan`,
so compile time does not grow with depth. The kernels receive the whole stacked cache / weights plus the
layer index: inside the scan a per-layer slice handed to a custom call would be materialised as a copy of
every byte it reads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pallas_kernels.cache_write import rope_and_cache_write
from pallas_kernels.common import from_raw_bits, raw_bits
from pallas_kernels.paged_attention import paged_decode_attention
from pallas_kernels.prefill_attention import paged_prefill_attention
from pallas_kernels.selective_gemm import selective_down, selective_mlp, selective_up
from polar_jax import layers
from polar_jax.cache import KVCache
from polar_jax.config import ModelConfig
from polar_jax.params import init_params
from polar_jax.sparsity import Segment, SparsityConfig, attention_heads, check_routers, mlp_neurons, plan


# Compiler options for every program that prefills (T > 1). With XLA's Triton GEMMs enabled, the layer scan
# copied each layer's weight slice w[l] before its cuBLAS GEMM (`loop_dynamic_slice_fusion`, 18% of the step);
# with them off, the prefill's cuBLAS calls read w[l] in place. A llama-3-8b prefill of 2,048 tokens on an H100:
# 56.2 ms before, 44.4 ms after (benchmarks/results/logs/profile_prefill_dsfusion.log, profile_prefill_llama3.log).
# Decode programs keep the defaults: their layer GEMMs are our kernels.
PREFILL_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


class Collected(NamedTuple):
    """Per-layer activations recorded for router training (prefill only)."""

    router_in: jax.Array  # [L, B, T, D] attention-norm output (the router input)
    mlp_hidden: jax.Array  # [L, B, T, F] activations entering the down projection
    head_norms: jax.Array  # [L, B, T, N] L2 norm of each head's attention output


def _at(tree: dict, layer) -> dict:
    return jax.tree_util.tree_map(lambda a: a[layer], tree)


def embed(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = params["embed"][tokens]  # [B, T, E]
    if cfg.has_project:
        x = x @ params["project_in"]  # [B, T, D]
    if cfg.positions == "learned":
        table = params["pos_embed"]
        x = x + table[jnp.clip(positions + 2, 0, table.shape[0] - 1)]  # OPT: offset 2
    return x


def unembed(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    if cfg.has_final_norm:
        x = layers.norm(cfg, params["final_norm"], x)
    if cfg.has_project:
        x = x @ params["project_out"]  # [..., E]
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...e,ve->...v", x, head, preferred_element_type=jnp.float32)


class Riders(NamedTuple):
    """Decode rows riding along a prefill call (`forward_packed`): one new token each, appended after the
    row's `lengths` cached ones. Their projections and dense MLP share the prefill's GEMMs, so a step that
    prefills reads every weight once; their attention and any sparsity are the decode path's."""

    tokens: jax.Array  # [R] int32
    lengths: jax.Array  # [R] cached tokens before this one
    valid: jax.Array  # [R] bool: padding rows append nothing
    page_table: jax.Array  # [R, M]
    row_density: jax.Array | None = None  # [R] per-row attention density (NaN: the config's), or None


class _Rows(NamedTuple):
    """Where one set of rows [B, T] reads and writes the paged cache."""

    starts: jax.Array  # [B] cached tokens before the new ones
    n_new: jax.Array  # [B] new tokens really appended
    table: jax.Array  # [B, M]
    write_page: jax.Array  # [B, T] page of each new token; the pool size P (a dropped write) for padding
    write_off: jax.Array  # [B, T]
    rope: tuple | None  # (cos, sin) [B, T, H] or None
    ends: jax.Array  # [B] starts + n_new: the cached tokens after the call (made once, outside the layer scan)
    offsets: jax.Array | None = None  # [C] packed chunks (`forward_packed`): where each starts on the token axis


def _rows(cfg: ModelConfig, cache_lengths, n_new, table, T: int, S: int, Z: int, P: int) -> tuple[_Rows, jax.Array]:
    starts = jnp.minimum(cache_lengths, S)  # [B]
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    real = (jnp.arange(T)[None, :] < n_new[:, None]) & (positions < S)  # [B, T]
    n_new = jnp.sum(real, axis=1, dtype=jnp.int32)  # [B]: what is really appended
    page = jnp.take_along_axis(table, jnp.minimum(positions // Z, S // Z - 1), axis=1)  # [B, T]
    rope = layers.rope_tables(cfg, positions) if cfg.positions == "rope" else None
    return _Rows(starts, n_new, table, jnp.where(real, page, P), positions % Z, rope, starts + n_new), positions


def _packed_rows(cfg: ModelConfig, starts, n_new, offsets, table, S: int, cap: int, Z: int,
                 P: int) -> tuple[_Rows, jax.Array]:
    """The rows of C chunks packed on one token axis [1, S] (chunk c's tokens at offsets[c]..): per-chunk
    starts, n_new (what is really appended), table and offsets; per-token writes and positions [1, S]."""
    starts = jnp.minimum(starts, cap)  # [C]
    n_new = jnp.maximum(jnp.minimum(n_new, cap - starts), 0)  # [C]
    s = jnp.arange(S, dtype=jnp.int32)
    member = (s[None, :] >= offsets[:, None]) & (s[None, :] < (offsets + n_new)[:, None])  # [C, S]
    real = jnp.any(member, axis=0)  # [S] tokens of some chunk (the rest is padding)
    c = jnp.argmax(member, axis=0)  # [S] each token's chunk
    positions = jnp.where(real, starts[c] + s - offsets[c], 0)  # [S]
    page = table[c, jnp.minimum(positions // Z, table.shape[1] - 1)]  # [S]
    rope = layers.rope_tables(cfg, positions[None]) if cfg.positions == "rope" else None
    rows = _Rows(starts, n_new, table, jnp.where(real, page, P)[None], (positions % Z)[None], rope, starts + n_new,
                 offsets)
    return rows, positions[None]


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: KVCache, *, n_new: jax.Array | None = None,
            sparsity: SparsityConfig | None = None, key: jax.Array | None = None, last_only: bool = False,
            collect: bool = False, row_density: jax.Array | None = None):
    """Append tokens [B, T] at each sequence's current length; return (logits, cache, collected).

    n_new [B]: how many of the T tokens are real for each sequence (ragged prompts; default T). Padding
    tokens are neither cached nor counted; a row with n_new 0 (a padded batch row, a finished sequence)
    changes nothing and takes no part in the batch's MLP neuron union. Positions past the cache's capacity
    are never written, and lengths never grow past it. logits: [B, T, V] fp32, or [B, V] at each sequence's
    last real token when last_only. collected: a Collected when collect (prefill only), else None.
    """
    logits, _, cache, collected = _forward(cfg, params, tokens, cache, n_new=n_new, sparsity=sparsity, key=key,
                                           last_only=last_only, collect=collect, row_density=row_density)
    return logits, cache, collected


def forward_packed(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: KVCache, offsets: jax.Array,
                   n_new: jax.Array, *, max_new: int, riders: Riders | None = None,
                   sparsity: SparsityConfig | None = None, key: jax.Array | None = None, all_logits: bool = False,
                   batch_invariant: bool = False):
    """A prefill of C chunks packed back to back on one token axis, with optional decode rows riding along.

    tokens [S]: chunk c's n_new[c] tokens are tokens[offsets[c]:offsets[c] + n_new[c]], appended after its
    cache.lengths[c] cached ones (cache.page_table [C, M] holds the chunks' pages); tokens of no chunk are
    padding (computed, never cached). Chunks must not overlap; max_new (static) bounds every n_new. The
    GEMMs run on the S packed tokens (and the riders' rows) only, so chunks of unequal length cost no
    padding. Returns (logits [C, V] at each chunk's last real token, or [S, V] at every token when
    all_logits; rider logits [R, V] or None; k pool; v pool): each part computes what `forward` would
    compute for it alone (the riders with the sparsity config, for a batch of R).

    batch_invariant: each chunk's results are bit for bit what it would get in any other call of the same
    shapes (S, C, max_new), whatever else the call holds and however a sequence was cut into chunks: every
    row goes through the same GEMMs and the same attention arithmetic (decode rows, if any, come as chunks
    of one token; riders take the decode kernels, so they are refused).
    """
    if tokens.ndim != 1:
        raise ValueError(f"forward_packed: tokens must be [S] (packed chunks), got {tokens.shape}")
    if batch_invariant and riders is not None:
        raise ValueError("forward_packed: batch_invariant=True takes decode rows as one-token chunks, not riders "
                         "(riders go through the decode kernels, whose arithmetic differs from the prefill's)")
    logits, rider_logits, cache, _ = _forward(cfg, params, tokens[None], cache, n_new=n_new, sparsity=sparsity,
                                              key=key, last_only=not all_logits, riders=riders,
                                              packed=(offsets, max_new), batch_invariant=batch_invariant)
    return logits if not all_logits else logits[0], rider_logits, cache.k, cache.v


def _forward(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: KVCache, *, n_new, sparsity, key, last_only,
             collect=False, row_density=None, riders: Riders | None = None, packed: tuple | None = None,
             batch_invariant: bool = False):
    """packed: (offsets [C], max_new) for forward_packed's chunks on one token axis (tokens [1, S]); n_new
    and the cache's page_table / lengths are then the chunks'."""
    B, T = tokens.shape
    N, K, H, S, Z = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.max_len, cache.page_size
    P = cache.k.shape[1]
    decode = T == 1  # this call's own rows decode (riders only ride a prefill)
    if collect and decode:
        raise ValueError("collect=True records prefill activations; pass more than one token")
    R = 0 if riders is None else riders.tokens.shape[0]
    Bd = R if riders is not None else B  # the decode rows (the call's own, or the riders): what sp is sized for
    sp = sparsity or SparsityConfig()
    # A per-batch-size k (calibrated table): the step's real decode rows (not its padded Bd) pick the counts
    # on the device; capacities are sized for the largest count any of 1 .. Bd rows takes.
    count_table = None if sp.mlp_k_table is None else sp.neuron_count_table(cfg, Bd)  # [Bd + 1, L]
    if count_table is not None:
        sp = dataclasses.replace(sp, mlp_k=tuple(int(k) for k in count_table.max(axis=0)), mlp_k_table=None)
    n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new.astype(jnp.int32)  # [B] (packed: [C])
    key = jax.random.key(sp.seed) if key is None else key
    lp, routers = params["layers"], params.get("routers")
    check_routers(cfg, params, sp)
    sm_scale = H ** -0.5

    if packed is None:
        main, positions = _rows(cfg, cache.lengths, n_new, cache.page_table, T, S, Z, P)
    else:
        main, positions = _packed_rows(cfg, cache.lengths, n_new, packed[0].astype(jnp.int32), cache.page_table, T,
                                       S, Z, P)
    x = embed(cfg, params, tokens, positions)  # [B, T, D]
    xr = rider_rows = None
    if riders is not None:
        rider_rows, r_pos = _rows(cfg, riders.lengths, riders.valid.astype(jnp.int32), riders.page_table, 1, S, Z, P)
        xr = embed(cfg, params, riders.tokens[:, None], r_pos)  # [R, 1, D]
        row_density = riders.row_density

    # Decode projections go through the row-gathering GEMM with every row selected: it indexes the
    # stacked weights by layer itself (on the GPU; elsewhere the API picks its XLA path). The "every row"
    # index arrays are made here, outside the layer scan: made inside it, each is an iota kernel per layer
    # (XLA does not hoist them out of the loop; 95 us of an 11.7 ms llama-2-7b step on an H100).
    impl = "triton" if jax.default_backend() == "gpu" else None
    every_row = {n: jnp.arange(n, dtype=jnp.int32) for n in {lp["wqkv"].shape[1], lp["wo"].shape[1], cfg.mlp_dim}}

    def project(hs, l, w, b=None):  # [B, T, D] each @ w[l].T (+ b[l]) -> [B, T, R'] each
        if decode:
            return [selective_up(hs[0][:, 0], w, every_row[w.shape[1]], w.shape[1], b_up=b, activation="none",
                                 layer=l, impl=impl)[:, None]]
        return _split_rows(jnp.einsum("nd,rd->nr", _join_rows(hs), w[l]) + (0 if b is None else b[l]), hs)

    def unproject(as_, l, w, b=None):  # [B, T, R'] each @ w[l] (+ b[l]) -> [B, T, D] each
        if decode:
            return [selective_down(as_[0][:, 0], w, every_row[w.shape[1]], w.shape[1], b_down=b, layer=l,
                                   impl=impl)[:, None]]
        return _split_rows(_join_rows(as_) @ w[l] + (0 if b is None else b[l]), as_)

    def split_and_write(l, qkv, k_all, v_all, rows: _Rows):  # -> q [B, T, N, H] (rotated), k_all, v_all
        # Decode rows: one kernel on the GPU; prefill rows: XLA's scatters (the API's choice, measured there).
        return rope_and_cache_write(qkv, k_all, v_all, rows.write_page, rows.write_off, rows.rope, n_heads=N, layer=l)

    def decode_attention(l, q, h1, k_all, v_all, rows: _Rows, n_heads, seg: Segment):
        # rows.ends, not starts + n_new here: an add inside the scan is a kernel per layer (39 us of an 11.7 ms
        # llama-2-7b B = 16 step on an H100).
        q1, lengths = q[:, 0], rows.ends  # [B, N, H], [B]
        Bd = q1.shape[0]

        def dense_norms():  # oracle: [B, K] norms of each KV group's output
            o = paged_decode_attention(q1, k_all, v_all, lengths, rows.table, layer=l, sm_scale=sm_scale)
            return jnp.sqrt(jnp.sum(jnp.square(o.astype(jnp.float32)).reshape(Bd, K, -1), axis=-1))

        head_idx = attention_heads(sp, cfg, l, n_heads, seg.head_capacity, h1, routers, key, dense_norms,
                                   row_density=row_density)
        return paged_decode_attention(q1, k_all, v_all, lengths, rows.table, head_idx, layer=l,
                                      sm_scale=sm_scale)[:, None]

    def decode_mlp(l, h1, router_in, valid, n_neurons, seg: Segment):  # h1 [B, D] -> [B, 1, D]
        # The router reads the layer's attention-norm output (router_in), as collection recorded it for
        # training and calibration, so both routers can run at the start of the layer.
        sel = mlp_neurons(sp, cfg, l, n_neurons, seg.neuron_capacity, router_in, routers, key, valid=valid,
                          dense_hidden=lambda: layers.dense_mlp_hidden(cfg, lp, l, h1))
        idx, n = (every_row[cfg.mlp_dim], cfg.mlp_dim) if sel is None else sel
        y = selective_mlp(h1, lp["w_up"], lp["w_down"], idx, n, b_up=lp.get("b_up"), b_down=lp.get("b_down"),
                          w_gate=lp.get("w_gate"), activation="none" if cfg.gated_mlp else cfg.activation,
                          layer=l, impl=impl)
        return y[:, None]

    def norm(name, l, xs_):
        return [layers.norm(cfg, _at(lp[name], l), a) for a in xs_]

    def layer_step(seg: Segment, carry, xs):
        x, xr, k_all, v_all = carry
        k_all, v_all = from_raw_bits(k_all, cache.k.dtype), from_raw_bits(v_all, cache.v.dtype)
        l, n_heads, n_neurons = xs
        parts = [x] if xr is None else [x, xr]
        hs = parts if cfg.post_norm else norm("attn_norm", l, parts)
        qkvs = project(hs, l, lp["wqkv"], lp.get("bqkv"))  # [B, T, (N+2K)*H] each
        q, k_all, v_all = split_and_write(l, qkvs[0], k_all, v_all, main)
        if xr is not None:  # written before either part's attention reads the pool: one version of it is
            # live, so the writes stay in place (a write after a read of the same buffer copies the pool)
            qr, k_all, v_all = split_and_write(l, qkvs[1], k_all, v_all, rider_rows)
        if decode:
            attn = decode_attention(l, q, hs[0][:, 0], k_all, v_all, main, n_heads, seg)
        elif packed is None:
            attn = paged_prefill_attention(q, k_all, v_all, main.table, main.starts, main.n_new, layer=l,
                                           sm_scale=sm_scale)  # [B, T, N, H]
        else:  # q [1, S, N, H]: the chunks on one token axis
            attn = paged_prefill_attention(q[0], k_all, v_all, main.table, main.starts, main.n_new, layer=l,
                                           sm_scale=sm_scale, q_offsets=main.offsets, max_new=packed[1],
                                           batch_invariant=batch_invariant)[None]
        attns = [attn.reshape(B, T, N * H)]
        if xr is not None:
            attns.append(decode_attention(l, qr, hs[1][:, 0], k_all, v_all, rider_rows, n_heads, seg)
                         .reshape(R, 1, N * H))
        parts = [a + o for a, o in zip(parts, unproject(attns, l, lp["wo"], lp.get("bo")))]
        if cfg.post_norm:
            parts = norm("attn_norm", l, parts)
        h2s = parts if cfg.post_norm else norm("mlp_norm", l, parts)
        hidden = None
        if decode:
            ys = [decode_mlp(l, h2s[0][:, 0], hs[0][:, 0], main.n_new > 0, n_neurons, seg)]
        elif xr is None or seg.neuron_capacity is None:  # riders with a dense MLP join the prefill's GEMMs
            hidden = layers.dense_mlp_hidden(cfg, lp, l, _join_rows(h2s))  # [n, F]
            ys = _split_rows(layers.dense_mlp_out(cfg, lp, l, hidden), h2s)
            hidden = hidden.reshape(B, T, -1) if xr is None else None
        else:
            hidden = layers.dense_mlp_hidden(cfg, lp, l, h2s[0])  # [B, T, F]
            ys = [layers.dense_mlp_out(cfg, lp, l, hidden),
                  decode_mlp(l, h2s[1][:, 0], hs[1][:, 0], rider_rows.n_new > 0, n_neurons, seg)]
        parts = [a + y for a, y in zip(parts, ys)]
        if cfg.post_norm:
            parts = norm("mlp_norm", l, parts)
        rec = None
        if collect:
            norms = jnp.sqrt(jnp.sum(jnp.square(attn.astype(jnp.float32)), axis=-1))  # [B, T, N]
            rec = Collected(hs[0], hidden, norms)
        return (parts[0], parts[1] if xr is not None else None, raw_bits(k_all), raw_bits(v_all)), rec

    # One scan per run of layers with equal selection capacities of the decode rows (a plain prefill: one
    # run, all dense). A decode step's scans are unrolled: with the layer index a constant, the norm gains
    # and the cache writes need no dynamic slices or clamps of their own, and XLA overlaps kernels across
    # layers (llama-3-8b B = 16 on an H100: 7.56 against 7.86 ms of device time a step,
    # benchmarks/results/logs/profile_unroll.log). It costs compile time: an engine with sparse heads took
    # about twice as long to start (benchmarks/NOTES.md). Prefill steps, whose layers are few large GEMMs,
    # keep the loop.
    if decode or riders is not None:
        segments = plan(sp, cfg, Bd, row_density is not None, count_table)
    else:
        segments = [Segment(0, cfg.n_layers, None, None)]
    neurons = sp.neuron_counts(cfg)
    if count_table is not None:
        real = jnp.sum((main if riders is None else rider_rows).n_new > 0)
        neurons = jnp.asarray(count_table)[jnp.clip(real, 1, Bd)]  # [L]
    xs = (np.arange(cfg.n_layers, dtype=np.int32), sp.head_counts(cfg), neurons)
    # The scan carries the pools as raw bits (pallas_kernels.common.raw_bits; on the CPU, where the jnp references
    # scatter and gather 16-bit pools as bits): carried as floats, each layer of a loop converted the whole pool
    # to bits and back, two copies of it per pool and layer. A caller that keeps its pools as bits (the engine)
    # passes them through with no conversion at all.
    carry, records = (x, xr, raw_bits(cache.k), raw_bits(cache.v)), []
    for seg in segments:
        carry, rec = jax.lax.scan(functools.partial(layer_step, seg), carry,
                                  tuple(jnp.asarray(a[seg.start:seg.stop]) for a in xs), unroll=decode)
        records.append(rec)
    x, xr, k_all, v_all = carry
    k_all, v_all = from_raw_bits(k_all, cache.k.dtype), from_raw_bits(v_all, cache.v.dtype)
    collected = records[0] if collect else None  # prefill runs a single segment

    if last_only and packed is not None:
        x = x[0, jnp.clip(main.offsets + main.n_new - 1, 0, T - 1)]  # [C, D]
    elif last_only:
        x = x[jnp.arange(B), jnp.maximum(main.n_new - 1, 0)]  # [B, D]
    logits = unembed(cfg, params, x)
    rider_logits = None if xr is None else unembed(cfg, params, xr[:, 0])  # [R, V]
    return logits, rider_logits, KVCache(k_all, v_all, main.table, main.ends), collected


def _join_rows(parts: list[jax.Array]) -> jax.Array:
    """[B_i, T_i, C] arrays as one [sum B_i * T_i, C] matrix: the rows of every part in one GEMM."""
    return jnp.concatenate([p.reshape(-1, p.shape[-1]) for p in parts], axis=0)


def _split_rows(y: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
    """The inverse of _join_rows for a result y [n, C'] with the parts' leading shapes."""
    out, at = [], 0
    for p in like:
        n = p.shape[0] * p.shape[1]
        out.append(y[at:at + n].reshape(p.shape[0], p.shape[1], y.shape[-1]))
        at += n
    return out


class PolarLM(nn.Module):
    """Flax (linen) face of the model for code that composes Flax modules.

    Its variables are {"params": {"weights": <the parameter pytree>}}; `apply` runs `forward`, so a
    checkpoint loaded with polar_jax.load plugs in as model.apply({"params": {"weights": params}}, ...).
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, cache: KVCache, **kwargs):
        params = self.param("weights", lambda key: init_params(self.cfg, key, self.dtype))
        return forward(self.cfg, params, tokens, cache, **kwargs)

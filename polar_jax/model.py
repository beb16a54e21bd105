"""The decoder shared by OPT and LLaMA: one functional forward over the parameter pytree.

`forward` appends T tokens to every sequence of a paged KV cache (polar_jax/cache.py) and returns their
logits. T > 1 is prefill (dense; causal flash attention over the sequence's pages); T == 1 is a decode step
through the Pallas kernels, where sparsity enters (polar_jax/sparsity.py). Layers run under one `lax.scan`,
so compile time does not grow with depth. The kernels receive the whole stacked cache / weights plus the
layer index: inside the scan a per-layer slice handed to a custom call would be materialised as a copy of
every byte it reads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

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
    B, T = tokens.shape
    N, K, H, S, Z = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.max_len, cache.page_size
    P = cache.k.shape[1]
    decode = T == 1
    sp = (sparsity or SparsityConfig()).for_batch(B)
    if collect and decode:
        raise ValueError("collect=True records prefill activations; pass more than one token")
    n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
    key = jax.random.key(sp.seed) if key is None else key
    lp, routers = params["layers"], params.get("routers")
    check_routers(cfg, params, sp)
    sm_scale = H ** -0.5

    starts = jnp.minimum(cache.lengths, S)  # [B]
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    real = (jnp.arange(T)[None, :] < n_new[:, None]) & (positions < S)  # [B, T]
    n_new = jnp.sum(real, axis=1, dtype=jnp.int32)  # [B]: what is really appended
    page = jnp.take_along_axis(cache.page_table, jnp.minimum(positions // Z, S // Z - 1), axis=1)  # [B, T]
    write_page = jnp.where(real, page, P)  # P: out of the pool, the write is dropped
    write_off = positions % Z  # [B, T]
    x = embed(cfg, params, tokens, positions)
    if cfg.positions == "rope":
        cos, sin = layers.rope_tables(cfg, positions)

    # Decode projections go through the row-gathering GEMM with every row selected: it indexes the
    # stacked weights by layer itself (on the GPU; elsewhere the API picks its XLA path).
    impl = "triton" if decode and jax.default_backend() == "gpu" else None

    def project(h, l, w, b=None):  # h [B, T, D] @ w[l].T (+ b[l]) -> [B, T, R]
        if not decode:
            y = jnp.einsum("btd,rd->btr", h, w[l])
            return y if b is None else y + b[l]
        rows_all = jnp.arange(w.shape[1], dtype=jnp.int32)
        return selective_up(h[:, 0], w, rows_all, w.shape[1], b_up=b, activation="none", layer=l, impl=impl)[:, None]

    def unproject(a, l, w, b=None):  # a [B, T, R] @ w[l] (+ b[l]) -> [B, T, D]
        if not decode:
            y = a @ w[l]
            return y if b is None else y + b[l]
        rows_all = jnp.arange(w.shape[1], dtype=jnp.int32)
        return selective_down(a[:, 0], w, rows_all, w.shape[1], b_down=b, layer=l, impl=impl)[:, None]

    def attention(l, h, k_all, v_all, n_heads, seg: Segment):
        qkv = project(h, l, lp["wqkv"], lp.get("bqkv"))  # [B, T, (N+2K)*H]
        q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if cfg.positions == "rope":
            q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        # [B, T, K, H] into pages [l, page, :, off]: the advanced indices broadcast to [B, T] in front.
        k_all = k_all.at[l, write_page, :, write_off].set(k.astype(k_all.dtype), mode="drop")
        v_all = v_all.at[l, write_page, :, write_off].set(v.astype(v_all.dtype), mode="drop")
        if decode:
            q1, lengths = q[:, 0], starts + n_new  # [B, N, H], [B]

            def dense_norms():  # oracle: [B, K] norms of each KV group's output
                o = paged_decode_attention(q1, k_all, v_all, lengths, table, layer=l, sm_scale=sm_scale)
                return jnp.sqrt(jnp.sum(jnp.square(o.astype(jnp.float32)).reshape(B, K, -1), axis=-1))

            head_idx = attention_heads(sp, cfg, l, n_heads, seg.head_capacity, h[:, 0], routers, key, dense_norms,
                                       row_density=row_density)
            out = paged_decode_attention(q1, k_all, v_all, lengths, table, head_idx, layer=l,
                                         sm_scale=sm_scale)[:, None]
        else:
            out = paged_prefill_attention(q, k_all, v_all, table, starts, n_new, layer=l,
                                          sm_scale=sm_scale)  # [B, T, N, H]
        return out, k_all, v_all

    def mlp(l, h, n_neurons, seg: Segment):
        if not decode:
            hidden = layers.dense_mlp_hidden(cfg, lp, l, h)  # [B, T, F]
            return layers.dense_mlp_out(cfg, lp, l, hidden), hidden
        h1 = h[:, 0]  # [B, D]
        sel = mlp_neurons(sp, cfg, l, n_neurons, seg.neuron_capacity, h1, routers, key, valid=n_new > 0,
                          dense_hidden=lambda: layers.dense_mlp_hidden(cfg, lp, l, h1))
        idx, n = (jnp.arange(cfg.mlp_dim, dtype=jnp.int32), cfg.mlp_dim) if sel is None else sel
        y = selective_mlp(h1, lp["w_up"], lp["w_down"], idx, n, b_up=lp.get("b_up"), b_down=lp.get("b_down"),
                          w_gate=lp.get("w_gate"), activation="none" if cfg.gated_mlp else cfg.activation,
                          layer=l, impl=impl)
        return y[:, None], None

    def layer_step(seg: Segment, carry, xs):
        x, k_all, v_all = carry
        l, n_heads, n_neurons = xs
        h = x if cfg.post_norm else layers.norm(cfg, _at(lp["attn_norm"], l), x)
        attn, k_all, v_all = attention(l, h, k_all, v_all, n_heads, seg)
        x = x + unproject(attn.reshape(B, T, N * H), l, lp["wo"], lp.get("bo"))
        if cfg.post_norm:
            x = layers.norm(cfg, _at(lp["attn_norm"], l), x)
        h2 = x if cfg.post_norm else layers.norm(cfg, _at(lp["mlp_norm"], l), x)
        y, hidden = mlp(l, h2, n_neurons, seg)
        x = x + y
        if cfg.post_norm:
            x = layers.norm(cfg, _at(lp["mlp_norm"], l), x)
        rec = None
        if collect:
            norms = jnp.sqrt(jnp.sum(jnp.square(attn.astype(jnp.float32)), axis=-1))  # [B, T, N]
            rec = Collected(h, hidden, norms)
        return (x, k_all, v_all), rec

    # One scan per run of layers with equal selection capacities (prefill: one run, all dense).
    segments = plan(sp, cfg, B, row_density is not None) if decode else [Segment(0, cfg.n_layers, None, None)]
    xs = (np.arange(cfg.n_layers, dtype=np.int32), sp.head_counts(cfg), sp.neuron_counts(cfg, B))
    table = cache.page_table
    carry, records = (x, cache.k, cache.v), []
    for seg in segments:
        carry, rec = jax.lax.scan(functools.partial(layer_step, seg), carry,
                                  tuple(jnp.asarray(a[seg.start:seg.stop]) for a in xs))
        records.append(rec)
    x, k_all, v_all = carry
    collected = records[0] if collect else None  # prefill runs a single segment

    if last_only:
        x = x[jnp.arange(B), jnp.maximum(n_new - 1, 0)]  # [B, D]
    logits = unembed(cfg, params, x)
    return logits, KVCache(k_all, v_all, table, starts + n_new), collected


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

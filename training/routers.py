"""Router parameters, their forward functions and their labels (the layout polar_jax/sparsity.py reads).

params["routers"] = {
  "attn": {"w": [L, D, K], "b": [L, K]}                 one logit per KV head (group), top-k per sequence
  "mlp":  {"w1": [L, D, R], "b1": [L, R],               R = 1024, no activation between the two
           "w2": [L, R, F], "b2": [L, F]}               one logit per neuron, per-token top-k, batch union
}
Per-layer functions below take one layer's slice (no L axis); training vmaps them over L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.config import ModelConfig

MLP_HIDDEN = 1024  # R


DEFAULT_ATTN_DENSITY = 0.5


def topk_count(frac: float, n: int, what: str = "--attn-density") -> int:
    """How many of n items a fraction keeps: the rounding SparsityConfig.head_counts uses, at least 1."""
    if not 0 < frac <= 1:
        raise ValueError(f"{what} must lie in (0, 1], got {frac}")
    return int(np.clip(np.floor(frac * n + 0.5), 1, n))  # halves round up (np.round would take 0.5 of 5 to 2)


def attn_group_count(n_kv: int, density: float | None = None, groups: int | None = None) -> int:
    """KV groups kept (or labelled positive) per token: `groups` itself, else the `density` fraction of
    n_kv (default DEFAULT_ATTN_DENSITY). The CLI's --attn-groups and --attn-density."""
    if groups is None:
        return topk_count(DEFAULT_ATTN_DENSITY if density is None else density, n_kv)
    if density is not None:
        raise ValueError("pass either --attn-density (a fraction) or --attn-groups (a count), not both")
    if not 1 <= groups <= n_kv:
        raise ValueError(f"--attn-groups must lie in 1..{n_kv} (the model's KV groups), got {groups}")
    return groups


def init_attn(cfg: ModelConfig, key: jax.Array) -> dict:
    L, D, K = cfg.n_layers, cfg.dim, cfg.n_kv_heads
    return {"w": jax.random.normal(key, (L, D, K)) * D ** -0.5, "b": jnp.zeros((L, K))}


def init_mlp(cfg: ModelConfig, key: jax.Array, hidden: int = MLP_HIDDEN) -> dict:
    L, D, F = cfg.n_layers, cfg.dim, cfg.mlp_dim
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (L, D, hidden)) * D ** -0.5, "b1": jnp.zeros((L, hidden)),
            "w2": jax.random.normal(k2, (L, hidden, F)) * hidden ** -0.5, "b2": jnp.zeros((L, F))}


def attn_logits(r: dict, h: jax.Array) -> jax.Array:
    """One layer: h [n, D] -> [n, K], as sparsity.attention_heads computes it."""
    return jnp.einsum("nd,dk->nk", h, r["w"], preferred_element_type=jnp.float32) + r["b"]


def mlp_logits(r: dict, h: jax.Array) -> jax.Array:
    """One layer: h [n, D] -> [n, F], as sparsity.mlp_neurons computes it."""
    z = jnp.einsum("nd,dr->nr", h, r["w1"], preferred_element_type=jnp.float32) + r["b1"]  # [n, R]
    return jnp.einsum("nr,rf->nf", z, r["w2"], preferred_element_type=jnp.float32) + r["b2"]


def group_norms(head_norms, n_kv_heads: int):
    """[..., N] per-head output norms -> [..., K] per-group: the norm of the group's concatenated output,
    sqrt(sum of its heads' squared norms), the quantity the oracle ranks at decode time."""
    x = jnp.asarray(head_norms, jnp.float32)
    g = x.reshape(*x.shape[:-1], n_kv_heads, -1)  # [..., K, G]
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """[..., X] -> bool [..., X]: True at the k largest scores of each row."""
    _, ids = jax.lax.top_k(scores, k)  # [..., k]
    return jnp.any(ids[..., :, None] == jnp.arange(scores.shape[-1]), axis=-2)


def attn_labels(head_norms, n_kv_heads: int, k: int) -> jax.Array:
    """bool [..., K]: the k KV groups with the largest output norm per token."""
    return topk_mask(group_norms(head_norms, n_kv_heads), k)


def cast(routers: dict, dtype) -> dict:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), routers)



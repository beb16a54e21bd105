"""Stateless building blocks shared by the OPT and LLaMA families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.config import ModelConfig


def norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis, statistics in fp32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + cfg.norm_eps)
        return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
    y = (xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + cfg.norm_eps)).astype(x.dtype)
    return p["scale"] * y  # HF LlamaRMSNorm: cast back to the input dtype, then scale


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[H/2] inverse frequencies, with LLaMA-3.1 frequency-dependent scaling when configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_positions / rs.low_freq_factor
    high_wavelen = rs.original_max_positions / rs.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_positions / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for integer positions [B, T] (HF rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def dense_mlp_hidden(cfg: ModelConfig, lp: dict, layer, x: jax.Array) -> jax.Array:
    """act(x @ W_up.T + b) (gated: silu(x @ W_gate.T) * (x @ W_up.T)) for one layer: [..., D] -> [..., F]."""
    up = jnp.einsum("...d,fd->...f", x, lp["w_up"][layer])
    if cfg.mlp_bias:
        up = up + lp["b_up"][layer]
    if cfg.gated_mlp:
        gate = jnp.einsum("...d,fd->...f", x, lp["w_gate"][layer])
        return activation(cfg.activation, gate) * up
    return activation(cfg.activation, up)


def dense_mlp_out(cfg: ModelConfig, lp: dict, layer, h: jax.Array) -> jax.Array:
    """h @ W_down (+ b): [..., F] -> [..., D]."""
    y = jnp.einsum("...f,fd->...d", h, lp["w_down"][layer])
    return y + lp["b_down"][layer] if cfg.mlp_bias else y

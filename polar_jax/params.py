"""The one parameter pytree shared by conversion, the model, the kernels and router training.

Every matrix of a layer is stored [rows, D] with rows the dimension that sparsity selects (heads'
features, MLP neurons), so selecting rows reads contiguous memory, and one row-gathering GEMM family
(pallas_kernels/selective_gemm) serves every decode projection: "up" (x @ W[rows].T) and "down" (h @ W[rows]).

Layout (nested dicts of arrays; layers stacked on a leading L axis):

  embed            [V, E]            token embeddings (also the LM head when tied)
  pos_embed        [P + 2, D]        OPT learned positions; row p + 2 is position p (HF offset 2)
  project_in       [E, D]            OPT-350m only (x @ project_in)
  project_out      [D, E]            OPT-350m only
  final_norm       {scale [D], bias [D]}      absent for post-norm OPT; bias only for LayerNorm
  lm_head          [V, E]            untied models only (logits = x @ lm_head.T)
  layers:
    attn_norm      {scale [L, D], bias [L, D]}
    wqkv           [L, (N+2K)*H, D]  output-major: [q; k; v] = x @ wqkv[l].T, one projection for all three;
                                     q head n is rows n*H:(n+1)*H, then the K k heads, then the K v heads
    bqkv           [L, (N+2K)*H]     qkv_bias only
    wo             [L, N*H, D]       input-major: o = attn @ wo[l]; bo [L, D] when out_bias
    mlp_norm       {scale [L, D], bias [L, D]}
    w_up           [L, F, D]         neuron-major: neuron f is row f (x @ w_up[l].T)
    w_gate         [L, F, D]         gated (SwiGLU) models only
    w_down         [L, F, D]         neuron-major: y = h @ w_down[l]
    b_up           [L, F]            mlp_bias only; b_down [L, D]
  routers          (optional) learned routers, see training/
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polar_jax.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of shape tuples: the contract every producer and consumer of params checks against."""
    L, D, E, F, V = cfg.n_layers, cfg.dim, cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
    NH, KH = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def norm(*lead):
        out = {"scale": (*lead, D)}
        if cfg.norm == "layer":
            out["bias"] = (*lead, D)
        return out

    layers = {
        "attn_norm": norm(L), "mlp_norm": norm(L),
        "wqkv": (L, NH + 2 * KH, D), "wo": (L, NH, D),
        "w_up": (L, F, D), "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers["bqkv"] = (L, NH + 2 * KH)
    if cfg.out_bias:
        layers["bo"] = (L, D)
    if cfg.gated_mlp:
        layers["w_gate"] = (L, F, D)
    if cfg.mlp_bias:
        layers |= {"b_up": (L, F), "b_down": (L, D)}

    shapes = {"embed": (V, E), "layers": layers}
    if cfg.positions == "learned":
        shapes["pos_embed"] = (cfg.max_positions + 2, D)
    if cfg.has_project:
        shapes |= {"project_in": (E, D), "project_out": (D, E)}
    if cfg.has_final_norm:
        shapes["final_norm"] = norm()
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (V, E)
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def qkv_rows(cfg: ModelConfig, part: str) -> tuple[int, int]:
    """Rows [start, stop) of q, k or v inside wqkv / bqkv."""
    NH, KH = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (0, NH), "k": (NH, NH + KH), "v": (NH + KH, NH + 2 * KH)}[part]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters at the config's real shapes (benchmarks of large shapes, tests).

    Norm scales are near 1 and biases small, so activations stay in a realistic range at any depth.
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "scale" in path:
            x = 1.0 + 0.1 * jax.random.normal(k, shape)
        elif "bias" in path or "'b" in path:
            x = 0.02 * jax.random.normal(k, shape)
        else:
            fan_in = shape[-2] if path.endswith(("w_down']", "wo']", "project_in']", "project_out']")) else shape[-1]
            x = jax.random.normal(k, shape) / jnp.sqrt(fan_in)
        out.append(x.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Raise ValueError naming the first tensor whose presence or shape differs from the contract."""
    expected = param_shapes(cfg)

    def walk(exp, got, prefix):
        for name, e in exp.items():
            where = f"{prefix}{name}"
            if name not in got:
                raise ValueError(f"parameter {where!r} is missing (model {cfg.name})")
            if isinstance(e, dict):
                walk(e, got[name], where + ".")
            elif tuple(got[name].shape) != e:
                raise ValueError(f"parameter {where!r} has shape {tuple(got[name].shape)}, config {cfg.name} "
                                 f"expects {e}")
        extra = set(got) - set(exp) - {"routers"}
        if extra:
            raise ValueError(f"unexpected parameters {sorted(prefix + x for x in extra)} for model {cfg.name}")

    walk(expected, params, "")

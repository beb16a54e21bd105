"""Decode-mode perplexity: accuracy measured through the same sparse decode path that gives the speedup.

Each window of W = prefix + decode_len + 1 tokens is prefilled densely for its first `prefix` tokens, then
fed one token per step through model.forward's decode path (T == 1: the selective-head attention and
selective-GEMM kernels, with the configured sparsity), teacher-forced. The NLL is taken over the
decode_len tokens predicted by decode steps only (the prefill's own prediction is dense, so it is left
out). Several windows run as one batch; the steps run as one jitted lax.scan.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from polar_jax.cache import init_cache
from polar_jax.checkpoint import write_whole
from polar_jax.config import ModelConfig
from polar_jax.model import PREFILL_COMPILER_OPTIONS, forward
from polar_jax.sparsity import SparsityConfig
from polar_jax.sparsity import check_routers
from training.routers import topk_count

SWEEP_SOURCES = ("router", "oracle")


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] fp32, targets [...] -> [...] negative log-likelihood."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def decode_nll(cfg: ModelConfig, params: dict, windows: jax.Array, prefix: int, sparsity: SparsityConfig | None,
               key: jax.Array) -> jax.Array:
    """windows [B, W] -> NLL [B, W - prefix - 1] of tokens prefix+1 .. W-1, each predicted by a decode step."""
    B, W = windows.shape
    sp = (sparsity or SparsityConfig()).for_batch(B)
    cache = init_cache(cfg, B, W, params["embed"].dtype)
    _, cache, _ = forward(cfg, params, windows[:, :prefix], cache, last_only=True)  # dense prefill

    def step(cache, t):
        tok = jax.lax.dynamic_slice_in_dim(windows, t, 1, axis=1)  # [B, 1]
        logits, cache, _ = forward(cfg, params, tok, cache, sparsity=sp, key=jax.random.fold_in(key, t))
        target = jax.lax.dynamic_index_in_dim(windows, t + 1, axis=1, keepdims=False)  # [B]
        return cache, _nll(logits[:, 0], target)

    _, nll = jax.lax.scan(step, cache, jnp.arange(prefix, W - 1))  # [M, B]
    return nll.T


def full_nll(cfg: ModelConfig, params: dict, windows: jax.Array, prefix: int) -> jax.Array:
    """The same positions' NLL from one dense forward over whole windows: [B, W - prefix - 1]."""
    B, W = windows.shape
    logits, _, _ = forward(cfg, params, windows, init_cache(cfg, B, W, params["embed"].dtype))  # [B, W, V]
    return _nll(logits[:, prefix:-1], windows[:, prefix + 1:])


_decode_nll_jit = jax.jit(decode_nll, static_argnames=("cfg", "prefix", "sparsity"),
                          compiler_options=PREFILL_COMPILER_OPTIONS)


def perplexity(cfg: ModelConfig, params: dict, windows: np.ndarray, prefix: int, sparsity: SparsityConfig | None,
               batch: int = 16, seed: int | None = None, progress: bool = True, desc: str = "eval") -> dict:
    """Decode-mode perplexity over windows [n, W]: {"ppl", "nll", "tokens"}. seed keys random head / neuron
    selection (default: the sparsity config's seed, as the engine's)."""
    n, W = windows.shape
    if not 1 <= prefix <= W - 2:
        raise ValueError(f"prefix {prefix} must leave at least one decode step in windows of {W} tokens")
    if sparsity is not None:
        check_routers(cfg, params, sparsity)
    if seed is None:
        seed = sparsity.seed if sparsity is not None else 0
    key = jax.random.key(seed)
    batch = min(batch, n)
    total, count = 0.0, 0
    for i in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=not progress):
        w = windows[i: i + batch]
        real = len(w)
        if real < batch:  # pad with copies to the compiled batch shape; their NLL is dropped
            w = np.concatenate([w, np.repeat(w[-1:], batch - real, 0)])
        sp = None if sparsity is None else sparsity.for_batch(real)  # a calibrated table: the real windows' k
        nll = np.asarray(_decode_nll_jit(cfg, params, jnp.asarray(w), prefix, sp, jax.random.fold_in(key, i)))
        total += float(nll[:real].astype(np.float64).sum())
        count += nll[:real].size
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def eval_windows(cfg: ModelConfig, tokens: np.ndarray, prefix: int, decode_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows [n, prefix + decode_len + 1] covering about max_tokens decoded tokens."""
    if prefix < 1 or decode_len < 1:
        raise ValueError(f"--prefix and --decode-len must be >= 1, got {prefix} and {decode_len}")
    W = prefix + decode_len + 1
    if W > cfg.max_positions:  # RoPE runs past it too, but measures extrapolation, not the model
        raise ValueError(f"windows of {W} tokens (prefix + decode-len + 1) exceed the {cfg.max_positions}-token "
                         f"context of {cfg.name}; lower --prefix or --decode-len")
    n = len(tokens) // W
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {W}")
    n = min(n, max(1, -(-max_tokens // decode_len)))
    return tokens[: n * W].reshape(n, W)


def head_sparsity(source: str, density: float, cfg: ModelConfig) -> SparsityConfig:
    """Head (KV-group) sparsity from `source` at `density`, layer 0 dense, MLP dense."""
    topk_count(density, cfg.n_kv_heads, "attention density")
    if source not in ("router", "oracle", "random"):
        raise ValueError(f"--source {source!r}; choose router, oracle or random")
    return SparsityConfig(attn=source, attn_density=density)


def default_densities(cfg: ModelConfig) -> list[float]:
    K = cfg.n_kv_heads
    return [k / K for k in range(1, K + 1)] if K <= 8 else [d / 10 for d in range(1, 11)]


def sweep(cfg: ModelConfig, params: dict, windows: np.ndarray, prefix: int, densities: list[float], batch: int = 16,
          sources=SWEEP_SOURCES, seed: int | None = None, progress: bool = True) -> dict:
    """Perplexity for dense and for each source at each head density: {"dense": {...}, "rows": [...]}."""
    have_router = "attn" in (params.get("routers") or {})
    sources = [s for s in sources if s != "router" or have_router]
    if not have_router:
        print("note: the model has no attention router; sweeping the oracle only")
    dense = perplexity(cfg, params, windows, prefix, None, batch, seed, progress, desc="dense")
    rows = []
    for d in densities:
        for s in sources:
            sp = head_sparsity(s, d, cfg)
            k = int(sp.head_counts(cfg)[-1])
            r = perplexity(cfg, params, windows, prefix, sp, batch, seed, progress, desc=f"{s} {k}/{cfg.n_kv_heads}")
            rows.append({"source": s, "density": d, "groups": k, **r})
            print(f"  {s:>7} {k}/{cfg.n_kv_heads} groups: ppl {r['ppl']:.3f}")
    return {"dense": dense, "rows": rows}


def format_sweep(result: dict, n_kv: int) -> str:
    lines = [f"| heads (KV groups) kept | {' | '.join(sorted({r['source'] for r in result['rows']}))} |"]
    lines.append("|---" * (1 + len({r['source'] for r in result['rows']})) + "|")
    by = {}
    for r in result["rows"]:
        by.setdefault(r["groups"], {})[r["source"]] = r["ppl"]
    for g in sorted(by):
        lines.append(f"| {g}/{n_kv} | " + " | ".join(f"{by[g][s]:.3f}" for s in sorted(by[g])) + " |")
    d = result["dense"]
    lines.append(f"\ndense decode-mode perplexity: {d['ppl']:.3f} over {d['tokens']} tokens")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot (Agg backend); ValueError when matplotlib, an optional extra, is not installed. The sweep
    calls it before its work too, so a missing plotter does not fail it at the end."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the --sweep plot needs matplotlib (pip install matplotlib)") from None
    return plt


def plot_sweep(result: dict, cfg: ModelConfig, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s, style in (("router", "o-"), ("oracle", "s--"), ("random", "^:")):
        pts = sorted((r["groups"] / cfg.n_kv_heads, r["ppl"]) for r in result["rows"] if r["source"] == s)
        if pts:
            ax.plot(*zip(*pts), style, label=f"{s} top-k")
    ax.axhline(result["dense"]["ppl"], color="k", lw=1, label="dense")
    ax.set_yscale("log")  # sparse perplexities can be 10x the dense one; a log axis keeps both readable
    ax.set_xlabel("fraction of KV groups kept (layer 0 dense)")
    ax.set_ylabel("decode-mode perplexity")
    ax.set_title(f"{cfg.name}: {result['dense']['tokens']} decoded tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(result: dict, cfg: ModelConfig, prefix_path, meta: dict, router_metrics: dict | None) -> list[Path]:
    """PREFIX.json, PREFIX.md and PREFIX.png of a sweep; the router's per-layer recall when known."""
    base = Path(prefix_path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, **result}
    md = [f"# Head sparsity vs decode-mode perplexity: {cfg.name}", "", "```", meta.get("command", ""), "```", "",
          f"Text: {meta.get('text')}; {result['dense']['tokens']} decoded tokens (windows of {meta.get('window')}: "
          f"dense prefill of {meta.get('prefix')}, then teacher-forced decode steps through the sparse kernels). "
          "Layer 0 dense; MLP dense.", "", format_sweep(result, cfg.n_kv_heads)]
    if router_metrics and "attn" in router_metrics:
        a = router_metrics["attn"]
        out["router_metrics"] = router_metrics
        md += ["", f"## Attention router per layer (test split of the {router_metrics.get('tokens')} collected tokens "
               f"of {router_metrics.get('source')}; labels: top-{a['topk']} groups by output norm)", "",
               "| layer | top-k recall | recall (p>0.5) | precision (p>0.5) |", "|---|---|---|---|"]
        m = a["metrics"]
        md += [f"| {l} | {m['topk_recall'][l]:.3f} | {m['recall'][l]:.3f} | {m['precision'][l]:.3f} |"
               for l in range(len(m["loss"]))]
        md += ["| mean | " + " | ".join(f"{np.mean(m[c]):.3f}" for c in ("topk_recall", "recall", "precision")) + " |"]
    paths = [base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")]
    write_whole(paths[0], json.dumps(out, indent=1))
    write_whole(paths[1], "\n".join(md) + "\n")
    plot_sweep(result, cfg, paths[2])
    return paths

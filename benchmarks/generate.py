"""End-to-end decode throughput on the GPU: dense and sparse decode steps against the HBM roofline.

One decode step at a fixed context (every sequence holds `ctx` cached tokens; the step rewrites the same
position so the context does not drift while timing). The roofline is the bytes one step must read
(weights once + the KV slabs it attends to) over the copy bandwidth measured in the same run.

    python -m benchmarks.generate                # everything (dense sweep + sparse sweep)
    python -m benchmarks.generate --part dense   # issue 2: smollm2-135m and llama-2-7b, B 1/16/64, ctx 512/2048
    python -m benchmarks.generate --part sparse  # issue 3: dense vs sparse heads, B 16/64/128, ctx 2048
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, copy_bandwidth, metadata, write_results
from benchmarks.shapes import DENSE_CASES, SPARSE_CASES, SPARSE_MODES
from polar_jax.cache import KVCache, cache_bytes
from polar_jax.config import ModelConfig, preset
from polar_jax.model import forward
from polar_jax.params import init_params
from polar_jax.sparsity import SparsityConfig

DTYPE = jnp.bfloat16
GPU_BYTES = None  # filled from the device at start


def step_bytes(cfg: ModelConfig, params: dict, B: int, ctx: int, sp: SparsityConfig | None) -> float:
    """Bytes one decode step must read: every weight once (B rows of the embedding table) + KV slabs."""
    leaves = jax.tree_util.tree_leaves({k: v for k, v in params.items() if k not in ("embed", "routers")})
    weights = sum(x.size * x.dtype.itemsize for x in leaves)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    weights += head.size * head.dtype.itemsize + B * cfg.embed_dim * 2 * (not cfg.tie_embeddings)
    per_layer_kv = cache_bytes(cfg, B, ctx + 1, DTYPE) / cfg.n_layers
    if sp is None or sp.attn == "all":
        kv = per_layer_kv * cfg.n_layers
    else:
        kv = float((sp.head_counts(cfg) / cfg.n_kv_heads).sum()) * per_layer_kv
    return weights + kv


def random_cache(cfg: ModelConfig, B: int, ctx: int) -> KVCache:
    S = ctx + 128
    shape = (cfg.n_layers, B, cfg.n_kv_heads, S, cfg.head_dim)

    @jax.jit
    def make(key):  # one layer at a time, so no full-size fp32 temporary
        keys = jax.random.split(key, cfg.n_layers)
        return jax.lax.map(lambda k: jax.random.normal(k, shape[1:], DTYPE), keys)

    return KVCache(make(jax.random.key(1)), make(jax.random.key(2)), jnp.full((B,), ctx, jnp.int32))


def random_routers(cfg: ModelConfig, key) -> dict:
    """Attention routers with random weights: the same cost as trained ones."""
    w = jax.random.normal(key, (cfg.n_layers, cfg.dim, cfg.n_kv_heads), DTYPE) / np.sqrt(cfg.dim)
    return {"attn": {"w": w, "b": jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.float32)}}


def time_steps(step, params, cache, tokens, *, inner: int = 10, reps: int = 7) -> tuple[float, KVCache]:
    key = jax.random.key(0)
    for _ in range(3):
        tokens, cache = step(params, cache, tokens, key)
    jax.block_until_ready(tokens)
    samples = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            tokens, cache = step(params, cache, tokens, jax.random.fold_in(key, r * inner + i))
        jax.block_until_ready(tokens)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), cache


def make_step(cfg: ModelConfig, sp: SparsityConfig | None):
    def step(params, cache, tokens, key):
        logits, new, _ = forward(cfg, params, tokens[:, None], cache, sparsity=sp, key=key)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), new.replace(lengths=cache.lengths)

    return jax.jit(step, donate_argnums=1)


def fits(cfg: ModelConfig, B: int, ctx: int) -> bool:
    weights = sum(s.size for s in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), DTYPE)))) * 2
    return weights + cache_bytes(cfg, B, ctx + 128, DTYPE) < 0.85 * GPU_BYTES


def load_model(name: str, smollm2_dir: str | None):
    if name == "smollm2-135m" and smollm2_dir and (Path(smollm2_dir) / "config.json").is_file():
        from polar_jax.checkpoint import load

        cfg, params, _ = load(smollm2_dir)
        return cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, DTYPE), params), "real"
    cfg = preset(name)
    params = jax.jit(lambda k: init_params(cfg, k, DTYPE))(jax.random.key(0))
    return cfg, params, "random"


def run_cases(cases, modes, bw, smollm2_dir) -> list[dict]:
    records = []
    by_model: dict[str, list] = {}
    for name, B, ctx in cases:
        by_model.setdefault(name, []).append((B, ctx))
    for name, shapes in by_model.items():
        cfg, params, weights = load_model(name, smollm2_dir)
        params = dict(params, routers=random_routers(cfg, jax.random.key(3)))
        for B, ctx in shapes:
            if not fits(cfg, B, ctx):
                print(f"skip {name} B={B} ctx={ctx}: weights + cache exceed GPU memory", flush=True)
                continue
            cache = random_cache(cfg, B, ctx)
            tokens = jax.random.randint(jax.random.key(4), (B,), 0, cfg.vocab_size, jnp.int32)
            dense_ms = None
            for mode, density in modes:
                sp = None if mode == "dense" else SparsityConfig(attn=mode, attn_density=density)
                ms, cache = time_steps(make_step(cfg, sp), params, cache, tokens)
                nbytes = step_bytes(cfg, params, B, ctx, sp)
                dense_ms = ms if mode == "dense" else dense_ms
                rec = dict(model=name, weights=weights, B=B, ctx=ctx, mode=mode, density=density, ms=ms,
                           tokens_per_s=B / (ms * 1e-3), GB_per_step=nbytes / 1e9,
                           roofline_frac=nbytes / bw / (ms * 1e-3))
                if mode != "dense":
                    rec["speedup"] = dense_ms / ms
                    rec["bw_bound_speedup"] = step_bytes(cfg, params, B, ctx, None) / nbytes
                    rec["frac_of_bw_bound"] = rec["speedup"] / rec["bw_bound_speedup"]
                records.append(rec)
                print(f"{name:14s} B={B:4d} ctx={ctx:5d} {mode:7s} {density:.2f}: {ms:8.3f} ms/step "
                      f"{rec['tokens_per_s']:9.0f} tok/s  roofline {rec['roofline_frac']:.2f}"
                      + (f"  speedup {rec['speedup']:.2f} (bw-bound {rec['bw_bound_speedup']:.2f})"
                         if mode != "dense" else ""), flush=True)
            del cache
            gc.collect()
        del params
        gc.collect()
    return records


def main(argv=None) -> None:
    global GPU_BYTES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["dense", "sparse", "all"], default="all")
    ap.add_argument("--smollm2-dir", default="models/smollm2-135m-instruct",
                    help="converted SmolLM2 model dir (real weights); random weights when absent")
    ap.add_argument("--quick", action="store_true", help="a few cases only (smoke test)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the result files (default benchmarks/results)")
    args = ap.parse_args(argv)
    stats = jax.devices()[0].memory_stats() or {}
    GPU_BYTES = stats.get("bytes_limit", 16 << 30)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {jax.devices()[0].device_kind}", flush=True)
    command = "python -m benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["model", "weights", "B", "ctx", "mode", "density", "ms", "tokens_per_s", "GB_per_step",
            "roofline_frac", "speedup", "bw_bound_speedup", "frac_of_bw_bound"]
    if args.part in ("dense", "all"):
        cases = DENSE_CASES[:2] if args.quick else DENSE_CASES
        recs = run_cases(cases, [("dense", 1.0)], bw, args.smollm2_dir)
        write_results("generate_dense", dict(metadata(command), copy_bw_TBps=bw / 1e12), recs, cols, Path(args.out))
    if args.part in ("sparse", "all"):
        cases = SPARSE_CASES[:1] if args.quick else SPARSE_CASES
        recs = run_cases(cases, SPARSE_MODES, bw, args.smollm2_dir)
        write_results("generate_sparse", dict(metadata(command), copy_bw_TBps=bw / 1e12), recs, cols, Path(args.out))


if __name__ == "__main__":
    main()

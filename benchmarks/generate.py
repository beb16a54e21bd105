"""End-to-end decode throughput on the GPU: dense and sparse decode steps against the HBM roofline.

One decode step at a fixed context: every sequence holds ctx - 1 cached tokens and the step attends over
ctx positions, its own token included, in a cache of exactly ctx positions (the capacity an engine with
max_model_len = ctx has, and the one `polar tune --ctx` tunes the paged kernel for; the step rewrites the
same position so the context does not drift while timing). Clock: wall (host-timed pipelined steps). The
roofline is the bytes one step must read (`step_bytes`: every weight once, the embedding rows of the B
tokens, the KV slabs it attends to) over the streaming-read bandwidth measured in the same run (the
ceiling; the copy bandwidth is reported as information). Densities are reported as run: the KV heads
(groups) kept per sparse layer and their fraction, next to the density asked for.

    python -m benchmarks.generate                # everything (dense sweep + sparse sweep)
    python -m benchmarks.generate --part dense   # issue 2: smollm2-135m and llama-2-7b, B 1/16/64, ctx 512/2048
    python -m benchmarks.generate --part sparse  # issue 3: dense vs sparse heads, B 16/64/128, ctx 2048
    python -m benchmarks.generate --part dense --cases llama-3-8b:48:2048,llama-2-7b:16:2048 --name generate_steps
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.shapes import DENSE_CASES, SPARSE_CASES, SPARSE_MODES
from polar_jax import ModelConfig, SparsityConfig, forward, init_cache, init_params, preset
from polar_jax.model import PREFILL_COMPILER_OPTIONS

DTYPE = jnp.bfloat16


def _nbytes(x) -> int:
    return x.size * jnp.dtype(x.dtype).itemsize


def weight_bytes(cfg: ModelConfig, params: dict, B: int) -> int:
    """Weight bytes one decode step reads: every matrix once, but only the B rows of the token (and, for
    learned positions, position) embeddings; a tied embedding table is read whole as the LM head.
    params: arrays or ShapeDtypeStructs; routers are left out (see step_bytes)."""
    total = 0
    for name, value in params.items():
        if name in ("routers", "embed", "pos_embed"):
            continue
        total += sum(_nbytes(x) for x in jax.tree_util.tree_leaves(value))
    embed = params["embed"]  # [V, E]
    row = _nbytes(embed) // embed.shape[0]
    total += _nbytes(embed) if cfg.tie_embeddings else B * row
    if "pos_embed" in params:
        pos = params["pos_embed"]
        total += B * _nbytes(pos) // pos.shape[0]
    return total


def router_bytes(params: dict, sp: SparsityConfig | None) -> int:
    """Bytes of the routers a step reads: the attention router when heads are routed, the MLP one likewise."""
    if sp is None or "routers" not in params:
        return 0
    used = [k for k, mode in (("attn", sp.attn), ("mlp", sp.mlp)) if mode == "router" and k in params["routers"]]
    return sum(_nbytes(x) for k in used for x in jax.tree_util.tree_leaves(params["routers"][k]))


def heads_kept(cfg: ModelConfig, sp: SparsityConfig | None) -> np.ndarray:
    """[L] KV heads (groups) a step attends to in each layer."""
    return np.full(cfg.n_layers, cfg.n_kv_heads) if sp is None else sp.head_counts(cfg)


def kv_bytes(cfg: ModelConfig, B: int, ctx: int, kept: np.ndarray, dtype=DTYPE) -> int:
    """K and V bytes a step reads: the kept heads' slabs over ctx + 1 positions (ctx cached and the new token)."""
    return int(2 * B * int(np.sum(kept)) * (ctx + 1) * cfg.head_dim * jnp.dtype(dtype).itemsize)


def step_bytes(cfg: ModelConfig, params: dict, B: int, ctx: int, sp: SparsityConfig | None) -> int:
    """Bytes one decode step must read: weights (`weight_bytes`), routers in use, KV slabs of the kept heads."""
    return weight_bytes(cfg, params, B) + router_bytes(params, sp) + kv_bytes(cfg, B, ctx, heads_kept(cfg, sp))


def density_labels(cfg: ModelConfig, sp: SparsityConfig | None, requested: float) -> dict:
    """What ran: KV heads kept per sparse layer ("2/8"), that as a fraction, over all layers, and what was asked."""
    kept = heads_kept(cfg, sp)
    K = cfg.n_kv_heads
    sparse = np.ones(cfg.n_layers, bool)
    if sp is not None and sp.attn != "all":
        sparse[list(sp.dense_layers)] = False
    per_layer = np.unique(kept[sparse]) if sparse.any() else np.unique(kept)
    kept_s = "/".join(str(int(c)) for c in per_layer) + f" of {K}"
    return dict(density_requested=requested, kv_heads_kept=kept_s, density=float(np.mean(kept[sparse] / K)) if
                sparse.any() else 1.0, density_all_layers=float(np.sum(kept) / (K * cfg.n_layers)))


@functools.partial(jax.jit, donate_argnums=0)
def fill_random(x, key):
    """x with standard-normal values, written in place one leading index at a time (x is donated, and the
    loop updates it, so only one [x.shape[1:]] slab is ever allocated beside it: an H200 ran out of memory at
    llama-2-7b B = 64 when a fill built its output next to its input)."""
    def body(i, x):
        slab = jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype)
        return jax.lax.dynamic_update_index_in_dim(x, slab, i, 0)
    return jax.lax.fori_loop(0, x.shape[0], body, x)


def random_cache(cfg: ModelConfig, B: int, ctx: int, room: int = 128):
    """A cache from `init_cache` with every floating-point buffer (the K and V data, whatever the layout)
    filled with random values in place (`fill_random`) and every sequence `ctx` tokens long, with room for
    `room` more. Returns once the buffers are written."""
    cache = init_cache(cfg, B, ctx + room, DTYPE)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    leaves = [fill_random(x, jax.random.key(i + 1)) if jnp.issubdtype(x.dtype, jnp.floating) else x
              for i, x in enumerate(leaves)]
    cache = jax.tree_util.tree_unflatten(treedef, leaves)
    return jax.block_until_ready(cache.replace(lengths=jnp.full((B,), ctx, jnp.int32)))


def random_routers(cfg: ModelConfig, key) -> dict:
    """Attention routers with random weights: the same cost as trained ones."""
    w = jax.random.normal(key, (cfg.n_layers, cfg.dim, cfg.n_kv_heads), DTYPE) / np.sqrt(cfg.dim)
    return {"attn": {"w": w, "b": jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.float32)}}


def time_steps(step, params, cache, tokens, *, inner: int = 10, reps: int = 7):
    """(median wall ms per step, cache): pipelined steps, blocking once per `inner`.

    Every step gets a key of its own, all made before the clock starts: a `jax.random.fold_in` between the
    steps is a dispatch of its own that cost 0.17-0.33 ms a step on an H100 (`benchmarks.probe_dispatch
    --fold-in`), which the serving engine does not pay (it derives each step's key inside its program)."""
    key = jax.random.key(0)
    for _ in range(3):
        tokens, cache = step(params, cache, tokens, key)
    keys = list(jax.random.split(jax.random.fold_in(key, 1), reps * inner))
    jax.block_until_ready((tokens, keys))
    samples = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            tokens, cache = step(params, cache, tokens, keys[r * inner + i])
        jax.block_until_ready(tokens)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), cache


def make_step(cfg: ModelConfig, sp: SparsityConfig | None):
    def step(params, cache, tokens, key):
        logits, new, _ = forward(cfg, params, tokens[:, None], cache, sparsity=sp, key=key)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), new.replace(lengths=cache.lengths)

    return jax.jit(step, donate_argnums=1)


def make_prefill_step(cfg: ModelConfig):
    """tokens [B, T] appended after each sequence's cached ones (dense prefill); the cache's lengths are kept,
    so the step can be repeated."""
    def step(params, cache, tokens, key):
        del key
        logits, new, _ = forward(cfg, params, tokens, cache, last_only=True)
        return jnp.argmax(logits, -1).astype(jnp.int32), new.replace(lengths=cache.lengths)

    return jax.jit(step, donate_argnums=1, compiler_options=PREFILL_COMPILER_OPTIONS)


def fits(cfg: ModelConfig, B: int, ctx: int) -> bool:
    shapes = jax.eval_shape(lambda: (init_params(cfg, jax.random.key(0), DTYPE), init_cache(cfg, B, ctx + 128, DTYPE)))
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16 << 30)  # 16 GiB where unknown (CPU)
    return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(shapes)) < 0.85 * limit


def load_model(name: str, smollm2_dir: str | None):
    if name == "smollm2-135m" and smollm2_dir and (Path(smollm2_dir) / "config.json").is_file():
        from polar_jax import load

        cfg, params, _ = load(smollm2_dir)
        return cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, DTYPE), params), "real"
    cfg = preset(name)
    params = jax.jit(lambda k: init_params(cfg, k, DTYPE))(jax.random.key(0))
    return cfg, params, "random"


def run_cases(cases, modes, read_bw, smollm2_dir) -> list[dict]:
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
            cache = random_cache(cfg, B, ctx - 1, room=1)  # ctx positions in all: the tuned capacity
            tokens = jax.random.randint(jax.random.key(4), (B,), 0, cfg.vocab_size, jnp.int32)
            dense_ms = None
            for mode, density in modes:
                sp = None if mode == "dense" else SparsityConfig(attn=mode, attn_density=density)
                try:
                    ms, cache = time_steps(make_step(cfg, sp), params, cache, tokens)
                except jax.errors.JaxRuntimeError as e:
                    # `fits` counts weights and cache only, not the step's own temporaries (a sparse mode's,
                    # a tight memory fraction): say so and go on to the next case.
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    print(f"skip {name} B={B} ctx={ctx} {mode}: out of GPU memory in the step "
                          f"({str(e).splitlines()[0][:160]})", flush=True)
                    break
                nbytes = step_bytes(cfg, params, B, ctx - 1, sp)
                dense_ms = ms if mode == "dense" else dense_ms
                rec = dict(model=name, weights=weights, B=B, ctx=ctx, mode=mode, **density_labels(cfg, sp, density),
                           ms_wall=ms, tokens_per_s_wall=B / (ms * 1e-3), GB_per_step=nbytes / 1e9,
                           roofline_frac_wall=nbytes / read_bw / (ms * 1e-3))
                if mode != "dense":
                    rec["speedup_wall"] = dense_ms / ms
                    rec["bw_bound_speedup"] = step_bytes(cfg, params, B, ctx - 1, None) / nbytes
                    rec["frac_of_bw_bound_wall"] = rec["speedup_wall"] / rec["bw_bound_speedup"]
                records.append(rec)
                print(f"{name:14s} B={B:4d} ctx={ctx:5d} {mode:7s} {rec['kv_heads_kept']:>9s} kv heads: "
                      f"{ms:8.3f} ms/step {rec['tokens_per_s_wall']:9.0f} tok/s  "
                      f"roofline {rec['roofline_frac_wall']:.2f}"
                      + (f"  speedup {rec['speedup_wall']:.2f} (bw-bound {rec['bw_bound_speedup']:.2f})"
                         if mode != "dense" else ""), flush=True)
            del cache
            gc.collect()
        del params
        gc.collect()
    return records


COLUMNS = ["model", "weights", "B", "ctx", "mode", "density_requested", "kv_heads_kept", "density", "ms_wall",
           "tokens_per_s_wall", "GB_per_step", "roofline_frac_wall", "speedup_wall", "bw_bound_speedup",
           "frac_of_bw_bound_wall"]
CLOCKS = ["wall: host-timed pipelined decode steps (`*_wall` columns; no profiler clock here)",
          "roofline_frac = (GB_per_step / read ceiling) / ms; bw_bound_speedup = dense bytes / sparse bytes; "
          "density = KV heads kept / K in the sparse layers (layer 0 stays dense)"]


def _label(r: dict) -> str:
    return f"{r['model']} B={r['B']} ctx={r['ctx']} {r['mode']} {r['kv_heads_kept']}"


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    """MODEL:B:CTX,... -> [(model preset, batch, context)]; the preset is checked when it loads."""
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) < 1:
            raise argparse.ArgumentTypeError(f"a case is MODEL:B:CTX (e.g. llama-3-8b:48:2048), got {item!r}")
        cases.append((parts[0], int(parts[1]), int(parts[2])))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["dense", "sparse", "all"], default="all")
    ap.add_argument("--smollm2-dir", default="models/smollm2-135m-instruct",
                    help="converted SmolLM2 model dir (real weights); random weights when absent")
    ap.add_argument("--quick", action="store_true", help="a few cases only (smoke test)")
    ap.add_argument("--cases", type=parse_cases, metavar="MODEL:B:CTX,...",
                    help="these cases instead of the part's list (one --part: dense or sparse)")
    ap.add_argument("--name", help="result file name (default generate_PART)")
    ap.add_argument("--out", default=str(common.RESULTS), help="result folder (default benchmarks/results)")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    if (args.cases or args.name) and args.part == "all":
        ap.error("--cases and --name take one --part (dense or sparse)")
    common.require_gpu("benchmarks.generate", args.allow_cpu)
    common.check_out_dir(Path(args.out))
    ceiling = common.measure_ceiling()
    command = "python -m benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(common.metadata(command.strip()), **common.ceiling_meta(ceiling), clocks=CLOCKS)
    warned = False
    for part, all_cases, modes in [("dense", DENSE_CASES, [("dense", 1.0)]), ("sparse", SPARSE_CASES, SPARSE_MODES)]:
        if args.part not in (part, "all"):
            continue
        cases = args.cases or (all_cases[:2 if part == "dense" else 1] if args.quick else all_cases)
        recs = run_cases(cases, modes, ceiling["read_bw"], args.smollm2_dir)
        warnings = common.check_ceiling(recs, ["roofline_frac_wall"], _label)
        common.write_results(args.name or f"generate_{part}", dict(meta, warnings=warnings), recs, COLUMNS,
                             Path(args.out))
        warned |= bool(warnings)
    return 3 if warned else 0


if __name__ == "__main__":
    sys.exit(main())

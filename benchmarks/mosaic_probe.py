"""One-shot GPU probe of the Mosaic GPU decode-attention prototype (pallas_kernels/decode_attention/mosaic.py)
against today's Triton-backed kernel (the public `decode_attention`).

  python -m benchmarks.mosaic_probe --out OUT/mosaic_probe.json     (Hopper GPU; ~1-2 min)

1. Correctness: each Mosaic config is compiled and checked against the f32 reference at two shapes (GQA
   bf16 with ragged lengths, MHA fp16 at H = 64); a config stops at its first mismatch (max relative
   error printed) or compile failure (first line printed, whole message in the JSON) and is not timed.
2. Timing: llama-2-7b (N = K = 32) and llama-3-8b (N = 32, K = 8) shapes, H = 128, B = 16 / 64, S = 2048,
   bf16, every length = S: the public decode_attention (Triton on a GPU), the XLA reference, and each
   config that passed, and the first such config's kernel alone (`padded_attention`: without the query
   padding and output slicing around it). Each timed jit call is a chain of calls alternating between two
   cache sets (each larger than the 50 MB L2) with fresh q per call; figures are per call (wall clock,
   median).
   bytes = K and V slabs + q + o (what must move; the prototype's padded q/o are not counted).
3. Warnings raised while compiling (the Triton deprecation on jax 0.11) are recorded in the JSON and shown
   again, not silenced.
The JSON is rewritten after every step, so a cut-off run keeps what it measured. Off a Hopper GPU the
probe prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = [  # (label, MosaicAttentionConfig fields): 2-3 K/V blocks in flight of 64 or 128 positions
    ("bs128_st2", dict(block_s=128, max_concurrent_steps=2)),
    ("bs128_st3", dict(block_s=128, max_concurrent_steps=3)),
    ("bs64_st4", dict(block_s=64, max_concurrent_steps=4)),
    ("bs64_st2", dict(block_s=64, max_concurrent_steps=2)),
    ("bs128_st2_static", dict(block_s=128, max_concurrent_steps=2, dynamic_grid=False)),
]
CHECKS = [  # (name, B, N, K, S, H, dtype, lengths)
    ("gqa_bf16_ragged", 3, 32, 8, 1024, 128, jnp.bfloat16, [1024, 517, 0]),
    ("mha_f16_h64", 2, 16, 16, 512, 64, jnp.float16, [300, 512]),
]
TIMED = [("llama-2-7b", 32, 32), ("llama-3-8b", 32, 8)]  # (model, N, K) at H = 128
BATCHES = (16, 64)
S, H, DTYPE = 2048, 128, jnp.bfloat16
REL_TOL = {"bfloat16": 2e-2, "float16": 4e-3}  # tests/tolerances.py
CHAIN = 4  # calls per timed jit call (alternating cache sets)


def _err_text(e: BaseException) -> tuple[str, str]:
    """(first line, whole traceback) of an exception."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}", "".join(traceback.format_exception(e))[-6000:]


def check_config(mosaic, cfg) -> dict:
    """Compile and compare one config at CHECKS; stops at the first failure."""
    from pallas_kernels.decode_attention import decode_attention_reference

    out = {"checks": []}
    for name, B, N, K, S_, H_, dtype, lengths in CHECKS:
        ks = jax.random.split(jax.random.key(B * 1000 + N), 3)
        q = jax.random.normal(ks[0], (B, N, H_), jnp.float32).astype(dtype)
        k = jax.random.normal(ks[1], (B, K, S_, H_), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[2], (B, K, S_, H_), jnp.float32).astype(dtype)
        lens = jnp.array(lengths, jnp.int32)
        try:
            t0 = time.perf_counter()
            o = jax.jit(lambda *a: mosaic.decode_attention(*a, config=cfg))(q, k, v, lens)
            o = np.asarray(o.astype(jnp.float32))
            compile_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (report every failure, keep probing the other configs)
            line, full = _err_text(e)
            out.update(ok=False, failed_at=name, error=line, traceback=full)
            return out
        f32 = lambda x: x.astype(jnp.float32)
        ref = np.asarray(decode_attention_reference(f32(q), f32(k), f32(v), lens))
        rel = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        max_rel = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
        tol = REL_TOL[jnp.dtype(dtype).name]
        ok = bool(np.all(np.isfinite(o))) and rel <= tol
        out["checks"].append(dict(name=name, rel_err=rel, max_rel_err=max_rel, tol=tol, ok=ok,
                                  compile_and_run_s=compile_s))
        if not ok:
            out.update(ok=False, failed_at=name, error=f"mismatch: rel err {rel:.3e} > {tol:.0e} "
                                                        f"(max rel err {max_rel:.3e})")
            return out
    out["ok"] = True
    return out


def time_impl(fn, sets, qs, lengths) -> float:
    """Median ms per call of fn(q, k, v, lengths) over chains alternating between the cache sets."""
    from pallas_kernels.autotune import time_fn  # the benchmarks' and the tuner's timer

    chain = jax.jit(lambda sets, qs, n: [fn(q, *sets[i % len(sets)], n) for i, q in enumerate(qs)])
    return time_fn(chain, [(sets, qs, lengths)], inner=5, reps=7, warmup=2) / len(qs)


def time_shape(result, impls, model, N, K, B, read_bw, ms_triton, t_start, budget_s):
    """Time impls at one shape; append a record each (ms, TB/s, fraction of the read ceiling, vs Triton)."""
    from pallas_kernels.decode_attention import attention_config

    kk = jax.random.split(jax.random.key(B * 7 + K), 4 + CHAIN)
    make = jax.jit(lambda k: jax.random.normal(k, (B, K, S, H), jnp.float32).astype(DTYPE))
    sets = [(make(kk[0]), make(kk[1])), (make(kk[2]), make(kk[3]))]
    qs = [jax.random.normal(kk[4 + i], (B, N, H), jnp.float32).astype(DTYPE) for i in range(CHAIN)]
    lengths = jnp.full((B,), S, jnp.int32)
    nbytes = 2 * B * K * S * H * 2 + 2 * B * N * H * 2
    for name, fn, prep in impls:
        rec = dict(model=model, B=B, N=N, K=K, H=H, S=S, dtype="bfloat16", impl=name, GB=nbytes / 1e9)
        result["records"].append(rec)
        if time.perf_counter() - t_start > budget_s:
            rec["skipped"] = f"budget of {budget_s:.0f} s spent"
            print(f"# {model} B={B} {name}: not timed ({rec['skipped']})", flush=True)
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ms = time_impl(fn, sets, [prep(q, K) for q in qs], lengths)
            _record_warnings(result, caught)
        except Exception as e:  # noqa: BLE001  (report it, keep timing the others)
            rec["error"], rec["traceback"] = _err_text(e)
            print(f"| {model} | {B} | {N} | {K} | {name} | FAILED: {rec['error']} |", flush=True)
            continue
        if name.startswith("triton"):
            ms_triton[(model, B)] = ms
            rec["triton_config"] = dataclasses.asdict(attention_config(B, N, K, S, H, K, DTYPE))
        base = ms_triton.get((model, B))
        tbps = nbytes / (ms * 1e-3) / 1e12
        rec.update(ms=ms, TBps=tbps, frac_read_bw=tbps * 1e12 / read_bw, vs_triton=base / ms if base else None)
        vs = f"{rec['vs_triton']:.2f}x" if base else "-"
        print(f"| {model} | {B} | {N} | {K} | {name} | {ms:.4f} | {nbytes / 1e9:.3f} | {tbps:.2f} | "
              f"{rec['frac_read_bw']:.2f} | {vs} |", flush=True)


def _record_warnings(result, caught):
    """Show each distinct caught warning once (as Python's default filters would) and keep it in the JSON."""
    for w in caught:
        entry = {"category": w.category.__name__, "message": str(w.message)}
        if entry not in result["warnings"]:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            result["warnings"].append(entry)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="JSON file to write (or an existing folder: mosaic_probe.json in it)")
    ap.add_argument("--budget-s", type=float, default=70.0,
                    help="seconds: checks stop at 40%% of it, timings are not started past it")
    args = ap.parse_args(argv)

    from pallas_kernels.decode_attention import mosaic

    why = mosaic.mosaic_available()
    if why is not None:
        print(f"mosaic_probe: nothing to measure here: {why}")
        return 0

    from benchmarks import common
    from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

    out_path = args.out / "mosaic_probe.json" if args.out.is_dir() else args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = {"meta": common.metadata(" ".join(sys.argv)), "configs": {}, "records": [], "warnings": []}
    dev = jax.devices()[0]
    result["meta"]["compute_capability"] = str(getattr(dev, "compute_capability", "?"))

    def save():
        out_path.write_text(json.dumps(result, indent=1, default=str))

    print(f"mosaic_probe on {common.device_name()} (cc {result['meta']['compute_capability']}), jax {jax.__version__}",
          flush=True)
    # 1. correctness of each config
    passed = []
    for label, fields in CONFIGS:
        if time.perf_counter() - t_start > 0.4 * args.budget_s:
            print(f"check {label:18s} skipped: 40% of the budget spent on checks", flush=True)
            result["configs"][label] = {"config": fields, "ok": False, "skipped": "budget"}
            continue
        cfg = mosaic.MosaicAttentionConfig(**fields)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = check_config(mosaic, cfg)
        _record_warnings(result, caught)
        res["config"] = fields
        result["configs"][label] = res
        save()
        errs = ", ".join(f"{c['name']} rel {c['rel_err']:.2e} (max {c['max_rel_err']:.2e})" for c in res["checks"])
        status = "ok" if res["ok"] else f"FAILED at {res['failed_at']}: {res['error']}"
        print(f"check {label:18s} {status}" + (f" ({errs})" if errs else ""), flush=True)
        if res["ok"]:
            passed.append((label, cfg))

    read_bw, _ = common.read_bandwidth()
    result["meta"]["read_bw_TBps"] = read_bw / 1e12
    print(f"streaming-read ceiling {read_bw / 1e12:.3f} TB/s", flush=True)

    # 2. timing: first the Triton kernel, XLA and the first config that passed (whole call and kernel
    # alone) at every shape, then the other configs (so a spent budget loses the least informative figures)
    same = lambda q, K: q
    impls = [("triton (public API)", lambda q, k, v, n: decode_attention(q, k, v, n), same),
             ("xla reference", lambda q, k, v, n: decode_attention_reference(q, k, v, n), same)]
    impls += [(f"mosaic {label}", lambda q, k, v, n, c=cfg: mosaic.decode_attention(q, k, v, n, config=c), same)
              for label, cfg in passed]
    if passed:  # the first config's kernel alone: what the query padding and output slicing around it cost
        label, cfg = passed[0]
        impls.insert(3, (f"mosaic {label} kernel only",
                         lambda q, k, v, n, c=cfg: mosaic.padded_attention(q, k, v, n, config=c), mosaic.pad_queries))
    cols = ["model", "B", "N", "K", "impl", "ms", "GB", "TBps", "frac_read_bw", "vs_triton"]
    print("| " + " | ".join(cols) + " |", flush=True)
    ms_triton = {}
    for round_impls in (impls[:4], impls[4:]):
        for model, N, K in TIMED:
            for B in BATCHES:
                if round_impls:
                    time_shape(result, round_impls, model, N, K, B, read_bw, ms_triton, t_start, args.budget_s)
                    save()
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    save()
    print("\nsummary (ms per call, TB/s, vs the Triton kernel):")
    for r in result["records"]:
        what = (f"{r['ms']:.4f} ms {r['TBps']:.2f} TB/s " + (f"{r['vs_triton']:.2f}x" if r["vs_triton"] else "")
                if "ms" in r else r.get("error") or r.get("skipped"))
        print(f"  {r['model']} B={r['B']} {r['impl']}: {what}")
    for w in result["warnings"]:
        print(f"warning seen: {w['category']}: {w['message'][:160]}")
    print(f"wrote {out_path} ({result['meta']['wall_s']:.0f} s; {len(result['warnings'])} distinct warnings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

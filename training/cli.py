"""`polar` subcommands for routers: collect, train-routers, calibrate, eval ppl.

polar_jax/cli.py calls `add_commands(subparsers)`; each subcommand sets `func(args)`. User errors are raised
as ValueError / FileNotFoundError, which the `polar` entry point prints as one line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from polar_jax.argtypes import positive_float, positive_int
from polar_jax.evals.cli import add_tasks_command
from training.data import HELDOUT_FRAC

_FMT = argparse.RawDescriptionHelpFormatter


def _text_flags(p: argparse.ArgumentParser, default_split: str) -> None:
    g = p.add_argument_group("text (default: the Python standard library's pydoc_data.topics)")
    g.add_argument("--text", action="append", metavar="FILE", help="a UTF-8 text file (repeat for several)")
    g.add_argument("--dataset", metavar="DIR", help="a dataset saved with datasets.save_to_disk (its 'text' "
                   "column; needs the `datasets` package)")
    g.add_argument("--split", default=default_split, choices=["all", "train", "heldout"],
                   help=f"part of the token stream: train = the first {(1 - HELDOUT_FRAC) * 100:.0f}%%, heldout = the "
                   f"rest (default {default_split}; collect and eval use complementary parts)")
    g.add_argument("--heldout-frac", type=float, default=HELDOUT_FRAC,
                   help=f"fraction of the stream held out for evaluation (default {HELDOUT_FRAC})")


def _load_model(path):
    from polar_jax.checkpoint import load

    return load(Path(path))


def _floats(s: str, what: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {s!r}") from None


_TOPK_RENAMED = ("--attn-topk is gone: it took a fraction; pass --attn-density FRACTION (of the KV groups, e.g. 0.5) "
                 "or --attn-groups COUNT")


def _attn_flags(p: argparse.ArgumentParser, what: str, default: str = "") -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--attn-density", type=float, metavar="FRACTION",
                   help=f"fraction in (0, 1] of the KV groups {what} (rounded to whole groups, at least 1){default}")
    g.add_argument("--attn-groups", type=int, metavar="COUNT", help=f"number of KV groups {what}")
    p.add_argument("--attn-topk", type=float, help=argparse.SUPPRESS)  # the old name: a clear error


def _command() -> str:
    return "polar " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_collect(args) -> None:
    from training.collect import collect
    from training.data import load_tokens

    cfg, params, tokenizer = _load_model(args.model)
    tokens, source = load_tokens(tokenizer, cfg.vocab_size, args.text, args.dataset, args.split, args.heldout_frac)
    r = collect(cfg, params, tokens, source, args.out, n_tokens=args.tokens, seq_len=args.seq_len,
                batch=args.batch, shard_tokens=args.shard_tokens, progress=not args.quiet)
    print(f"{r.out_dir}: {r.tokens} tokens in {r.shards} shards ({r.new_tokens} collected now) from {source}")


def cmd_train_routers(args) -> None:
    from training.train import TrainConfig, train_routers

    if args.attn_topk is not None:
        raise ValueError(_TOPK_RENAMED)
    tc = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                     max_epochs=args.epochs, patience=args.patience, val_frac=args.val_frac, seed=args.seed)
    train_routers(args.model, args.data, args.out, attn_density=args.attn_density, attn_groups=args.attn_groups,
                  mlp=args.mlp, tc=tc,
                  max_tokens=args.max_tokens, overwrite=args.overwrite, progress=not args.quiet)


def cmd_calibrate(args) -> None:
    from training.calibrate import calibrate

    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    calibrate(args.model, args.data, args.out, batch_sizes=sizes, recall=args.recall, attn_density=args.attn_density,
              n_batches=args.n_batches, seed=args.seed, progress=not args.quiet)


def cmd_eval_ppl(args) -> None:
    from polar_jax.checkpoint import check_writable
    from polar_jax.sparsity import SparsityConfig
    from training import evaluate as ev
    from training.data import load_tokens
    from training.routers import attn_group_count
    from training.train import METRICS_FILE

    if args.attn_topk is not None:
        raise ValueError(_TOPK_RENAMED)
    heads_given = args.attn_density is not None or args.attn_groups is not None
    if args.sparsity and heads_given:
        raise ValueError("pass either --sparsity or --attn-density / --attn-groups, not both")
    if args.sweep and (args.sparsity or heads_given):
        raise ValueError("--sweep sets the head densities itself (--densities); drop --sparsity / --attn-density")
    if args.source is not None and not heads_given:  # it would be ignored
        raise ValueError("--source needs --attn-density or --attn-groups (a --sparsity file names its own source, "
                         "--sweep takes --sources)")
    sp = SparsityConfig.from_json(args.sparsity) if args.sparsity else None  # a bad file fails before the load
    cfg, params, tokenizer = _load_model(args.model)
    tokens, source = load_tokens(tokenizer, cfg.vocab_size, args.text, args.dataset, args.split, args.heldout_frac)
    windows = ev.eval_windows(cfg, tokens, args.prefix, args.decode_len, args.max_tokens)
    progress = not args.quiet
    print(f"{len(windows)} windows of {windows.shape[1]} tokens from {source}")
    if args.sweep:
        densities = _floats(args.densities, "--densities") if args.densities else ev.default_densities(cfg)
        sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        for s in sources:
            if s not in ("router", "oracle", "random"):
                raise ValueError(f"--sources: unknown source {s!r}; choose from router, oracle, random")
        for d in densities:
            ev.head_sparsity("oracle", d, cfg)  # validates the density before hours of work
        for suffix in (".json", ".md", ".png"):  # and the output files
            check_writable(Path(args.out).with_suffix(suffix))
        ev.pyplot()  # and the plotter (an optional extra)
        result = ev.sweep(cfg, params, windows, args.prefix, densities, args.batch, sources, args.seed, progress)
        print(ev.format_sweep(result, cfg.n_kv_heads))
        metrics_path = Path(args.model) / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        meta = {"command": _command(), "model": cfg.name, "text": source, "prefix": args.prefix,
                "window": int(windows.shape[1]), "batch": args.batch}
        paths = ev.write_sweep(result, cfg, args.out, meta, metrics)
        print("wrote " + ", ".join(map(str, paths)))
        return
    if args.sparsity:
        what = f"sparsity {args.sparsity}"
    elif heads_given:
        k = attn_group_count(cfg.n_kv_heads, args.attn_density, args.attn_groups)
        source = args.source or "router"
        sp = ev.head_sparsity(source, k / cfg.n_kv_heads, cfg)
        what = f"{source} top-{int(sp.head_counts(cfg)[-1])}/{cfg.n_kv_heads} KV groups"
    else:
        what = "dense"
    r = ev.perplexity(cfg, params, windows, args.prefix, sp, args.batch, args.seed, progress)
    print(f"{what}: decode-mode perplexity {r['ppl']:.4f} (mean NLL {r['nll']:.4f} over {r['tokens']} tokens)")


def add_commands(sub) -> None:
    """Register collect, train-routers, calibrate and eval on the `polar` subparsers."""
    p = sub.add_parser("collect", help="record router training data by running the dense model over text",
                       formatter_class=_FMT, description="""\
Run the dense model (jitted, batched prefill) over text and record per layer and token: the router input
(attention-norm output), per-head attention-output L2 norms (attention labels) and, for ReLU models, which
MLP neurons are active (act > 0, bit-packed). Writes shards and a manifest to --out. Resumable: run the
same command again after an interruption and it continues after the last complete shard. Refuses to add
to a directory holding data of another model or text. Each token takes L * (2D + 4N + F/8 for ReLU models)
+ 4 bytes (SmolLM2-135M: about 36 KB, so 65,536 tokens = 2.3 GB); the size is printed before collecting,
and collect refuses when the disk lacks the space.""")
    p.add_argument("--model", required=True, help="model directory (from `polar convert`)")
    p.add_argument("--out", required=True, help="data directory to create or resume")
    p.add_argument("--tokens", type=positive_int, default=100_000, help="tokens to collect (default 100000)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per prefill window (default 512)")
    p.add_argument("--batch", type=positive_int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--shard-tokens", type=positive_int, default=16384,
                   help="tokens per shard on disk, rounded to whole batches of --batch windows of --seq-len "
                   "(default 16384)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _text_flags(p, "train")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train-routers", help="train attention (and MLP) routers on collected data",
                       formatter_class=_FMT, description="""\
Train per-layer routers on data from `polar collect`, all layers at once: the attention router (linear
D -> KV heads; label: the --attn-density fraction, or --attn-groups, of the KV groups with the largest output
norm: train for the density the router will run at) and, with --mlp (ReLU models), the MLP router
(D -> 1024 -> F; label: neuron active). Weighted BCE, AdamW. Three disjoint splits of the collected tokens
(whole windows): the last 10% is the test split (the metrics printed and `polar calibrate` use it); of the
rest, the last --val-frac is for validation and early stopping, the remainder for training. Writes the
model with params["routers"] to --out, a model directory that generate / eval / calibrate load.""")
    p.add_argument("--model", required=True, help="model directory the data was collected with")
    p.add_argument("--data", required=True, help="data directory from `polar collect`")
    p.add_argument("--out", required=True, help="output model directory (the model plus its routers)")
    _attn_flags(p, "labelled positive per token", "; default 0.5")
    p.add_argument("--mlp", action="store_true", help="also train the MLP router (ReLU models only)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="tokens per step (default 1024)")
    p.add_argument("--epochs", type=positive_int, default=30, help="most epochs (default 30)")
    p.add_argument("--patience", type=positive_int, default=3,
                   help="stop after this many epochs without any layer improving (default 3)")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="fraction of the non-test tokens used for early stopping (default 0.1)")
    p.add_argument("--max-tokens", type=positive_int, help="train and validate on at most this many collected tokens "
                   "(the test split stays the last 10%% of all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router initialisation and of the batch "
                   "order (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_routers)

    p = sub.add_parser("calibrate", help="per-layer MLP top-k per batch size; write a sparsity config JSON",
                       formatter_class=_FMT, description="""\
Write the SparsityConfig JSON that generate / eval / benchmarks read (--sparsity). Attention: a uniform
--attn-density of KV groups per sequence (layer 0 dense) from the attention router. MLP (models with an
MLP router): for each layer and batch size, the smallest router top-k (a multiple of 128, or all F) whose union over
a batch recalls --recall of the truly active neurons, over random batches of the collected tokens' test split
(about the last 10%, in whole windows, which the router neither trained nor stopped early on).""")
    p.add_argument("--model", required=True, help="model directory with routers (from `polar train-routers`)")
    p.add_argument("--data", required=True, help="data directory from `polar collect` (same model)")
    p.add_argument("--out", required=True, help="sparsity config JSON to write")
    p.add_argument("--batch-sizes", default="1,8,32,64,128", help="comma-separated (default 1,8,32,64,128)")
    p.add_argument("--recall", type=float, default=0.99, help="batch-union recall target (default 0.99)")
    p.add_argument("--attn-density", type=float,
                   help="fraction of KV groups kept per sequence in layers > 0 (default: the density the attention "
                   "router was trained for, from the model's routers_metrics.json, else 0.5; 1 = dense)")
    p.add_argument("--n-batches", type=positive_int, default=16, help="random batches per batch size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration batches (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)

    p_eval = sub.add_parser("eval", help="evaluate a model: decode-mode perplexity (`polar eval ppl`), task "
                            "accuracy (`polar eval tasks`)",
                            description="Evaluation through the sparse decode path.")
    eval_sub = p_eval.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    p = eval_sub.add_parser("ppl", help="decode-mode perplexity, dense or sparse, or a sweep over head densities",
                            formatter_class=_FMT, description="""\
Perplexity measured through the decode path that produces the speedup: each window gets a dense prefill of
--prefix tokens, then --decode-len teacher-forced single-token decode steps through the sparse kernels;
NLL over the decoded tokens. Sparsity: --sparsity JSON (from calibrate), or --attn-density FRACTION /
--attn-groups COUNT with --source; neither = dense. --sweep: dense plus router and oracle top-k at each
density, a table, and OUT.json / OUT.md / OUT.png (perplexity vs density).""")
    p.add_argument("--model", required=True, help="model directory (with routers for --source router)")
    p.add_argument("--sparsity", help="sparsity config JSON (from `polar calibrate`)")
    _attn_flags(p, "kept per sequence in layers > 0")
    p.add_argument("--source", choices=["router", "oracle", "random"],
                   help="where the kept groups come from (default router)")
    p.add_argument("--prefix", type=int, default=64, help="dense prefill tokens per window (default 64)")
    p.add_argument("--decode-len", type=positive_int, default=192, help="decode steps per window (default 192)")
    p.add_argument("--max-tokens", type=positive_int, default=8192,
                   help="about this many decoded tokens (default 8192)")
    p.add_argument("--batch", type=positive_int, default=16, help="windows decoded together (default 16)")
    p.add_argument("--sweep", action="store_true", help="sweep head densities (router, oracle, dense)")
    p.add_argument("--densities", help="comma-separated densities for --sweep (default k/K for every k)")
    p.add_argument("--sources", default="router,oracle", help="sources for --sweep (default router,oracle)")
    p.add_argument("--out", default="runs/ppl_sweep", help="output prefix for --sweep files (default runs/ppl_sweep)")
    p.add_argument("--seed", type=int, help="seed of random head / neuron selection (default: the --sparsity file's "
                   "seed, as generate and serve use it; else 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _text_flags(p, "heldout")
    p.set_defaults(func=cmd_eval_ppl)
    add_tasks_command(eval_sub)

"""`polar eval tasks`: accuracy on lm-eval tasks through the sparse decode path (a front door to run.py).

The lead wires `add_tasks_command` into the `polar eval` group; errors reach the caller as ValueError /
FileNotFoundError, which `polar` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polar_jax.argtypes import positive_int


def cmd_eval_tasks(args) -> None:
    try:
        from polar_jax.evals.lm import PolarLM
        from polar_jax.evals.run import evaluate, markdown
    except ImportError as e:
        raise ValueError(f"`polar eval tasks` needs lm-eval: pip install 'polar-jax[eval]' ({e})") from None
    from polar_jax.checkpoint import check_writable
    from polar_jax.evals import data

    folder = data.data_dir(args.tasks_dir)
    names = data.available(folder) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    for n in names:  # fail on a bad name before loading the model
        data.task_file(n, folder)
    if args.sparsity and (args.attn_source or args.attn_density is not None):
        raise ValueError("pass either --sparsity JSON or --attn-source/--attn-density, not both")
    if args.out:
        check_writable(args.out)
    lm = PolarLM(args.model, sparsity=args.sparsity, attn=args.attn_source, attn_density=args.attn_density,
                 batch_size=args.batch_size, seed=args.seed)
    results = evaluate(lm, names, folder, limit=args.limit)
    table = markdown([{"label": "polar" + (" (sparse)" if lm.sparsity else " (dense)"), "results": results}])
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "polar " + " ".join(sys.argv[1:]), "model": str(args.model), "limit": args.limit,
                "sparsity": None if lm.sparsity is None else repr(lm.sparsity), "tasks_dir": str(folder)}
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {out}")


class _PrintIncludePath(argparse.Action):
    """Prints the folder of this package's lm-eval task YAMLs and exits, before the required flags are checked
    (like --version): `lm_eval --model polar ... --include_path "$(polar eval tasks --print-include-path)"`."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(Path(__file__).parent / "tasks")
        parser.exit()


def add_tasks_command(eval_subparsers) -> argparse.ArgumentParser:
    """Add `tasks` to the subparsers of `polar eval`; returns its parser."""
    p = eval_subparsers.add_parser(
        "tasks", help="accuracy on lm-eval tasks (piqa, arc_easy, ...) through the sparse decode path",
        description="""\
Accuracy on multiple-choice / lambada tasks with lm-eval's own metrics (acc, acc_norm, perplexity and their
stderr), each continuation scored in decode mode: the context is prefilled densely, then the continuation is
fed one token per step through the sparse decode kernels. Tasks are NAME.jsonl files in --tasks-dir
(default $POLAR_EVALS_DIR), in the schema of the shared evals folder's README.""")
    p.add_argument("--model", required=True, help="model directory (`polar convert`)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, or 'all' (every file of --tasks-dir)")
    p.add_argument("--tasks-dir", help="folder of NAME.jsonl task files (default $POLAR_EVALS_DIR)")
    p.add_argument("--sparsity", help="sparsity config JSON (`polar calibrate`); default dense")
    p.add_argument("--attn-source", choices=["router", "oracle", "random"],
                   help="head source for --attn-density (instead of --sparsity)")
    p.add_argument("--attn-density", type=float,
                   help="fraction of KV groups kept per sequence, in (0, 1] (needs --attn-source; default 1)")
    p.add_argument("--limit", type=positive_int, help="first N items of each task (a quick run)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="continuation rows per device call (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head source (default 0)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--print-include-path", action=_PrintIncludePath,
                   help="print the folder of the task YAMLs for lm-eval's --include_path (then exit)")
    p.set_defaults(func=cmd_eval_tasks)
    return p

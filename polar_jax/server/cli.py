"""`polar serve` (the OpenAI-compatible server) and `polar bench serve|plot` (its load benchmark).

polar_jax/cli.py calls `add_commands(subparsers)`; each subcommand sets `func(args)`. `python -m
polar_jax.server ...` runs the same commands on their own (see main).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

from polar_jax.argtypes import fraction, nonnegative_float, nonnegative_int, positive_int

# Kept here, not imported from protocol.py: the `polar` command must start without pydantic / FastAPI.
DEFAULT_MAX_QUEUE = 256


def _model(args):
    """(cfg, params, tokenizer, name) from --model DIR, or a preset with random weights (--random-weights)."""
    from polar_jax.checkpoint import load, load_tokenizer

    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer files in {args.tokenizer}")
    if args.random_weights:
        import jax
        import jax.numpy as jnp

        from polar_jax import init_params, preset

        if tokenizer is None:
            raise ValueError("--random-weights needs --tokenizer DIR (the server detokenizes its outputs)")
        try:
            cfg = preset(args.model)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        dtype = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32}[args.dtype]
        params = jax.jit(lambda k: init_params(cfg, k, dtype))(jax.random.key(args.seed))
        return cfg, params, tokenizer, f"{args.model}-random"
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg, params, own_tokenizer = load(model_dir)
    return cfg, params, tokenizer or own_tokenizer, model_dir.name


def _sparsity(args):
    """The --sparsity config (None: dense), read and fitted to the model's layers before its weights load."""
    from polar_jax.checkpoint import CONFIG_FILE
    from polar_jax.cli import check_sparsity_fits
    from polar_jax.config import load_config
    from polar_jax.sparsity import SparsityConfig

    if not args.sparsity:
        return None
    sparsity = SparsityConfig.from_json(args.sparsity)
    config = Path(args.model) / CONFIG_FILE
    if not args.random_weights and config.is_file():
        check_sparsity_fits(sparsity, args.sparsity, load_config(config))
    return sparsity


def build_engine(args):
    """(engine, sparsity, served name) for `polar serve`'s flags."""
    from polar_jax.engine.llm_engine import LLMEngine

    sparsity = _sparsity(args)
    cfg, params, tokenizer, default_name = _model(args)
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        warnings.warn(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of "
                      f"{cfg.vocab_size}: prompts holding the others are refused, and they are never generated",
                      stacklevel=2)
    kw = {k: getattr(args, k) for k in ("num_pages", "page_size", "prefill_chunk", "max_num_batched_tokens")
          if getattr(args, k) is not None}
    # With heads selected by the sparsity config, each request may ask for its own density (polar_attn_density).
    kw.setdefault("per_request_density", sparsity is not None and sparsity.attn != "all")
    engine = LLMEngine(cfg, params, tokenizer, sparsity=sparsity, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, kv_memory_fraction=args.kv_memory_fraction,
                       batch_invariant=args.batch_invariant, progress=not args.quiet, **kw)
    return engine, sparsity, args.served_model_name or default_name


def check_port_free(host: str, port: int) -> None:
    """OSError naming the address if nothing can listen there now (uvicorn binds as this does)."""
    if not 0 <= port <= 65535:  # socket.bind raises OverflowError, which would show as a traceback
        raise ValueError(f"--port must lie in 0..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def cmd_serve(args) -> None:
    import uvicorn

    from polar_jax.server.app import DrainingServer, build_app

    check_port_free(args.host, args.port)  # before minutes of loading and compiling, not after
    engine, sparsity, name = build_engine(args)
    app = build_app(engine, name, api_key=args.api_key, max_queue=args.max_queue, sparsity=sparsity)
    print(f"serving {name} ({engine.config.num_pages} KV pages of {engine.config.page_size}, max_num_seqs "
          f"{engine.config.max_num_seqs}, max_model_len {engine.config.max_model_len}"
          f"{', batch-invariant' if args.batch_invariant else ''}) on "
          f"http://{args.host}:{args.port}", flush=True)
    # uvicorn handles SIGTERM / SIGINT: it stops accepting, lets in-flight requests finish for up to
    # --shutdown-timeout seconds (DrainingServer ends those still running just before, each with an error
    # event or a 503) and runs the app's lifespan exit, which stops the engine thread. Then it raises the
    # signal again for the handler it found: this one, so that a clean shutdown exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=args.shutdown_timeout)).run()


def cmd_bench_serve(args) -> None:
    from polar_jax.server.bench import bench_serve

    bench_serve(args)


def cmd_bench_plot(args) -> None:
    from polar_jax.server.bench import bench_plot

    bench_plot(args)


def add_commands(sub) -> None:
    """Register `serve` and `bench` on the `polar` subparsers."""
    p = sub.add_parser("serve", help="serve a model over HTTP with the OpenAI API",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                       "/health, /metrics) over the continuous-batching engine. Binds 127.0.0.1 unless --host says "
                       "otherwise.")
    p.add_argument("--model", required=True, help="model directory (from `polar convert`), with tokenizer files; "
                   "with --random-weights, a preset name (e.g. llama-2-7b)")
    p.add_argument("--tokenizer", help="take the tokenizer from this directory instead")
    p.add_argument("--random-weights", action="store_true", help="serve preset --model with random weights (for "
                   "benchmarks; needs --tokenizer)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "bfloat16", "float32"],
                   help="--random-weights dtype (default bf16; the long spellings too)")
    p.add_argument("--seed", type=int, default=0, help="--random-weights seed")
    p.add_argument("--sparsity", help="sparsity config JSON (from `polar calibrate`); default dense")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("POLAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $POLAR_API_KEY, else open)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--max-model-len", type=positive_int,
                   help="prompt + output tokens per request (default: the model's context length)")
    p.add_argument("--max-queue", type=nonnegative_int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests accepted beyond --max-num-seqs before answering 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--num-pages", type=positive_int,
                   help="KV pool size in pages (default: what --kv-memory-fraction holds)")
    p.add_argument("--page-size", type=positive_int, help="tokens per KV page (default: the engine's)")
    p.add_argument("--prefill-chunk", type=positive_int,
                   help="prompt tokens per sequence per step (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="tokens per step, decode and prefill together (default: the engine's)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="each request's tokens and logprobs independent of what shares its steps (one dense "
                        "program for every step: slower decode, no sparsity; see the README)")
    p.add_argument("--kv-memory-fraction", type=fraction, default=0.9, help="device memory for KV pages (default 0.9)")
    p.add_argument("--shutdown-timeout", type=nonnegative_float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM or Ctrl-C; those still running "
                   "then end with an error (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.add_argument("--quiet", action="store_true", help="no compile progress bar")
    p.set_defaults(func=cmd_serve)

    p_bench = sub.add_parser("bench", help="benchmarks of a running server (`polar bench serve`, `polar bench plot`)")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bench_sub.add_parser("serve", help="load a server with Poisson arrivals; TTFT, TPOT, ITL, E2E, throughput",
                             description="Streams /v1/completions requests at --request-rate (Poisson arrivals; inf: "
                             "all at once) and reports TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99 in "
                             "ms) and request and output-token throughput, as a table and as JSON (--out).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--model", help="model name to send (default: the server's first /v1/models entry)")
    p.add_argument("--api-key", default=os.environ.get("POLAR_API_KEY"), help="bearer key (default $POLAR_API_KEY)")
    p.add_argument("--num-prompts", type=positive_int, default=100, help="requests to send (default 100)")
    p.add_argument("--request-rate", default="inf", help="requests per second, or inf (default inf)")
    p.add_argument("--sweep", help="comma-separated request rates to run one after another (overrides --request-rate)")
    p.add_argument("--max-concurrency", type=positive_int, help="requests in flight at most (default: no limit)")
    p.add_argument("--dataset", default="synthetic", help="'synthetic' (text of --input-len pseudo-words, default), "
                   "'random' (token ids below --vocab-size; lengths may be ranges LO:HI), or a JSON/JSONL file of "
                   '{"prompt": ..., "max_tokens": ...}')
    p.add_argument("--input-len", default="128", help="prompt length: words (synthetic) or tokens, N or LO:HI "
                   "(random; uniform) (default 128)")
    p.add_argument("--output-len", default="128", help="output tokens per request, N or LO:HI (random) (default "
                   "128; EOS ignored)")
    p.add_argument("--vocab-size", type=int, help="--dataset random: token ids are drawn from [3, this)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts (synthetic, random datasets) and of the arrival times (default 0)")
    p.add_argument("--label", help="curve name in plots (e.g. dense, sparse-50%%)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--plot", metavar="PNG", help="draw latency vs throughput of this run (and --compare) here")
    p.add_argument("--compare", nargs="*", metavar="JSON", help="earlier reports to draw on the same axes")
    p.set_defaults(func=cmd_bench_serve)

    p = bench_sub.add_parser("plot", help="latency vs throughput of several `bench serve` reports on the same axes")
    p.add_argument("results", nargs="+", help="report JSON files (their label, else the file name, names the curve)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=cmd_bench_plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polar")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"polar: error: {e}", file=sys.stderr)
        return 2
    return 0

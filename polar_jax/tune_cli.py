"""`polar tune`: time the kernels' candidate configs at the shapes a model's decode step uses, ahead of time.

The keys of a model at batch B and context S (cache positions per sequence), dtype T:
  attention   contiguous decode attention (B, N, K, S, H, C = K)
  paged       paged decode attention (B, N, K, S = M*Z, H, C = K, Z = the engine's page size)
  mlp         the row-gathering GEMMs of a decode step: selective_up for the q/k/v projection ((N + 2K) H rows)
              and the MLP up (F rows per density, gated as the model), selective_down for the attention
              output (N H rows) and the MLP down (F rows per density)
Each key's winner goes to the user cache (pallas_kernels.autotune), or with --out into a file in the shipped
table format (pallas_kernels/tuned/<device>.json is where a shipped table lives).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

KERNEL_GROUPS = ("attention", "paged", "mlp")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = 0.05          # --check: a shipped config may be this much slower than the best (issue 11)
CPU_MAX_BYTES = 16 << 20  # --allow-cpu: interpret mode is thousands of times slower; tiny shapes only


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return vals


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not vals or not all(0 < v <= 1 for v in vals):
        raise ValueError(f"{flag} takes densities in (0, 1], got {text!r}")
    return vals


def model_config(spec: str):
    """The ModelConfig `--model` names: a preset, a polar model directory (or its config.json), or a
    transformers model directory (or its config.json)."""
    from polar_jax.config import PRESETS, from_hf_config, load_config

    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model "
                         f"directory or config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {spec!r}: cannot read {path}: {e}") from None
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
        return from_hf_config(data, name=path.parent.name or "custom")
    return load_config(path)


def model_keys(cfg, batches, ctx: int, groups, dtype: str, densities) -> list[tuple[str, dict, int]]:
    """(kernel, shape, input bytes) for every kernel call of cfg's decode step at each batch."""
    from polar_jax.cache import PAGE_SIZE

    N, K, H, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.mlp_dim
    item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    Z = PAGE_SIZE
    S_paged = -(-ctx // Z) * Z
    out = []
    for B in batches:
        if "attention" in groups:
            out.append(("attention", dict(B=B, N=N, K=K, S=ctx, H=H, C=K, dtype=dtype), 2 * B * K * ctx * H * item))
        if "paged" in groups:
            out.append(("paged_attention", dict(B=B, N=N, K=K, S=S_paged, H=H, C=K, Z=Z, dtype=dtype),
                        2 * B * K * S_paged * H * item))
        if "mlp" in groups:
            out.append(("selective_up", dict(B=B, D=D, count=(N + 2 * K) * H, gated=False, dtype=dtype),
                        (N + 2 * K) * H * D * item))
            out.append(("selective_down", dict(B=B, D=D, count=N * H, dtype=dtype), N * H * D * item))
            for d in densities:
                n = max(1, round(d * F))
                out.append(("selective_up", dict(B=B, D=D, count=n, gated=cfg.gated_mlp, dtype=dtype),
                            (2 if cfg.gated_mlp else 1) * n * D * item))
                out.append(("selective_down", dict(B=B, D=D, count=n, dtype=dtype), n * D * item))
    return out


def _fmt_config(c: dict) -> str:
    short = {"num_warps": "warps", "num_stages": "stages"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in c.items())


def _print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def check_table(path: Path, args) -> None:
    """Re-tune every key of the table at `path` on this device, timing its shipped config beside the
    candidates; where another config wins, time the two head to head (alternating, same inputs) and exit 1
    if the shipped config is slower than that winner by more than TOLERANCE there. (The re-tune's own
    minimum is the fastest of many noisy timings, biased low: it names the rival, it does not judge.)
    With --update, each such entry (or one whose config failed) is replaced in the file by the re-tune's
    winner, key by key and atomically, and only a key left slower makes the exit status 1: run --check
    again to confirm the new table."""
    from tqdm import tqdm

    from pallas_kernels import autotune

    if not path.is_file():
        raise ValueError(f"--check: no table file {path}")
    entries = autotune.read_entries(path)
    data = json.loads(path.read_text()) if entries else {}
    device = autotune.device_kind()
    if not entries or data.get("device") != device:
        raise ValueError(f"--check: {path} holds {len(entries)} entries for {data.get('device')!r}; this is {device!r}")
    rows = [("key", "shipped config", "shipped ms", "best ms", "best config", "re-tune ratio",
             "head to head", "")]
    slow, replaced = 0, []
    for ck, e in tqdm(entries.items(), desc="polar tune --check", unit="key", file=sys.stderr):
        kernel, shape = autotune.parse_class_key(ck)
        shipped = autotune.KERNELS[kernel].config_cls(**e["config"])
        r = autotune.tune(kernel, shape, max_candidates=args.max_candidates, reps=args.reps, log=tqdm.write,
                          extra=(shipped,))
        shipped_ms = next((m for c, m in r["entry"]["timings"] if c == dataclasses.asdict(shipped)), None)
        best_ms = r["entry"]["ms"]
        ratio = None if shipped_ms is None else shipped_ms / best_ms
        if ratio is None or r["best"] == shipped:
            h2h = ratio
        else:
            a_ms, b_ms = autotune.head_to_head(kernel, shape, (shipped, r["best"]), reps=args.reps)
            h2h = a_ms / b_ms
        bad = h2h is None or h2h > 1 + TOLERANCE
        slow += bad
        if bad and args.update:
            autotune.save(path, device, {ck: r["entry"]})
            replaced.append(ck)
        rows.append((ck, _fmt_config(e["config"]), "failed" if shipped_ms is None else f"{shipped_ms:.4f}",
                     f"{best_ms:.4f}", _fmt_config(r["entry"]["config"]), "-" if ratio is None else f"{ratio:.3f}",
                     "-" if h2h is None else f"{h2h:.3f}", "SLOWER" if bad else "ok"))
    _print_table(rows)
    print(f"{len(entries) - slow} of {len(entries)} shipped configs within {TOLERANCE:.0%} of the best config "
          f"(timed head to head) on {device}")
    if replaced:
        print(f"--update: replaced {len(replaced)} entries of {path} with the winner's config: {', '.join(replaced)}")
    if slow > len(replaced):
        sys.exit(1)


def cmd_tune(args) -> None:
    import jax
    from tqdm import tqdm

    from pallas_kernels import autotune
    from pallas_kernels.decode_attention import triton as _attention  # noqa: F401  (registers its kernel)
    from pallas_kernels.paged_attention import triton as _paged  # noqa: F401
    from pallas_kernels.selective_gemm import triton as _gemm  # noqa: F401
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        raise ValueError(f"polar tune times GPU kernels, but JAX's backend here is {backend!r}; run it on a GPU "
                         f"(or pass --allow-cpu: interpret mode, tiny shapes, for tests)")
    if args.max_candidates is not None and args.max_candidates < 1:
        raise ValueError(f"--max-candidates must be >= 1, got {args.max_candidates}")
    if args.reps < 1:  # --check times too
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.update and not args.check:
        raise ValueError("--update rewrites the table given to --check; pass --check TABLE")
    if args.check:
        ignored = [f"--{k.replace('_', '-')}" for k, d in KEY_FLAGS.items() if getattr(args, k) != d]
        if ignored:
            raise ValueError(f"--check re-tunes the keys TABLE holds, in TABLE: {', '.join(ignored)} would be "
                             "ignored; drop them")
        return check_table(Path(args.check), args)

    groups = [g.strip() for g in args.kernels.split(",") if g.strip()]
    bad = [g for g in groups if g not in KERNEL_GROUPS]
    if bad or not groups:
        raise ValueError(f"--kernels takes a comma-separated subset of {','.join(KERNEL_GROUPS)}, got {args.kernels!r}")
    batches = _ints(args.batch, "--batch")
    ctx = args.ctx
    if ctx < 1:
        raise ValueError(f"--ctx must be >= 1, got {ctx}")
    densities = _floats(args.mlp_density, "--mlp-density")
    models = [model_config(m.strip()) for m in args.model.split(",") if m.strip()]

    keys = {}
    for cfg in models:
        for kernel, shape, nbytes in model_keys(cfg, batches, ctx, groups, DTYPES[args.dtype], densities):
            if backend != "gpu" and nbytes > CPU_MAX_BYTES:
                raise ValueError(f"{kernel} of {cfg.name} at {shape} reads {nbytes >> 20} MiB: too big for "
                                 f"interpret mode on {backend!r} (tiny presets and shapes only)")
            sc = autotune.KERNELS[kernel].bucket(**shape)
            keys.setdefault(autotune.class_key(kernel, sc), (kernel, shape))

    device = autotune.device_kind()
    path = Path(args.out) if args.out else autotune.user_file(device)
    if args.resume:
        done = autotune.read_entries(path)
        keys = {ck: v for ck, v in keys.items() if ck not in done}
    results = {}
    bar = tqdm(keys.items(), desc="polar tune", unit="key", file=sys.stderr)
    for ck, (kernel, shape) in bar:
        bar.set_postfix_str(ck, refresh=True)
        try:
            results[ck] = autotune.tune(kernel, shape, max_candidates=args.max_candidates, reps=args.reps,
                                        log=tqdm.write)["entry"]
        except RuntimeError as e:  # every candidate rejected: the key keeps its heuristic
            tqdm.write(f"{ck}: {e}; not written")
            continue
        autotune.save(path, device, {ck: results[ck]})   # key by key: an interrupted run keeps what it timed

    rows = [("key", "heuristic ms", "best ms", "best config", "speedup")]
    for ck, e in results.items():
        h = e["heuristic_ms"]
        rows.append((ck, "failed" if h is None else f"{h:.4f}", f"{e['ms']:.4f}", _fmt_config(e["config"]),
                     "-" if h is None else f"{h / e['ms']:.2f}x"))
    _print_table(rows)

    print(f"wrote {len(results)} entries for {device!r} to {path}")


# The flags that choose the keys to tune and where they go (defaults): --check takes its keys from its table.
KEY_FLAGS = {"model": "llama-2-7b,llama-3-8b", "batch": "16,48,64", "ctx": 2048, "kernels": ",".join(KERNEL_GROUPS),
             "mlp_density": "1", "dtype": "bf16", "out": None, "resume": False}


def add_commands(sub) -> None:
    p = sub.add_parser("tune", help="time kernel configs for this GPU at a model's decode shapes (ahead of time)",
                       description="Time each kernel's candidate block configs at the shapes a model's "
                       "decode step uses (per batch, at one context) and keep the fastest per (device, kernel, "
                       "shape class): in the user cache ($POLAR_TUNE_DIR, else ~/.cache/polar-jax/tune), or "
                       "with --out in a file of the shipped-table format. The kernels read these entries in "
                       "place of their heuristics; POLAR_AUTOTUNE=1 tunes a missing key on first use instead.")
    p.add_argument("--model", default=KEY_FLAGS["model"], help="models, comma-separated: preset names, "
                   "polar model directories or transformers model directories / config.json files (only the "
                   "shapes are read; default llama-2-7b,llama-3-8b)")
    p.add_argument("--batch", default=KEY_FLAGS["batch"], help="batch sizes, comma-separated (default 16,48,64)")
    p.add_argument("--ctx", type=int, default=KEY_FLAGS["ctx"], help="cache positions per sequence: the context the "
                   "contiguous cache holds, the engine's max_model_len for the paged one (default 2048)")
    p.add_argument("--kernels", default=KEY_FLAGS["kernels"],
                   help=f"kernel groups, comma-separated subset of {','.join(KERNEL_GROUPS)} (default all)")
    p.add_argument("--mlp-density", default=KEY_FLAGS["mlp_density"],
                   help="MLP neuron densities to tune the MLP GEMMs at, comma-separated (default 1: dense)")
    p.add_argument("--dtype", default=KEY_FLAGS["dtype"], choices=sorted(DTYPES),
                   help="activation / cache dtype (default bf16)")
    p.add_argument("--out", help="write the entries to this file (shipped-table format, merged into it if it "
                   "exists) instead of the user cache")
    p.add_argument("--check", metavar="TABLE", help="instead: re-tune every key of TABLE (a shipped table of this "
                   f"device), timing its configs beside the candidates, then each against the winner head to "
                   f"head; exit 1 if any is more than {TOLERANCE * 100:.0f}%% slower there")
    p.add_argument("--update", action="store_true", help="with --check: replace each entry that is more than "
                   f"{TOLERANCE * 100:.0f}%% slower than the winner by the winner's config, in TABLE itself")
    p.add_argument("--resume", action="store_true", help="skip the keys the output file already holds (after a "
                   "run was cut off)")
    p.add_argument("--max-candidates", type=int, help="time at most this many candidates per key (the "
                   "heuristic's first)")
    p.add_argument("--reps", type=int, default=7, help="timing samples per candidate; the median is kept (default 7)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (Pallas interpret mode, tiny "
                   "shapes only: for tests; the timings mean nothing)")
    p.set_defaults(func=cmd_tune)

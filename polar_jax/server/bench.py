"""`polar bench serve`: load a running server the way vLLM's and SGLang's serving benchmarks do.

Requests leave with Poisson arrivals at --request-rate (inf: all at once), optionally at most
--max-concurrency at a time, each streaming /v1/completions. Per request: time to first token (TTFT), time
per output token after the first (TPOT), the gaps between streamed chunks (ITL) and end-to-end latency (E2E).
The report gives their mean, p50, p90 and p99 in ms, request and output-token throughput, as a table and
JSON. Datasets: `synthetic` (pseudo-word text), `random` (token ids, lengths drawn from ranges; the engine
benchmark's workload W with its defaults) or a JSON/JSONL file. --sweep runs one rate after another;
`polar bench plot` draws latency against throughput for several result files (e.g. dense and sparse
servers) on the same axes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

PERCENTILES = (50, 90, 99)
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "po", "da", "fe")


@dataclass
class Item:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class Result:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def synthetic(n: int, input_len: int, output_len: int, seed: int) -> list[Item]:
    """n prompts of input_len pseudo-words (about a token or two each), each asking for output_len tokens."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        words = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 3))) for _ in range(input_len)]
        items.append(Item(" ".join(words), output_len))
    return items


def random_tokens(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  seed: int) -> list[Item]:
    """n prompts of random token ids in [3, vocab_size), lengths uniform in input_len (inclusive), outputs
    uniform in output_len. The draws follow benchmarks/serve_offline.py's workload(), so `--input-len
    128:2048 --output-len 64:512 --num-prompts 512 --seed 0` sends the engine benchmark's workload W."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(input_len[0], input_len[1] + 1, n)
    o_len = rng.integers(output_len[0], output_len[1] + 1, n)
    return [Item(rng.integers(3, vocab_size, p).tolist(), int(o)) for p, o in zip(p_len, o_len)]


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """'128' -> (128, 128); '128:2048' -> (128, 2048)."""
    lo, _, hi = str(text).partition(":")
    try:
        r = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"{flag} must be N or LO:HI, got {text!r}") from None
    if not 1 <= r[0] <= r[1]:
        raise ValueError(f"{flag} must satisfy 1 <= LO <= HI, got {text!r}")
    return r


def load_dataset(path: str, n: int, output_len: int) -> list[Item]:
    """A JSON list or JSONL file of {"prompt": str or token ids, "max_tokens": int (optional)}; the first n,
    cycled when the file holds fewer."""
    text = Path(path).read_text()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list or JSONL of objects with a 'prompt'")
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}: row {i} has no 'prompt'")
        items.append(Item(row["prompt"], int(row.get("max_tokens", output_len))))
    return [items[i % len(items)] for i in range(n)]


async def _one(client: httpx.AsyncClient, url: str, model: str, item: Item, headers: dict) -> Result:
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
    t0 = time.perf_counter()
    res, last = Result(ok=False), None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = event["error"].get("message", "error event")
                    return res
                now = time.perf_counter()
                if event.get("choices"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    res.ok = last is not None
    if not res.ok:
        res.error = "the stream ended without a token"
    return res


async def run(url: str, items: list[Item], request_rate: float, max_concurrency: int | None = None,
              model: str | None = None, api_key: str | None = None, seed: int = 0) -> tuple[list[Result], float]:
    """Send every item (Poisson arrivals at request_rate per second; inf: at once); (results, seconds)."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(items) or 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        if model is None:
            try:
                r = await client.get(f"{url}/v1/models", headers=headers)
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
            if r.status_code != 200:
                raise ValueError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
            model = r.json()["data"][0]["id"]
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = np.random.default_rng(seed)

        async def send(item: Item) -> Result:
            if gate is None:
                return await _one(client, url, model, item, headers)
            async with gate:
                return await _one(client, url, model, item, headers)

        t0 = time.perf_counter()
        tasks = []
        for item in items:
            tasks.append(asyncio.create_task(send(item)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _stats(values_s: list[float]) -> dict:
    """mean and percentiles in ms (NaN when there are no values)."""
    v = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean": float(v.mean()) if v.size else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(v, p)) if v.size else math.nan
    return out


def summarize(results: list[Result], duration: float, request_rate: float, max_concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "max_concurrency": max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else math.nan,
        "output_throughput": out_tokens / duration if duration > 0 else math.nan,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def format_table(s: dict) -> str:
    lines = [
        f"request rate {s['request_rate']}/s, max concurrency {s['max_concurrency'] or 'none'}",
        f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f} s",
        f"request throughput {s['request_throughput']:.2f} req/s, output throughput "
        f"{s['output_throughput']:.1f} tok/s ({s['prompt_tokens']} prompt, {s['output_tokens']} output tokens)",
        f"{'ms':<6}" + "".join(f"{k:>11}" for k in ("mean", *(f"p{p}" for p in PERCENTILES))),
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{name}_ms"]
        lines.append(f"{name.upper():<6}" + "".join(f"{st[k]:>11.2f}" for k in ("mean", *(f"p{p}" for p in
                                                                                          PERCENTILES))))
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {text}")
    return rate


def bench_serve(args) -> dict:
    """The `polar bench serve` command; returns what it writes to --out."""
    rates = [parse_rate(r) for r in args.sweep.split(",")] if args.sweep else [parse_rate(args.request_rate)]
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    input_len, output_len = parse_range(args.input_len, "--input-len"), parse_range(args.output_len, "--output-len")
    if args.dataset == "synthetic":
        if input_len[0] != input_len[1] or output_len[0] != output_len[1]:
            raise ValueError("--dataset synthetic takes single lengths; ranges are for --dataset random")
        items = synthetic(args.num_prompts, input_len[0], output_len[0], args.seed)
    elif args.dataset == "random":
        if args.vocab_size is None:
            raise ValueError("--dataset random needs --vocab-size (token ids are drawn below it)")
        items = random_tokens(args.num_prompts, input_len, output_len, args.vocab_size, args.seed)
    else:
        items = load_dataset(args.dataset, args.num_prompts, output_len[0])
    compare = _check_outputs(args)  # before any request: a run's results are not lost to a bad path
    runs = []
    for rate in rates:
        results, duration = asyncio.run(run(args.url, items, rate, args.max_concurrency, args.model, args.api_key,
                                            args.seed))
        summary = summarize(results, duration, rate, args.max_concurrency)
        print(format_table(summary), flush=True)
        runs.append(summary)
    report = {"label": args.label, "url": args.url, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "runs": runs}
    if args.out:
        from polar_jax.checkpoint import write_whole

        write_whole(args.out, json.dumps(report, indent=2))  # an interrupted write leaves the old report whole
        print(f"wrote {args.out}")
    if args.plot:
        plot([report] + compare, args.plot)
        print(f"wrote {args.plot}")
    return report


def _check_outputs(args) -> list[dict]:
    """Refuse now an --out or --plot that cannot be written; read the --compare reports (returned)."""
    from polar_jax.checkpoint import check_writable

    for path in (args.out, args.plot):
        if path:
            check_writable(path)
    if args.plot:
        check_plot_format(args.plot)
    return [read_report(f, "--compare") for f in args.compare or []]


def read_report(path: str, flag: str) -> dict:
    """A `polar bench serve` report (its JSON), or an error naming the flag and the file."""
    try:
        rep = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: no report {path}") from None
    except ValueError as e:
        raise ValueError(f"{flag}: {path} is not a report of `polar bench serve` (not JSON: {e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("runs"), list):
        raise ValueError(f"{flag}: {path} is not a report of `polar bench serve` (no 'runs' list)")
    return rep


def check_plot_format(path: str) -> None:
    """Refuse a plot path whose suffix matplotlib cannot write (no suffix: png)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix[1:].lower()
    if suffix and suffix not in kinds:
        raise ValueError(f"{path}: matplotlib cannot write .{suffix} plots (it writes {', '.join(sorted(kinds))})")


def plot(reports: list[dict], out: str, title: str = "latency vs throughput (one point per request rate)") -> None:
    """Median TTFT and median TPOT against output throughput, one line per report (its label), written to `out`
    whole (the format from its suffix, png without one)."""
    import io

    import matplotlib

    from polar_jax.checkpoint import write_whole

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rep in reports:
        runs = sorted(rep["runs"], key=lambda r: r["output_throughput"])
        x = [r["output_throughput"] for r in runs]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            ax.plot(x, [r[key]["p50"] for r in runs], marker="o", label=rep.get("label") or rep.get("url"))
    for ax, name in zip(axes, ("median TTFT (ms)", "median TPOT (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(out).suffix[1:].lower() or "png")
    plt.close(fig)
    write_whole(out, buf.getvalue())


def bench_plot(args) -> None:
    from polar_jax.checkpoint import check_writable

    check_writable(args.out)
    check_plot_format(args.out)
    reports = [read_report(f, "polar bench plot") for f in args.results]
    for f, rep in zip(args.results, reports):
        rep.setdefault("label", None)
        rep["label"] = rep["label"] or Path(f).stem
    plot(reports, args.out)
    print(f"wrote {args.out}")


"""Serving benchmark over HTTP (GPU): `polar serve` on workload W beside the offline engine, in one run.

Workload W of the engine issue (benchmarks/serve_offline.py's workload(): prompt token ids with lengths
uniform in [128, 2048], outputs uniform in [64, 512], fixed seed), streamed to /v1/completions with
`ignore_eos` and greedy sampling by `polar bench serve`'s client. Steps, each in its own process so that GPU
memory is never held twice:
1. benchmarks/serve_http_engine.py: W offline (output tokens/s), and the reference step times of the same
   engine configuration: a lone prefill chunk's first token, and pure decode steps at several batches;
2. `polar serve --random-weights` dense: W at request rate inf (its request throughput is the saturation),
   then the sweep: --rates times the saturation, fewer prompts per point (--sweep-requests, at most
   --point-seconds of arrivals); the point at 0.5 is the half-saturation point of the latency targets;
3. `polar serve --random-weights --sparsity` with random 50% of attention heads: W at inf and the same sweep.
The mean decode batch of each point is the server's own (/metrics polar_decode_batch, sum over count).

Targets (issue 9): server/offline output throughput at rate inf >= 0.90; at half saturation, median TTFT
< 2 x (first token of one prefill chunk + a decode step at the point's mean decode batch) and median TPOT
<= 1.2 x that decode step; the sparse curve right of the dense one (more output tokens/s at inf, lower
median TPOT at every finite rate). Writes OUT/serve_http.{json,md,png} at the end, whole.

The server needs a tokenizer: a word-level one over the model's vocabulary is written to a temporary folder
(token i is "w<i>"), so detokenising costs what a cheap tokenizer costs. Servers bind 127.0.0.1 on a free
port and are always stopped (SIGTERM, then SIGKILL); every wait is bounded; points that would overrun
--budget-s are skipped and say so.

    python -m benchmarks.serve_http --out benchmarks/results
    python -m benchmarks.serve_http --allow-cpu --out /tmp/serve_http --model tiny-llama --requests 12 \
        --sweep-requests 6 --prompt-len 8,32 --output-len 4,16 --max-num-seqs 4 --max-model-len 64 \
        --prefill-chunk 16 --batches 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np

from benchmarks.common import RESULTS, header_lines, markdown_table
from benchmarks.serve_offline import workload
from polar_jax import preset
from polar_jax.engine.llm_engine import PREFILL_CHUNK
from polar_jax.server import bench

TAIL_S = 8.0  # a sweep point's estimated drain after its last arrival (a few requests' end-to-end latency)
SPARSE = {"attn": "random", "attn_density": 0.5}
HALF = 0.5  # the sweep point (fraction of the saturation) of the latency targets


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with ids 0..vocab_size-1: <unk>, <s>, </s>, then w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


class Server:
    """`polar serve ARGS` in its own process group on 127.0.0.1:<free port>, its output in `log`.

    Entering waits (at most start_timeout s) until /health answers 200; leaving always stops it: SIGTERM to
    the group, then SIGKILL if it has not exited within 8 s.
    """

    def __init__(self, args: list[str], log: Path, start_timeout: float):
        self.args, self.log, self.start_timeout = args, log, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "polar_jax.cli", "serve", *self.args, "--host", "127.0.0.1", "--port", str(port)]
        print(f"== {time.strftime('%H:%M:%S')} starting {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.proc.returncode} while starting:\n"
                                       f"{_tail(self.log)}")
                if time.monotonic() - t0 > self.start_timeout:
                    raise RuntimeError(f"the server did not answer /health within {self.start_timeout:.0f} s:\n"
                                       f"{_tail(self.log)}")
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        print(f"   up after {self.start_s:.1f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # Within the 15 s that gpu_session.sh's `timeout --kill-after` leaves this process after its SIGTERM.
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def decode_batch_counter(url: str) -> tuple[float, float]:
    """(sum, count) of the server's polar_decode_batch histogram: decode rows and decoding steps so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        for key in ("polar_decode_batch_sum", "polar_decode_batch_count"):
            if line.startswith(key + " "):
                found[key] = float(line.split()[-1])
    if len(found) != 2:
        raise RuntimeError(f"{url}/metrics has no polar_decode_batch histogram")
    return found["polar_decode_batch_sum"], found["polar_decode_batch_count"]


def http_run(url: str, items: list, rate: float, timeout: float, seed: int) -> dict:
    """One load run (Poisson arrivals at `rate`/s, inf: all at once); bench.summarize's dict plus the prompts
    sent and the server's mean decode batch over the run. Raises when it takes longer than `timeout` s."""
    s0, c0 = decode_batch_counter(url)
    try:
        results, duration = asyncio.run(asyncio.wait_for(bench.run(url, items, rate, seed=seed), timeout))
    except asyncio.TimeoutError:
        raise RuntimeError(f"{len(items)} requests at rate {rate}/s did not finish within {timeout:.0f} s") from None
    s1, c1 = decode_batch_counter(url)
    summary = bench.summarize(results, duration, rate, None)
    summary |= {"num_prompts": len(items), "mean_decode_batch": (s1 - s0) / (c1 - c0) if c1 > c0 else math.nan}
    print(bench.format_table(summary), flush=True)
    return summary


class Clock:
    """The run's budget: estimates decide which sweep points still fit; hard timeouts bound every wait."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def timeout(self, estimate: float) -> float:
        """A run's hard limit: 3x its estimate, at least 60 s, never past the budget (+20 s of grace)."""
        return max(1.0, min(max(60.0, 3 * estimate), self.left() + 20))


def sweep_points(rates: list[float], sat: float, n_max: int, point_seconds: float) -> list[tuple[float, int, float]]:
    """(fraction of saturation, prompts, estimated seconds) of each finite point: at most point_seconds of
    arrivals, at least 8 prompts."""
    out = []
    for f in rates:
        n = int(min(n_max, max(8, round(f * sat * point_seconds))))
        out.append((f, n, n / (f * sat) + TAIL_S))
    return out


def run_mode(label: str, server_args: list[str], items: list, points, sat: float | None, clock: Clock, args,
             log: Path, reserve=None) -> tuple[list[dict], float]:
    """One server: W at rate inf, then the finite sweep points (points(sat)) that fit the budget less
    reserve(sat, seconds W took) s (what later modes need); (runs, saturation req/s: W's unless given)."""
    runs = []
    with Server(server_args, log, min(args.start_timeout, clock.left())) as srv:
        # One short request first: the first HTTP request, detokeniser and sampling paths warm up outside timing.
        bench_item = bench.Item(items[0].prompt[:16], 4)
        asyncio.run(asyncio.wait_for(bench.run(srv.url, [bench_item], math.inf), 120))
        print(f"== {time.strftime('%H:%M:%S')} {label}: {len(items)} requests of W at rate inf", flush=True)
        w = http_run(srv.url, items, math.inf, clock.timeout(2 * TAIL_S + len(items)), args.seed)
        runs.append(w | {"mode": label, "point": "W, inf", "rate_fraction": math.inf})
        sat = sat or w["request_throughput"]
        keep = reserve(sat, w["duration_s"]) if reserve else 0.0
        for f, n, est in points(sat):
            # The half-saturation point carries the latency targets: only the budget itself can skip it.
            if clock.left() - (0.0 if f == HALF else keep) < est:
                print(f"!! skipping {label} at {f} x saturation ({n} prompts, ~{est:.0f} s): {clock.left():.0f} s "
                      f"of budget left, {keep:.0f} s of them kept for the sparse server", flush=True)
                runs.append({"mode": label, "point": f"{f:g} x sat", "rate_fraction": f, "num_prompts": n,
                             "skipped": "budget"})
                continue
            rate = f * sat
            print(f"== {time.strftime('%H:%M:%S')} {label}: {n} requests at {f:g} x saturation = {rate:.3f}/s",
                  flush=True)
            r = http_run(srv.url, items[:n], rate, clock.timeout(est), args.seed + 1)
            runs.append(r | {"mode": label, "point": f"{f:g} x sat", "rate_fraction": f})
    return runs, sat


def judge(engine: dict, dense: list[dict], sparse: list[dict] | None, sat: float) -> tuple[list[dict], dict]:
    """The issue's targets: [{target, figure, limit, pass}], and the derived figures. sparse: the sparse
    server's runs, [] when it was skipped, None when not asked for."""
    w_dense = dense[0]
    offline = engine["offline"]["output_tok_s"]
    ratio = w_dense["output_throughput"] / offline
    batches = sorted(int(b) for b in engine["decode_ms_by_batch"])
    ms = [engine["decode_ms_by_batch"][str(b)] for b in batches]
    targets = [{"target": "server / offline output tok/s at rate inf (W)", "figure": ratio, "limit": ">= 0.90",
                "pass": ratio >= 0.90}]
    derived = {"offline_output_tok_s": offline, "server_output_tok_s": w_dense["output_throughput"],
               "saturation_req_s": sat}
    half = next((r for r in dense if r.get("rate_fraction") == HALF and "skipped" not in r), None)
    if half is None:
        targets.append({"target": "half-saturation latency", "figure": math.nan, "limit": "the 0.5 point ran",
                        "pass": False})
    else:
        b = half["mean_decode_batch"]
        step = float(np.interp(b, batches, ms))  # decode step time is near-linear in the batch between points
        first = engine["prefill_chunk_first_token_ms"]
        ttft, tpot = half["ttft_ms"]["p50"], half["tpot_ms"]["p50"]
        derived |= {"half_sat_mean_decode_batch": b, "decode_step_ms_at_half_sat_batch": step,
                    "prefill_chunk_first_token_ms": first, "ttft_ref_ms": first + step,
                    "half_sat_ttft_p50_ms": ttft, "half_sat_tpot_p50_ms": tpot}
        targets += [
            {"target": f"median TTFT at half saturation / (prefill chunk {first:.1f} ms + decode step {step:.1f} ms)",
             "figure": ttft / (first + step), "limit": "< 2", "pass": ttft < 2 * (first + step)},
            {"target": f"median TPOT at half saturation / decode step at its mean batch {b:.1f} ({step:.1f} ms)",
             "figure": tpot / step, "limit": "<= 1.2", "pass": tpot <= 1.2 * step}]
    if sparse == []:
        targets.append({"target": "50% heads: the sparse server", "figure": math.nan, "limit": "ran",
                        "pass": False})
    elif sparse:
        speed = sparse[0]["output_throughput"] / w_dense["output_throughput"]
        derived["sparse_over_dense_tok_s_at_inf"] = speed
        pairs = [(d, s) for d in dense[1:] for s in sparse[1:] if d.get("rate_fraction") == s.get("rate_fraction")
                 and "skipped" not in d and "skipped" not in s]
        lower = [s["tpot_ms"]["p50"] < d["tpot_ms"]["p50"] for d, s in pairs]
        targets += [
            {"target": "50% heads / dense output tok/s at rate inf (W)", "figure": speed, "limit": "> 1",
             "pass": speed > 1},
            {"target": "finite rates where 50% heads has the lower median TPOT", "figure": f"{sum(lower)}/{len(pairs)}",
             "limit": "all", "pass": bool(pairs) and all(lower)}]
    return targets, derived


def write_outputs(out: Path, meta: dict, targets: list[dict], derived: dict, engine: dict, runs: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_http.json").write_text(json.dumps({"meta": meta, "targets": targets, "derived": derived,
                                                     "engine": engine, "runs": runs}, indent=1))
    rows = []
    for r in runs:
        row = {k: r.get(k, "") for k in ("mode", "point", "num_prompts")}
        if "skipped" not in r:
            row |= {"rate req/s": r["request_rate"], "failed": r["failed"], "req/s": r["request_throughput"],
                    "out tok/s": r["output_throughput"], "decode batch": r["mean_decode_batch"],
                    **{f"{k.upper()} p50 ms": r[f"{k}_ms"]["p50"] for k in ("ttft", "tpot", "itl", "e2e")},
                    "TTFT p99 ms": r["ttft_ms"]["p99"], "TPOT p99 ms": r["tpot_ms"]["p99"]}
        else:
            row["rate req/s"] = f"skipped ({r['skipped']})"
        rows.append(row)
    cols = ["mode", "point", "rate req/s", "num_prompts", "failed", "req/s", "out tok/s", "decode batch",
            "TTFT p50 ms", "TPOT p50 ms", "ITL p50 ms", "E2E p50 ms", "TTFT p99 ms", "TPOT p99 ms"]
    tgt = [{"target": t["target"], "figure": t["figure"], "limit": t["limit"], "result": "PASS" if t["pass"]
            else "FAIL"} for t in targets]
    refs = [{"reference": "first token of a lone prefill chunk (ms)", "value": engine["prefill_chunk_first_token_ms"]},
            {"reference": "the decode step after it, batch 1 (ms)", "value": engine["decode_after_prefill_ms"]}]
    refs += [{"reference": f"decode step, batch {b}, context {engine['ref_context']} (ms)", "value": v}
             for b, v in sorted(engine["decode_ms_by_batch"].items(), key=lambda kv: int(kv[0]))]
    off = engine["offline"]
    refs += [{"reference": "offline engine on W: output tok/s, req/s, mean decode batch",
              "value": f"{off['output_tok_s']:.1f}, {off['req_s']:.2f}, {off['mean_decode_batch']:.1f}"}]
    text = ["# serve_http", "", *header_lines(meta), f"Tokenizer: {meta['tokenizer']}.", "", "## Targets", "", markdown_table(tgt, list(tgt[0])), "",
            "## References (same engine configuration, offline, this run)", "",
            markdown_table(refs, ["reference", "value"]), "", "## Runs over HTTP (ms; medians unless p99)", "",
            markdown_table(rows, cols), "", "![latency vs throughput](serve_http.png)", ""]
    (out / "serve_http.md").write_text("\n".join(text))
    reports = [{"label": label, "runs": [r for r in runs if r["mode"] == label and "skipped" not in r]}
               for label in dict.fromkeys(r["mode"] for r in runs)]
    bench.plot(reports, str(out / "serve_http.png"),
               title=f"polar serve, {meta['model']}, {meta['device']}, {meta['date']}: one point per request rate")
    print("\n".join(text), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="model preset, random bf16 weights (default llama-2-7b)")
    ap.add_argument("--requests", type=int, default=128, help="requests of W at rate inf (default 128)")
    ap.add_argument("--prompt-len", default="128,2048", help="LO,HI: W's prompt lengths (default 128,2048)")
    ap.add_argument("--output-len", default="64,512", help="LO,HI: W's output lengths (default 64,512)")
    ap.add_argument("--seed", type=int, default=0, help="W's and the weights' seed")
    ap.add_argument("--rates", default="0.25,0.5,0.75,1.0", help="sweep rates as fractions of the dense saturation "
                    "(0.5 is the half-saturation point; default 0.25,0.5,0.75,1.0; inf is W itself)")
    ap.add_argument("--sweep-requests", type=int, default=48, help="prompts per sweep point at most (default 48)")
    ap.add_argument("--point-seconds", type=float, default=16.0, help="seconds of arrivals per sweep point at "
                    "most (fewer prompts at low rates; default 16)")
    ap.add_argument("--modes", default="dense,sparse", help="dense and/or sparse (random 50%% of heads)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048 + 512)
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                    help=f"prompt tokens per sequence per step (default: the engine's, {PREFILL_CHUNK})")
    ap.add_argument("--batches", default="1,2,4,8,16,24,32,48,64", help="decode batches of the reference step times")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds the whole run may take; sweep points "
                    "that would overrun are skipped (default 450)")
    ap.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to start")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (tiny flags; figures meaningless)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or set(modes) - {"dense", "sparse"} or modes[0] != "dense":
        ap.error(f"--modes must start with dense (the saturation comes from it), got {args.modes!r}")
    if args.allow_cpu and args.out.resolve() == RESULTS.resolve():
        sys.exit(f"error: --allow-cpu figures do not go into {RESULTS}; pass --out DIR")
    # This process only orchestrates: it must not take GPU memory from the engine and server processes.
    jax.config.update("jax_platforms", "cpu")
    # The budget ends this process (gpu_session.sh runs it under `timeout`): SIGTERM unwinds, stopping servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clock = Clock(args.budget_s)
    command = "python -m benchmarks.serve_http " + " ".join(argv if argv is not None else sys.argv[1:])
    cfg = preset(args.model)
    prompts, outs = workload(args.requests, cfg.vocab_size, seed=args.seed, prompt=_pair(args.prompt_len),
                             output=_pair(args.output_len))
    items = [bench.Item(p, int(o)) for p, o in zip(prompts, outs)]
    # The mean context of W's decode steps: a request decodes at contexts p .. p + o, one step each.
    ref_ctx = round(sum(o * (len(p) + o / 2) for p, o in zip(prompts, outs)) / sum(outs))
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve_http-") as tmp:
        tmp = Path(tmp)
        (tmp / "w.json").write_text(json.dumps({"prompts": prompts, "outs": [int(o) for o in outs]}))
        engine_cmd = [sys.executable, "-m", "benchmarks.serve_http_engine", "--model", args.model, "--workload",
                      str(tmp / "w.json"), "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
                      str(args.max_model_len), "--prefill-chunk", str(args.prefill_chunk), "--ref-context",
                      str(ref_ctx), "--batches", args.batches, "--seed", str(args.seed), "--out",
                      str(tmp / "engine.json")] + (["--allow-cpu"] if args.allow_cpu else [])
        print(f"== {time.strftime('%H:%M:%S')} {' '.join(engine_cmd[1:])}", flush=True)
        try:
            subprocess.run(engine_cmd, check=True, timeout=max(1.0, clock.left()))
        except subprocess.CalledProcessError as e:  # it said why (e.g. no GPU without --allow-cpu)
            sys.exit(f"error: benchmarks.serve_http_engine exited with status {e.returncode}")
        engine = json.loads((tmp / "engine.json").read_text())
        if engine["backend"] != "gpu" and args.out.resolve() == RESULTS.resolve():
            sys.exit(f"error: not writing {engine['backend']} figures into {RESULTS}; pass --out DIR")
        tokenizer = write_tokenizer(tmp / "tokenizer", cfg.vocab_size)
        common = ["--model", args.model, "--random-weights", "--seed", str(args.seed), "--tokenizer", str(tokenizer),
                  "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
                  "--prefill-chunk", str(args.prefill_chunk), "--num-pages", str(engine["num_pages"]),
                  "--page-size", str(engine["page_size"]), "--max-queue", str(max(256, args.requests)),
                  "--log-level", "warning", "--quiet", "--shutdown-timeout", "5"]
        (tmp / "sparse.json").write_text(json.dumps(SPARSE))

        def points(sat):
            return sweep_points(rates, sat, args.sweep_requests, args.point_seconds)

        def sparse_reserve(sat, w_seconds):  # the sparse server's start, its W run and its sweep
            return 90 + w_seconds + sum(p[2] for p in points(sat)) if "sparse" in modes else 0.0

        dense_runs, sat = run_mode("dense", common, items, points, None, clock, args, tmp / "dense.log",
                                   reserve=sparse_reserve)
        runs = list(dense_runs)
        sparse_runs = [] if "sparse" in modes else None
        if "sparse" in modes:
            if clock.left() < 90 + dense_runs[0]["duration_s"]:
                print(f"!! skipping the sparse server: {clock.left():.0f} s of budget left", flush=True)
            else:
                sparse_runs, _ = run_mode("random 50% heads", common + ["--sparsity", str(tmp / "sparse.json")],
                                          items, points, sat, clock, args, tmp / "sparse.log")
                runs += sparse_runs
    targets, derived = judge(engine, dense_runs, sparse_runs, sat)
    meta = {"device": engine["device"], "backend": engine["backend"], "jax": engine["jax"], "command": command,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "model": args.model, "requests": args.requests, "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len, "prefill_chunk": args.prefill_chunk,
            "num_pages": engine["num_pages"], "page_size": engine["page_size"], "sparse": SPARSE,
            "clocks": ["wall clock: latencies seen by the client over HTTP on 127.0.0.1 (streamed SSE, one event per "
                       "token); references from the wall time of LLMEngine.step() in a separate offline process"],
            "tokenizer": "word-level over the model's vocabulary (the prompts are random token ids; detokenising "
                         "is cheap)"}
    failed = sum(r.get("failed", 0) for r in runs)
    if failed:
        meta["warnings"] = [f"{failed} requests failed: their runs' figures are incomplete"]
    write_outputs(args.out, meta, targets, derived, engine, runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

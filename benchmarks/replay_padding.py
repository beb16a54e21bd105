"""How much padding the engine's prefill GEMMs carry on a workload: its schedule replayed through the
scheduler on the host (no model, no device; the figures depend on the rules only).

    python -m benchmarks.replay_padding [--requests 512] [--prompt-len 128,2048] [--output-len 64,512]
                                        [--max-num-seqs 64] [--prefill-chunk 2048] [--name NAME] [--out DIR]

Every request is submitted at once (as `benchmarks.serve_offline` does) and each step samples a dummy token.
For each rule it counts the steps that prefill, their real prompt tokens, the prefill tokens after padding
(`padded / real`) and the rows of the prefill GEMMs with the decode rows that ride along (`gemm_rows / real`):
- `packed`: today's engine (`Buckets`) at its default token budget (`Buckets.default_budget`, the largest
  capacity within 2 x prefill_chunk): a step's chunks packed on one token axis, padded to the next capacity,
  with max_num_seqs decode rows riding in every mixed step;
- `packed, 2 x chunk`: the same engine at the budget that was its default before (2 x prefill_chunk);
- `[rows, T] buckets`: the engine before packing, at 2 x prefill_chunk (T in 64, 256, 1024, ..,
  prefill_chunk; rows powers of two up to 8 with rows x T within the budget; chunks grouped longest first;
  no riders, the decode program ran beside).
Writes OUT/NAME.json and OUT/NAME.md (default benchmarks/results/replay_padding).
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from pathlib import Path

from benchmarks import common
from benchmarks.serve_offline import _pair, workload
from polar_jax.engine.block_manager import BlockManager
from polar_jax.engine.model_runner import Buckets, ModelRunner
from polar_jax.engine.sampling_params import SamplingParams
from polar_jax.engine.scheduler import Scheduler, SchedulerConfig
from polar_jax.engine.sequence import Sequence

PAGE_SIZE, NUM_PAGES, MAX_MODEL_LEN = 32, 5121, 8192  # a pool that never preempts W: padding only


def _rows_t_buckets(max_num_seqs: int, chunk: int, budget: int):
    """The [rows, T] buckets of the engine before packing, and its grouping: padded tokens of one step."""
    lengths, t = [], min(64, chunk)
    while t < chunk:
        lengths.append(t)
        t *= 4
    lengths.append(chunk)
    pairs = [(r, t) for t in lengths for r in (1, 2, 4, 8) if r * t <= max(budget, t)]

    def padded(chunks) -> tuple[int, int]:
        ns, groups = [c.n for c in chunks], []
        for n in sorted(ns, reverse=True):
            if groups and any(r >= len(groups[-1]) + 1 and t >= groups[-1][0] for r, t in pairs):
                groups[-1].append(n)
            else:
                groups.append([n])
        total = sum(min((r * t for r, t in pairs if r >= len(g) and t >= g[0])) for g in groups)
        return total, total  # no riders: the decode program ran beside
    return padded


def _packed(max_num_seqs: int, chunk: int, budget: int):
    """Today's engine: the runner's own grouping of a step's chunks (ModelRunner._prefill_groups reads only
    its buckets), each group padded to its capacity, max_num_seqs riders beside each."""
    runner = SimpleNamespace(buckets=Buckets.make(max_num_seqs, chunk, budget))

    def padded(chunks) -> tuple[int, int]:
        groups = ModelRunner._prefill_groups(runner, chunks)
        total = sum(runner.buckets.prefill_size(sum(c.n for c in g)) for g in groups)
        return total, total + len(groups) * max_num_seqs
    return padded


def replay(args, rule: str) -> dict:
    budget = (Buckets.default_budget(args.max_num_seqs, args.prefill_chunk) if rule == "packed"
              else 2 * args.prefill_chunk)
    padded = (_rows_t_buckets(args.max_num_seqs, args.prefill_chunk, budget) if rule == "[rows, T] buckets"
              else _packed(args.max_num_seqs, args.prefill_chunk, budget))
    cfg = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
                          prefill_chunk=args.prefill_chunk, max_model_len=MAX_MODEL_LEN, page_size=PAGE_SIZE,
                          num_pages=NUM_PAGES)
    sched = Scheduler(cfg, BlockManager(NUM_PAGES, PAGE_SIZE))
    prompts, outs = workload(args.requests, 32000, prompt=_pair(args.prompt_len), output=_pair(args.output_len))
    for i, (p, o) in enumerate(zip(prompts, outs)):
        sched.add(Sequence(f"w{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)))
    steps = real = pad = rows = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        if batch.prefill:
            p, r = padded(batch.prefill)
            steps, real, pad, rows = steps + 1, real + sum(c.n for c in batch.prefill), pad + p, rows + r
        sched.advance(batch)
        sched.apply(batch, {s.request_id: (5, None, 5, None) for s, _ in batch.sampling})
    return {"rule": rule, "max_num_batched_tokens": budget, "prefill_steps": steps, "real_tokens": real,
            "padded_tokens": pad, "padded_per_real": pad / real, "gemm_rows": rows, "gemm_rows_per_real": rows / real}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", default="128,2048", help="LO,HI: prompt lengths uniform in [LO, HI]")
    ap.add_argument("--output-len", default="64,512", help="LO,HI: output lengths uniform in [LO, HI]")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--name", default="replay_padding")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    command = "python -m benchmarks.replay_padding " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = common.metadata(command) | {"device": "host only (a schedule replay: no model, no device)"}
    records = [replay(args, rule) for rule in ("[rows, T] buckets", "packed, 2 x chunk", "packed")]
    cols = ["rule", "max_num_batched_tokens", "prefill_steps", "real_tokens", "padded_tokens", "padded_per_real", "gemm_rows",
            "gemm_rows_per_real"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = common.markdown_table(records, cols)
    (args.out / f"{args.name}.md").write_text("\n".join([f"# {args.name}", "", *common.header_lines(meta), table, ""]))
    print(table)


if __name__ == "__main__":
    main()

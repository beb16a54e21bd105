"""The engine loop: requests in, per-step outputs (new tokens and text) out.

    engine = LLMEngine(cfg, params, tokenizer, max_num_seqs=64)
    engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step: the scheduler picks decode rows and prefill chunks (host, plain Python), the model runner launches
them (device, jitted programs), and then the step launched before is finished: the scheduler applies its
sampled tokens and each sequence's detokenizer turns them into text (and catches stop strings). One step
is always in flight, so the device never waits for the host's Python between steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence as Seq

import jax

from pallas_kernels.paged_attention.api import PAGE_SIZES
from polar_jax.cache import PAGE_SIZE, page_bytes, pages_for
from polar_jax.config import ModelConfig, check_head_dim, token_ids
from polar_jax.engine.block_manager import BlockManager
from polar_jax.engine.detokenizer import Detokenizer
from polar_jax.engine.model_runner import Buckets, ModelRunner
from polar_jax.engine.sampling_params import SamplingParams
from polar_jax.engine.scheduler import Scheduler, SchedulerConfig
from polar_jax.engine.sequence import RequestError, Sequence
from polar_jax.sparsity import SparsityConfig, check_routers

# Prompt tokens of one sequence per step. A step that prefills runs a second program beside the decode
# program, which reads every weight again, so fewer, larger chunks prefill W in fewer such steps
# (benchmarks/results/serve_offline.md compares chunk sizes on W).
PREFILL_CHUNK = 2048
# On a CPU the pool shares the process's memory with the weights, XLA's compiler and everything else, so the
# "device memory" the pool takes its fraction of is this share of the physical memory available.
CPU_POOL_SHARE = 0.25


def default_compile_cache() -> Path:
    """$POLAR_HOME/jax, else $XDG_CACHE_HOME/polar-jax/jax, else ~/.cache/polar-jax/jax."""
    home = os.environ.get("POLAR_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polar-jax"
    return Path(home).expanduser() / "jax"


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step. new_token_ids / new_text: what this step added (for streaming).
    token_ids, logprobs and top_logprobs are the first num_output_tokens of the request's, copied when read:
    the outputs an engine step reports never change after, so an output costs the same however long its
    request has run."""

    request_id: str
    prompt_token_ids: list[int]
    num_output_tokens: int
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    # What ended a "stop": the stop string matched, or the token id of SamplingParams.stop_token_ids; None for the
    # model's EOS, for any other finish_reason and before the end (vLLM's stop_reason)
    stop_reason: int | str | None
    prompt_logprobs: list[float | None] | None  # of each prompt token, None for the first
    # At each prompt token the SamplingParams.prompt_logprobs most likely tokens as above, None for the first
    prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int
    _seq: Sequence = dataclasses.field(repr=False, compare=False)

    @property
    def token_ids(self) -> list[int]:
        return self._seq.output_token_ids[: self.num_output_tokens]

    @property
    def logprobs(self) -> list[float] | None:
        """Of each output token (SamplingParams.logprobs not None)."""
        lps = self._seq.output_logprobs
        return lps[: self.num_output_tokens] if self._seq.params.logprobs is not None else None

    @property
    def top_logprobs(self) -> list[tuple[tuple[int, float], ...]] | None:
        """At each output token the SamplingParams.logprobs most likely tokens, ((token, logprob), ...) most
        likely first (SamplingParams.logprobs not None)."""
        tops = self._seq.output_top_logprobs
        return tops[: self.num_output_tokens] if self._seq.params.logprobs is not None else None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


def enable_compile_cache(path: str | os.PathLike | None = "default") -> None:
    """JAX's persistent compilation cache, so a restarted engine loads its programs instead of compiling them
    ("default": `default_compile_cache()`; None: leave JAX's setting alone). An explicit
    JAX_COMPILATION_CACHE_DIR wins."""
    if path is None or os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    path = default_compile_cache() if path == "default" else path
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def kv_pages_that_fit(cfg: ModelConfig, dtype, page_size: int, fraction: float) -> int:
    """Pages of KV (all layers) that fit in `fraction` of the device memory JAX may use, less what is in use.

    On a GPU: from the allocator's limit and use. On a CPU (no allocator statistics): `fraction` of
    CPU_POOL_SHARE of the physical memory available now.
    """
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = fraction * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = fraction * CPU_POOL_SHARE * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free // page_bytes(cfg, page_size, dtype))


class LLMEngine:
    """Continuous batching over a paged KV cache.

    max_num_seqs: sequences decoded together at most. max_model_len: prompt + output tokens of one request
    (default: the model's context length). num_pages: KV pool size in pages (default: as many as
    kv_memory_fraction of the device memory holds, on a CPU of CPU_POOL_SHARE of the memory available, capped
    at what max_num_seqs full-length sequences use). compile_cache: JAX's persistent compilation cache
    ("default": $POLAR_HOME/jax, else ~/.cache/polar-jax/jax; None: JAX's own setting).
    prefill_chunk: prompt tokens of one sequence per step (at most max_model_len; default PREFILL_CHUNK);
    max_num_batched_tokens: tokens per step, decode and prefill together (default: the largest packed
    prefill capacity within 2 * prefill_chunk, `Buckets.default_budget`; 4,032 for 2,048-token chunks and 64
    sequences). sparsity: how decode steps pick heads and neurons (prefill is dense). compile: compile
    every bucket's program now (with a progress bar when progress).

    batch_invariant: each request's tokens and log-probabilities are bit for bit the same whatever else the
    engine runs beside it, however its prompt is chunked and whether it is preempted (for reproducible
    outputs under load, and for checking an engine against itself). Every step then runs one dense program
    of one shape over max_num_batched_tokens tokens (default `Buckets.invariant_budget`: 512 for up to 512
    sequences), decode rows included: slower decode, no sparsity. Requests that ask for prompt logprobs
    are prefilled by a program of their own and keep this guarantee only for those log-probabilities.

    seed: keys random head / neuron selection (sparsity attn or mlp "random"), with the step number
    (default: the sparsity config's seed). Sampling has its own seeds, per request.
    """

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer=None, *, sparsity: SparsityConfig | None = None,
                 max_num_seqs: int = 64, max_model_len: int | None = None, num_pages: int | None = None,
                 kv_memory_fraction: float = 0.9, page_size: int = PAGE_SIZE, prefill_chunk: int = PREFILL_CHUNK,
                 max_num_batched_tokens: int | None = None, compile: bool = True, progress: bool = True,
                 compile_cache: str | os.PathLike | None = "default", per_request_density: bool = False,
                 batch_invariant: bool = False, seed: int | None = None):
        check_head_dim(cfg)
        if seed is None:  # random head / neuron selection: the sparsity config's seed unless one is given
            seed = sparsity.seed if sparsity is not None else 0
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must lie in (0, 1], got {kv_memory_fraction}")
        max_model_len = cfg.max_positions if max_model_len is None else int(max_model_len)
        if not 1 <= max_model_len <= cfg.max_positions:
            raise ValueError(f"max_model_len={max_model_len} must lie in [1, {cfg.max_positions}] (the model's "
                             "context length)")
        if prefill_chunk < 1 or max_num_seqs < 1:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) and max_num_seqs ({max_num_seqs}) must be >= 1")
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size={page_size} unsupported; supported: {', '.join(map(str, PAGE_SIZES))}")
        if sparsity is not None:
            check_routers(cfg, params, sparsity)
        if per_request_density and (sparsity is None or sparsity.attn == "all"):
            raise ValueError("per_request_density needs a sparsity config that selects heads (attn = router, "
                             "oracle or random): it says where a request's heads come from")
        if batch_invariant and sparsity is not None and (sparsity.attn != "all" or sparsity.mlp != "all"):
            raise ValueError("batch_invariant=True runs decode rows through the dense prefill program: leave "
                             "sparsity unset (the sparse MLP keeps the union of the batch's neurons, so a "
                             "sparse step cannot be batch-invariant)")
        self.per_request_density = per_request_density
        enable_compile_cache(compile_cache)
        dtype = params["embed"].dtype
        most = max_num_seqs * pages_for(max_model_len, page_size) + 1  # more pages than this are never used
        if num_pages is None:
            num_pages = min(most, kv_pages_that_fit(cfg, dtype, page_size, kv_memory_fraction))
        if num_pages - 1 < pages_for(max_model_len, page_size):  # page 0 is the scratch page
            raise ValueError(f"the KV pool ({num_pages} pages of {page_size} tokens) cannot hold one sequence of "
                             f"max_model_len {max_model_len} tokens: lower max_model_len, or raise num_pages or "
                             "kv_memory_fraction")
        prefill_chunk = min(prefill_chunk, max_model_len)  # no longer chunk can occur: no bucket for one
        budget = max_num_batched_tokens or (Buckets.invariant_budget(max_num_seqs) if batch_invariant
                                            else Buckets.default_budget(max_num_seqs, prefill_chunk))
        self.config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                      prefill_chunk=prefill_chunk, max_model_len=max_model_len,
                                      page_size=page_size, num_pages=num_pages)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.scheduler = Scheduler(self.config, BlockManager(num_pages, page_size))
        self.runner = ModelRunner(cfg, params, num_pages=num_pages, page_size=page_size,
                                  max_model_len=max_model_len, sparsity=sparsity, seed=seed,
                                  per_request_density=per_request_density, batch_invariant=batch_invariant,
                                  buckets=(Buckets.invariant if batch_invariant else Buckets.make)(
                                      max_num_seqs, prefill_chunk, budget))
        self._detok: dict[str, Detokenizer] = {}
        self._in_flight = None  # the step launched and not yet finished (model_runner.Launched)
        self.compile_s = 0.0
        if compile:
            self.compile_s = self.runner.compile_all(_progress_bar("compiling", progress))

    # -- requests ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load a model with one")
            return list(self.tokenizer.encode(prompt))
        return token_ids(prompt)

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, attn_density: float | None = None) -> None:
        """Queue a request; RequestError (a ValueError) naming it and its field (and nothing queued) when it
        cannot run.

        attn_density: this request's fraction of KV heads in sparse layers (engine built with
        per_request_density); None: the sparsity config's."""
        if attn_density is not None:
            if not self.per_request_density:
                raise RequestError(request_id, "attn_density needs an engine built with per_request_density=True "
                                   "and a sparsity config", "attn_density")
            if not (isinstance(attn_density, (int, float)) and 0 < attn_density <= 1):
                raise RequestError(request_id, f"attn_density must lie in (0, 1], got {attn_density!r}", "attn_density")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id!r}: params must be a SamplingParams, got {type(params).__name__}")
        try:
            ids = self.encode(prompt)
        except ValueError as e:
            raise RequestError(request_id, str(e), "prompt") from None
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(request_id, f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})",
                               "prompt")
        bad = [t for t in params.stop_token_ids if t >= self.cfg.vocab_size]
        if bad:  # the model can never sample it: the request would run to max_tokens where it meant to stop
            raise RequestError(request_id, f"stop token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.cfg.vocab_size})", "stop_token_ids")
        bad = [t for t, _ in params.logit_bias if t >= self.cfg.vocab_size]
        if bad:
            raise RequestError(request_id, f"logit_bias token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.cfg.vocab_size})", "logit_bias")
        if params.stop and self.tokenizer is None:
            raise RequestError(request_id, "stop strings need a tokenizer", "stop")
        seq = Sequence(request_id, ids, params, eos_token_ids=self.cfg.eos_token_ids, arrival_time=arrival_time,
                       attn_density=None if attn_density is None else float(attn_density))
        self.scheduler.add(seq)  # raises ValueError naming the request
        if self.tokenizer is not None:
            self._detok[request_id] = Detokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                                  params.include_stop_str_in_output, params.min_tokens)

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request in any state; its pages are free at once. False if unknown or finished."""
        aborted = self.scheduler.abort(request_id)
        self._detok.pop(request_id, None)
        return aborted

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- the loop ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step: launch the next batch, then finish the step launched before it (one step is
        in flight between calls, so the host's work overlaps the device's). Returns an output for every
        request that got a token (or finished) in the finished step."""
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            launched = self.runner.launch(batch)
            self.scheduler.advance(batch)
        elif self._in_flight is None and self.scheduler.has_unfinished():  # add() admits only what fits alone
            raise RuntimeError(f"the scheduler made no progress with {self.scheduler.num_waiting} waiting "
                               f"and {self.scheduler.num_running} running requests")
        previous, self._in_flight = self._in_flight, launched
        return self._finish(previous) if previous is not None else []

    def _finish(self, launched) -> list[RequestOutput]:
        sampled, prompt_lp = self.runner.collect(launched)
        self.scheduler.apply(launched.batch, sampled, prompt_lp)
        outputs = []
        for seq, i in launched.batch.sampling:
            if seq.finish_reason == "abort" or i >= len(seq.output_token_ids):
                continue  # aborted, or sampled past its own EOS by a step already launched
            token = seq.output_token_ids[i]
            detok = self._detok.get(seq.request_id)
            delta = ""
            # An EOS or stop token id that ended seq (scheduler.apply) adds no text unless the request keeps its
            # stop strings (vLLM's): its text is never emitted, so a stream never has to take it back.
            on_stop_token = seq.finish_reason == "stop" and i == len(seq.output_token_ids) - 1
            if detok is not None and (not on_stop_token or seq.params.include_stop_str_in_output):
                delta = detok.add_token(token)
                if detok.stopped is not None and seq.finish_reason != "stop":
                    self.scheduler.stop_at(seq, i)
            last = seq.is_finished and i == len(seq.output_token_ids) - 1
            if last and detok is not None:
                delta += detok.flush()
            outputs.append(self._output(seq, i, delta, last))
            if last:
                self._detok.pop(seq.request_id, None)
        return outputs

    def _output(self, seq: Sequence, i: int, delta: str, finished: bool) -> RequestOutput:
        """seq's state once its output token i is known (later outputs may still be PENDING)."""
        detok = self._detok.get(seq.request_id)
        t = seq.timings
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
            num_output_tokens=i + 1, text=detok.text if detok is not None else "",
            new_token_ids=[seq.output_token_ids[i]], new_text=delta, finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            stop_reason=_stop_reason(seq, detok) if finished else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
            prompt_top_logprobs=list(seq.prompt_top_logprobs) if seq.prompt_top_logprobs is not None else None,
            arrival_time=t.arrival, first_token_time=t.first_token, finish_time=t.finish if finished else None,
            num_preemptions=seq.num_preemptions, _seq=seq)


def _progress_bar(desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = None

    def update(i: int, n: int):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n, desc=desc, unit="program")
        bar.update(1)
        if i == n:
            bar.close()

    return update


def _stop_reason(seq: Sequence, detok) -> int | str | None:
    """What ended a finished seq, checked in the scheduler's order: the model's EOS (None), a stop token id, a
    stop string."""
    if seq.finish_reason != "stop":
        return None
    last, p = seq.output_token_ids[-1], seq.params
    if last in seq.eos_token_ids and not p.ignore_eos:
        return None
    if last in p.stop_token_ids:
        return last
    return detok.stopped if detok is not None else None

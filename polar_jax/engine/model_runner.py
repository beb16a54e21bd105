"""The engine's device side: a scheduled batch in, sampled tokens out, through two jitted programs.

  decode   [Bd] sequences append one token each (sparse heads / neurons per the SparsityConfig), sample.
  mixed    [Bp, Tc] chunks of new tokens (dense) and, riding along, the step's decode rows padded to
           max_num_seqs (`forward_mixed`: one pass over the weights for both); sample at each chunk's last
           token and for each decode row. A step that prefills runs it (with no real decode rows if it has
           none), so it reads the weights once, not once per program.

A prefill group whose requests ask for prompt logprobs runs a third program (prefill with every position's
logits) beside them. All take the whole KV page pool and the last sampled tokens (donated, updated in place) plus
per-step arrays: page tables
[B, M], lengths, tokens and per-row sampling parameters. Batch sizes and chunk lengths are padded to a small
set of buckets (`Buckets`) so the number of compiled programs is bounded; `compile_all` compiles every one
of them ahead of traffic. Padded rows have n_new = 0 (they write nothing, take no part in the MLP union) and
point at page 0, which the allocator never hands out.

The boundary to the host-side scheduler is `launch` (ScheduledBatch -> Launched, returns at once) and
`collect` (Launched -> {request_id: (token, logprob)}, waits): the engine launches step n+1 before it
collects step n, so the host's work of one step overlaps the device's of the other. Sampled tokens also
stay on the device ([S] `last`, one slot per running sequence) for the next decode step to read.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import KVCache, init_pool, pages_for
from polar_jax.config import ModelConfig
from polar_jax.engine.sampler import needs_filter, sample_rows
from polar_jax.engine.scheduler import ScheduledBatch
from polar_jax.engine.sequence import PENDING
from polar_jax.model import PREFILL_COMPILER_OPTIONS, Riders, forward, forward_mixed
from polar_jax.sparsity import SparsityConfig


def _pow2_up_to(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded shapes the programs are compiled for.

    decode: batch sizes (powers of two from 4, and max_num_seqs). prefill: (rows, chunk length) pairs,
    chunk lengths 64, 256, ... (x4) up to prefill_chunk, rows powers of two up to max_prefill_rows, with
    rows * length <= the step's token budget.
    """

    decode: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]

    @classmethod
    def make(cls, max_num_seqs: int, prefill_chunk: int, token_budget: int, max_prefill_rows: int = 8) -> Buckets:
        decode = tuple(_pow2_up_to(min(4, max_num_seqs), max_num_seqs))
        lengths, t = [], min(64, prefill_chunk)
        while t < prefill_chunk:
            lengths.append(t)
            t *= 4
        lengths.append(prefill_chunk)
        pairs = [(r, t) for t in lengths for r in _pow2_up_to(1, max_prefill_rows) if r * t <= max(token_budget, t)]
        return cls(decode, tuple(pairs))

    def decode_size(self, n: int) -> int:
        return next(b for b in self.decode if b >= n)

    def fits(self, rows: int, longest: int) -> bool:
        return any(r >= rows and t >= longest for r, t in self.prefill)

    def prefill_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """The smallest bucket (fewest padded tokens) that holds `rows` chunks of up to `longest` tokens."""
        fits = [(r * t, r, t) for r, t in self.prefill if r >= rows and t >= longest]
        if not fits:
            raise ValueError(f"no prefill bucket holds {rows} chunks of {longest} tokens; buckets: {self.prefill}")
        _, r, t = min(fits)
        return r, t


def _feed(last, slots, tokens):
    """tokens [B] with each PENDING row's token taken from the device's last sampled tokens [S] at its slot
    (a token the host has not seen yet: the step that sampled it may still be running)."""
    return jnp.where(tokens == PENDING, last[jnp.clip(slots, 0, last.shape[0] - 1)], tokens)


def _keep(last, slots, tok):
    """last [S] with tok [B] written at slots [B] (rows whose slot is S or more write nothing)."""
    return last.at[slots].set(tok, mode="drop")


def _decode_program(cfg: ModelConfig, sparsity: SparsityConfig | None, filtered: bool, params, k, v, last, tokens,
                    slots, table, lengths, valid, row_density, temps, top_k, top_p, seeds, steps, seed,
                    step):
    cache = KVCache(k, v, table, lengths)
    key = jax.random.fold_in(jax.random.key(seed), step)  # random head/neuron choices: fresh every step
    tokens = _feed(last, slots, tokens)
    logits, cache, _ = forward(cfg, params, tokens[:, None], cache, n_new=valid.astype(jnp.int32),
                               sparsity=sparsity, key=key, row_density=row_density)
    tok, logprob = sample_rows(logits[:, 0], temps, top_k, top_p, seeds, steps, filtered=filtered)
    return cache.k, cache.v, _keep(last, slots, tok), tok, logprob


def _mixed_program(cfg: ModelConfig, sparsity: SparsityConfig | None, filtered: bool, params, k, v, last,
                   d_tokens, d_slots, d_table, d_lengths, d_valid, d_density, d_temps, d_top_k, d_top_p, d_seeds,
                   d_steps, seed, step, slots, tokens, table, starts, n_new, temps, top_k, top_p, seeds, steps):
    """The prefill chunks [Bp, Tc] (the rest of the arguments) with the decode rows (d_*, as the decode
    program takes them) riding along: returns the pools, last, and (tokens, logprobs) of each part."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    riders = Riders(_feed(last, d_slots, d_tokens), d_lengths, d_valid, d_table, d_density)
    logits, d_logits, k, v = forward_mixed(cfg, params, tokens, KVCache(k, v, table, starts), riders, n_new=n_new,
                                           sparsity=sparsity, key=key)  # [Bp, V], [R, V]
    d_tok, d_lp = sample_rows(d_logits, d_temps, d_top_k, d_top_p, d_seeds, d_steps, filtered=filtered)
    tok, lp = sample_rows(logits, temps, top_k, top_p, seeds, steps, filtered=filtered)
    last = _keep(_keep(last, d_slots, d_tok), slots, tok)
    return k, v, last, d_tok, d_lp, tok, lp


def _prefill_logprobs_program(cfg: ModelConfig, params, k, v, last, slots, tokens, table, starts, n_new, temps,
                              top_k, top_p, seeds, steps, targets):
    """The prefill program that also returns [Bp, Tc] log-probabilities of targets[b, t] (the token after
    position t): all T logits are kept, so it runs only for chunks whose requests ask for prompt logprobs."""
    cache = KVCache(k, v, table, starts)
    logits, cache, _ = forward(cfg, params, tokens, cache, n_new=n_new)  # [Bp, Tc, V]
    final = jnp.take_along_axis(logits, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [Bp, V]
    tok, logprob = sample_rows(final, temps, top_k, top_p, seeds, steps)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (cache.k, cache.v, _keep(last, slots, tok), tok, logprob,
            jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


_DECODE = jax.jit(_decode_program, static_argnums=(0, 1, 2), donate_argnums=(4, 5, 6))
_MIXED = jax.jit(_mixed_program, static_argnums=(0, 1, 2), donate_argnums=(4, 5, 6),
                 compiler_options=PREFILL_COMPILER_OPTIONS)
_PREFILL_LOGPROBS = jax.jit(_prefill_logprobs_program, static_argnums=(0,), donate_argnums=(2, 3, 4),
                            compiler_options=PREFILL_COMPILER_OPTIONS)


@dataclasses.dataclass
class StepRecord:
    """One engine step as the benchmark's roofline needs it."""

    decode_rows: int  # real sequences decoded
    context_tokens: int  # sum over decoded sequences of their cache length (KV positions read, dense)
    prefill_tokens: int  # real prefill tokens
    prefill_context: int  # sum over prefill tokens of the positions each attends to
    seconds: float  # from the previous step's results (or this launch, if none was in flight) to this one's
    wait_seconds: float = 0.0  # of which the host was blocked waiting for them


@dataclasses.dataclass
class Launched:
    """A dispatched step: its batch, device results per program ([rows] tokens and logprobs, the sequence of
    each row or None), prompt logprobs per prefill group that asked, and its StepRecord when recording."""

    batch: ScheduledBatch
    results: list = dataclasses.field(default_factory=list)
    prompt: list = dataclasses.field(default_factory=list)
    record: StepRecord | None = None


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, *, num_pages: int, page_size: int, max_model_len: int,
                 buckets: Buckets, sparsity: SparsityConfig | None = None, per_request_density: bool = False,
                 seed: int = 0):
        """per_request_density: decode takes each sequence's own attention density (seq.attn_density, None
        for the config's), at the price of head capacity K in sparse layers; needs a sparse `sparsity`."""
        self.cfg, self.params, self.sparsity = cfg, params, sparsity
        self.per_request_density = per_request_density
        self.page_size, self.num_pages = page_size, num_pages
        self.M = pages_for(max_model_len, page_size)
        self.buckets = buckets
        self.k, self.v = init_pool(cfg, num_pages, page_size, params["embed"].dtype)
        self.num_slots = buckets.decode[-1]  # max_num_seqs: one slot per running sequence
        self.last = jnp.zeros(self.num_slots, jnp.int32)  # [S] each slot's last sampled token, on the device
        self.seed, self.num_decode_steps = seed & 0xFFFFFFFF, 0
        self.log: list[StepRecord] = []
        self.record = False
        self._in_flight, self._busy_since = 0, None

    # -- host arrays ------------------------------------------------------------------------------------
    def _table(self, seqs, rows: int) -> np.ndarray:
        table = np.zeros((rows, self.M), np.int32)  # page 0: the scratch page of padded rows
        for i, s in enumerate(seqs):
            table[i, : len(s.pages)] = s.pages
        return table

    @staticmethod
    def _sampling(seqs, rows: int):
        temps = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        seeds = np.zeros(rows, np.uint32)
        steps = np.zeros(rows, np.int32)
        for i, s in enumerate(seqs):
            p = s.params
            temps[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
            seeds[i] = s.seed & 0xFFFFFFFF
            steps[i] = len(s.output_token_ids)  # the key of a request's n-th token depends on (seed, n) only
        return temps, top_k, top_p, seeds, steps

    # -- programs -------------------------------------------------------------------------------------
    def _slots(self, seqs, rows: int) -> np.ndarray:
        slots = np.full(rows, self.num_slots, np.int32)  # num_slots: padding, writes nothing
        for i, s in enumerate(seqs):
            if s is not None:
                slots[i] = s.slot
        return slots

    def _decode_args(self, seqs, rows: int):
        tokens = np.zeros(rows, np.int32)  # PENDING: the device's last sampled token at the row's slot
        lengths = np.zeros(rows, np.int32)
        valid = np.zeros(rows, bool)
        density = np.full(rows, np.nan, np.float32)  # NaN: the sparsity config's own density
        for i, s in enumerate(seqs):
            tokens[i], lengths[i], valid[i] = s.last_token_id, s.num_computed, True
            if s.attn_density is not None:
                density[i] = s.attn_density
        self.num_decode_steps += bool(seqs)
        return (tokens, self._slots(seqs, rows), self._table(seqs, rows), lengths, valid,
                density if self.per_request_density else None, *self._sampling(seqs, rows), np.uint32(self.seed),
                np.int32(self.num_decode_steps))

    def _prefill_args(self, chunks, rows: int, T: int):
        tokens = np.zeros((rows, T), np.int32)
        starts = np.zeros(rows, np.int32)
        n_new = np.zeros(rows, np.int32)
        for i, c in enumerate(chunks):
            ids = c.seq.all_token_ids[c.start: c.start + c.n]
            if PENDING in ids:
                raise RuntimeError(f"request {c.seq.request_id!r}: a prefill chunk holds a token not yet sampled")
            tokens[i, : c.n], starts[i], n_new[i] = ids, c.start, c.n
        seqs = [c.seq for c in chunks]
        slots = self._slots([c.seq if c.samples else None for c in chunks], rows)
        return (slots, tokens, self._table(seqs, rows), starts, n_new, *self._sampling(seqs, rows))

    def compile_all(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Compile every bucket's program before traffic; returns the seconds it took."""
        t0 = time.perf_counter()
        shapes = ([("decode", b, f) for f in (False, True) for b in self.buckets.decode]
                  + [("mixed", rt, f) for f in (False, True) for rt in self.buckets.prefill])
        state = (self.k, self.v, self.last)
        for i, (kind, shape, filtered) in enumerate(shapes):
            if kind == "decode":
                *state, _, _ = _DECODE(self.cfg, self.sparsity, filtered, self.params, *state,
                                       *self._decode_args([], shape))
            else:
                *state, _, _, _, _ = _MIXED(self.cfg, self.sparsity, filtered, self.params, *state,
                                            *self._decode_args([], self.num_slots), *self._prefill_args([], *shape))
            jax.block_until_ready(state)
            if progress:
                progress(i + 1, len(shapes))
        self.k, self.v, self.last = state
        return time.perf_counter() - t0

    def launch(self, batch: ScheduledBatch) -> Launched:
        """Dispatch the batch's decode rows and prefill chunks without waiting for them. Decode rows whose
        last token is still PENDING (sampled by the step before, maybe still running) read it on the device."""
        t0 = time.perf_counter()
        if self._busy_since is None:
            self._busy_since = t0
        out = Launched(batch)
        groups = self._prefill_groups(sorted(batch.prefill, key=lambda c: -c.n))
        with_logprobs = [g for g in groups
                         if any(c.seq.params.prompt_logprobs and c.start < c.seq.num_prompt_tokens for c in g)]
        plain = [g for g in groups if g not in with_logprobs]
        riders = batch.decode
        if riders and not plain:  # nothing to ride on: the decode program
            args = self._decode_args(riders, self.buckets.decode_size(len(riders)))
            filtered = needs_filter(*args[6:9])  # temps, top_k, top_p
            self.k, self.v, self.last, tok, lp = _DECODE(self.cfg, self.sparsity, filtered, self.params, self.k,
                                                         self.v, self.last, *args)
            out.results.append((riders, tok, lp))
            riders = []
        for group in plain:
            d_args = self._decode_args(riders, self.num_slots)
            args = self._prefill_args(group, *self.buckets.prefill_shape(len(group), max(c.n for c in group)))
            filtered = needs_filter(*d_args[6:9]) or needs_filter(*args[5:8])
            self.k, self.v, self.last, d_tok, d_lp, tok, lp = _MIXED(
                self.cfg, self.sparsity, filtered, self.params, self.k, self.v, self.last, *d_args, *args)
            if riders:
                out.results.append((riders, d_tok, d_lp))
                riders = []
            out.results.append(([c.seq if c.samples else None for c in group], tok, lp))
        for group in with_logprobs:
            rows, T = self.buckets.prefill_shape(len(group), max(c.n for c in group))
            self.k, self.v, self.last, tok, lp, target_lp = _PREFILL_LOGPROBS(
                self.cfg, self.params, self.k, self.v, self.last, *self._prefill_args(group, rows, T),
                self._targets(group, rows, T))
            out.prompt.append((group, target_lp))
            out.results.append(([c.seq if c.samples else None for c in group], tok, lp))
        if self.record:
            out.record = StepRecord(
                decode_rows=len(batch.decode),
                context_tokens=sum(s.num_computed + 1 for s in batch.decode),
                prefill_tokens=sum(c.n for c in batch.prefill),
                prefill_context=sum(c.n * c.start + c.n * (c.n + 1) // 2 for c in batch.prefill),
                seconds=0.0)
        self._in_flight += 1
        return out

    def collect(self, launched: Launched) -> tuple[dict[str, tuple[int, float]], dict[str, np.ndarray]]:
        """Wait for a launched step. Returns (sampled, prompt_logprobs): sampled {request_id: (token, logprob)}
        for every decode row and every chunk that samples; prompt_logprobs {request_id: [n] logprobs of the
        chunk's tokens after its first position} for chunks of requests that asked for them
        (Sequence.record_prompt_logprobs)."""
        t_wait = time.perf_counter()
        results = [(seqs, np.asarray(tok), np.asarray(lp)) for seqs, tok, lp in launched.results]
        prompt = [(group, np.asarray(target_lp)) for group, target_lp in launched.prompt]
        now = time.perf_counter()
        sampled, prompt_lp = {}, {}
        for seqs, tok, lp in results:
            for i, s in enumerate(seqs):
                if s is not None:
                    sampled[s.request_id] = (int(tok[i]), float(lp[i]))
        for group, target_lp in prompt:
            prompt_lp.update({c.seq.request_id: target_lp[i, : c.n] for i, c in enumerate(group)
                              if c.seq.params.prompt_logprobs})
        if launched.record is not None:  # the time since the step before it completed: device throughput
            launched.record.seconds, launched.record.wait_seconds = now - self._busy_since, now - t_wait
            self.log.append(launched.record)
        self._in_flight -= 1
        self._busy_since = now if self._in_flight else None
        return sampled, prompt_lp

    def _prefill_groups(self, chunks):
        """Split chunks (longest first) into groups that each fit one prefill bucket."""
        groups: list[list] = []
        for c in chunks:
            if groups and self.buckets.fits(len(groups[-1]) + 1, groups[-1][0].n):
                groups[-1].append(c)
            else:
                groups.append([c])
        return groups

    @staticmethod
    def _targets(group, rows: int, T: int) -> np.ndarray:
        """[rows, T] the token after each fed position (prompt logprobs); 0 past a sequence's known tokens."""
        targets = np.zeros((rows, T), np.int32)
        for i, c in enumerate(group):
            nxt = c.seq.all_token_ids[c.start + 1: c.start + c.n + 1]
            targets[i, : len(nxt)] = np.maximum(nxt, 0)  # a PENDING last output is past the prompt: unused
        return targets

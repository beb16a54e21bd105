"""The engine's device side: a scheduled batch in, sampled tokens out, through two jitted model programs
and a sampler.

  decode   [Bd] sequences append one token each (sparse heads / neurons per the SparsityConfig): logits.
  mixed    the step's prefill chunks packed back to back on one token axis [S] (dense; `forward_packed`), and,
           riding along, its decode rows padded to max_num_seqs (one pass over the weights for both):
           logits for each decode row and at each chunk's last token. A step that prefills runs it (with
           no real decode rows if it has none), so it reads the weights once, not once per program.
  sample   a token per row of a model program's logits, with each row's own sampling parameters; it
           writes them to `last`. Two variants (with and without the top-k / top-p / min-p cut-offs, chosen on the
           host), so the model programs, the costly ones to compile, need only one each.

Batch-invariant mode (`batch_invariant`) replaces decode and mixed by one program of one shape, `unified`:
every step packs its decode rows (as one-token chunks) and its prefill chunks into the same S tokens and C =
max_num_seqs chunks, dense, through the same GEMMs and the same attention kernel. A request's tokens and
log-probabilities then do not depend on what shares its steps, on how its prompt was chunked, or on a
preemption's recompute. It costs the decode kernels' speed and sparsity (the MLP neuron union is the batch's
by design).

A prefill group whose requests ask for prompt logprobs runs a third model program (a packed prefill with
every token's logits) instead of mixed. The model programs take the whole KV page pool (donated, updated in
place) and the last sampled tokens, plus per-step arrays: page tables [B, M], lengths, tokens. Decode
batches and packed token counts are padded to a small set of buckets (`Buckets`) so the number of compiled
programs is bounded; `compile_all` compiles every one of them ahead of traffic. Packing means chunks of
unequal length cost no padding between them, only up to the next bucket at the end. Padded rows and chunks
have n_new = 0 (they write nothing, take no part in the MLP union) and point at page 0, which the allocator
never hands out.

The boundary to the host-side scheduler is `launch` (ScheduledBatch -> Launched, returns at once) and
`collect` (Launched -> {request_id: (token, logprob, top tokens, top logprobs)}, waits): the engine launches
step n+1 before it collects step n, so the host's work of one step overlaps the device's of the other.
Sampled tokens also stay on the device ([S] `last`, one slot per running sequence) for the next decode step
to read.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import from_raw_bits, raw_bits
from polar_jax.cache import KVCache, init_pool, pages_for
from polar_jax.config import ModelConfig
from polar_jax.engine.host_args import HostPacked
from polar_jax.engine.sampler import most_likely, sample_rows
from polar_jax.engine.sampling_params import MAX_LOGPROBS
from polar_jax.engine.scheduler import PrefillChunk, ScheduledBatch
from polar_jax.engine.sequence import PENDING
from polar_jax.model import PREFILL_COMPILER_OPTIONS, Riders, forward, forward_packed
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

    decode: batch sizes (powers of two from 4, and max_num_seqs). prefill: the mixed programs' capacities S
    of packed prefill tokens, chosen so that S plus the max_num_seqs decode rows riding along (the row count
    of their GEMMs) is a multiple of 128, about four sizes per doubling (128, 256, 384, 512, 640, .., 1024,
    1280, ..), from the smallest above max_num_seqs to the first that holds a step's whole token budget.
    chunks: prefill chunks one program takes at most; max_new: tokens of one chunk at most (prefill_chunk).
    """

    decode: tuple[int, ...]
    prefill: tuple[int, ...]
    chunks: int
    max_new: int

    @staticmethod
    def capacities(max_num_seqs: int):
        """The packed prefill capacities, ascending, without end: rows - max_num_seqs for GEMM row counts
        of 128, 256, .., 512, 640, .., 1024, 1280, .. (128 apart, then about four per doubling)."""
        rows = 128
        while True:
            if rows > max_num_seqs:
                yield rows - max_num_seqs
            rows += max(128, (1 << (rows.bit_length() - 1)) // 4)

    @classmethod
    def default_budget(cls, max_num_seqs: int, prefill_chunk: int) -> int:
        """The step token budget by default: the largest capacity within 2 * prefill_chunk that holds a
        chunk (a full prefill-only step then fills its capacity exactly; with every decode row riding,
        budget + max_num_seqs GEMM rows do), else max(2 * prefill_chunk, max_num_seqs)."""
        best = None
        for S in cls.capacities(max_num_seqs):
            if S > 2 * prefill_chunk:
                break
            if S >= max(prefill_chunk, max_num_seqs):
                best = S
        return best or max(2 * prefill_chunk, max_num_seqs)

    @classmethod
    def make(cls, max_num_seqs: int, prefill_chunk: int, token_budget: int, max_chunks: int = 16) -> Buckets:
        decode = tuple(_pow2_up_to(min(4, max_num_seqs), max_num_seqs))
        sizes = []
        for S in cls.capacities(max_num_seqs):
            sizes.append(S)
            if S >= token_budget:
                break
        return cls(decode, tuple(sizes), max_chunks, prefill_chunk)

    @staticmethod
    def invariant_budget(max_num_seqs: int) -> int:
        """The token budget by default in batch-invariant mode, where every step, decode-only ones too, runs
        all of them through the GEMMs: max_num_seqs rounded up to 128, at least 512."""
        return max(512, -(-max_num_seqs // 128) * 128)

    @classmethod
    def invariant(cls, max_num_seqs: int, prefill_chunk: int, token_budget: int) -> Buckets:
        """Batch-invariant mode's single shape: token_budget packed tokens, a chunk per running sequence."""
        return cls((max_num_seqs,), (token_budget,), max_num_seqs, prefill_chunk)

    def decode_size(self, n: int) -> int:
        return next(b for b in self.decode if b >= n)

    def prefill_size(self, n_tokens: int) -> int:
        """The smallest capacity that holds n_tokens packed prefill tokens."""
        if n_tokens > self.prefill[-1]:
            raise ValueError(f"no prefill bucket holds {n_tokens} tokens; buckets: {self.prefill}")
        return next(S for S in self.prefill if S >= n_tokens)


def _feed(last, slots, tokens):
    """tokens [B] with each PENDING row's token taken from the device's last sampled tokens [S] at its slot
    (a token the host has not seen yet: the step that sampled it may still be running)."""
    return jnp.where(tokens == PENDING, last[jnp.clip(slots, 0, last.shape[0] - 1)], tokens)


def _keep(last, slots, tok):
    """last [S] with tok [B] written at slots [B] (rows whose slot is S or more write nothing)."""
    return last.at[slots].set(tok, mode="drop")


def _pools(params, k, v):
    """The pools as the model takes them, from the runner's raw bits (see ModelRunner.__init__): its dtype is the
    weights' (init_pool there)."""
    dtype = params["embed"].dtype
    return from_raw_bits(k, dtype), from_raw_bits(v, dtype)


def _decode_program(cfg: ModelConfig, sparsity: SparsityConfig | None, params, k, v, last, tokens, slots, table,
                    lengths, valid, row_density, seed, step):
    """[B] sequences append one token each: returns the pools and logits [B, V]."""
    cache = KVCache(*_pools(params, k, v), table, lengths)
    key = jax.random.fold_in(jax.random.key(seed), step)  # random head/neuron choices: fresh every step
    logits, cache, _ = forward(cfg, params, _feed(last, slots, tokens)[:, None], cache,
                               n_new=valid.astype(jnp.int32), sparsity=sparsity, key=key, row_density=row_density)
    return raw_bits(cache.k), raw_bits(cache.v), logits[:, 0]


def _mixed_program(cfg: ModelConfig, sparsity: SparsityConfig | None, max_new: int, params, k, v, last, d_tokens,
                   d_slots, d_table, d_lengths, d_valid, d_density, seed, step, tokens, table, starts, offsets,
                   n_new):
    """The prefill chunks packed in tokens [S] (the rest of the arguments, [C] per chunk) with the decode
    rows (d_*, as the decode program takes them) riding along: returns the pools and logits [R + C, V],
    the R decode rows' first, then each chunk's at its last token."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    riders = Riders(_feed(last, d_slots, d_tokens), d_lengths, d_valid, d_table, d_density)
    logits, d_logits, k, v = forward_packed(cfg, params, tokens, KVCache(*_pools(params, k, v), table, starts),
                                            offsets, n_new, max_new=max_new, riders=riders, sparsity=sparsity,
                                            key=key)  # [C, V], [R, V]
    return raw_bits(k), raw_bits(v), jnp.concatenate([d_logits, logits])


def _unified_program(cfg: ModelConfig, max_new: int, params, k, v, last, tokens, table, starts, offsets, n_new,
                     token_slots):
    """Batch-invariant mode's step: decode rows and prefill chunks alike as chunks packed in tokens [S]
    (a PENDING token read from last at token_slots [S]): returns the pools and logits [C, V] at each chunk's
    last token."""
    logits, _, k, v = forward_packed(cfg, params, _feed(last, token_slots, tokens),
                                     KVCache(*_pools(params, k, v), table, starts), offsets, n_new, max_new=max_new,
                                     batch_invariant=True)
    return raw_bits(k), raw_bits(v), logits


def _prefill_logprobs_program(cfg: ModelConfig, max_new: int, top: int, params, k, v, tokens, table, starts,
                              offsets, n_new, targets):
    """The packed prefill that also returns [S] log-probabilities of targets[s] (the token after packed
    token s) and the `top` most likely next tokens with theirs: all S logits are kept, so it runs only for
    chunks whose requests ask for prompt logprobs. Returns the pools, logits [C, V] at each chunk's last token,
    the targets' [S] log-probabilities, and the [S, top] ids and [S, top] log-probabilities of the most likely
    next tokens (sampler.most_likely)."""
    logits, _, k, v = forward_packed(cfg, params, tokens, KVCache(*_pools(params, k, v), table, starts), offsets,
                                     n_new, max_new=max_new, all_logits=True)  # [S, V]
    final = logits[jnp.clip(offsets + n_new - 1, 0, tokens.shape[0] - 1)]  # [C, V]
    logp = jax.nn.log_softmax(logits, axis=-1)  # [S, V]
    target_lp = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return raw_bits(k), raw_bits(v), final, target_lp, *most_likely(logp, top)


def _sample_program(filtered: bool, top: int, last, logits, slots, temps, top_k, top_p, min_p, seeds, steps,
                    penalties, bias):
    """Sample a token per row of logits [B, V] and keep it in last at the row's slot: returns (last, sampled
    [B, 2 + 2 top] int32: per row its token, its logprob's bits, the top most likely tokens and their logprobs'
    bits (sample_rows' results, in one array: one device-to-host copy; `unpack_sampled`). penalties: None,
    or ModelRunner._penalties' arrays, whose PENDING tokens are read here from last at the row's slot; bias:
    None, or ModelRunner._bias' arrays. Its own program, so the model programs need no variant per
    `filtered`, `top`, penalties or bias."""
    if penalties is not None:
        history, *rest = penalties
        pending = last[jnp.clip(slots, 0, last.shape[0] - 1)][:, None]  # [B, 1]
        penalties = (jnp.where(history == PENDING, pending, history), *rest)
    tok, logprob, top_tok, top_logprob = sample_rows(logits, temps, top_k, top_p, min_p, seeds, steps,
                                                     filtered=filtered, k=top, penalties=penalties, bias=bias)
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return _keep(last, slots, tok), jnp.concatenate([tok[:, None], bits(logprob)[:, None], top_tok,
                                                     bits(top_logprob)], axis=1)


def unpack_sampled(sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sampler program's [B, 2 + 2 top] int32 results as (tokens [B], logprobs [B], top tokens [B, top],
    top logprobs [B, top]) (views, no copies)."""
    top = (sampled.shape[1] - 2) // 2
    return (sampled[:, 0], sampled[:, 1].view(np.float32), sampled[:, 2: 2 + top],
            sampled[:, 2 + top:].view(np.float32))


# No HLO rematerialization in the engine's model programs. XLA's GPU compiler sets its memory limit from what
# the device has free at compile time, and the engine has by then allocated the KV pool, which the programs take
# donated; so the limit sits below the pool plus the weights, and the pass recomputed cache scatters (each
# rewriting the pool) and GEMMs while saving nothing ("Can't reduce memory use below 46.54GiB ... only reduced
# to 61.42GiB"). llama-2-7b, one 2,048-token chunk with 64 riders' pool on an H100: mixed step 62-78 ms by
# sparsity mode with it (benchmarks/results/logs/probe_mixed_modes.log). The engine sizes its pool to leave the
# programs' temporaries room, which is what rematerialization would have had to find.
ENGINE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}
# Each takes its per-step host arrays in one host-to-device copy (host_args.HostPacked); arguments: (static ones,
# device ones, host ones).
_DECODE = HostPacked(_decode_program, 2, 4, donate=(3, 4), compiler_options=ENGINE_COMPILER_OPTIONS)
_MIXED = HostPacked(_mixed_program, 3, 4, donate=(4, 5),
                    compiler_options=PREFILL_COMPILER_OPTIONS | ENGINE_COMPILER_OPTIONS)
_PREFILL_LOGPROBS = HostPacked(_prefill_logprobs_program, 3, 3, donate=(4, 5),
                               compiler_options=PREFILL_COMPILER_OPTIONS | ENGINE_COMPILER_OPTIONS)
# Batch-invariant mode compiles without autotuning: each GEMM then takes the algorithm cuBLAS's heuristics pick
# for its shape, the same in every engine of the process (timing noise could make two engines' autotuners
# choose differently, and algorithms differ in their rounding).
_UNIFIED = HostPacked(_unified_program, 2, 4, donate=(3, 4), compiler_options=PREFILL_COMPILER_OPTIONS
                      | ENGINE_COMPILER_OPTIONS | {"xla_gpu_autotune_level": 0})
_SAMPLE = HostPacked(_sample_program, 2, 2, donate=(2,))
PENALTY_TOKENS = 1024  # the shortest history a penalized step sends (ModelRunner._penalties)


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
    """A dispatched step: its batch, device results per program (the sequence of each row or None; the
    sampler's [rows, 2 + 2 top], `unpack_sampled`), prompt logprobs and most likely tokens per prefill group
    that asked, and its StepRecord when recording."""

    batch: ScheduledBatch
    results: list = dataclasses.field(default_factory=list)
    prompt: list = dataclasses.field(default_factory=list)
    record: StepRecord | None = None


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, *, num_pages: int, page_size: int, max_model_len: int,
                 buckets: Buckets, sparsity: SparsityConfig | None = None, per_request_density: bool = False,
                 batch_invariant: bool = False, seed: int = 0):
        """per_request_density: decode takes each sequence's own attention density (seq.attn_density, None
        for the config's), at the price of head capacity K in sparse layers; needs a sparse `sparsity`.
        batch_invariant: every step through the unified program (buckets from `Buckets.invariant`; dense)."""
        self.cfg, self.params, self.sparsity = cfg, params, sparsity
        self.batch_invariant = batch_invariant
        self.per_request_density = per_request_density
        self.page_size, self.num_pages = page_size, num_pages
        self.M = pages_for(max_model_len, page_size)
        self.buckets = buckets
        # The pools as raw bits (pallas_kernels.common.raw_bits: 16-bit pools on the CPU, else as they are): the
        # programs hand them to the model's layer scan as they are. Kept as floats, each program converted both
        # whole pools to bits at its start and back at its end (4 copies of the pool a step, whatever it touched).
        self.k, self.v = (raw_bits(a) for a in init_pool(cfg, num_pages, page_size, params["embed"].dtype))
        self.num_slots = buckets.decode[-1]  # max_num_seqs: one slot per running sequence
        self.last = jnp.zeros(self.num_slots, jnp.int32)  # [S] each slot's last sampled token, on the device
        # [S, M] the page table of the sequence in each slot, kept between steps (_table): the pages list each row
        # copies (a sequence's list only grows, by BlockManager.allocate; freeing gives it a new one) and how many
        # of its pages the row holds.
        self._slot_table = np.zeros((self.num_slots, self.M), np.int32)
        self._slot_pages: list[list[int] | None] = [None] * self.num_slots
        self._slot_len = [0] * self.num_slots
        self.seed, self.num_decode_steps = seed & 0xFFFFFFFF, 0
        self.log: list[StepRecord] = []
        self.record = False
        self._in_flight, self._busy_since = 0, None

    # -- host arrays ------------------------------------------------------------------------------------
    def _table(self, seqs, rows: int) -> np.ndarray:
        """[rows, M] page tables of running seqs (page 0, the scratch page, past their pages and in padded rows),
        gathered from the rows kept per slot: a step copies only the pages a sequence got since the one before."""
        for s in seqs:
            held, n = self._slot_len[s.slot], len(s.pages)
            if self._slot_pages[s.slot] is not s.pages:  # a new sequence in the slot, or a new list (preempted)
                self._slot_table[s.slot] = 0
                self._slot_pages[s.slot], held = s.pages, 0
            if held != n:
                self._slot_table[s.slot, held:n] = s.pages[held:]
                self._slot_len[s.slot] = n
        table = np.zeros((rows, self.M), np.int32)
        table[: len(seqs)] = self._slot_table[[s.slot for s in seqs]]
        return table

    @staticmethod
    def _sampling(seqs, rows: int):
        temps = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        min_p = np.zeros(rows, np.float32)
        seeds = np.zeros(rows, np.uint32)
        steps = np.zeros(rows, np.int32)
        if seqs:
            n = len(seqs)
            temps[:n], top_k[:n], top_p[:n], min_p[:n], seeds[:n] = zip(*(s.sampling_row for s in seqs))
            steps[:n] = [len(s.output_token_ids) for s in seqs]  # a request's n-th token's key: (seed, n) only
        return temps, top_k, top_p, min_p, seeds, steps

    def _penalties(self, seqs, rows: int):
        """The sampler's penalty arrays for rows seqs (None: padding), or None when no request has a penalty:
        history [rows, T] (each penalized row's prompt and output tokens so far, PENDING where the last one is
        still on the device, -2 past them and in other rows), out_start [rows] (where its output begins),
        presence, frequency, repetition [rows]. T: a power of two of at least PENALTY_TOKENS (or the context
        length, if shorter), so that few programs compile (one per batch shape for sequences that short)."""
        pen = [i for i, s in enumerate(seqs) if s is not None and s.params.penalized]
        if not pen:
            return None
        longest = max(seqs[i].num_tokens for i in pen)
        T = 1 << (max(longest, min(PENALTY_TOKENS, self.M * self.page_size)) - 1).bit_length()
        history = np.full((rows, T), -2, np.int32)
        out_start = np.zeros(rows, np.int32)
        presence, frequency, repetition = np.zeros(rows, np.float32), np.zeros(rows, np.float32), np.ones(rows,
                                                                                                       np.float32)
        for i in pen:
            s, p = seqs[i], seqs[i].params
            ids = s.all_token_ids
            if PENDING in ids[:-1]:
                raise RuntimeError(f"request {s.request_id!r}: more than its last token not yet sampled")
            history[i, : len(ids)], out_start[i] = ids, s.num_prompt_tokens
            presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        return history, out_start, presence, frequency, repetition

    # -- programs -------------------------------------------------------------------------------------
    def _slots(self, seqs, rows: int) -> np.ndarray:
        slots = np.full(rows, self.num_slots, np.int32)  # num_slots: padding, writes nothing
        slots[: len(seqs)] = [self.num_slots if s is None else s.slot for s in seqs]
        return slots

    def _decode_args(self, seqs, rows: int):
        """(the decode program's per-step arguments, the sampler's) for seqs padded to rows."""
        n = len(seqs)
        tokens = np.zeros(rows, np.int32)  # PENDING: the device's last sampled token at the row's slot
        tokens[:n] = [s.last_token_id for s in seqs]
        lengths = np.zeros(rows, np.int32)
        lengths[:n] = [s.num_computed for s in seqs]
        valid = np.arange(rows) < n
        density = np.full(rows, np.nan, np.float32)  # NaN: the sparsity config's own density
        if self.per_request_density:
            density[:n] = [np.nan if s.attn_density is None else s.attn_density for s in seqs]
        self.num_decode_steps += bool(seqs)
        slots = self._slots(seqs, rows)
        return ((tokens, slots, self._table(seqs, rows), lengths, valid,
                 density if self.per_request_density else None, np.uint32(self.seed),
                 np.int32(self.num_decode_steps)),
                (slots, *self._sampling(seqs, rows)))

    def _prefill_args(self, chunks, S: int, n_decode: int | None = None):
        """(the packed prefill's per-step arguments, the sampler's): the chunks back to back in tokens [S];
        per chunk (C rows, padded) page table, starts, offsets, n_new; slots and sampling parameters.
        n_decode (the unified program): the first n_decode chunks are decode rows, whose one token may be
        PENDING, to be read on the device at the sequence's slot: token_slots [S] joins the arguments."""
        C = self.buckets.chunks
        tokens, token_slots = np.zeros(S, np.int32), np.full(S, self.num_slots, np.int32)
        starts, offsets, n_new = np.zeros(C, np.int32), np.zeros(C, np.int32), np.zeros(C, np.int32)
        at = 0
        for i, c in enumerate(chunks):
            ids = c.seq.all_token_ids[c.start: c.start + c.n]
            if PENDING in ids and i >= (n_decode or 0):
                raise RuntimeError(f"request {c.seq.request_id!r}: a prefill chunk holds a token not yet sampled")
            if ids[0] == PENDING:
                token_slots[at] = c.seq.slot
            tokens[at: at + c.n], starts[i], offsets[i], n_new[i] = ids, c.start, at, c.n
            at += c.n
        seqs = [c.seq for c in chunks]
        slots = self._slots([c.seq if c.samples else None for c in chunks], C)
        fwd = (tokens, self._table(seqs, C), starts, offsets, n_new) + (() if n_decode is None else (token_slots,))
        return fwd, (slots, *self._sampling(seqs, C))

    def _max_new(self, S: int) -> int:
        return min(self.buckets.max_new, S)

    def _top(self, seqs, field: str = "logprobs") -> int:
        """How many most likely tokens a program reports for seqs (None: padding): 1 (an argmax) unless a
        request asks for more, then the most any may ask (one more compiled variant, not one per count)."""
        asked = max((getattr(s.params, field) or 0 for s in seqs if s is not None), default=0)
        return 1 if asked <= 1 else min(MAX_LOGPROBS, self.cfg.vocab_size)

    @staticmethod
    def _bias(seqs, rows: int):
        """The sampler's logit bias arrays for rows seqs (None: padding), or None when no row has one: ids
        [rows, K] and values [rows, K] (K a power of two; id -1: no entry): each request's logit_bias, and
        -inf on its EOS (unless ignore_eos) and stop_token_ids while its output is shorter than min_tokens."""
        entries = {}
        for i, s in enumerate(seqs):
            if s is None:
                continue
            p = s.params
            short = len(s.output_token_ids) < p.min_tokens  # the token sampled now would be output number len()
            if not (p.logit_bias or short):
                continue
            ends = set(p.stop_token_ids) | (set() if p.ignore_eos else set(s.eos_token_ids)) if short else ()
            if e := list(p.logit_bias) + [(t, -np.inf) for t in sorted(ends)]:
                entries[i] = e
        if not entries:
            return None
        K = max(8, 1 << (max(map(len, entries.values())) - 1).bit_length())
        ids, values = np.full((rows, K), -1, np.int32), np.zeros((rows, K), np.float32)
        for i, e in entries.items():
            ids[i, : len(e)], values[i, : len(e)] = [t for t, _ in e], [b for _, b in e]
        return ids, values

    def _sample(self, logits, sample_args, seqs):
        """Dispatch the sampler over logits [B, V] for rows seqs; searches for top-k / top-p cut-offs only
        when a row asks for them. Returns its results [B, 2 + 2 top] on the device (`unpack_sampled`)."""
        filtered = any(s.params.filters for s in seqs if s is not None)
        rows = logits.shape[0]
        self.last, sampled = _SAMPLE(filtered, self._top(seqs), self.last, logits, *sample_args,
                                     self._penalties(seqs, rows), self._bias(seqs, rows))
        return sampled

    def compile_all(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Compile every bucket's program before traffic; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.batch_invariant:
            shapes = [("unified", self.buckets.prefill[0]), ("sample", self.buckets.chunks)]
        else:
            mixed_rows = self.num_slots + self.buckets.chunks
            shapes = ([("decode", b) for b in self.buckets.decode] + [("mixed", S) for S in self.buckets.prefill]
                      + [("sample", b) for b in sorted({*self.buckets.decode, mixed_rows})])
        for i, (kind, shape) in enumerate(shapes):
            if kind == "unified":
                self.k, self.v, _ = _UNIFIED(self.cfg, self._max_new(shape), self.params, self.k, self.v, self.last,
                                             *self._prefill_args([], shape, n_decode=0)[0])
            elif kind == "decode":
                fwd, _ = self._decode_args([], shape)
                self.k, self.v, _ = _DECODE(self.cfg, self.sparsity, self.params, self.k, self.v, self.last, *fwd)
            elif kind == "mixed":
                self.k, self.v, _ = _MIXED(self.cfg, self.sparsity, self._max_new(shape), self.params, self.k,
                                           self.v, self.last, *self._decode_args([], self.num_slots)[0],
                                           *self._prefill_args([], shape)[0])
            else:
                logits = jnp.zeros((shape, self.cfg.vocab_size), jnp.float32)
                _, smp = self._decode_args([], shape)
                for filtered in (False, True):  # top logprobs above 1, penalties and biases compile their own
                    self.last, *_ = _SAMPLE(filtered, 1, self.last, logits, *smp, None, None)
            jax.block_until_ready((self.k, self.v, self.last))
            if progress:
                progress(i + 1, len(shapes))
        return time.perf_counter() - t0

    def launch(self, batch: ScheduledBatch) -> Launched:
        """Dispatch the batch's decode rows and prefill chunks without waiting for them. Decode rows whose
        last token is still PENDING (sampled by the step before, maybe still running) read it on the device."""
        t0 = time.perf_counter()
        if self._busy_since is None:
            self._busy_since = t0
        out = Launched(batch)
        groups = self._prefill_groups(batch.prefill)
        with_logprobs = [g for g in groups if any(c.seq.params.prompt_logprobs is not None
                                                  and c.start < c.seq.num_prompt_tokens for c in g)]
        plain = [g for g in groups if g not in with_logprobs]
        riders = batch.decode
        if self.batch_invariant:  # one unified call: decode rows as one-token chunks, then the chunks
            units = [PrefillChunk(s, s.num_computed, 1) for s in riders] + [c for g in plain for c in g]
            if units:
                S = self.buckets.prefill[0]
                fwd, smp = self._prefill_args(units, S, n_decode=len(riders))
                self.k, self.v, logits = _UNIFIED(self.cfg, self._max_new(S), self.params, self.k, self.v,
                                                  self.last, *fwd)
                rows = [u.seq if u.samples else None for u in units]
                out.results.append((rows, self._sample(logits, smp, rows)))
            riders, plain = [], []
        if riders and not plain:  # nothing to ride on: the decode program
            fwd, smp = self._decode_args(riders, self.buckets.decode_size(len(riders)))
            self.k, self.v, logits = _DECODE(self.cfg, self.sparsity, self.params, self.k, self.v, self.last, *fwd)
            out.results.append((riders, self._sample(logits, smp, riders)))
            riders = []
        for group in plain:
            d_fwd, d_smp = self._decode_args(riders, self.num_slots)
            S = self.buckets.prefill_size(sum(c.n for c in group))
            p_fwd, p_smp = self._prefill_args(group, S)
            self.k, self.v, logits = _MIXED(self.cfg, self.sparsity, self._max_new(S), self.params, self.k,
                                            self.v, self.last, *d_fwd, *p_fwd)
            rows = (list(riders) + [None] * (self.num_slots - len(riders))
                    + [c.seq if c.samples else None for c in group])  # as the logits' rows: riders, then chunks
            out.results.append((rows, self._sample(logits, [np.concatenate(a) for a in zip(d_smp, p_smp)], rows)))
            riders = []
        for group in with_logprobs:
            S = self.buckets.prefill_size(sum(c.n for c in group))
            p_fwd, p_smp = self._prefill_args(group, S)
            top = self._top([c.seq for c in group], "prompt_logprobs")
            self.k, self.v, logits, *prompt = _PREFILL_LOGPROBS(self.cfg, self._max_new(S), top, self.params,
                                                                self.k, self.v, *p_fwd, self._targets(group, S))
            out.prompt.append((group, *prompt))  # target logprobs [S], top ids and their logprobs [S, top]
            rows = [c.seq if c.samples else None for c in group]
            out.results.append((rows, self._sample(logits, p_smp, rows)))
        if self.record:
            out.record = StepRecord(
                decode_rows=len(batch.decode),
                context_tokens=sum(s.num_computed + 1 for s in batch.decode),
                prefill_tokens=sum(c.n for c in batch.prefill),
                prefill_context=sum(c.n * c.start + c.n * (c.n + 1) // 2 for c in batch.prefill),
                seconds=0.0)
        self._in_flight += 1
        return out

    def collect(self, launched: Launched) -> tuple[dict[str, tuple[int, float, np.ndarray, np.ndarray]],
                                                   dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Wait for a launched step. Returns (sampled, prompt_logprobs): sampled {request_id: (token, logprob,
        [top] most likely tokens, [top] their logprobs)} for every decode row and every chunk that samples;
        prompt_logprobs {request_id: ([n] logprobs of the chunk's tokens after its first position, [n, top]
        most likely tokens there, [n, top] their logprobs)} for chunks of requests that asked for them
        (Sequence.record_prompt_logprobs)."""
        t_wait = time.perf_counter()
        # One device_get: the copies of every program's results start together.
        results, prompt = jax.device_get(([sampled for _, sampled in launched.results],
                                          [arrays for _, *arrays in launched.prompt]))
        now = time.perf_counter()
        sampled, prompt_lp = {}, {}
        for (seqs, _), sampled_rows in zip(launched.results, results):
            tok, lp, top_tok, top_lp = unpack_sampled(sampled_rows)
            tok, lp = tok.tolist(), lp.tolist()  # Python ints and floats, in one call each
            for i, s in enumerate(seqs):
                if s is not None:
                    sampled[s.request_id] = (tok[i], lp[i], top_tok[i], top_lp[i])
        for (group, *_), arrays in zip(launched.prompt, prompt):  # target logprobs, top ids, top logprobs
            at = 0
            for c in group:  # packed back to back, as _prefill_args laid them out
                if c.seq.params.prompt_logprobs is not None:
                    prompt_lp[c.seq.request_id] = tuple(a[at: at + c.n] for a in arrays)
                at += c.n
        if launched.record is not None:  # the time since the step before it completed: device throughput
            launched.record.seconds, launched.record.wait_seconds = now - self._busy_since, now - t_wait
            self.log.append(launched.record)
        self._in_flight -= 1
        self._busy_since = now if self._in_flight else None
        return sampled, prompt_lp

    def _prefill_groups(self, chunks):
        """Split chunks (in order) into groups that each fit one mixed program: at most `chunks` of them
        and the largest capacity's tokens (a step's budget, so one group unless it has many chunks)."""
        groups: list[list] = []
        for c in chunks:
            if (groups and len(groups[-1]) < self.buckets.chunks
                    and sum(x.n for x in groups[-1]) + c.n <= self.buckets.prefill[-1]):
                groups[-1].append(c)
            else:
                groups.append([c])
        return groups

    @staticmethod
    def _targets(group, S: int) -> np.ndarray:
        """[S] the token after each packed position (prompt logprobs); 0 past a sequence's known tokens."""
        targets, at = np.zeros(S, np.int32), 0
        for c in group:
            nxt = c.seq.all_token_ids[c.start + 1: c.start + c.n + 1]
            targets[at: at + len(nxt)] = np.maximum(nxt, 0)  # a PENDING last output is past the prompt: unused
            at += c.n
        return targets

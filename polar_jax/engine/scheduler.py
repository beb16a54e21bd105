"""Continuous batching: which sequences decode, which prefill a chunk, which are preempted, each step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from polar_jax.engine.block_manager import BlockManager
from polar_jax.engine.sequence import PENDING, RequestError, Sequence, SequenceStatus, top_pairs


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: running sequences at most (the decode batch); max_num_batched_tokens: tokens fed per
    step, decode and prefill together; prefill_chunk: prompt tokens of one sequence per step at most;
    max_model_len: prompt + output tokens of one sequence at most; page_size (Z) and num_pages (P, page 0
    reserved) describe the KV page pool."""

    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk: int
    max_model_len: int
    page_size: int
    num_pages: int

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "max_model_len", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1: got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(f"SchedulerConfig.num_pages must be >= 2 (page 0 is reserved): got {self.num_pages}")
        # Every running sequence decodes every step, so the budget must hold a full decode batch.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_num_seqs ({self.max_num_seqs})")


@dataclass(frozen=True)
class PrefillChunk:
    """Feed seq.all_token_ids[start:start + n] at positions start.. (start == seq.num_computed).
    samples (set when made): the chunk reaches the end of the sequence's known tokens, so the runner samples
    the next token after it."""

    seq: Sequence
    start: int
    n: int
    samples: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "samples", self.start + self.n == self.seq.num_tokens)


@dataclass
class ScheduledBatch:
    """One step's work. decode: each feeds its last token at position num_computed and samples one;
    prefill: chunks; preempted: sequences sent back to waiting this step (their pages are already free).
    sampling (set by Scheduler.advance): (sequence, index in its output_token_ids) of every token this step
    samples, decode rows first, then chunks in order."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    sampling: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.n for c in self.prefill)

    def __bool__(self):
        return bool(self.decode or self.prefill)


class Scheduler:
    """Owns the waiting queue and the running list (admission order: the last is the newest).

    A step's results may come back one step late: `advance(batch)` right after scheduling it (positions,
    pages, a PENDING placeholder for each token it samples, finishing by length), `apply(batch, sampled)`
    when its tokens are known (their values, finishing by EOS or stop token). Meanwhile the next step can
    be scheduled: a sequence whose EOS is still in flight decodes one more token, which `apply` drops.
    `update` is both at once.

    Each running sequence holds a slot in [0, max_num_seqs): where the device keeps its last sampled token,
    so a decode row can feed a token the host has not seen yet.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if (block_manager.num_pages, block_manager.page_size) != (config.num_pages, config.page_size):
            raise ValueError(f"BlockManager(num_pages={block_manager.num_pages}, page_size="
                             f"{block_manager.page_size}) does not match {config}")
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: dict[object, Sequence] = {}  # request_id -> every sequence not yet finished
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0  # since start, all sequences (served as /metrics' polar_preemptions_total)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def add(self, seq: Sequence) -> None:
        """Queue a new request; RequestError (a ValueError) naming it if it can never run."""
        cfg, rid = self.config, seq.request_id
        if rid in self._live:
            raise RequestError(rid, "request_id already in use")
        if seq.status is not SequenceStatus.WAITING or seq.output_token_ids or seq.pages:
            raise RequestError(rid, "only a new sequence can be added")
        if seq.num_prompt_tokens == 0:
            raise RequestError(rid, "empty prompt", "prompt")
        if seq.num_prompt_tokens > cfg.max_model_len:
            raise RequestError(rid, f"prompt has {seq.num_prompt_tokens} tokens, more than max_model_len "
                               f"{cfg.max_model_len}", "prompt")
        # Positions whose KV is ever stored: the last sampled token is never fed.
        stored = max(seq.num_prompt_tokens,
                     min(seq.num_prompt_tokens + (seq.params.max_tokens or cfg.max_model_len), cfg.max_model_len) - 1)
        need = self.block_manager.pages_for(stored)
        if need > self.block_manager.num_usable_pages:
            raise RequestError(rid, f"needs {need} KV pages of {cfg.page_size} tokens, the pool has "
                               f"{self.block_manager.num_usable_pages}")
        self._live[rid] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq now, from any state, and free its pages (the engine calls it with "stop" when the
        detokenizer finds a stop string)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_slot(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.timings.finish = time.monotonic()
        del self._live[seq.request_id]

    def abort(self, request_id) -> bool:
        """Finish the request with reason "abort"; False if it is unknown or already finished. Outputs of a
        step in flight (PENDING) are dropped: they will never be filled in."""
        seq = self._live.get(request_id)
        if seq is None:
            return False
        self.finish(seq, "abort")
        while seq.output_token_ids and seq.output_token_ids[-1] == PENDING:
            seq.output_token_ids.pop()
            seq.output_logprobs.pop()
            seq.output_top_logprobs.pop()
        return True

    def _release_slot(self, seq: Sequence) -> None:
        self._free_slots.append(seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_slot(seq)
        self.block_manager.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        cfg, bm = self.config, self.block_manager
        batch = ScheduledBatch()

        # (1) Decode: every running sequence past prefill feeds one token, oldest first. A sequence whose
        # pages are full needs one more; if none is free, preempt the newest until it fits (possibly itself).
        # The oldest sequence is never preempted while others run, and alone it fits (add() checked), so it
        # always progresses.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.needs_prefill:
                i += 1
                continue
            while not bm.try_allocate(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.decode.append(seq)
                i += 1

        # (2) Prefill with the budget left: running sequences mid-prefill first, then waiting ones in order.
        # A sequence is admitted only with pages for its whole prefill, so running ones never wait on pages.
        budget = cfg.max_num_batched_tokens - len(batch.decode)
        for seq in self.running:
            if budget == 0:
                break
            if seq.needs_prefill:
                budget -= self._add_chunk(batch, seq, budget)
        # After a preemption the pool is short: admitting now would only take pages decode needs next step.
        while budget > 0 and self.waiting and not batch.preempted and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if not bm.can_allocate(seq, seq.prefill_target):
                break  # FIFO: nobody overtakes the front
            self.waiting.popleft()
            bm.allocate(seq, seq.prefill_target)
            seq.slot = self._free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._add_chunk(batch, seq, budget)

        now = time.monotonic()
        for seq in batch.decode + [c.seq for c in batch.prefill]:
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
        return batch

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        n = min(seq.prefill_target - seq.num_computed, self.config.prefill_chunk, budget)
        batch.prefill.append(PrefillChunk(seq, seq.num_computed, n))
        return n

    def update(self, batch: ScheduledBatch, sampled: dict,
               prompt_logprobs: dict | None = None) -> list[Sequence]:
        """advance + apply: one step's results applied right after it ran. Returns the sequences that
        finished in this step (their pages are already free)."""
        self.advance(batch)
        return self.apply(batch, sampled, prompt_logprobs)

    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """Account for a step that has been launched: positions computed, one PENDING output per sampled
        token (recorded in batch.sampling), and the end of sequences that reach max_tokens or max_model_len
        (pages freed now; the token's value comes with apply). Returns the sequences finished here."""
        fed = [(seq, 1, True) for seq in batch.decode] + [(c.seq, c.n, c.samples) for c in batch.prefill]
        finished = []
        for seq, n, samples in fed:
            if seq.is_finished:  # aborted between schedule() and advance()
                continue
            seq.num_computed += n
            if not samples:
                continue
            batch.sampling.append((seq, len(seq.output_token_ids)))
            seq.output_token_ids.append(PENDING)
            seq.output_logprobs.append(None)
            seq.output_top_logprobs.append(None)
            p = seq.params
            if (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) or \
                    seq.num_tokens >= self.config.max_model_len:
                self.finish(seq, "length")
                finished.append(seq)
        return finished

    def apply(self, batch: ScheduledBatch, sampled: dict, prompt_logprobs: dict | None = None) -> list[Sequence]:
        """Fill in the tokens of an advanced step. sampled: request_id -> (token_id, logprob, the most likely
        token ids, their logprobs: most likely first, at least as many as the request asks) for every entry of
        batch.sampling; prompt_logprobs (optional): request_id -> (logprobs, most likely ids, their logprobs) of
        the chunk's prompt tokens after its first position (see Sequence.record_prompt_logprobs). A token in a
        sequence's EOS or stop ids ends it with "stop" and drops any output after it (a step already in
        flight). Returns the sequences that finished in this step (now, or by length in advance)."""
        if prompt_logprobs:
            for c in batch.prefill:
                if c.seq.request_id in prompt_logprobs and c.seq.finish_reason != "abort":
                    c.seq.record_prompt_logprobs(c.start, *prompt_logprobs[c.seq.request_id])
        finished = []
        for seq, i in batch.sampling:
            if seq.finish_reason == "abort" or i >= len(seq.output_token_ids):
                continue  # aborted, or past an EOS found in the step before
            if seq.request_id not in sampled:
                raise KeyError(f"apply(): no sampled token for request {seq.request_id!r}")
            token, logprob, top_ids, top_logprobs = sampled[seq.request_id]
            seq.output_token_ids[i] = int(token)
            if seq.params.logprobs is not None:
                seq.output_logprobs[i] = float(logprob)
                seq.output_top_logprobs[i] = top_pairs(top_ids, top_logprobs, seq.params.logprobs)
            if seq.timings.first_token is None:
                seq.timings.first_token = time.monotonic()
            p = seq.params
            if (token in seq.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                self.stop_at(seq, i)
            if seq.is_finished and i == len(seq.output_token_ids) - 1:
                seq.timings.finish = time.monotonic()
                finished.append(seq)
        return finished

    def stop_at(self, seq: Sequence, i: int) -> None:
        """End seq with "stop" at output token i (an EOS, a stop token or the end of a stop string): outputs
        after it, sampled by a step already launched, are dropped."""
        del seq.output_token_ids[i + 1:], seq.output_logprobs[i + 1:], seq.output_top_logprobs[i + 1:]
        if seq.is_finished:
            seq.finish_reason = "stop"
        else:
            self.finish(seq, "stop")

    def check_invariants(self) -> None:
        """Raise AssertionError if pages or queues are inconsistent (tests call this every step)."""
        self.block_manager.check_invariants(list(self._live.values()))
        z = self.config.page_size
        slots = [seq.slot for seq in self.running]
        assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_slots), slots
        assert sorted(slots + self._free_slots) == list(range(self.config.max_num_seqs)), slots
        for seq in self._live.values():
            assert len(seq.output_logprobs) == len(seq.output_top_logprobs) == len(seq.output_token_ids), seq
        for seq in self.running:
            assert seq.status is SequenceStatus.RUNNING, seq
            assert len(seq.pages) * z >= seq.num_computed, seq
        for seq in self.waiting:
            assert seq.status is SequenceStatus.WAITING and not seq.pages and seq.num_computed == 0, seq
            assert seq.slot is None, seq
        assert len(self.running) + len(self.waiting) == len(self._live)
        assert len(self.running) <= self.config.max_num_seqs

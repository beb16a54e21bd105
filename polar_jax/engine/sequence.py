"""One request's state: its tokens, its pages and where it is in its life.

Life: WAITING -> RUNNING -> FINISHED. Preemption sends a RUNNING sequence back to WAITING with its pages
freed and num_computed = 0; its outputs are kept and prefilled again with the prompt. Every way into
FINISHED (stop, length, abort) goes through Scheduler.finish, which frees the pages.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass

from polar_jax.engine.sampling_params import SamplingParams


INT32_MAX = 2**31 - 1
PENDING = -1  # an output token sampled by a launched step whose value has not reached the host yet


class RequestError(ValueError):
    """A request that cannot run. Its text names the request (by its id, or by `name`: "prompt 2"); `reason` is
    the problem alone and `field` the request's field at fault (None: the request as a whole), for front ends
    that spell fields their own way."""

    def __init__(self, request_id: str, reason: str, field: str | None = None, name: str | None = None):
        super().__init__(f"{name or f'request {request_id!r}'}: {reason}")
        self.request_id, self.reason, self.field = request_id, reason, field


def top_pairs(ids, logprobs, n: int) -> tuple[tuple[int, float], ...]:
    """The first n of a position's most likely tokens (ids, logprobs: most likely first) as ((id, logprob),
    ...)."""
    return tuple((int(i), float(lp)) for i, lp in zip(ids[:n], logprobs[:n]))


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class Timings:
    """time.monotonic() seconds; None until the event happens."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None


class Sequence:
    """A request: prompt + outputs so far, the pages holding their KV, and why it ended."""

    def __init__(self, request_id, prompt_token_ids, params: SamplingParams | None = None,
                 eos_token_ids=(), arrival_time: float | None = None, attn_density: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.params = params if params is not None else SamplingParams()
        # The sampling seed: the request's own, else drawn once, so every token of the request (also after a
        # preemption) comes from one key stream.
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(32)
        p = self.params
        # The sampler's fixed per-row arguments (ModelRunner._sampling): temperature, top_k, top_p, min_p, seed.
        # A top_k past the vocabulary keeps every token, as past int32 (which it must fit) it would too; the
        # seed mod 2**32 keys the samples (negative seeds too).
        self.sampling_row = (p.temperature, min(p.top_k, INT32_MAX), p.top_p, p.min_p, self.seed & 0xFFFFFFFF)
        self.attn_density = attn_density  # fraction of KV heads in sparse layers; None: the engine's config
        self.num_preemptions = 0
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float | None] = []  # one per output token (None unless params.logprobs)
        # One per output token: the params.logprobs most likely tokens there, ((token, logprob), ...) most likely
        # first; None unless params.logprobs.
        self.output_top_logprobs: list[tuple[tuple[int, float], ...] | None] = []
        # Entry i is the logprob of prompt token i, and the params.prompt_logprobs most likely tokens at i with
        # theirs; entry 0 (no context) is None.
        asked = self.params.prompt_logprobs is not None
        self.prompt_logprobs: list[float | None] | None = [None] if asked else None
        self.prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] | None = [None] if asked else None
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.pages: list[int] = []  # page ids in order: position s lives in pages[s // Z] at s % Z
        self.slot: int | None = None  # while running: where the device keeps its last sampled token
        self.num_computed = 0  # leading tokens of all_token_ids whose KV is in the pages
        self.timings = Timings(time.monotonic() if arrival_time is None else arrival_time)

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={len(self.output_token_ids)}, computed={self.num_computed}, pages={self.pages})")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prefill_target(self) -> int:
        """How many tokens prefill computes: all of them before the first sample; after that (a preempted
        sequence) all but the last sampled token, which the next decode step feeds."""
        return self.num_tokens if not self.output_token_ids else self.num_tokens - 1

    @property
    def needs_prefill(self) -> bool:
        return self.num_computed < self.prefill_target

    def record_prompt_logprobs(self, start: int, logprobs, top_ids, top_logprobs) -> None:
        """logprobs[i]: of prompt token start + 1 + i, from a prefill chunk starting at `start`; top_ids[i],
        top_logprobs[i]: the most likely tokens at that position and their logprobs, most likely first (at
        least params.prompt_logprobs of them). Positions already recorded (a preempted sequence's prompt
        computed again) are kept as they were."""
        if self.prompt_logprobs is None:
            return
        for i, (lp, top_id, top_lp) in enumerate(zip(logprobs, top_ids, top_logprobs)):
            pos = start + 1 + i
            if pos >= self.num_prompt_tokens:
                break
            if pos == len(self.prompt_logprobs):
                self.prompt_logprobs.append(None if lp is None else float(lp))
                self.prompt_top_logprobs.append(top_pairs(top_id, top_lp, self.params.prompt_logprobs))

"""Per-request sampling parameters, validated once when they are made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _bad(field: str, rule: str, value) -> ValueError:
    return ValueError(f"SamplingParams.{field} {rule}: got {value!r}")


def _is_int(x) -> bool:
    # numpy integers count; bools do not.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off (a top_k at or past the vocabulary
    keeps every token); seed (any int, taken mod 2**32) makes the request's samples reproducible whatever else
    shares its batch (not its heads under random head selection, which follow the engine's step). `stop` strings end the text (the stop string is not part of
    it); `stop_token_ids` and the model's EOS (unless `ignore_eos`) end it on a token, which is kept.
    `logprobs`: the log-probability of each sampled token; `prompt_logprobs`: of each prompt token after the
    first. `max_tokens` None: until the context (max_model_len) ends.

    vLLM's spellings of "off" are taken as well: None for stop, stop_token_ids, logprobs and prompt_logprobs
    (and 0 for the two logprobs fields), top_k -1.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False

    def __post_init__(self):
        for name, off in (("stop", ()), ("stop_token_ids", ()), ("logprobs", False), ("prompt_logprobs", False)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, off)
        for name in ("logprobs", "prompt_logprobs"):  # vLLM's counts of top log-probs: 0 is the chosen token
            if _is_int(getattr(self, name)) and getattr(self, name) in (0, 1):
                object.__setattr__(self, name, bool(getattr(self, name)))
        if _is_int(self.top_k) and self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        # A single string is one stop string, not a sequence of one-character ones.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        for name, value in (("stop", stop), ("stop_token_ids", self.stop_token_ids)):
            try:
                object.__setattr__(self, name, tuple(value))
            except TypeError:
                raise _bad(name, "must be a sequence", value) from None

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise _bad("temperature", "must be a finite number >= 0", t)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise _bad("top_p", "must be in (0, 1]", p)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _bad("top_k", "must be an int >= 0 (0: off)", self.top_k)
        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", "must be None or an int", self.seed)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _bad("max_tokens", "must be None or an int >= 1", self.max_tokens)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", "must hold non-empty strings", s)
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                raise _bad("stop_token_ids", "must hold ints >= 0", i)
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        for name in ("ignore_eos", "logprobs", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be a bool", getattr(self, name))


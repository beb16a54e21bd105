"""Per-request sampling parameters, validated once when they are made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

MAX_LOGPROBS = 20  # the most alternatives a request may ask for at each position (vLLM's default max_logprobs)


class SamplingParamsError(ValueError):
    """A bad SamplingParams field; `field` names it (for front ends that spell it their own way)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _bad(field: str, rule: str, value) -> SamplingParamsError:
    return SamplingParamsError(field, f"SamplingParams.{field} {rule}: got {value!r}")


def _is_int(x) -> bool:
    # numpy integers count; bools do not.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (vLLM's fields and meanings).

    - temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off (a top_k at or past the
      vocabulary keeps every token; min_p drops tokens less likely than min_p times the most likely one).
    - logit_bias ({token id: bias in [-100, 100]}, OpenAI's; kept as sorted (id, bias) pairs), then
      repetition_penalty (> 0; 1: off), frequency_penalty and presence_penalty (in [-2, 2]; 0: off) change
      the logits before sampling, greedy included (engine.sampler.biased, penalized).
    - seed (any int, taken mod 2**32) makes the request's samples reproducible whatever else shares its batch
      (not its heads under random head selection, which follow the engine's step).
    - `stop` strings end the text (the stop string is not part of it, unless `include_stop_str_in_output`);
      `stop_token_ids` and the model's EOS (unless `ignore_eos`) end it on a token, which is kept in
      token_ids but not its text in text (unless `include_stop_str_in_output`); none of them ends it before
      `min_tokens` tokens. `skip_special_tokens` False keeps special tokens' text in the output text.
    - `logprobs` N: the log-probability of each sampled token and the N most likely tokens at its position
      with theirs (0 <= N <= MAX_LOGPROBS; None: off); `prompt_logprobs` N: the same for each prompt token
      after the first.
    - `max_tokens` None: until the context (max_model_len) ends.

    vLLM's spellings of "off" are taken as well: None for stop, stop_token_ids and logit_bias, top_k -1. True
    for either logprobs field means 1, False None.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        for name in ("stop", "stop_token_ids", "logit_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, ())
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool):
                object.__setattr__(self, name, 1 if value else None)
            elif value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise _bad(name, f"must be None or an int in [0, {MAX_LOGPROBS}] (how many of the most likely "
                                 "tokens to report beside the chosen one)", value)
            elif value is not None:
                object.__setattr__(self, name, int(value))
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
        for name, rule, ok in (("min_p", "must be in [0, 1] (0: off)", lambda v: 0 <= v <= 1),
                               ("repetition_penalty", "must be a finite number > 0 (1: off)", lambda v: v > 0),
                               ("frequency_penalty", "must be in [-2, 2] (0: off)", lambda v: -2 <= v <= 2),
                               ("presence_penalty", "must be in [-2, 2] (0: off)", lambda v: -2 <= v <= 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
                raise _bad(name, rule, v)
        bias = self.logit_bias
        try:
            pairs = list(bias.items() if hasattr(bias, "items") else bias)
        except TypeError:
            raise _bad("logit_bias", "must be a {token id: bias} mapping", bias) from None
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise _bad("logit_bias", "must be a {token id: bias} mapping", bias)
            t, b = pair
            if not _is_int(t) or t < 0:
                raise _bad("logit_bias", "must have int token ids >= 0", t)
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not -100 <= b <= 100:
                raise _bad("logit_bias", f"must have biases in [-100, 100] (token {t})", b)
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in pairs)))
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _bad("min_tokens", "must be an int >= 0", self.min_tokens)
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
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be a bool", getattr(self, name))

    @property
    def filters(self) -> bool:
        """Whether this request samples with top-k, top-p or min-p (its steps then search for cut-offs)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes this request's logits (its steps then send its tokens so far)."""
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

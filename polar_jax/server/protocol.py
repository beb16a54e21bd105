"""Request and response bodies of the OpenAI API (the parts this server implements), as pydantic models.

Requests are validated here (types and ranges) so that a bad field becomes HTTP 400 naming it; what needs the
model (prompt length against the context, token ids against the vocabulary) is checked in app.py.
Extensions beyond OpenAI's fields: top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens (as in vLLM), and polar_attn_density (the fraction of attention
KV heads a sparse engine keeps for this request).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

from polar_jax.engine.sampling_params import MAX_LOGPROBS

# Requests accepted beyond the engine's max_num_seqs before the server answers 429.
from polar_jax.server.cli import DEFAULT_MAX_QUEUE  # noqa: E402,F401  (the CLI owns it: no pydantic there)
# OpenAI's own upper bound on temperature; larger values are almost surely mistakes.
MAX_TEMPERATURE = 2.0


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement, with the values that mean "not used" (besides null, and
# what SDKs send by default: an empty logit_bias, a text response_format): a request that sets one otherwise
# gets 400 rather than an answer that silently ignores it. Other unknown fields are ignored.
UNSUPPORTED = {"best_of": (1,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "response_format": ({"type": "text"},),
               # vLLM's sampling extensions this server does not implement either
               "use_beam_search": (False,), "length_penalty": (1,)}


def _null_is_default(field) -> bool:
    """A field that takes no null of its own (max_tokens null is "until the context"), and has a default."""
    return field is not None and not field.is_required() and type(None) not in get_args(field.annotation)


class _Sampling(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, strict=True)  # 0 or -1: off (vLLM uses -1)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)  # vLLM's; 0: off
    # OpenAI's penalties, and vLLM's repetition_penalty (polar_jax.engine.sampler.penalized)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # OpenAI's {token id: bias in [-100, 100]}
    min_tokens: int = Field(0, ge=0, strict=True)  # vLLM's: no EOS, stop token or stop string before this many
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, strict=True)  # any 64-bit seed, as OpenAI's; taken mod 2**32
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, strict=True)  # choices per prompt: n engine requests (at most the server's queue)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: the stop string or stop token's text that ended it stays
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens' text
    stop_token_ids: list[int] | None = None  # vLLM's extension: generation also ends at any of these ids
    polar_attn_density: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """OpenAI's optional fields are nullable ("temperature": null is the default temperature), and clients
        send null for a field they leave unset: take it as the default, not as a bad value."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None or not _null_is_default(cls.model_fields.get(k))}
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, unused in UNSUPPORTED.items():
                if data.get(name) is not None and data[name] not in unused:
                    raise PydanticCustomError("unsupported", "{name} is not supported by this server",
                                              {"name": name})
        return data

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias):
        for key in bias or {}:
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options needs stream: true")  # as vLLM's server
        return options

    @property
    def token_bias(self) -> dict[int, float] | None:
        return None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings ({len(stops)} given)")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # A string, a list of token ids, or a list of either (one choice per prompt).
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]  # strict: true / 1.0 are not token ids
    max_tokens: int | None = Field(16, ge=0, strict=True)  # strict: true is not 1
    # The chosen token's logprob and the `logprobs` most likely tokens' (OpenAI caps it at 5, vLLM at 20).
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        """Content as one string; list content keeps its text parts (this server reads no images)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the most likely tokens at each position

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_what_it_carries(self) -> dict:
        """OpenAI's deltas leave out what they do not carry (the role after the first chunk), not null it."""
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "polar-jax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

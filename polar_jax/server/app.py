"""The OpenAI-compatible HTTP API over the serving engine (FastAPI).

The app only translates: a request body becomes token ids and SamplingParams, the AsyncEngine runs them, and
RequestOutputs become response bodies or server-sent events. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (naming the field), 401 for a missing
or wrong API key, 429 when the queue is full, 500 when the engine failed on the request.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from polar_jax.engine.llm_engine import LLMEngine, RequestOutput
from polar_jax.engine.sampling_params import SamplingParams, SamplingParamsError
from polar_jax.engine.sequence import RequestError
from polar_jax.server import protocol as P
from polar_jax.server.async_engine import (AsyncEngine, ClientGone, EngineError, QueueFull, Submission,
                                           TooManySequences)
from polar_jax.server.metrics import ServerMetrics
from polar_jax.server.token_bytes import TextOffsets, TokenBytes

DRAIN_MARGIN_S = 1.0  # DrainingServer ends what is still running this long before uvicorn would cancel it


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
              max_queue: int = P.DEFAULT_MAX_QUEUE, sparsity=None) -> FastAPI:
    """The app serving `engine` as model `model_name`.

    api_key: required as `Authorization: Bearer KEY` on /v1/* (None: open). max_queue: requests accepted
    beyond the engine's max_num_seqs before answering 429. sparsity: shown in /metrics (default: the
    engine's). The engine thread starts and stops with the app's lifespan.
    """
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer: serve a model directory with tokenizer files")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    sparsity = sparsity if sparsity is not None else getattr(engine.runner, "sparsity", None)
    metrics = ServerMetrics(model_name, sparsity, engine.cfg)
    async_engine = AsyncEngine(engine, metrics, max_in_flight=engine.config.max_num_seqs + max_queue)
    api = _API(async_engine, engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        metrics.set_engine_state(engine.scheduler)
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="polar-jax", lifespan=lifespan)
    app.state.async_engine, app.state.metrics = async_engine, metrics

    if api_key is not None:
        # A middleware, so that the key is checked before anything else (even before the body is parsed).
        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                            api_key.encode()):
                    return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                    type="authentication_error", code="invalid_api_key").response()
            return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return _validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response()

    @app.get("/health")
    async def health():
        if not async_engine.alive:
            return APIError(503, "the engine is not running", type="server_error").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    card = P.ModelCard(id=model_name, max_model_len=engine.config.max_model_len)

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        return P.ModelList(data=[card])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> P.ModelCard:
        api._check_model(name)
        return card

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    return app


def _validation_response(errors) -> JSONResponse:
    """400 naming the first offending field ('temperature', 'messages.0.role'); malformed JSON says so."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return _bad(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None,
                    code="invalid_json").response()
    if err.get("type") == "unsupported":
        return _bad(err["msg"], err["ctx"]["name"], code="unsupported").response()
    # A union (prompt: str | list[int] | ...) reports each alternative: name the field, not the alternative
    # (and not a field whose name starts like one: stream, stream_options).
    loc = [x for x in loc if x not in ("str", "int", "float", "bool") and not x.startswith(("list[", "dict[",
                                                                                          "function-"))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "value_error":  # our own validators' messages, without pydantic's "Value error, "
        msg = msg.removeprefix("Value error, ")
    if "input" in err and err.get("type") != "missing" and ", got " not in msg:  # (ours may name it already)
        got = repr(err["input"])
        msg += f", got {got if len(got) <= 80 else got[:77] + '...'}"
    return _bad(f"{param}: {msg}" if param else msg, param).response()


class _API:
    """Request translation for the routes; one instance per app."""

    def __init__(self, async_engine: AsyncEngine, engine: LLMEngine, model_name: str):
        self.async_engine, self.tokenizer, self.model_name = async_engine, engine.tokenizer, model_name
        self.token_bytes = TokenBytes(engine.tokenizer)
        self.vocab_size, self.max_model_len = engine.cfg.vocab_size, engine.config.max_model_len

    # -- shared checks -----------------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")  # OpenAI's (and vLLM's) status for it

    def _extra(self, body: P._Sampling) -> dict:
        if body.polar_attn_density is None:
            return {}
        if not self.async_engine.accepts_attn_density:
            raise _bad("polar_attn_density is not supported by this engine", "polar_attn_density")
        return {"attn_density": body.polar_attn_density}

    def _check_lengths(self, ids: list[int], max_tokens: int | None, prompt_param: str, which: str = "the prompt"
                       ) -> int:
        """The output budget of one prompt (max_tokens, or what the context leaves when None). which: how the
        messages name it ("prompt 2" in a list of prompts)."""
        if not ids:
            raise _bad(f"{which} is empty", prompt_param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(f"{which}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", prompt_param)
        if len(ids) > self.max_model_len:
            raise _bad(f"{which} has {len(ids)} tokens, more than the context length {self.max_model_len}",
                       prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            if len(ids) >= self.max_model_len:  # what is left is nothing: say so, not an empty completion
                raise _bad(f"{which} has {len(ids)} tokens, which fills the context length {self.max_model_len}:"
                           " no room to generate", prompt_param, code="context_length_exceeded")
            return self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise _bad(f"max_tokens={max_tokens} with {which} of {len(ids)} tokens exceeds the context length "
                       f"{self.max_model_len}", "max_tokens", code="context_length_exceeded")
        return max_tokens

    def _params(self, body: P._Sampling, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                sample: int = 0) -> SamplingParams:
        """sample: which of a prompt's n choices; with a seed, choice j samples with seed + j (as vLLM's)."""
        seed = None if body.seed is None else body.seed + sample
        try:
            # max_tokens 0 (echo only): the engine generates one token, which is dropped.
            return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                                  min_p=body.min_p, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logit_bias=body.token_bias,
                                  min_tokens=body.min_tokens,
                                  seed=seed, max_tokens=max(max_tokens, 1), stop=body.stops,
                                  stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                                  include_stop_str_in_output=body.include_stop_str_in_output,
                                  skip_special_tokens=body.skip_special_tokens,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except SamplingParamsError as e:  # "SamplingParams.top_p must be ...": name the field
            raise _bad(str(e), e.field) from None

    async def _submit(self, requests) -> Submission:
        try:
            return await self.async_engine.submit(requests)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except TooManySequences as e:
            raise _bad(str(e), "n") from None
        except RequestError as e:  # the field at fault, without the engine's request id
            raise _bad(e.reason, e.field) from None
        except (ValueError, TypeError) as e:
            raise _bad(str(e), None) from None
        except EngineError as e:
            raise APIError(503, str(e), type="server_error") from None

    def _text(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _token_str(self, token_id: int) -> str:
        return self.token_bytes.token_str(token_id)

    # -- /v1/completions ---------------------------------------------------------------------------------
    async def completions(self, body: P.CompletionRequest, request: Request):
        self._check_model(body.model)
        extra = self._extra(body)
        prompts = body.prompts()
        if not prompts:
            raise _bad("no prompt given", "prompt")
        ids_per_prompt = []
        for p in prompts:
            ids = list(self.tokenizer.encode(p)) if isinstance(p, str) else list(p)
            ids_per_prompt.append(ids)
        which = (lambda i: "the prompt") if len(ids_per_prompt) == 1 else (lambda i: f"prompt {i}")
        budgets = [self._check_lengths(ids, body.max_tokens, "prompt", which(i))
                   for i, ids in enumerate(ids_per_prompt)]
        prompt_tokens = sum(map(len, ids_per_prompt))  # once per prompt, however many choices it has
        want_lp = body.logprobs is not None
        req_id = P.new_id("cmpl")
        # Choice k is sample k % n of prompt k // n (OpenAI's order: a prompt's n choices side by side).
        n = body.n
        ids_per_choice = [ids for ids in ids_per_prompt for _ in range(n)]
        budgets = [b for b in budgets for _ in range(n)]
        prompt_lp = body.logprobs if body.echo else None
        engine_reqs = [(f"{req_id}-{k}", ids, self._params(body, b, body.logprobs, prompt_lp, k % n), extra)
                       for k, (ids, b) in enumerate(zip(ids_per_choice, budgets))]
        echo_only = [b == 0 for b in budgets]  # max_tokens 0: the prompt (echo) and nothing generated
        index = {r[0]: k for k, r in enumerate(engine_reqs)}
        sub = await self._submit(engine_reqs)
        if body.stream:
            return _sse(self._completion_stream(body, req_id, sub, ids_per_choice, prompt_tokens, index, echo_only),
                        sub)
        try:
            final: dict[int, RequestOutput] = {}
            async for out in sub.outputs(request.is_disconnected):
                if out.finished:
                    final[index[out.request_id]] = out
        except ClientGone:
            return Response(status_code=499)
        except EngineError as e:
            raise APIError(e.status, str(e), type="server_error") from None
        finally:
            sub.close()
        choices, completion_tokens = [], 0
        for i, ids in enumerate(ids_per_choice):
            out = final[i]
            gen_ids = [] if echo_only[i] else out.token_ids
            text = out.text if not echo_only[i] else ""
            completion_tokens += len(gen_ids)
            logprobs = None
            if want_lp:
                lps = [] if echo_only[i] else out.logprobs[:len(gen_ids)]
                tops = [] if echo_only[i] else out.top_logprobs[:len(gen_ids)]
                toks = gen_ids
                if body.echo:
                    lps, toks = list(out.prompt_logprobs) + lps, ids + gen_ids
                    tops = list(out.prompt_top_logprobs) + tops
                where = TextOffsets(self.token_bytes, body.echo, body.skip_special_tokens)
                logprobs = self._completion_logprobs(toks, lps, tops, where)
            echoed = self._text(ids, body.skip_special_tokens) if body.echo else ""
            choices.append(P.CompletionChoice(index=i, text=echoed + text,
                                              logprobs=logprobs,
                                              finish_reason="length" if echo_only[i] else out.finish_reason,
                                              stop_reason=None if echo_only[i] else out.stop_reason))
        return P.CompletionResponse(id=req_id, model=self.model_name, choices=choices,
                                    usage=P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))

    def _completion_logprobs(self, token_ids, logprobs, tops, where: TextOffsets) -> P.CompletionLogprobs:
        """OpenAI's legacy logprobs: each token's text, its logprob, where it starts in the choice's text
        (`where` carries the position across a stream's chunks) and at each position {text: logprob} of the
        engine's most likely tokens there (tops: ((token id, logprob), ...), None at an echoed prompt's first
        token) and of the token itself (OpenAI's "up to logprobs + 1" entries). The engine takes every logprob
        from one log-softmax, so where the token is the most likely, a client comparing the two (lm-eval's
        is_greedy) sees them equal."""
        offsets = where.offsets(token_ids)
        top_logprobs = [None if top is None else {self._token_str(t): lp for t, lp in (*top, (tok, tok_lp))}
                        for tok, tok_lp, top in zip(token_ids, logprobs, tops)]
        return P.CompletionLogprobs(tokens=[self._token_str(t) for t in token_ids], token_logprobs=list(logprobs),
                                    top_logprobs=top_logprobs, text_offset=offsets)

    async def _completion_stream(self, body, req_id, sub, ids_per_prompt, prompt_tokens: int, index, echo_only
                                 ) -> AsyncIterator[str]:
        """ids_per_prompt: each choice's prompt (a prompt's n choices each have it); prompt_tokens: of the
        request's distinct prompts."""
        want_lp = body.logprobs is not None
        sent_echo: set[int] = set()
        where: dict[int, TextOffsets] = {}  # per choice: text_offset runs on across the stream's chunks
        completion_tokens = 0
        created = int(time.time())  # one time for every chunk of the response, as OpenAI's
        try:
            async for out in sub.outputs():
                i = index[out.request_id]
                if echo_only[i] and not out.finished:
                    continue
                text, toks, lps, tops = "", [], [], []
                if body.echo and i not in sent_echo:
                    sent_echo.add(i)
                    text, toks = self._text(ids_per_prompt[i], body.skip_special_tokens), list(ids_per_prompt[i])
                    lps, tops = list(out.prompt_logprobs or []), list(out.prompt_top_logprobs or [])
                if not echo_only[i]:
                    text += out.new_text
                    toks += out.new_token_ids
                    if want_lp:
                        new = slice(len(out.token_ids) - len(out.new_token_ids), len(out.token_ids))
                        lps += out.logprobs[new]
                        tops += out.top_logprobs[new]
                    completion_tokens += len(out.new_token_ids)
                finish = ("length" if echo_only[i] else out.finish_reason) if out.finished else None
                stop_reason = None if echo_only[i] else out.stop_reason
                if want_lp and i not in where:
                    where[i] = TextOffsets(self.token_bytes, body.echo, body.skip_special_tokens)
                logprobs = self._completion_logprobs(toks, lps, tops, where[i]) if want_lp else None
                choice = P.CompletionChoice(index=i, text=text, finish_reason=finish, stop_reason=stop_reason,
                                            logprobs=logprobs)
                yield P.CompletionResponse(id=req_id, created=created, model=self.model_name,
                                           choices=[choice]).model_dump_json()
            if body.include_usage:
                usage = P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)
                yield P.CompletionResponse(id=req_id, created=created, model=self.model_name, choices=[],
                                           usage=usage).model_dump_json()
        except EngineError as e:
            yield _error_event(e)
        finally:
            sub.close()

    # -- /v1/chat/completions ----------------------------------------------------------------------------
    async def chat(self, body: P.ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        extra = self._extra(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not getattr(self.tokenizer, "chat_template", None):
            raise _bad("this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (roles, order)
            raise _bad(f"the chat template rejected the messages: {e}", "messages") from None
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        budget = self._check_lengths(ids, body.wanted_tokens, "messages")
        if budget == 0:
            raise _bad(f"the messages fill the context length {self.max_model_len}", "messages",
                       code="context_length_exceeded")
        req_id = P.new_id("chatcmpl")
        top = (body.top_logprobs or 0) if body.logprobs else None
        engine_reqs = [(f"{req_id}-{j}", ids, self._params(body, budget, top, None, j), extra) for j in range(body.n)]
        index = {r[0]: j for j, r in enumerate(engine_reqs)}
        sub = await self._submit(engine_reqs)
        if body.stream:
            return _sse(self._chat_stream(body, req_id, sub, len(ids), index), sub)
        try:
            final: dict[int, RequestOutput] = {}
            async for out in sub.outputs(request.is_disconnected):
                if out.finished:
                    final[index[out.request_id]] = out
        except ClientGone:
            return Response(status_code=499)
        except EngineError as e:
            raise APIError(e.status, str(e), type="server_error") from None
        finally:
            sub.close()
        choices = [P.ChatChoice(index=j, message=P.ChatResponseMessage(content=out.text),
                                logprobs=self._chat_logprobs(body, out.token_ids, out.logprobs, out.top_logprobs)
                                if body.logprobs else None,
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason)
                   for j, out in sorted(final.items())]
        completion_tokens = sum(len(out.token_ids) for out in final.values())
        usage = P.Usage(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                        total_tokens=len(ids) + completion_tokens)
        return P.ChatCompletionResponse(id=req_id, model=self.model_name, choices=choices, usage=usage)

    def _chat_logprobs(self, body, token_ids, logprobs, tops) -> P.ChatChoiceLogprobs:
        """Each token's logprob and the body.top_logprobs most likely tokens there (tops: ((id, logprob), ...),
        as many as the request asked)."""
        def entry(t, lp) -> dict:
            return dict(token=self._token_str(t), logprob=lp, bytes=list(self.token_bytes.bytes_of(t)))

        content = [P.ChatLogprob(**entry(t, lp), top_logprobs=[entry(*pair) for pair in top])
                   for t, lp, top in zip(token_ids, logprobs, tops)]
        return P.ChatChoiceLogprobs(content=content)

    async def _chat_stream(self, body, req_id, sub, prompt_tokens: int, index: dict[str, int]
                           ) -> AsyncIterator[str]:
        def chunk(j: int, delta: P.ChatDelta, finish=None, logprobs=None, stop_reason=None) -> str:
            choice = P.ChatChunkChoice(index=j, delta=delta, finish_reason=finish, stop_reason=stop_reason,
                                       logprobs=logprobs)
            return P.ChatCompletionChunk(id=req_id, created=created, model=self.model_name,
                                         choices=[choice]).model_dump_json()

        created = int(time.time())  # one time for every chunk of the response, as OpenAI's
        tokens = [0] * len(index)  # per choice
        try:
            for j in range(len(index)):
                yield chunk(j, P.ChatDelta(role="assistant", content=""))
            async for out in sub.outputs():
                j = index[out.request_id]
                tokens[j] = len(out.token_ids)
                lp = None
                if body.logprobs:
                    new = len(out.new_token_ids)
                    lp = self._chat_logprobs(body, out.new_token_ids, out.logprobs[-new:], out.top_logprobs[-new:])
                yield chunk(j, P.ChatDelta(content=out.new_text), out.finish_reason if out.finished else None, lp,
                            out.stop_reason)
            if body.include_usage:
                completion_tokens = sum(tokens)
                usage = P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)
                yield P.ChatCompletionChunk(id=req_id, created=created, model=self.model_name, choices=[],
                                            usage=usage).model_dump_json()
        except EngineError as e:
            yield _error_event(e)
        finally:
            sub.close()


def _error_event(e: Exception) -> str:
    return P.ErrorResponse(error=P.ErrorInfo(message=str(e), type="server_error")).model_dump_json()


def _sse(events: AsyncIterator[str], sub: Submission) -> StreamingResponse:
    """Server-sent events: each JSON event as `data: ...`, then `data: [DONE]`."""

    async def body():
        async for e in events:
            yield f"data: {e}\n\n"
        yield "data: [DONE]\n\n"

    return _SSEResponse(body(), sub)


class _SSEResponse(StreamingResponse):
    """Closes its submission however the response ends: a client that disconnects cancels the body (even
    before its first event, when the body's own `finally` never runs), which aborts the requests and frees
    their pages."""

    def __init__(self, body, sub: Submission):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sub = sub

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server for `app` (from build_app). On SIGTERM or SIGINT uvicorn stops accepting, lets in-flight
    requests finish for `timeout_graceful_shutdown` seconds and then cancels their tasks, which cuts a stream
    off mid-way with no final event (and logs the CancelledError). This server ends what is still running
    DRAIN_MARGIN_S before that (half the timeout where it is shorter): a stream gets an error event and
    [DONE], a whole request a 503, and every connection closes cleanly."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        timeout = self.config.timeout_graceful_shutdown
        if self._drain is None and timeout is not None:  # None: uvicorn waits for every request
            self._drain = threading.Timer(max(timeout - min(DRAIN_MARGIN_S, timeout / 2), 0.0),
                                          self.config.app.state.async_engine.end_all)
            self._drain.daemon = True
            self._drain.start()

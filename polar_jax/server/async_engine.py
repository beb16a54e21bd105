"""The engine behind the HTTP server: one thread owns the LLMEngine; the event loop talks to it by messages.

LLMEngine is not thread-safe, so every add_request / abort_request / step happens on the engine thread, fed by
a command queue. Each submission (the prompts of one HTTP request) has an asyncio.Queue; the engine thread
puts that submission's RequestOutputs on it with loop.call_soon_threadsafe. When a step raises, the requests
in the engine get an EngineError and are aborted, and the loop goes on with the next requests.

    sub = await async_engine.submit([("id-0", [1, 2, 3], SamplingParams(max_tokens=4), {})])
    try:
        async for out in sub.outputs(): ...
    finally:
        sub.close()  # aborts what has not finished (a client that went away)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from polar_jax.engine.llm_engine import LLMEngine, RequestOutput
from polar_jax.engine.sampling_params import SamplingParams
from polar_jax.server.metrics import ServerMetrics

log = logging.getLogger("polar_jax.server")

# How often a waiting consumer asks whether its client is still there.
_DISCONNECT_POLL_S = 0.5


class EngineError(RuntimeError):
    """The engine failed (or shut down) while running this request."""

    status = 500


class ShuttingDown(EngineError):
    """The server is shutting down and ended this request before it finished."""

    status = 503


class QueueFull(RuntimeError):
    """More requests in flight than the server accepts."""


class TooManySequences(ValueError):
    """One submission of more sequences than the server ever has in flight."""


class ClientGone(RuntimeError):
    """The client disconnected before its request finished."""


@dataclass
class _Stream:
    """One submission's delivery channel; engine thread fields: last_token (monotonic s) per request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    last_token: dict[str, float] = field(default_factory=dict)

    def put(self, item) -> None:
        _call_in(self.loop, self.queue.put_nowait, item)


@dataclass
class Submission:
    """The engine requests of one HTTP request; outputs() yields their RequestOutputs as steps make them."""

    engine: AsyncEngine
    request_ids: list[str]
    stream: _Stream
    unfinished: set[str]

    async def outputs(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None
                      ) -> AsyncIterator[RequestOutput]:
        """Until every request has finished. is_disconnected: asked every _DISCONNECT_POLL_S, whether or not
        outputs come meanwhile (a busy engine makes a token far more often); True raises ClientGone."""
        next_poll = time.monotonic() + _DISCONNECT_POLL_S
        while self.unfinished:
            if is_disconnected is None:
                item = await self.stream.queue.get()
            else:
                if time.monotonic() >= next_poll:
                    if await is_disconnected():
                        raise ClientGone()
                    next_poll = time.monotonic() + _DISCONNECT_POLL_S
                try:
                    item = await asyncio.wait_for(self.stream.queue.get(), next_poll - time.monotonic())
                except asyncio.TimeoutError:
                    continue
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def close(self) -> None:
        """Abort what has not finished (idempotent) and give back the submission's place in the queue."""
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished.clear()
        if self.request_ids:
            self.engine.release(len(self.request_ids))
            self.request_ids = []


class AsyncEngine:
    """Runs an LLMEngine on its own thread.

    max_in_flight: engine requests accepted at once (running + waiting); submit() raises QueueFull beyond it.
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_in_flight: int):
        self.engine, self.metrics, self.max_in_flight = engine, metrics, max_in_flight
        # Per-request attention density (polar_attn_density) needs an engine built for it (a sparsity config
        # that selects heads, per_request_density=True).
        self.accepts_attn_density = engine.per_request_density
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._in_flight = 0  # event loop only
        self._thread: threading.Thread | None = None

    # -- event loop side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="polar-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in the engine (its consumers get EngineError) and stop the thread."""
        if self.alive:
            self._commands.put(("stop",))
            self._thread.join(timeout)

    async def submit(self, requests: list[tuple[str, list[int], SamplingParams, dict]]) -> Submission:
        """Queue (request_id, prompt ids, params, add_request keywords) for each; all or none.

        Raises QueueFull when the server is full, TooManySequences when it never could take them all at once,
        RequestError (from add_request) when a request cannot run.
        """
        if not self.alive:
            raise EngineError("the engine is not running")
        if len(requests) > self.max_in_flight:
            raise TooManySequences(f"{len(requests)} sequences (prompts times n) in one request; this server takes "
                                   f"at most {self.max_in_flight}")
        if self._in_flight + len(requests) > self.max_in_flight:
            raise QueueFull(f"the server is full ({self._in_flight} requests in flight, at most "
                            f"{self.max_in_flight}); retry later")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        done = loop.create_future()
        self._in_flight += len(requests)
        sub = Submission(self, [r[0] for r in requests], stream, set())
        self._commands.put(("add", requests, stream, done, time.monotonic()))
        try:
            await done
        except BaseException:  # refused, or the caller was cancelled after the engine took the requests
            sub.unfinished = set(sub.request_ids)
            sub.close()
            raise
        sub.unfinished = set(sub.request_ids)
        return sub

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def end_all(self) -> None:
        """End every request in the engine now (the server is shutting down): their consumers get ShuttingDown
        (a stream its error event and [DONE]); the engine goes on taking requests."""
        self._commands.put(("end_all",))

    def release(self, n: int) -> None:
        """n requests left the server (finished, refused or abandoned): room for n more."""
        self._in_flight -= n

    # -- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                commands = [self._commands.get(block=not self.engine.has_unfinished())]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if cmd[0] == "stop":
                    self._end_all()
                    return
                try:
                    getattr(self, f"_{cmd[0]}")(*cmd[1:])
                except Exception:  # noqa: BLE001 - a bookkeeping failure must not end the thread
                    log.exception("engine command %s failed", cmd[0])
            if self.engine.has_unfinished():
                self._step()
            self.metrics.set_engine_state(self.engine.scheduler)

    def _add(self, requests, stream: _Stream, done: asyncio.Future, arrival: float) -> None:
        added = []
        try:
            for rid, prompt, params, kwargs in requests:
                self.engine.add_request(rid, prompt, params, arrival_time=arrival, **kwargs)
                added.append(rid)
                self._streams[rid] = stream
        except Exception as e:  # noqa: BLE001 - any refusal goes back to the caller; the loop goes on
            for rid in added:
                self._abort(rid)
            _call_in(stream.loop, _settle, done, e)
            return
        self.metrics.prompt_tokens.inc(sum(len(r[1]) for r in requests))
        _call_in(stream.loop, _settle, done, None)

    def _end_all(self) -> None:
        self._fail_all(ShuttingDown("the server is shutting down"))

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            self.metrics.finished.labels("abort").inc()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one failed step must not end the server
            log.exception("engine step failed; aborting the %d requests in it", len(self._streams))
            self._fail_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
            return
        now = time.monotonic()
        decoded = 0  # requests that already had a token: the step's decode rows (those still streamed)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted while the step ran
                continue
            last = stream.last_token.get(out.request_id)
            if last is None and out.first_token_time is not None:
                self.metrics.ttft.observe(out.first_token_time - out.arrival_time)
            elif last is not None:
                self.metrics.itl.observe(now - last)
                decoded += 1
            stream.last_token[out.request_id] = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if out.finished:
                del self._streams[out.request_id]
                stream.last_token.pop(out.request_id, None)
                self.metrics.finished.labels(out.finish_reason or "stop").inc()
                self.metrics.e2e.observe(now - out.arrival_time)
            stream.put(out)
        if decoded:
            self.metrics.decode_batch.observe(decoded)

    def _fail_all(self, error: EngineError) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self._abort(rid)
            except Exception:  # noqa: BLE001 - the engine is already in trouble; tell the client regardless
                log.exception("aborting %s failed", rid)
                self._streams.pop(rid, None)
            stream.put(error)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _call_in(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """fn(*args) on loop's thread; nothing when the loop has closed (its consumers are gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass

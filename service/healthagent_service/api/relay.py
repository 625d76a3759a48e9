"""Relays a Chat turn from the upstream to its caller, and keeps the stream's accounts.

The loop reads the upstream's events and writes each to the caller as a `ChatResponse`. On the
way it counts what the stream's metrics need: its chunks, the time to the first one, the time
spent waiting on the upstream (what the service adds is the rest) and the tokens used. A caller
that takes no message for `client_stall_seconds` is cut off by a stall deadline. However the
turn ends, the upstream stream is closed and the turn written down.

This is the service's per-chunk path, and it keeps the idioms that counted cheaper there
(docs/decisions/0009-per-call-python.md): methods bound to locals before the loop, `type(x) is`
for event types, one stall deadline per stream checked by a shared timer rather than a timer per
write (docs/decisions/0006-watchdog.md), and metrics added once per stream, not per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any

import grpc

from healthagent_service.api.converter import to_chat_response
from healthagent_service.domain.events import (
    ChatEvent,
    ChatTurn,
    ChatUpstream,
    ResponseDone,
    TextDelta,
    Usage,
)
from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.history.recorder import TurnRecorder, TurnRecording
from healthagent_service.metrics import Metrics, StreamMetrics
from healthagent_service.watchdog import NOT_ARMED, Deadline, Watchdog

Context = grpc.aio.ServicerContext[Any, Any]


def shutting_down() -> HealthAgentError:
    """What a stream ended by shutdown tells its caller."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "SHUTTING_DOWN",
        "the server is shutting down and its grace period ended; retry on another replica",
        retry_after_seconds=1.0,
    )


def client_too_slow(limit: float) -> HealthAgentError:
    """What a caller that took no message for `limit` seconds is told."""
    return HealthAgentError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "CLIENT_TOO_SLOW",
        f"the caller took no message for {limit:g} s; the stream was ended so the reply does "
        "not pile up in the service",
        retry_after_seconds=1.0,
    )


def upstream_not_unicode() -> HealthAgentError:
    """An upstream event whose text cannot be sent: protobuf strings must be Unicode."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_PROTOCOL_ERROR",
        "the upstream sent text that is not Unicode (a lone surrogate escape)",
        retry_after_seconds=1.0,
    )


class ChatRelay:
    """Relays the Chat turns of one servicer from its upstream: what every stream shares."""

    def __init__(
        self,
        *,
        upstream: ChatUpstream,
        recorder: TurnRecorder,
        metrics: Metrics,
        stream_metrics: StreamMetrics,
        client_stall_seconds: float,
        shutting_down: Callable[[], bool],
        handlers: set[asyncio.Task[Any]],
    ) -> None:
        self.upstream = upstream
        self.recorder = recorder
        self.metrics = metrics
        self.stream_metrics = stream_metrics
        self.client_stall_seconds = client_stall_seconds
        self.shutting_down = shutting_down
        # the Chat handlers running now, shared with the servicer, which ends them at shutdown
        self.handlers = handlers
        # one timer for every stream's stall deadline, not one per write
        self.watchdog = Watchdog(resolution=min(1.0, client_stall_seconds / 4))

    def stream(self, context: Context, started: float) -> RelayedStream:
        """The relay of the Chat call this task handles, begun at `started` (perf_counter);
        enter it for the whole call, so that the call is counted and can be ended."""
        return RelayedStream(self, context, asyncio.current_task(), started)


class RelayedStream:
    """One Chat call: its stall deadline and what it counted, added to the metrics on exit."""

    __slots__ = (
        "_context",
        "_handler",
        "_relay",
        "_stall",
        "completed",
        "events",
        "first_chunk_at",
        "started",
        "usage",
        "waited",
    )

    def __init__(
        self,
        relay: ChatRelay,
        context: Context,
        handler: asyncio.Task[Any] | None,
        started: float,
    ) -> None:
        self._relay = relay
        self._context = context
        self._handler = handler
        # a caller that takes no message in time: the watchdog cancels the handler
        self._stall = Deadline(handler.cancel if handler is not None else _nothing)
        self.started = started
        self.events = 0  # messages written to the caller
        self.waited = 0.0  # seconds spent waiting on the upstream
        self.first_chunk_at: float | None = None
        self.usage: Usage | None = None
        self.completed = False  # the upstream ended the turn and the caller took all of it

    def __enter__(self) -> RelayedStream:
        self._relay.metrics.active_streams.inc()
        if self._handler is not None:
            self._relay.handlers.add(self._handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._relay.watchdog.forget(self._stall)
        self._relay.metrics.active_streams.dec()
        self._record()
        if self._handler is not None:
            self._relay.handlers.discard(self._handler)

    async def relay(self, turn: ChatTurn) -> None:
        """Relay `turn`'s events to the caller until the upstream ends the turn."""
        relay = self._relay
        recording = relay.recorder.start(turn)
        add_chunk = recording.add_chunk
        write = self._context.write
        stall = self._stall
        stall_limit = relay.client_stall_seconds
        loop_time = asyncio.get_running_loop().time
        clock = time.perf_counter
        events = 0
        waited = 0.0
        first_chunk_at: float | None = None
        relay.watchdog.watch(stall)
        try:
            # however this ends, the upstream turn is closed at once, and fully, and then
            # written down
            async with _relayed(relay.upstream.chat(turn), recording, self._cut_reason) as stream:
                next_event = stream.__anext__
                while True:
                    waiting_since = clock()
                    try:
                        event = await next_event()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        await recording.upstream_failed(exc)
                        raise
                    now = clock()
                    waited += now - waiting_since
                    if type(event) is TextDelta:
                        add_chunk(event.text)
                        if first_chunk_at is None:
                            first_chunk_at = now
                    else:
                        if type(event) is ResponseDone:
                            self.usage = event.usage
                        await recording.observe(event)  # before the caller sees it
                    try:
                        response = to_chat_response(event)
                    except UnicodeEncodeError:  # a lone surrogate escape in its JSON
                        error = upstream_not_unicode()
                        await recording.upstream_failed(error)
                        raise error from None
                    # gRPC flow control makes a write wait while the caller reads slowly (so
                    # upstream reading waits too, and nothing piles up); a caller that takes
                    # no message for `stall_limit` seconds is cut off.
                    stall.at = loop_time() + stall_limit
                    await write(response)  # fails only once the call is over
                    stall.at = NOT_ARMED
                    events += 1
        finally:
            self.events = events
            self.waited = waited
            self.first_chunk_at = first_chunk_at

    def turn_completed(self) -> None:
        """The turn ended by itself and the caller has all of it (for the latency metric)."""
        self.completed = True

    def stall_error(self) -> HealthAgentError | None:
        """When the handler was cancelled for a caller that took no message in time: the
        error to end the call with (the cancellation is withdrawn: the caller is there to be
        told). None when gRPC cancelled it."""
        if self._stall.expired and self._handler is not None:
            self._handler.uncancel()
            return client_too_slow(self._relay.client_stall_seconds)
        return None

    def write_failed(self) -> bool:
        """Whether a write was in flight when the relay failed: the caller left (cancel,
        deadline, disconnect), which gRPC may report before it cancels the handler."""
        if self._stall.at == NOT_ARMED:
            return False
        self._stall.at = NOT_ARMED
        return True

    def _cut_reason(self) -> str:
        """Why a turn that did not end by itself was cut off, as the caller is told."""
        if self._stall.expired:
            return "CLIENT_TOO_SLOW"
        if self._relay.shutting_down():
            return "SHUTTING_DOWN"
        remaining = self._context.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    def _record(self) -> None:
        """Add the stream to the metrics (once per stream, not per chunk)."""
        metrics = self._relay.stream_metrics
        if self.first_chunk_at is not None:
            metrics.time_to_first_chunk.observe(self.first_chunk_at - self.started)
        metrics.relayed_chunks.inc(self.events)
        if self.completed:
            metrics.added_latency.observe(time.perf_counter() - self.started - self.waited)
        if self.usage is not None:
            metrics.input_tokens.inc(self.usage.input_tokens)
            metrics.output_tokens.inc(self.usage.output_tokens)


def _nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def _relayed(
    stream: AsyncGenerator[ChatEvent, None],
    recording: TurnRecording,
    cut_reason: Callable[[], str],
) -> AsyncIterator[AsyncGenerator[ChatEvent, None]]:
    """Yield `stream`; on the way out close it, then write the turn down (one that did not
    end by itself as cut off for `cut_reason()`), both to their end even when the handler is
    cancelled meanwhile. gRPC cancels the handler when the caller leaves, which can land while
    the upstream response is being closed (a caller that leaves during a write fails the write
    first, then cancels); an interrupted close left the upstream connection open and its pool
    slot taken for good."""
    try:
        yield stream
    finally:
        closing = asyncio.ensure_future(_close_and_finish(stream, recording, cut_reason()))
        cancelled = False
        while not closing.done():
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                cancelled = True  # finish first: it is short (socket aborted, turn written down)
        closing.result()
        if cancelled:
            raise asyncio.CancelledError


async def _close_and_finish(
    stream: AsyncGenerator[ChatEvent, None], recording: TurnRecording, cut_reason: str
) -> None:
    try:
        await stream.aclose()
    finally:
        await recording.finish(cut_reason)

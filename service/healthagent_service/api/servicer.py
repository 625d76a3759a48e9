"""The HealthAgent RPC handlers: thin adapters between protobuf and the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.api import validation
from healthagent_service.api.converter import to_chat_response, to_conversation
from healthagent_service.api.decoding import Undecodable
from healthagent_service.api.status import status_code, to_status
from healthagent_service.domain.events import (
    ChatEvent,
    ChatUpstream,
    MintedSession,
    ResponseDone,
    SessionOptions,
    TextDelta,
    Usage,
)
from healthagent_service.errors import ErrorKind, HealthAgentError, conversation_not_found
from healthagent_service.history import export
from healthagent_service.history.recorder import TurnRecorder, TurnRecording
from healthagent_service.history.store import ConversationStore
from healthagent_service.ids import UniqueIds
from healthagent_service.logging import bind_call, current_call
from healthagent_service.metrics import Metrics
from healthagent_service.revocation import SessionRevoker
from healthagent_service.security.auth import ANONYMOUS, Authenticator, Principal
from healthagent_service.security.limits import Limiter
from healthagent_service.upstream.chatkit import ChatKitUpstream
from healthagent_service.upstream.realtime import RealtimeUpstream
from healthagent_service.watchdog import NOT_ARMED, Deadline, Watchdog

log = structlog.get_logger(__name__)
Response = TypeVar("Response")

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Iterable[tuple[str, Any]]  # the core's tuple, so it can be iterated twice
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # fullmatch: `$` allows a final newline


# new request ids: 32 hex digits, like a UUID's, without a random draw per call
_new_request_id = UniqueIds()


def _request_id(metadata: Metadata) -> str:
    """The caller's x-request-id if it is sane, else a new one."""
    for key, value in metadata:
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return _new_request_id()


def _begin(context: Context, rpc: str) -> tuple[float, Metadata, tuple[tuple[str, str]]]:
    """Start time, the caller's metadata (read once: each read converts it from the gRPC
    core anew) and the request id's metadata; the id is on every log line of the call."""
    metadata = context.invocation_metadata() or ()
    request_id = _request_id(metadata)
    bind_call(request_id, rpc)
    return time.perf_counter(), metadata, ((REQUEST_ID_KEY, request_id),)


async def _fail(context: Context, error: HealthAgentError, started: float) -> NoReturn:
    log.info(
        "rpc failed",
        code=status_code(error).name,
        reason=error.reason,
        error=error.message,
        duration_ms=_ms_since(started),
    )
    call = current_call()
    echo = ((REQUEST_ID_KEY, call[0]),) if call is not None else ()
    await context.abort_with_status(to_status(error, trailing_metadata=echo))
    raise AssertionError("abort_with_status returned")  # it always raises


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 2)


def _internal(exc: Exception) -> HealthAgentError:
    log.exception("unexpected error", exc_type=type(exc).__name__)
    return HealthAgentError(
        ErrorKind.INTERNAL, "INTERNAL", "internal error; the request id identifies it in the logs"
    )


def _shutting_down() -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "SHUTTING_DOWN",
        "the server is shutting down and its grace period ended; retry on another replica",
        retry_after_seconds=1.0,
    )


def _upstream_not_unicode() -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_PROTOCOL_ERROR",
        "the upstream sent text that is not Unicode (a lone surrogate escape)",
        retry_after_seconds=1.0,
    )


def _client_too_slow(limit: float) -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "CLIENT_TOO_SLOW",
        f"the caller took no message for {limit:g} s; the stream was ended so the reply does "
        "not pile up in the service",
        retry_after_seconds=1.0,
    )


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


class HealthAgentServicer(pb_grpc.HealthAgentServicer):
    """Authenticates, validates, limits, delegates to the upstream and the store, converts;
    maps every failure to a status."""

    def __init__(
        self,
        *,
        chat: ChatUpstream,
        chatkit: ChatKitUpstream,
        realtime: RealtimeUpstream,
        store: ConversationStore,
        recorder: TurnRecorder,
        revoker: SessionRevoker,
        authenticator: Authenticator,
        limiter: Limiter,
        max_message_bytes: int = validation.MAX_MESSAGE_BYTES,
        client_stall_seconds: float = 30.0,
        metrics: Metrics | None = None,
        upstream_name: str = "chatkit",
    ) -> None:
        self._chat = chat  # what Chat talks to: ChatKit or Realtime
        self._chatkit = chatkit
        self._realtime = realtime
        self._store = store
        self._recorder = recorder
        self._revoker = revoker
        self._auth = authenticator
        self._limiter = limiter
        self._max_message_bytes = max_message_bytes
        self._client_stall_seconds = client_stall_seconds
        self._metrics = metrics or Metrics()
        workflow = chatkit.workflow_id if upstream_name == "chatkit" else realtime.model
        self._stream_metrics = self._metrics.for_streams(upstream_name, workflow)
        self._active_chats: set[asyncio.Task[Any]] = set()
        self._shutting_down = False
        # one timer for every stream's write limit, not one per write
        self._watchdog = Watchdog(resolution=min(1.0, client_stall_seconds / 4))
        # The module's logger, resolved once: each call through structlog's lazy proxy binds
        # anew, which costs a line that the level filters out four times what the line costs.
        self._log = log.bind()
        # lines at info are skipped before their fields are computed when the level is higher
        self._info = bool(self._log.is_enabled_for(logging.INFO))

    def _cut_reason(self, context: Context, stall: Deadline) -> str:
        """Why a turn that did not end by itself was cut off, as the caller is told."""
        if stall.expired:
            return "CLIENT_TOO_SLOW"
        if self._shutting_down:
            return "SHUTTING_DOWN"
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    @property
    def active_chats(self) -> int:
        """Chat handlers running now."""
        return len(self._active_chats)

    def end_chats_for_shutdown(self) -> None:
        """End every running Chat with UNAVAILABLE (SHUTTING_DOWN), before the server's grace
        period runs out and gRPC cancels them with a less useful status."""
        self._shutting_down = True
        for task in list(self._active_chats):
            task.cancel()

    async def wait_for_chats(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until no Chat handler is running, so that shutdown
        closes the store and the upstream connections only after they have unwound."""
        if self._active_chats:
            await asyncio.wait(list(self._active_chats), timeout=timeout)

    def _record_stream(
        self,
        events: int,
        *,
        started: float,
        waited: float,
        first_chunk_at: float | None,
        usage: Usage | None,
        completed: bool,
    ) -> None:
        """Add one finished stream to the metrics (once per stream, not per chunk)."""
        metrics = self._stream_metrics
        if first_chunk_at is not None:
            metrics.time_to_first_chunk.observe(first_chunk_at - started)
        metrics.relayed_chunks.inc(events)
        if completed:
            metrics.added_latency.observe(time.perf_counter() - started - waited)
        if usage is not None:
            metrics.input_tokens.inc(usage.input_tokens)
            metrics.output_tokens.inc(usage.output_tokens)

    async def _fail(self, context: Context, error: HealthAgentError, started: float) -> NoReturn:
        call = current_call()
        rpc = call[1] if call is not None else ""
        self._metrics.upstream_errors.labels(rpc, error.reason).inc()
        await _fail(context, error, started)

    def _admit(self, principal: Principal, user: str) -> Awaitable[None]:
        """The caller may act for `user` (raises at once if not); await the result to take
        one of the user's requests (a plain function: a coroutine layer fewer per call)."""
        principal.check_user(user)
        return self._limiter.admit(user)

    async def _unary(
        self,
        context: Context,
        rpc: str,
        request: object,
        work: Callable[[Principal], Awaitable[Response]],
    ) -> Response:
        """Run a unary handler's work with a request id, the caller's identity, logging and
        error mapping (`request` is checked to have decoded)."""
        started, metadata, request_id = _begin(context, rpc)
        # A unary call's headers and trailers reach the caller together, and trailers ride in
        # the same gRPC batch as the answer; headers sent first cost their own batch and
        # write, about a fifth of a MintSession's server time (docs/benchmarks.md).
        context.set_trailing_metadata(request_id)
        try:
            # with authentication off, anonymous without awaiting a coroutine for it
            auth = self._auth
            principal = await auth.authenticate(metadata) if auth.enabled else ANONYMOUS
            if type(request) is Undecodable:
                raise request.error
            response = await work(principal)
        except HealthAgentError as error:
            await self._fail(context, error, started)
        except Exception as exc:
            await self._fail(context, _internal(exc), started)
        if self._info:
            self._log.info("rpc finished", duration_ms=_ms_since(started))
        return response

    # -- MintSession -----------------------------------------------------------------------

    async def MintSession(  # noqa: N802 - the name is the RPC's
        self, request: pb.MintSessionRequest, context: Context
    ) -> pb.MintSessionResponse:
        async def work(principal: Principal) -> pb.MintSessionResponse:
            # no coroutine for a step that does not wait (no rate to take, a pooled session):
            # a call is mostly Python, and each layer costs its instructions and its cache
            # misses (docs/benchmarks.md)
            mint = validation.mint_request(request)
            principal.check_user(mint.user)
            if self._limiter.limits_rate:
                await self._limiter.admit(mint.user)
            options = self._session_options(mint)
            session = self._chatkit.pool.pooled(options) if options is not None else None
            if session is None:
                session = await self._mint(mint, options)
            return self._minted(mint, session, principal)

        return await self._unary(context, "MintSession", request, work)

    def _minted(
        self, mint: validation.MintRequest, session: MintedSession, principal: Principal
    ) -> pb.MintSessionResponse:
        expires_at = session.expires_at_seconds + session.expires_at_nanos * 1e-9
        ttl = max(0, int(expires_at - time.time()))
        if self._info:
            self._log.info(
                "session handed out",
                session_id=session.id,
                user=mint.user,
                device_id=mint.device_id,
                ttl_seconds=ttl,
                principal=principal.name,
            )
        response = pb.MintSessionResponse(
            client_secret=session.client_secret,
            workflow_id=session.workflow_id,
            user=mint.user,
            kind=mint.kind,  # type: ignore[arg-type]
        )
        # filled in place: nested messages passed to a constructor are copied
        answer_session = response.session
        answer_session.id = session.id
        answer_session.ttl_seconds = ttl
        answer_expiry = answer_session.expires_at
        answer_expiry.seconds = session.expires_at_seconds
        answer_expiry.nanos = session.expires_at_nanos
        return response

    def _session_options(self, mint: validation.MintRequest) -> SessionOptions | None:
        """The pool key of a ChatKit session; None for a Realtime secret, which is not pooled."""
        if mint.kind == pb.SESSION_KIND_REALTIME:
            return None
        return self._chatkit.session_options(
            mint.user,
            version=mint.version,
            state_variables=mint.state_variables,
            ttl_seconds=mint.ttl_seconds,
        )

    def _mint(
        self, mint: validation.MintRequest, options: SessionOptions | None
    ) -> Awaitable[MintedSession]:
        if options is None:
            return self._mint_realtime(mint)
        return self._chatkit.pool.get(options)  # recorded by the pool's on_minted hook

    async def _mint_realtime(self, mint: validation.MintRequest) -> MintedSession:
        # Each caller gets its own ephemeral secret; they are not pooled or shared.
        session = await self._realtime.mint(mint.ttl_seconds)
        await self._store.record_session(session.id, mint.user, "realtime", session.expires_at)
        return session

    # -- Chat ------------------------------------------------------------------------------

    async def Chat(  # noqa: N802 - the name is the RPC's
        self, request: pb.ChatRequest | Undecodable, context: Context
    ) -> None:
        started, metadata, request_id = _begin(context, "Chat")
        # in the headers, so the caller has it before the first event
        try:
            await context.send_initial_metadata(request_id)
        except Exception:  # the call is over already: the caller left as it began
            return
        clock = time.perf_counter
        waited = 0.0  # time spent waiting on the upstream
        first_chunk_at: float | None = None
        usage: Usage | None = None
        completed = False
        self._metrics.active_streams.inc()
        handler = asyncio.current_task()
        if handler is not None:
            self._active_chats.add(handler)
        events = 0
        ended = False  # stays False when the caller leaves (cancel, deadline, disconnect)
        # a caller that takes no message in time: the watchdog cancels this handler
        stall = Deadline(handler.cancel if handler is not None else lambda: None)
        try:
            auth = self._auth
            principal = await auth.authenticate(metadata) if auth.enabled else ANONYMOUS
            if isinstance(request, Undecodable):
                raise request.error
            turn = validation.chat_request(request, self._max_message_bytes)
            await self._admit(principal, turn.user)
            if self._info:
                self._log.info(
                    "chat started",
                    user=turn.user,
                    device_id=turn.device_id,
                    conversation_id=turn.conversation_id,
                    tool_output=turn.tool_output is not None,
                    principal=principal.name,
                )
            async with self._limiter.stream(turn.user):
                # however this handler ends, the upstream turn is closed at once, and fully,
                # and then written down
                recording = self._recorder.start(turn)
                add_chunk = recording.add_chunk
                write = context.write
                stall_limit = self._client_stall_seconds
                loop_time = asyncio.get_running_loop().time
                self._watchdog.watch(stall)
                cut_reason = functools.partial(self._cut_reason, context, stall)
                async with _relayed(
                    self._chat.chat(turn), recording, cut_reason
                ) as upstream_events:
                    next_event = upstream_events.__anext__
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
                                usage = event.usage
                            await recording.observe(event)  # before the caller sees it
                        try:
                            response = to_chat_response(event)
                        except UnicodeEncodeError:  # a lone surrogate escape in its JSON
                            error = _upstream_not_unicode()
                            await recording.upstream_failed(error)
                            raise error from None
                        # gRPC flow control makes a write wait while the caller reads slowly
                        # (so upstream reading waits too, and nothing piles up); a caller that
                        # takes no message for `stall_limit` seconds is cut off.
                        stall.at = loop_time() + stall_limit
                        await write(response)  # fails only once the call is over
                        stall.at = NOT_ARMED
                        events += 1
            ended = completed = True
        except asyncio.CancelledError:
            if stall.expired and handler is not None:
                handler.uncancel()  # cancelled by the watchdog, not by gRPC: the caller is there
                ended = True
                await self._fail(context, _client_too_slow(self._client_stall_seconds), started)
            if not self._shutting_down:
                raise  # the caller left; there is no one to tell
            ended = True
            await self._fail(context, _shutting_down(), started)
        except HealthAgentError as error:
            ended = True
            await self._fail(context, error, started)
        except Exception as exc:
            if stall.at != NOT_ARMED:
                # A write failed: the caller left (cancel, deadline, disconnect) while it was
                # in flight, which gRPC may report before it cancels this handler. There is
                # no one to tell.
                stall.at = NOT_ARMED
            elif not context.cancelled():
                ended = True
                await self._fail(context, _internal(exc), started)
            # else a write failed because the caller left: there is no one to tell
        finally:
            self._watchdog.forget(stall)
            self._metrics.active_streams.dec()
            self._record_stream(
                events,
                started=started,
                waited=waited,
                first_chunk_at=first_chunk_at,
                usage=usage,
                completed=completed,
            )
            if handler is not None:
                self._active_chats.discard(handler)
            if not ended and self._info:
                self._log.info("chat cancelled", events=events, duration_ms=_ms_since(started))
        if self._info:
            self._log.info("chat finished", events=events, duration_ms=_ms_since(started))

    # -- history ---------------------------------------------------------------------------

    async def ListConversations(  # noqa: N802 - the name is the RPC's
        self, request: pb.ListConversationsRequest, context: Context
    ) -> pb.ListConversationsResponse:
        async def work(principal: Principal) -> pb.ListConversationsResponse:
            user = validation.user_only(request.user)
            await self._admit(principal, user)
            page = await self._store.list_conversations(user, request.page_size, request.page_token)
            return pb.ListConversationsResponse(
                conversations=[to_conversation(c) for c in page.conversations],
                next_page_token=page.next_page_token,
            )

        return await self._unary(context, "ListConversations", request, work)

    async def _owned(self, principal: Principal, user: str, conversation_id: str) -> Any:
        user, conversation_id = validation.user_and_conversation(user, conversation_id)
        await self._admit(principal, user)
        conversation = await self._store.get_conversation(user, conversation_id)
        if conversation is None:
            raise conversation_not_found(conversation_id)
        return conversation

    async def GetConversation(  # noqa: N802 - the name is the RPC's
        self, request: pb.GetConversationRequest, context: Context
    ) -> pb.GetConversationResponse:
        async def work(principal: Principal) -> pb.GetConversationResponse:
            conversation = await self._owned(principal, request.user, request.conversation_id)
            return pb.GetConversationResponse(conversation=to_conversation(conversation))

        return await self._unary(context, "GetConversation", request, work)

    async def DeleteConversation(  # noqa: N802 - the name is the RPC's
        self, request: pb.DeleteConversationRequest, context: Context
    ) -> pb.DeleteConversationResponse:
        async def work(principal: Principal) -> pb.DeleteConversationResponse:
            user, conversation_id = validation.user_and_conversation(
                request.user, request.conversation_id
            )
            await self._admit(principal, user)
            if not await self._store.delete_conversation(user, conversation_id):
                raise conversation_not_found(conversation_id)
            return pb.DeleteConversationResponse()

        return await self._unary(context, "DeleteConversation", request, work)

    async def ExportConversation(  # noqa: N802 - the name is the RPC's
        self, request: pb.ExportConversationRequest, context: Context
    ) -> pb.ExportConversationResponse:
        async def work(principal: Principal) -> pb.ExportConversationResponse:
            markdown = validation.export_format(request.format) == pb.EXPORT_FORMAT_MARKDOWN
            conversation = await self._owned(principal, request.user, request.conversation_id)
            if markdown:
                return pb.ExportConversationResponse(
                    content_type="text/markdown; charset=utf-8",
                    filename=f"{conversation.id}.md",
                    content=export.to_markdown(conversation),
                )
            return pb.ExportConversationResponse(
                content_type="application/json",
                filename=f"{conversation.id}.json",
                content=export.to_json(conversation),
            )

        return await self._unary(context, "ExportConversation", request, work)

    async def RevokeSessions(  # noqa: N802 - the name is the RPC's
        self, request: pb.RevokeSessionsRequest, context: Context
    ) -> pb.RevokeSessionsResponse:
        async def work(principal: Principal) -> pb.RevokeSessionsResponse:
            user = validation.user_only(request.user)
            await self._admit(principal, user)
            revoked, closed = await self._revoker.revoke(user)
            return pb.RevokeSessionsResponse(revoked_sessions=revoked, closed_sockets=closed)

        return await self._unary(context, "RevokeSessions", request, work)

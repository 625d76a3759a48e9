"""The HealthAgent RPC handlers. Each begins the call (its request id), authenticates the
caller, validates the request, admits it under the caller's limits, delegates (a Chat turn to
`relay`, the rest to the upstreams and the store) and maps every failure to a status."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, NoReturn, TypeVar

import grpc
import structlog

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.api import validation
from healthagent_service.api.converter import to_conversation
from healthagent_service.api.decoding import Undecodable
from healthagent_service.api.relay import ChatRelay, RelayedStream, shutting_down
from healthagent_service.api.status import status_code, to_status
from healthagent_service.domain.events import ChatTurn, ChatUpstream, MintedSession, SessionOptions
from healthagent_service.errors import ErrorKind, HealthAgentError, conversation_not_found
from healthagent_service.history import export
from healthagent_service.history.recorder import TurnRecorder
from healthagent_service.history.store import ConversationStore
from healthagent_service.ids import UniqueIds
from healthagent_service.logging import bind_call
from healthagent_service.metrics import Metrics
from healthagent_service.revocation import SessionRevoker
from healthagent_service.security.auth import ANONYMOUS, Authenticator, Principal
from healthagent_service.security.limits import Limiter
from healthagent_service.upstream.chatkit import ChatKitUpstream
from healthagent_service.upstream.realtime import RealtimeUpstream

log = structlog.get_logger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Iterable[tuple[str, Any]]  # the core's tuple, so it can be iterated twice
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # fullmatch: `$` allows a final newline


# new request ids: 32 hex digits, like a UUID's, without a random draw per call
_new_request_id = UniqueIds()


class _Call(NamedTuple):
    """The call being handled, as `_begin` found it."""

    rpc: str
    started: float  # time.perf_counter() when the handler began
    # the caller's metadata, read once: each read converts it from the gRPC core anew
    metadata: Metadata
    # the request id as metadata, echoed to the caller (a stream's headers, a unary call's trailers)
    request_id_metadata: tuple[tuple[str, str]]


def _request_id(metadata: Metadata) -> str:
    """The caller's x-request-id if it is sane, else a new one."""
    for key, value in metadata:
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return _new_request_id()


def _begin(context: Context, rpc: str) -> _Call:
    """Start a call: its request id goes on every log line of the call."""
    metadata = context.invocation_metadata() or ()
    request_id = _request_id(metadata)
    bind_call(request_id, rpc)
    return _Call(rpc, time.perf_counter(), metadata, ((REQUEST_ID_KEY, request_id),))


def _decoded(request: Request | Undecodable) -> Request:
    """`request`, unless it did not decode: then its error (INVALID_ARGUMENT) is raised."""
    if isinstance(request, Undecodable):
        raise request.error
    return request


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 2)


def _internal(exc: Exception) -> HealthAgentError:
    log.exception("unexpected error", exc_type=type(exc).__name__)
    return HealthAgentError(
        ErrorKind.INTERNAL, "INTERNAL", "internal error; the request id identifies it in the logs"
    )


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
        self._chatkit = chatkit
        self._realtime = realtime
        self._store = store
        self._revoker = revoker
        self._auth = authenticator
        self._limiter = limiter
        self._max_message_bytes = max_message_bytes
        self._metrics = metrics or Metrics()
        self._active_chats: set[asyncio.Task[Any]] = set()  # Chat handlers running now
        workflow = chatkit.workflow_id if upstream_name == "chatkit" else realtime.model
        self._relay = ChatRelay(
            upstream=chat,  # what Chat talks to: ChatKit or Realtime
            recorder=recorder,
            metrics=self._metrics,
            stream_metrics=self._metrics.for_streams(upstream_name, workflow),
            client_stall_seconds=client_stall_seconds,
            shutting_down=lambda: self._shutting_down,
            handlers=self._active_chats,
        )
        self._shutting_down = False
        # The module's logger, resolved once: each call through structlog's lazy proxy binds
        # anew, which costs a line that the level filters out four times what the line costs.
        self._log = log.bind()
        # lines at info are skipped before their fields are computed when the level is higher
        self._info = bool(self._log.is_enabled_for(logging.INFO))

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

    def _admit(self, principal: Principal, user: str) -> Awaitable[None]:
        """The caller may act for `user` (raises at once if not); await the result to take
        one of the user's requests (a plain function: a coroutine layer fewer per call)."""
        principal.check_user(user)
        return self._limiter.admit(user)

    async def _abort(self, context: Context, call: _Call, error: HealthAgentError) -> NoReturn:
        """End the call with `error`'s status (the request id in its trailers); log, count."""
        self._metrics.upstream_errors.labels(call.rpc, error.reason).inc()
        log.info(
            "rpc failed",
            code=status_code(error).name,
            reason=error.reason,
            error=error.message,
            duration_ms=_ms_since(call.started),
        )
        await context.abort_with_status(
            to_status(error, trailing_metadata=call.request_id_metadata)
        )
        raise AssertionError("abort_with_status returned")  # it always raises

    async def _unary(
        self,
        context: Context,
        rpc: str,
        request: object,
        work: Callable[[Principal], Awaitable[Response]],
    ) -> Response:
        """Run a unary handler's work with a request id, the caller's identity, logging and
        error mapping (`request` is checked to have decoded)."""
        call = _begin(context, rpc)
        # A unary call's headers and trailers reach the caller together, and trailers ride in
        # the same gRPC batch as the answer; headers sent first cost a batch and a write
        # of their own (docs/decisions/0009-per-call-python.md).
        context.set_trailing_metadata(call.request_id_metadata)
        auth = self._auth
        try:
            # with authentication off, anonymous without awaiting a coroutine for it
            principal = await auth.authenticate(call.metadata) if auth.enabled else ANONYMOUS
            _decoded(request)  # raises for a request that did not decode
            response = await work(principal)
        except HealthAgentError as error:
            await self._abort(context, call, error)
        except Exception as exc:
            await self._abort(context, call, _internal(exc))
        if self._info:
            self._log.info("rpc finished", duration_ms=_ms_since(call.started))
        return response

    # -- MintSession -----------------------------------------------------------------------

    async def MintSession(  # noqa: N802 - the name is the RPC's
        self, request: pb.MintSessionRequest, context: Context
    ) -> pb.MintSessionResponse:
        async def work(principal: Principal) -> pb.MintSessionResponse:
            # no coroutine for a step that does not wait (no rate to take, a pooled session):
            # a call is mostly Python, and each layer costs its instructions and its cache
            # misses (docs/decisions/0009-per-call-python.md)
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
        call = _begin(context, "Chat")
        try:  # in the headers, so the caller has the request id before the first event
            await context.send_initial_metadata(call.request_id_metadata)
        except Exception:  # the call is over already: the caller left as it began
            return
        auth = self._auth
        with self._relay.stream(context, call.started) as stream:
            try:
                principal = await auth.authenticate(call.metadata) if auth.enabled else ANONYMOUS
                turn = validation.chat_request(_decoded(request), self._max_message_bytes)
                await self._admit(principal, turn.user)
                if self._info:
                    self._log_chat_started(turn, principal)
                async with self._limiter.stream(turn.user):
                    await stream.relay(turn)
                stream.turn_completed()
            except asyncio.CancelledError:
                error = stream.stall_error() or (shutting_down() if self._shutting_down else None)
                if error is None:
                    self._log_chat_cancelled(call, stream)
                    raise  # the caller left; there is no one to tell
                await self._abort(context, call, error)
            except HealthAgentError as error:
                await self._abort(context, call, error)
            except Exception as exc:
                if not (stream.write_failed() or context.cancelled()):
                    await self._abort(context, call, _internal(exc))
                self._log_chat_cancelled(call, stream)  # the caller left: no one to tell
        if self._info:
            self._log.info(
                "chat finished", events=stream.events, duration_ms=_ms_since(call.started)
            )

    def _log_chat_started(self, turn: ChatTurn, principal: Principal) -> None:
        self._log.info(
            "chat started",
            user=turn.user,
            device_id=turn.device_id,
            conversation_id=turn.conversation_id,
            tool_output=turn.tool_output is not None,
            principal=principal.name,
        )

    def _log_chat_cancelled(self, call: _Call, stream: RelayedStream) -> None:
        if self._info:
            self._log.info(
                "chat cancelled", events=stream.events, duration_ms=_ms_since(call.started)
            )

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

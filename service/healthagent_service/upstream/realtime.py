"""The Realtime API over WebSocket as a `ChatUpstream`: the turn loop, over its parts.

- Secrets (`realtime_secrets`): sockets authenticate with an ephemeral secret from a pool, so a
  reconnect after 80% of a secret's life uses a fresh one; the API key itself only mints.
- Sockets (`realtime_socket`) and the warm pool (`realtime_warm_pool`): configured sockets
  kept ready for new conversations; a socket that carried a conversation is never handed to
  anyone else.
- Conversations (`realtime_conversations`): a conversation keeps its socket between turns until
  an idle timeout. When the socket is gone (session expiry at 60 minutes, a drop, the idle
  timeout), the next turn opens another one and replays the conversation so far into it.
- Here: a turn that dies mid-answer ends UNAVAILABLE; one that dies before anything reached the
  caller is retried once on a new socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from websockets.exceptions import ConnectionClosed

from healthagent_service.domain.events import (
    ChatEvent,
    ChatTurn,
    MintedSession,
    SessionStarted,
)
from healthagent_service.domain.session_pool import SessionPool
from healthagent_service.errors import ErrorKind, FieldViolation, HealthAgentError
from healthagent_service.upstream import realtime_events as rt
from healthagent_service.upstream.realtime_config import RealtimeConfig, RealtimeStats
from healthagent_service.upstream.realtime_conversations import (
    Conversations,
    RealtimeConversation,
    TranscriptLoader,
)
from healthagent_service.upstream.realtime_secrets import RealtimeSecrets
from healthagent_service.upstream.realtime_socket import RealtimeSocket, SocketOpener
from healthagent_service.upstream.realtime_warm_pool import WarmPool

log = structlog.get_logger(__name__)


class RealtimeUpstream:
    """Mints Realtime secrets and holds conversations over WebSocket."""

    def __init__(
        self,
        config: RealtimeConfig,
        http: httpx.AsyncClient,
        transcripts: TranscriptLoader | None = None,
    ) -> None:
        self._config = config
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = RealtimeStats()
        self._secrets = RealtimeSecrets(config, http)
        self._sockets = SocketOpener(config, self._secrets, self.stats)
        self._warm = WarmPool(config, self._sockets.open, self.stats, self._spawn)
        self._conversations = Conversations(
            max_conversations=config.max_conversations,
            idle_seconds=config.conversation_idle_seconds,
            transcripts=transcripts,
            spawn=self._spawn,
        )
        self._reaper: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return self._config.model

    @property
    def secrets(self) -> SessionPool:
        """The pool of ephemeral secrets sockets open with (for metrics)."""
        return self._secrets.pool

    async def mint(self, ttl_seconds: int | None = None) -> MintedSession:
        """Mint an ephemeral `ek_` secret (`POST /realtime/client_secrets`)."""
        return await self._secrets.mint(ttl_seconds)

    def start(self) -> None:
        """Start filling the warm pool and reaping idle sockets (call from a running loop)."""
        self._warm.fill()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        """Close every socket and stop background work."""
        for task in (self._reaper, *self._background):
            if task is not None:
                task.cancel()
        sockets = [*self._warm.stop(), *self._conversations.sockets()]
        await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
        await self._secrets.close()

    # -- sockets ---------------------------------------------------------------------------

    async def open_socket(self) -> RealtimeSocket:
        """A new configured socket, retrying transient failures with backoff and full jitter."""
        return await self._sockets.open()

    async def take_warm_socket(self) -> RealtimeSocket | None:
        """A live, unused socket from the warm pool, if there is one."""
        return await self._warm.take()

    @property
    def warm_sockets(self) -> int:
        """How many sockets wait in the warm pool."""
        return self._warm.size

    def warm_snapshot(self) -> list[RealtimeSocket]:
        """The sockets in the warm pool now (for tests and diagnostics)."""
        return self._warm.snapshot()

    def conversation_socket(self, conversation_id: str) -> RealtimeSocket | None:
        """The socket a conversation holds now (for tests and diagnostics)."""
        return self._conversations.socket_of(conversation_id)

    def close_user(self, user: str) -> int:
        """Close the sockets of `user`'s conversations (logout); return how many."""
        return self._conversations.close_user(user)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap_forever(self) -> None:
        interval = max(
            0.05,
            min(self._config.conversation_idle_seconds, self._config.warm_socket_max_idle_seconds)
            / 4,
        )
        while True:
            await asyncio.sleep(interval)
            self.reap_idle()

    def reap_idle(self) -> None:
        """Close conversation sockets idle too long, and warm sockets too old or idle."""
        now = time.monotonic()
        self._conversations.reap(now)
        self._warm.reap(now)

    # -- the turn loop ---------------------------------------------------------------------

    async def _socket_for(self, conversation: RealtimeConversation) -> RealtimeSocket:
        """The conversation's socket if alive; else a warm or new one with the past replayed."""
        socket = conversation.socket
        if socket is not None and await socket.is_alive(self._config.socket_max_age_seconds):
            return socket
        if socket is not None:
            conversation.socket = None
            self._spawn(socket.close())
            self.stats.reconnects += 1
        socket = await self._warm.take() or await self._sockets.open()
        try:
            for item in conversation.transcript:
                await socket.send(rt.item_create(item))
        except ConnectionClosed:
            self._spawn(socket.close())
            raise rt.closed_error(
                socket.close_code(),
                None,
                mid_turn=False,
                api_key_setting=self._config.api_key_setting,
            ) from None
        self.stats.replayed_items += len(conversation.transcript)
        conversation.socket = socket
        return socket

    async def chat(self, turn: ChatTurn) -> AsyncGenerator[ChatEvent, None]:
        """Stream one turn. Ends with `ResponseDone`, or raises `HealthAgentError`."""
        conversation = await self._conversations.for_turn(turn)
        async with conversation.lock:
            await self._conversations.catch_up(conversation)
            new_items = _new_items(turn, conversation)
            conversation.last_used = time.monotonic()
            for attempt in (1, 2):
                if conversation.revoked:
                    raise _session_revoked()
                result = _TurnResult()
                try:
                    socket = await self._socket_for(conversation)
                    async for event in self._run_turn(
                        conversation, socket, new_items, turn, result
                    ):
                        yield event
                    return
                except HealthAgentError:
                    # Logout closes the socket under the turn: what that looks like (a close
                    # mid-answer, UNAVAILABLE and retryable) is not what happened.
                    if conversation.revoked:
                        raise _session_revoked() from None
                    raise
                except _RetryableBeforeOutput as retry:
                    if conversation.revoked:
                        raise _session_revoked() from None  # logged out: no reconnect
                    if attempt == 2:
                        raise retry.error from None
                    log.info(
                        "realtime socket lost before the answer began, reconnecting",
                        reason=retry.error.reason,
                    )

    async def _run_turn(
        self,
        conversation: RealtimeConversation,
        socket: RealtimeSocket,
        new_items: list[dict[str, Any]],
        turn: ChatTurn,
        result: _TurnResult,
    ) -> AsyncIterator[ChatEvent]:
        translator = rt.RealtimeTurn(default_retry_seconds=self._config.retry_after_seconds)
        started = SessionStarted(socket.session_id, conversation.id, turn.user, self._config.model)
        completed = False
        try:
            for item in new_items:
                await socket.send(rt.item_create(item))
            await socket.send({"type": "response.create"})
            while not translator.done:
                raw = await socket.receive()
                try:
                    event = translator.translate(raw)
                except (KeyError, TypeError, AttributeError, ValueError) as exc:
                    raise rt.protocol_error(
                        f"{raw.get('type')} event lacks {exc}", self._config.retry_after_seconds
                    ) from None
                if event is None:
                    continue
                if not result.yielded:
                    result.yielded = True
                    yield started
                yield event
            completed = True
        except ConnectionClosed:
            error = rt.closed_error(
                socket.close_code(),
                translator.last_error,
                mid_turn=translator.response_events > 0,
                api_key_setting=self._config.api_key_setting,
            )
            if not result.yielded and error.kind is ErrorKind.UNAVAILABLE:
                raise _RetryableBeforeOutput(error) from None
            raise error from None
        finally:
            if not completed:
                # Cancelled, failed or cut: close the upstream socket now (the caller may have
                # left). The transcript keeps only whole turns, so the next turn replays the
                # conversation into a fresh socket and both sides agree on what was said.
                conversation.socket = None
                self._spawn(socket.close())
        conversation.transcript.extend(new_items)
        for item in translator.output_items:
            replay = rt.replayable(item)
            if replay is not None:
                conversation.transcript.append(replay)
        conversation.pending_call_ids = set(translator.call_ids)
        conversation.last_used = time.monotonic()


def _new_items(turn: ChatTurn, conversation: RealtimeConversation) -> list[dict[str, Any]]:
    """The items this turn adds; a tool output must answer a pending call."""
    if turn.tool_output is None:
        return [rt.user_message(turn.message or "")]
    if turn.tool_output.call_id not in conversation.pending_call_ids:
        raise HealthAgentError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            "invalid request: tool_output.call_id: no pending tool call has this id",
            field_violations=(
                FieldViolation("tool_output.call_id", "no pending tool call has this id"),
            ),
        )
    return [rt.function_call_output(turn.tool_output.call_id, turn.tool_output.output_json)]


def _session_revoked() -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.ABORTED,
        "SESSION_REVOKED",
        "the user's sessions were revoked (logout) during this turn",
    )


@dataclass(slots=True)
class _TurnResult:
    yielded: bool = False


class _RetryableBeforeOutput(Exception):  # noqa: N818 - a signal, carried inside chat()
    def __init__(self, error: HealthAgentError) -> None:
        super().__init__(error.message)
        self.error = error

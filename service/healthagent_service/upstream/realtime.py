"""The Realtime API over WebSocket: ephemeral secrets, sockets, warm pool, conversations.

- Sockets authenticate with an ephemeral secret from a `SessionPool`, so a reconnect after 80%
  of a secret's life uses a fresh one; the API key itself only mints.
- A warm pool keeps sockets that are past `session.created` and configured (text output,
  instructions, tools) but carry no conversation; a socket that carried a conversation is never
  handed to anyone else.
- A conversation keeps its socket between turns until an idle timeout. When the socket is gone
  (session expiry at 60 minutes, a drop, the idle timeout), the next turn opens another one with
  exponential backoff and jitter and replays the conversation so far into it.
- A turn that dies mid-answer ends UNAVAILABLE; one that dies before anything reached the caller
  is retried once on a new socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from healthagent_service.errors import (
    ErrorKind,
    FieldViolation,
    HealthAgentError,
    conversation_not_found,
)
from healthagent_service.upstream import realtime_events as rt
from healthagent_service.upstream.events import (
    ChatEvent,
    ChatTurn,
    MintedSession,
    SessionOptions,
    SessionStarted,
)
from healthagent_service.upstream.http_clients import ShardedHttpClient
from healthagent_service.upstream.session_pool import SessionPool
from healthagent_service.upstream.upstream_json import decode_json

log = structlog.get_logger(__name__)

_LIVENESS_PING_AFTER_IDLE_SECONDS = 5.0
# (user, conversation id) -> (replayable items, pending call ids), or None if not recorded.
TranscriptLoader = Callable[[str, str], Awaitable[tuple[list[dict[str, Any]], set[str]] | None]]
_LIVENESS_PING_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    """Where and how to reach the Realtime API. `api_key` is None when not configured."""

    base_url: str
    websocket_url: str
    api_key: str | None
    model: str = "gpt-realtime"
    instructions: str = ""
    tools: tuple[dict[str, Any], ...] = ()
    secret_ttl_seconds: int = 600
    refresh_fraction: float = 0.8
    warm_sockets: int = 2
    warm_socket_max_idle_seconds: float = 300.0
    conversation_idle_seconds: float = 300.0
    max_conversations: int = 10_000
    socket_max_age_seconds: float = 55 * 60.0
    connect_attempts: int = 4
    backoff_base_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    open_timeout_seconds: float = 10.0
    retry_after_seconds: float = 1.0
    api_key_setting: str = "OPENAI_API_KEY"

    def __repr__(self) -> str:  # never show the key
        return f"RealtimeConfig(websocket_url={self.websocket_url!r}, model={self.model!r})"


class RealtimeSocket:
    """One configured upstream session."""

    def __init__(self, connection: ClientConnection, session_id: str) -> None:
        self.connection = connection
        self.session_id = session_id
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at

    def open_for(self, max_age: float) -> bool:
        """Open, and young enough to start a turn before the session's hard limit."""
        return self.connection.state is State.OPEN and time.monotonic() - self.opened_at < max_age

    async def is_alive(self, max_age: float) -> bool:
        """`open_for`, plus a ping answered in time when the socket sat idle for a while."""
        if not self.open_for(max_age):
            return False
        if time.monotonic() - self.last_used < _LIVENESS_PING_AFTER_IDLE_SECONDS:
            return True
        try:
            pong = await self.connection.ping()
            await asyncio.wait_for(pong, _LIVENESS_PING_TIMEOUT_SECONDS)
        except (ConnectionClosed, TimeoutError, RuntimeError):
            return False
        return True

    async def send(self, event: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(event, separators=(",", ":")))
        self.last_used = time.monotonic()

    async def receive(self) -> dict[str, Any]:
        message = await self.connection.recv()
        self.last_used = time.monotonic()
        try:
            event = decode_json(message)
        except ValueError:
            raise rt_protocol_error("an event is not JSON") from None
        if not isinstance(event, dict):
            raise rt_protocol_error("an event is not a JSON object")
        return event

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.connection.close()

    def close_code(self) -> int | None:
        received = self.connection.protocol.close_rcvd
        return received.code if received is not None else None


def rt_protocol_error(detail: str) -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR", f"malformed Realtime event: {detail}"
    )


@dataclass(eq=False)
class RealtimeConversation:
    """A conversation held by this service: its transcript, and its socket while it lasts."""

    id: str
    user: str
    transcript: list[dict[str, Any]] = field(default_factory=list)
    pending_call_ids: set[str] = field(default_factory=set)
    socket: RealtimeSocket | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    revoked: bool = False  # set by logout; a turn under way ends instead of reconnecting


@dataclass(slots=True)
class RealtimeStats:
    """Counters for metrics and tests."""

    sockets_opened: int = 0
    warm_hits: int = 0
    warm_misses: int = 0
    reconnects: int = 0
    replayed_items: int = 0
    connect_failures: int = 0


class RealtimeUpstream:
    """Mints Realtime secrets and holds conversations over WebSocket."""

    def __init__(
        self,
        config: RealtimeConfig,
        http: ShardedHttpClient,
        transcripts: TranscriptLoader | None = None,
    ) -> None:
        self._config = config
        self._http = http
        # Where conversations this process does not hold come from (the history store), so
        # any replica can continue any conversation by replaying it.
        self._transcripts = transcripts
        self.secrets = SessionPool(
            self._mint_for_pool, max_size=4, refresh_fraction=config.refresh_fraction
        )
        self._warm: deque[RealtimeSocket] = deque()
        self._warm_filling: asyncio.Task[None] | None = None
        self._conversations: OrderedDict[str, RealtimeConversation] = OrderedDict()
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = RealtimeStats()

    @property
    def model(self) -> str:
        return self._config.model

    def start(self) -> None:
        """Start filling the warm pool and reaping idle sockets (call from a running loop)."""
        self._fill_warm_pool()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        """Close every socket and stop background work."""
        for task in (self._reaper, self._warm_filling, *self._background):
            if task is not None:
                task.cancel()
        sockets = [*self._warm, *(c.socket for c in self._conversations.values() if c.socket)]
        self._warm.clear()
        await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
        await self.secrets.close()

    # -- secrets ---------------------------------------------------------------------------

    def _require_key(self) -> str:
        if not self._config.api_key:
            raise HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_MISSING",
                f"{self._config.api_key_setting} is not set; the service cannot reach the "
                "Realtime API",
            )
        return self._config.api_key

    async def mint(self, ttl_seconds: int | None = None) -> MintedSession:
        """Mint an ephemeral `ek_` secret (`POST /realtime/client_secrets`)."""
        key = self._require_key()
        body: dict[str, Any] = {
            "expires_after": {
                "anchor": "created_at",
                "seconds": ttl_seconds or self._config.secret_ttl_seconds,
            },
            "session": {
                "type": "realtime",
                "model": self._config.model,
                "instructions": self._config.instructions,
                "output_modalities": ["text"],
            },
        }
        if self._config.tools:
            body["session"]["tools"] = list(self._config.tools)
        try:
            response = await self._http.first.post(
                f"{self._config.base_url}/realtime/client_secrets",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
        except httpx.HTTPError as exc:
            raise HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_UNAVAILABLE",
                f"cannot reach the upstream ({type(exc).__name__})",
                retry_after_seconds=self._config.retry_after_seconds,
            ) from None
        if response.status_code != 200:
            raise self._mint_error(response)
        try:
            answer = response.json()
            expires_at = int(answer["expires_at"])
            secret = str(answer["value"])
            session_id = str((answer.get("session") or {}).get("id") or "")
        except (ValueError, TypeError, KeyError) as exc:
            raise rt_protocol_error(f"client secret answer lacks {exc}") from None
        remaining = expires_at - time.time()
        if remaining <= 0:
            raise rt_protocol_error("the upstream minted a secret that has already expired")
        return MintedSession(
            id=session_id,
            client_secret=secret,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
            workflow_id=self._config.model,
            user="",
            minted_at_monotonic=time.monotonic(),
            lifetime_seconds=remaining,
        )

    async def _mint_for_pool(self, options: SessionOptions) -> MintedSession:
        return await self.mint(options.ttl_seconds)

    def _mint_error(self, response: httpx.Response) -> HealthAgentError:
        try:
            error = response.json()["error"]
            message, param = str(error.get("message")), error.get("param")
        except (ValueError, TypeError, KeyError, AttributeError):
            message, param = response.text[:200], None
        metadata = {"upstream_status": str(response.status_code)}
        if response.status_code in (401, 403):
            return HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_REJECTED",
                f"the upstream rejected {self._config.api_key_setting}; check that setting",
                metadata=metadata,
            )
        if response.status_code == 429:
            return HealthAgentError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "UPSTREAM_RATE_LIMITED",
                f"the upstream is rate limiting requests: {message}",
                retry_after_seconds=self._config.retry_after_seconds,
                metadata=metadata,
            )
        if response.status_code >= 500:
            return HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_ERROR",
                f"the upstream failed with HTTP {response.status_code}: {message}",
                retry_after_seconds=self._config.retry_after_seconds,
                metadata=metadata,
            )
        if param == "expires_after.seconds":
            return HealthAgentError(
                ErrorKind.INVALID_ARGUMENT,
                "UPSTREAM_REJECTED_REQUEST",
                f"the upstream rejected the request: {message}",
                field_violations=(FieldViolation("ttl_seconds", message),),
                metadata=metadata,
            )
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_REJECTED_REQUEST",
            f"the upstream answered HTTP {response.status_code}: {message}",
            metadata=metadata,
        )

    # -- sockets ---------------------------------------------------------------------------

    async def _open_once(self) -> RealtimeSocket:
        secret = await self.secrets.get(
            SessionOptions(
                user="", workflow_id=self._config.model, ttl_seconds=self._config.secret_ttl_seconds
            )
        )
        url = f"{self._config.websocket_url}?{urlencode({'model': self._config.model})}"
        try:
            connection = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {secret.client_secret}"},
                open_timeout=self._config.open_timeout_seconds,
                max_size=16 * 1024 * 1024,
                compression=None,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
                proxy=None,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                self.secrets.evict(
                    SessionOptions(
                        user="",
                        workflow_id=self._config.model,
                        ttl_seconds=self._config.secret_ttl_seconds,
                    ),
                    secret.id,
                )
                raise rt.closed_error(
                    rt.CLOSE_AUTH_FAILED,
                    None,
                    mid_turn=False,
                    api_key_setting=self._config.api_key_setting,
                ) from None
            raise HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_ERROR",
                f"the Realtime handshake failed with HTTP {exc.response.status_code}",
                retry_after_seconds=self._config.retry_after_seconds,
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_UNAVAILABLE",
                f"cannot reach the Realtime API ({type(exc).__name__})",
                retry_after_seconds=self._config.retry_after_seconds,
            ) from None
        try:
            return await self._configure(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise

    async def _configure(self, connection: ClientConnection) -> RealtimeSocket:
        socket = RealtimeSocket(connection, "")
        last_error: dict[str, Any] | None = None
        try:
            created = await socket.receive()
            while created.get("type") == "error":
                last_error = created
                created = await socket.receive()
            if created.get("type") != "session.created":
                raise rt_protocol_error(f"first event was {created.get('type')!r}")
            socket.session_id = str((created.get("session") or {}).get("id") or "")
            await socket.send(
                rt.session_update(self._config.instructions, list(self._config.tools))
            )
            while True:
                event = await socket.receive()
                if event.get("type") == "session.updated":
                    break
                if event.get("type") == "error":
                    last_error = event
        except ConnectionClosed:
            raise rt.closed_error(
                socket.close_code(),
                last_error,
                mid_turn=False,
                api_key_setting=self._config.api_key_setting,
            ) from None
        self.stats.sockets_opened += 1
        return socket

    async def open_socket(self) -> RealtimeSocket:
        """A new configured socket, retrying transient failures with backoff and full jitter."""
        attempts = self._config.connect_attempts
        for attempt in range(attempts):
            try:
                return await self._open_once()
            except HealthAgentError as error:
                self.stats.connect_failures += 1
                if error.kind is not ErrorKind.UNAVAILABLE or attempt == attempts - 1:
                    raise
                ceiling = min(
                    self._config.backoff_max_seconds, self._config.backoff_base_seconds * 2**attempt
                )
                delay = random.uniform(0, ceiling)
                log.info(
                    "realtime connect failed, retrying",
                    attempt=attempt + 1,
                    reason=error.reason,
                    delay_seconds=round(delay, 3),
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _fill_warm_pool(self) -> None:
        if self._config.warm_sockets <= 0:
            return
        if self._warm_filling is None or self._warm_filling.done():
            self._warm_filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while len(self._warm) < self._config.warm_sockets:
            try:
                self._warm.append(await self.open_socket())
            except HealthAgentError as error:
                log.warning("warm pool could not open a socket", reason=error.reason)
                await asyncio.sleep(self._config.backoff_max_seconds)

    async def take_warm_socket(self) -> RealtimeSocket | None:
        """A live, unused socket from the warm pool, if there is one."""
        try:
            while self._warm:
                socket = self._warm.popleft()
                if await socket.is_alive(self._config.socket_max_age_seconds):
                    self.stats.warm_hits += 1
                    return socket
                self._spawn(socket.close())
            self.stats.warm_misses += 1
            return None
        finally:
            self._fill_warm_pool()

    @property
    def warm_sockets(self) -> int:
        """How many sockets wait in the warm pool."""
        return len(self._warm)

    def warm_snapshot(self) -> list[RealtimeSocket]:
        """The sockets in the warm pool now (for tests and diagnostics)."""
        return list(self._warm)

    def _spawn(self, work: Any) -> None:
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
        for conversation in self._conversations.values():
            socket = conversation.socket
            if (
                socket is not None
                and not conversation.lock.locked()
                and now - socket.last_used > self._config.conversation_idle_seconds
            ):
                conversation.socket = None
                self._spawn(socket.close())
        fresh: deque[RealtimeSocket] = deque()
        for socket in self._warm:
            if (
                socket.open_for(self._config.socket_max_age_seconds)
                and now - socket.opened_at < self._config.warm_socket_max_idle_seconds
            ):
                fresh.append(socket)
            else:
                self._spawn(socket.close())
        if len(fresh) != len(self._warm):
            self._warm = fresh
            self._fill_warm_pool()

    # -- conversations ---------------------------------------------------------------------

    async def _conversation(self, turn: ChatTurn) -> RealtimeConversation:
        if turn.conversation_id is None:
            conversation = RealtimeConversation(
                id=f"rtconv_{secrets.token_hex(12)}", user=turn.user
            )
            self._conversations[conversation.id] = conversation
            self._evict_idle_conversations()
            return conversation
        known = self._conversations.get(turn.conversation_id)
        if known is None and self._transcripts is not None:
            loaded = await self._transcripts(turn.user, turn.conversation_id)
            if loaded is not None:
                known = RealtimeConversation(
                    id=turn.conversation_id,
                    user=turn.user,
                    transcript=loaded[0],
                    pending_call_ids=loaded[1],
                )
                self._conversations[known.id] = known
        if known is None or known.user != turn.user:
            raise conversation_not_found(turn.conversation_id)
        self._conversations.move_to_end(known.id)
        return known

    def _evict_idle_conversations(self) -> None:
        """Keep at most `max_conversations`, dropping the least recently used that are not in
        the middle of a turn (their transcripts stay in the history store)."""
        excess = len(self._conversations) - self._config.max_conversations
        for conversation in list(self._conversations.values()):
            if excess <= 0:
                break
            if conversation.lock.locked():
                continue
            del self._conversations[conversation.id]
            if conversation.socket is not None:
                self._spawn(conversation.socket.close())
            excess -= 1

    def close_user(self, user: str) -> int:
        """Close the sockets of `user`'s conversations (logout); return how many."""
        closed = 0
        for conversation in list(self._conversations.values()):
            if conversation.user != user:
                continue
            conversation.revoked = True
            # Forget it here; a later turn reloads it from the store onto a fresh session.
            del self._conversations[conversation.id]
            if conversation.socket is not None:
                self._spawn(conversation.socket.close())
                conversation.socket = None
                closed += 1
        return closed

    def conversation_socket(self, conversation_id: str) -> RealtimeSocket | None:
        """The socket a conversation holds now (for tests and diagnostics)."""
        conversation = self._conversations.get(conversation_id)
        return conversation.socket if conversation else None

    async def _socket_for(self, conversation: RealtimeConversation) -> RealtimeSocket:
        """The conversation's socket if alive; else a warm or new one with the past replayed."""
        socket = conversation.socket
        if socket is not None and await socket.is_alive(self._config.socket_max_age_seconds):
            return socket
        if socket is not None:
            conversation.socket = None
            self._spawn(socket.close())
            self.stats.reconnects += 1
        socket = await self.take_warm_socket() or await self.open_socket()
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
        conversation = await self._conversation(turn)
        async with conversation.lock:
            await self._catch_up(conversation)
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

    async def _catch_up(self, conversation: RealtimeConversation) -> None:
        """Another replica may have carried this conversation on since this one last held it:
        if the store has more turns than memory, take the store's and replay them."""
        if self._transcripts is None:
            return
        loaded = await self._transcripts(conversation.user, conversation.id)
        if loaded is None or _turns(loaded[0]) <= _turns(conversation.transcript):
            return
        conversation.transcript, conversation.pending_call_ids = loaded
        if conversation.socket is not None:
            self._spawn(conversation.socket.close())
            conversation.socket = None

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
                except (KeyError, TypeError, AttributeError) as exc:
                    raise rt_protocol_error(f"{raw.get('type')} event lacks {exc}") from None
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


def _turns(items: list[dict[str, Any]]) -> int:
    """How many caller turns (user messages and tool outputs) a transcript holds."""
    return sum(
        1
        for item in items
        if item.get("role") == "user" or item.get("type") == "function_call_output"
    )


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

"""One Realtime WebSocket, and opening one: connect with a pooled secret, wait for
`session.created`, configure it (text output, instructions, tools), retrying transient failures
with exponential backoff and full jitter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any
from urllib.parse import urlencode

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.upstream import realtime_events as rt
from healthagent_service.upstream.realtime_config import RealtimeConfig, RealtimeStats
from healthagent_service.upstream.realtime_secrets import RealtimeSecrets
from healthagent_service.upstream.upstream_json import decode_json, upstream_id

log = structlog.get_logger(__name__)

_LIVENESS_PING_AFTER_IDLE_SECONDS = 5.0
_LIVENESS_PING_TIMEOUT_SECONDS = 2.0


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
            raise rt.protocol_error("an event is not JSON") from None
        if not isinstance(event, dict):
            raise rt.protocol_error("an event is not a JSON object")
        return event

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.connection.close()

    def close_code(self) -> int | None:
        received = self.connection.protocol.close_rcvd
        return received.code if received is not None else None


class SocketOpener:
    """Opens configured sockets, each with a secret from `secrets`."""

    def __init__(
        self, config: RealtimeConfig, secrets: RealtimeSecrets, stats: RealtimeStats
    ) -> None:
        self._config = config
        self._secrets = secrets
        self._stats = stats

    async def open(self) -> RealtimeSocket:
        """A new configured socket, retrying transient failures with backoff and full jitter."""
        attempts = self._config.connect_attempts
        for attempt in range(attempts):
            try:
                return await self._open_once()
            except HealthAgentError as error:
                self._stats.connect_failures += 1
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

    async def _open_once(self) -> RealtimeSocket:
        secret = await self._secrets.for_socket()
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
                self._secrets.rejected(secret)
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
                raise rt.protocol_error(f"first event was {created.get('type')!r}")
            try:  # before any turn is recorded with it
                socket.session_id = upstream_id(
                    (created.get("session") or {}).get("id") or "", "session id"
                )
            except ValueError as exc:
                raise rt.protocol_error(
                    f"session.created event lacks {exc}", self._config.retry_after_seconds
                ) from None
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
        self._stats.sockets_opened += 1
        return socket

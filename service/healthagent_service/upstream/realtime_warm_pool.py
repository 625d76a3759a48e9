"""The warm pool: sockets opened ahead of need, past `session.created` and configured but
carrying no conversation, so a new conversation starts without waiting for a handshake. A
socket is handed out once; one that carried a conversation never comes back here."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from healthagent_service.errors import HealthAgentError
from healthagent_service.upstream.realtime_config import RealtimeConfig, RealtimeStats
from healthagent_service.upstream.realtime_socket import RealtimeSocket

log = structlog.get_logger(__name__)


class WarmPool:
    """Up to `config.warm_sockets` idle sockets, refilled in the background."""

    def __init__(
        self,
        config: RealtimeConfig,
        open_socket: Callable[[], Awaitable[RealtimeSocket]],
        stats: RealtimeStats,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self._config = config
        self._open_socket = open_socket
        self._stats = stats
        self._spawn = spawn  # closes a socket in the background
        self._sockets: deque[RealtimeSocket] = deque()
        self._filling: asyncio.Task[None] | None = None

    def fill(self) -> None:
        """Start refilling, unless a refill is under way (call from a running loop)."""
        if self._config.warm_sockets <= 0:
            return
        if self._filling is None or self._filling.done():
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while len(self._sockets) < self._config.warm_sockets:
            try:
                self._sockets.append(await self._open_socket())
            except HealthAgentError as error:
                log.warning("warm pool could not open a socket", reason=error.reason)
                await asyncio.sleep(self._config.backoff_max_seconds)

    async def take(self) -> RealtimeSocket | None:
        """A live, unused socket, if there is one."""
        try:
            while self._sockets:
                socket = self._sockets.popleft()
                if await socket.is_alive(self._config.socket_max_age_seconds):
                    self._stats.warm_hits += 1
                    return socket
                self._spawn(socket.close())
            self._stats.warm_misses += 1
            return None
        finally:
            self.fill()

    def reap(self, now: float) -> None:
        """Close the sockets too old or idle too long (as of `now`, monotonic), and refill."""
        fresh: deque[RealtimeSocket] = deque()
        for socket in self._sockets:
            if (
                socket.open_for(self._config.socket_max_age_seconds)
                and now - socket.opened_at < self._config.warm_socket_max_idle_seconds
            ):
                fresh.append(socket)
            else:
                self._spawn(socket.close())
        if len(fresh) != len(self._sockets):
            self._sockets = fresh
            self.fill()

    @property
    def size(self) -> int:
        """How many sockets wait now."""
        return len(self._sockets)

    def snapshot(self) -> list[RealtimeSocket]:
        """The sockets waiting now."""
        return list(self._sockets)

    def stop(self) -> list[RealtimeSocket]:
        """Stop refilling; hand back the sockets that were waiting, for the caller to close."""
        if self._filling is not None:
            self._filling.cancel()
        sockets = list(self._sockets)
        self._sockets.clear()
        return sockets

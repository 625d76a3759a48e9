"""Upstream HTTP clients: `SSEClient` for streaming turns, sharded httpx clients for the rest.

httpcore matches queued requests against the connections of its pool each time a request
starts or ends, so its work per request grows with the pool: one pool holding thousands of
streaming connections showed as a quarter of the server's CPU under 300 concurrent streams, and
splitting it into 16 raised throughput 2.7x. Pools of at most `CONNECTIONS_PER_SHARD`, picked by
a stable key (the user), keep that work bounded at any `max_connections` and a user's requests
on warm connections. A key whose pool is full spills over to the next pool with room, so one
busy user (or an unlucky spread of users) never waits while other pools have connections to
spare; only when every pool is full does a request queue, and `max_connections` holds overall.
"""

from __future__ import annotations

import httpcore
import httpx

from healthagent_service.upstream.asyncio_network import asyncio_transport
from healthagent_service.upstream.sse_client import DEFAULT_MAX_BUFFERED_BYTES, SSEClient

CONNECTIONS_PER_SHARD = 64
MIN_SHARDS = 16


def shards_for(max_connections: int) -> int:
    """Enough pools that each holds about `CONNECTIONS_PER_SHARD` connections at most."""
    return max(MIN_SHARDS, -(-max_connections // CONNECTIONS_PER_SHARD))


class ShardedHttpClient:
    """httpx clients with the same settings, `max_connections` split among them; `for_key`
    picks one. `streams` is the client for streaming turns, with its own `max_connections`."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        shards: int | None = None,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        count = shards or shards_for(max_connections)
        per_shard = max(1, -(-max_connections // count))
        # one TLS context for all of them: loading the CA bundle once, not once per pool
        tls = httpx.create_ssl_context()
        # idle connections still close after httpx's keep-alive expiry (5 s)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        transports = [asyncio_transport(ssl_context=tls, limits=limits) for _ in range(count)]
        self._pools: list[httpcore.AsyncConnectionPool] = [t.pool for t in transports]
        self._per_shard = per_shard
        self._clients = [
            httpx.AsyncClient(timeout=timeout, trust_env=False, transport=t.transport)
            for t in transports
        ]
        self.streams = SSEClient(
            timeout=timeout,
            max_connections=max_connections,
            ssl_context=tls,
            max_buffered_bytes=max_buffered_bytes,
        )

    def for_key(self, key: str) -> httpx.AsyncClient:
        """The client for `key`: the same one for the same key while its pool has room (warm
        connections), else the next one that has room."""
        count = len(self._clients)
        preferred = hash(key) % count
        for step in range(count):
            shard = (preferred + step) % count
            if self._has_room(self._pools[shard]):
                return self._clients[shard]
        return self._clients[preferred]  # all full: queue for this one (the pool timeout holds)

    def _has_room(self, pool: httpcore.AsyncConnectionPool) -> bool:
        connections = pool.connections
        return len(connections) < self._per_shard or any(c.is_idle() for c in connections)

    @property
    def first(self) -> httpx.AsyncClient:
        """Any client, for calls with no natural key."""
        return self._clients[0]

    async def aclose(self) -> None:
        await self.streams.aclose()
        for client in self._clients:
            await client.aclose()

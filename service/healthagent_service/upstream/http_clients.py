"""The upstream HTTP clients: `SSEClient` for streaming turns, and httpx clients for the other
calls (minting, cancelling, revoking agent tokens, Realtime secrets, JWKS), sharded by key.

httpcore walks every connection of its pool each time a request starts or ends (and polls the
socket of each idle one), so its work per request grows with the pool: cold mints 128 at a
time cost the service nearly twice the CPU each through one pool as through pools of at most
`CONNECTIONS_PER_SHARD` (docs/decisions/http-clients.md). A stable key (the user, or the
session) picks the pool, so a user's calls find warm connections; a key whose pool is full
spills over to the next pool with room, so one busy user (or an unlucky spread of users) never
waits while other pools have connections to spare. Only when every pool is full does a request
queue, and `max_connections` holds overall.
"""

from __future__ import annotations

import httpx

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
        # one TLS context for all of them: the CA bundle loaded once, not once per pool
        tls = httpx.create_ssl_context()
        # idle connections still close after httpx's keep-alive expiry (5 s); no proxy from the
        # environment (trust_env=False)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._transports = [
            httpx.AsyncHTTPTransport(verify=tls, limits=limits, trust_env=False)
            for _ in range(count)
        ]
        self._per_shard = per_shard
        self._clients = [
            httpx.AsyncClient(timeout=timeout, trust_env=False, transport=transport)
            for transport in self._transports
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
            if self._has_room(self._transports[shard]):
                return self._clients[shard]
        return self._clients[preferred]  # all full: queue for this one (the pool timeout holds)

    def _has_room(self, transport: httpx.AsyncHTTPTransport) -> bool:
        # httpx 0.28 keeps the transport's httpcore pool in `_pool` (pinned in
        # constraints.txt; tests/test_http_clients.py fills a pool and sees the spill-over)
        connections = transport._pool.connections
        return len(connections) < self._per_shard or any(c.is_idle() for c in connections)

    @property
    def first(self) -> httpx.AsyncClient:
        """Any client, for calls with no natural key."""
        return self._clients[0]

    async def aclose(self) -> None:
        await self.streams.aclose()
        for client in self._clients:
            await client.aclose()

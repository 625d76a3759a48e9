"""Upstream HTTP clients, sharded.

httpcore scans every connection of a pool when it hands out a request, so one pool holding
thousands of streaming connections costs O(n) per request (it showed as a quarter of the
server's CPU under 300 concurrent streams). A few smaller pools, picked by a stable key (the
user), keep that scan short and a user's requests on warm connections.
"""

from __future__ import annotations

import httpx


class ShardedHttpClient:
    """`shards` httpx clients with the same settings; `for_key` picks one."""

    def __init__(
        self,
        shards: int,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        max_keepalive_connections: int,
    ) -> None:
        per_shard = max(1, max_connections // shards)
        keepalive = max(1, max_keepalive_connections // shards)
        self._clients = [
            httpx.AsyncClient(
                timeout=timeout,
                trust_env=False,
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=keepalive),
            )
            for _ in range(shards)
        ]

    def for_key(self, key: str) -> httpx.AsyncClient:
        """The client for `key` (the same one for the same key, in this process)."""
        return self._clients[hash(key) % len(self._clients)]

    @property
    def first(self) -> httpx.AsyncClient:
        """Any client, for calls with no natural key."""
        return self._clients[0]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

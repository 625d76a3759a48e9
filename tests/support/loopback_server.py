"""Starting and ending the raw HTTP test servers of the upstream client tests on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol


class RawServer(Protocol):
    """A server's state: its port once listening, and the connections it accepted."""

    port: int
    writers: list[asyncio.StreamWriter]

    def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Awaitable[None]: ...


@contextlib.asynccontextmanager
async def listening(state: RawServer) -> AsyncIterator[None]:
    """Serve `state` on a free loopback port (set as `state.port`) until the block ends, then
    cut every connection it still has and let its handlers see them end."""
    listener = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield
        for writer in state.writers:
            writer.transport.abort()
        await asyncio.sleep(0.05)

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


class OneRequestUpstream:
    """A bad upstream on loopback: reads one HTTP/1.1 request a connection (its body sized by
    Content-Length) and hands it to `answer`, which subclasses write."""

    def __init__(self) -> None:
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def answer(
        self, path: bytes, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            await self.answer(head.split(b" ", 2)[1], body, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def answer_whole(writer: asyncio.StreamWriter, content_type: bytes, payload: bytes) -> None:
    """A 200 with `payload` as its whole body, then the connection closed."""
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (content_type, len(payload)) + payload
    )
    await writer.drain()

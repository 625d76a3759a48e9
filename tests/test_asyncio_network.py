"""The upstream clients' asyncio network backend, against a real HTTP/1.1 server over loopback:
plain and TLS, keep-alive reuse, a peer that closes an idle connection, a large body read
slowly, timeouts, refusals and resets, each mapped to the httpx error the service handles."""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from healthagent_service.upstream.asyncio_network import asyncio_transport
from healthagent_service.upstream.http_clients import ShardedHttpClient
from tests.support.loopback_server import listening
from tests.support.pki import Pki

# 16 MiB: more than loopback's socket buffers and the reader's 256 KiB limit together
BIG_BODY = bytes(range(256)) * 4096 * 16
SSE_EVENTS = 50


@dataclass
class Server:
    """A small HTTP/1.1 server: one handler per path, keep-alive, connections counted."""

    port: int = 0
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    big_body_paused: bool = False
    reader: asyncio.StreamReader | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if not await self.respond(path, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def reader_closed(self) -> None:
        """Wait until the client closes the connection."""
        assert self.reader is not None
        while await self.reader.read(4096):
            pass

    async def respond(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer `path`; False when the connection must end."""
        if path == "/sse":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for index in range(SSE_EVENTS):
                event = f'data: {{"n": {index}}}\n\n'.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BIG_BODY))
            writer.write(BIG_BODY)
            # the client does not read for a while: its buffer fills, it stops reading the
            # socket, the kernel's buffers fill, and what is left waits in ours
            await asyncio.sleep(0.3)
            self.big_body_paused = writer.transport.get_write_buffer_size() > 0
            await writer.drain()
            return True
        if path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            return False  # closed while the client keeps the connection for reuse
        if path == "/stall":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            await writer.drain()
            await self.reader_closed()
            return False
        if path == "/reset":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
            await writer.drain()
            writer.transport.abort()
            return False
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        return True


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    async with listening(state):
        yield state


def client(*, timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    return httpx.AsyncClient(
        timeout=timeout,
        transport=asyncio_transport(
            ssl_context=tls or httpx.create_ssl_context(), limits=limits
        ).transport,
    )


async def read_sse(http: httpx.AsyncClient, url: str) -> bytes:
    async with http.stream("GET", url) as response:
        assert response.status_code == 200
        return b"".join([piece async for piece in response.aiter_bytes()])


def expected_sse() -> bytes:
    return b"".join(f'data: {{"n": {index}}}\n\n'.encode() for index in range(SSE_EVENTS))


async def test_streams_a_chunked_body_and_reuses_the_connection(server: Server) -> None:
    async with client() as http:
        for _ in range(3):
            assert await read_sse(http, f"http://127.0.0.1:{server.port}/sse") == expected_sse()
    assert server.connections == 1


async def test_tls(server: Server, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_tls)
    port = listener.sockets[0].getsockname()[1]
    async with listener, client(tls=ssl.create_default_context(cafile=pki.ca_file)) as http:
        for _ in range(2):
            assert await read_sse(http, f"https://127.0.0.1:{port}/sse") == expected_sse()
        assert server.connections == 1
        # a certificate the client does not trust is refused as a connection error
        async with client() as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"https://127.0.0.1:{port}/sse")


async def test_a_large_body_read_slowly_arrives_whole_with_backpressure(server: Server) -> None:
    async with client() as http, http.stream("GET", f"http://127.0.0.1:{server.port}/big") as r:
        await asyncio.sleep(0.6)
        body = bytearray()
        async for piece in r.aiter_raw():
            body += piece
    assert body == BIG_BODY
    assert server.big_body_paused  # the server saw its send buffer fill: reading had paused


async def test_a_connection_the_peer_closed_while_idle_is_not_reused(server: Server) -> None:
    async with client() as http:
        assert (await http.get(f"http://127.0.0.1:{server.port}/close")).content == b"ok"
        await asyncio.sleep(0.1)  # the close reaches the client while the connection idles
        assert await read_sse(http, f"http://127.0.0.1:{server.port}/sse") == expected_sse()
    assert server.connections == 2


async def test_idle_connections_on_descriptors_above_1023(server: Server) -> None:
    # a server with thousands of upstream streams has descriptors beyond select()'s reach
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while fillers[-1] < 1100:  # every lower descriptor taken: the client's is above
            fillers.append(os.dup(fillers[0]))
        async with client() as http:
            for _ in range(2):  # the second request checks the idle connection first
                assert await read_sse(http, f"http://127.0.0.1:{server.port}/sse") == (
                    expected_sse()
                )
        assert server.connections == 1
    finally:
        for descriptor in fillers:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_read_timeout(server: Server) -> None:
    async with client(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"http://127.0.0.1:{server.port}/stall")


async def test_reset_mid_body_is_an_error_not_a_short_body(server: Server) -> None:
    async with client() as http:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get(f"http://127.0.0.1:{server.port}/reset")


async def test_connection_refused(server: Server) -> None:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/sse")


async def test_cancelling_a_read_closes_the_socket(server: Server) -> None:
    async with client() as http:
        task = asyncio.create_task(http.get(f"http://127.0.0.1:{server.port}/stall"))
        for _ in range(100):
            if server.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer = server.writers[0]
        # the server sees the connection end at once, not at the stall's end
        for _ in range(100):
            if writer.transport.is_closing() or writer.is_closing():
                break
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the cancelled request's socket stayed open")


async def test_a_full_pool_spills_over_and_the_overall_cap_holds(server: Server) -> None:
    # two pools of one connection each; one user's requests all prefer the same pool
    sharded = ShardedHttpClient(timeout=httpx.Timeout(5.0, pool=0.5), max_connections=2, shards=2)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with sharded.for_key("busy-user").stream("GET", f"{base}/stall"):
            # the user's pool is taken by the stalled stream: the next request goes elsewhere
            response = await sharded.for_key("busy-user").get(f"{base}/sse")
            assert response.content == expected_sse()
            async with sharded.for_key("busy-user").stream("GET", f"{base}/stall"):
                # both pools busy: a third request queues, and times out as the pool says
                with pytest.raises(httpx.PoolTimeout):
                    await sharded.for_key("busy-user").get(f"{base}/sse")
    finally:
        await sharded.aclose()

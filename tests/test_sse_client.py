"""The streaming-turn HTTP client against a raw HTTP/1.1 server over loopback, which writes
exactly the bytes each case needs: keep-alive reuse, bodies split at every byte, each way a body
can be delimited, truncation, error bodies, timeouts, backpressure, cancellation, the
connection cap, TLS and malformed responses, each mapped to the httpx error the service handles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from healthagent_service.upstream.sse import SSEProtocolError
from healthagent_service.upstream.sse_client import SSEClient, SSEResponse
from tests.support.loopback_server import listening
from tests.support.pki import Pki

EVENTS = [json.dumps({"n": index, "text": "é" * (index % 3)}).encode() for index in range(40)]
SSE_BODY = b"".join(b"data: " + data + b"\n\n" for data in EVENTS)
# 16 MiB of events: more than loopback's socket buffers and the client's 256 KiB queue
BIG_EVENT = b"x" * 8000
BIG_COUNT = 2048


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@dataclass
class Server:
    """Answers each request by its path; counts connections and keeps what it was sent."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    paused_by_client: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                path = head.split(b" ", 2)[1].decode()
                if not await self.respond(path, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def respond(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer `path`; False when the connection must end."""
        ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        if path == "/chunked":
            writer.write(ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(SSE_BODY, 37))
        elif path == "/bytewise":  # every byte its own write: splits land everywhere
            for byte in ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(SSE_BODY, 50):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
        elif path == "/early-hints":  # an informational response first
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
            writer.write(ok + b"content-length: %d\r\n\r\n" % len(SSE_BODY) + SSE_BODY)
        elif path == "/length":
            writer.write(ok + b"content-length: %d\r\n\r\n" % len(SSE_BODY) + SSE_BODY)
        elif path == "/until-close":
            writer.write(ok + b"connection: close\r\n\r\n" + SSE_BODY)
            await writer.drain()
            return False
        elif path == "/cut-mid-chunk":
            writer.write(ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(SSE_BODY, 64)[:500])
            await writer.drain()
            return False
        elif path == "/cut-mid-event":  # the body ends cleanly, inside an event
            writer.write(ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: {", 64))
        elif path == "/error":
            body = b'{"error": {"message": "slow down", "code": "rate_limited"}}'
            writer.write(
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
        elif path == "/stall":
            writer.write(
                ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: 1\n\n", 64)[:-5]
            )
            await writer.drain()
            while await reader.read(4096):
                pass
            return False
        elif path == "/keepalive":  # comments only, for longer than the read timeout
            writer.write(ok + b"transfer-encoding: chunked\r\n\r\n")
            for _ in range(8):
                writer.write(chunked(b": ping\n", 64)[:-5])
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(chunked(b"data: 1\n\n", 64))
        elif path == "/big":
            body = b"".join(b"data: " + BIG_EVENT + b"\n\n" for _ in range(BIG_COUNT))
            writer.write(ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(body, 65536))
            # the client does not read for a while: its queue fills, it stops reading the
            # socket, the kernel's buffers fill, and what is left waits in ours
            await asyncio.sleep(0.3)
            self.paused_by_client = writer.transport.get_write_buffer_size() > 0
        elif path == "/garbage":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        elif path == "/huge-event":
            writer.write(
                ok + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: " + b"y" * 5000, 4096)
            )
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        return True


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    async with listening(state):
        yield state


@contextlib.asynccontextmanager
async def sse_client(
    *,
    read: float = 5.0,
    pool: float = 5.0,
    max_connections: int = 4,
    tls: ssl.SSLContext | None = None,
    max_event_bytes: int | None = None,
    keepalive_expiry: float = 4.0,
) -> AsyncIterator[SSEClient]:
    client = SSEClient(
        timeout=httpx.Timeout(5.0, read=read, pool=pool),
        max_connections=max_connections,
        ssl_context=tls,
        max_event_bytes=max_event_bytes,
        keepalive_expiry=keepalive_expiry,
    )
    try:
        yield client
    finally:
        await client.aclose()


async def all_events(response: SSEResponse) -> list[bytes]:
    events: list[bytes] = []
    while batch := await response.receive_events():
        events.extend(batch)
    return events


async def read_events(client: SSEClient, url: str) -> list[bytes]:
    async with client.stream(url, b'{"q": 1}', {"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        events = await all_events(response)
        assert not response.ended_inside_event
        return events


@pytest.mark.parametrize("path", ["/chunked", "/bytewise", "/length", "/early-hints"])
async def test_events_arrive_whole_and_the_connection_is_reused(server: Server, path: str) -> None:
    async with sse_client() as client:
        for _ in range(3):
            assert await read_events(client, f"http://127.0.0.1:{server.port}{path}") == EVENTS
        assert client.open_connections == 1
    assert server.connections == 1
    head, body = server.requests[0]
    assert head.startswith(b"POST " + path.encode() + b" HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in head
    assert b"\r\nAccept: text/event-stream\r\n" in head
    assert body == b'{"q": 1}'


async def test_a_body_delimited_by_the_close_ends_cleanly(server: Server) -> None:
    async with sse_client() as client:
        for _ in range(2):
            assert await read_events(client, f"http://127.0.0.1:{server.port}/until-close") == (
                EVENTS
            )
        assert client.open_connections == 0  # never reused
    assert server.connections == 2


async def test_a_connection_cut_inside_the_body_is_an_error_not_a_short_answer(
    server: Server,
) -> None:
    async with sse_client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_events(client, f"http://127.0.0.1:{server.port}/cut-mid-chunk")
        assert client.open_connections == 0


async def test_a_body_that_ends_inside_an_event_is_reported(server: Server) -> None:
    async with sse_client() as client:
        url = f"http://127.0.0.1:{server.port}/cut-mid-event"
        async with client.stream(url, b"", {}) as response:
            assert await all_events(response) == []
            assert response.ended_inside_event


async def test_an_error_body_is_read_and_the_connection_kept(server: Server) -> None:
    async with sse_client() as client:
        async with client.stream(f"http://127.0.0.1:{server.port}/error", b"", {}) as response:
            assert response.status_code == 429
            assert response.headers["retry-after"] == "7"
            assert json.loads(await response.read_capped(64 * 1024))["error"]["message"] == (
                "slow down"
            )
        assert await read_events(client, f"http://127.0.0.1:{server.port}/chunked") == EVENTS
    assert server.connections == 1


async def test_read_timeout_closes_the_connection(server: Server) -> None:
    async with sse_client(read=0.3) as client:
        async with client.stream(f"http://127.0.0.1:{server.port}/stall", b"", {}) as response:
            assert await response.receive_events() == [b"1"]
            with pytest.raises(httpx.ReadTimeout):
                await response.receive_events()
        assert client.open_connections == 0


async def test_bytes_that_complete_no_event_still_keep_the_read_alive(server: Server) -> None:
    async with sse_client(read=0.3) as client:
        assert await read_events(client, f"http://127.0.0.1:{server.port}/keepalive") == [b"1"]


async def test_a_slow_reader_applies_backpressure_and_loses_nothing(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/big"
    async with sse_client() as client, client.stream(url, b"", {}) as response:
        await asyncio.sleep(0.6)
        events = await all_events(response)
    assert server.paused_by_client  # the server saw its send buffer fill: reading had paused
    assert len(events) == BIG_COUNT
    assert all(event == BIG_EVENT for event in events)


async def test_cancelling_a_stream_closes_its_socket_at_once(server: Server) -> None:
    async with sse_client() as client:
        started = asyncio.Event()

        async def reader() -> None:
            async with client.stream(f"http://127.0.0.1:{server.port}/stall", b"", {}) as r:
                await r.receive_events()
                started.set()
                await r.receive_events()

        task = asyncio.create_task(reader())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.open_connections == 0
        writer = server.writers[0]
        for _ in range(100):  # the server sees the connection end now, not at the stall's end
            if writer.transport.is_closing():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the cancelled stream's socket stayed open")


async def test_the_connection_cap_holds_and_a_waiting_request_gets_the_freed_one(
    server: Server,
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with sse_client(max_connections=1, pool=0.3) as client:
        async with client.stream(f"{base}/stall", b"", {}):
            with pytest.raises(httpx.PoolTimeout):
                await read_events(client, f"{base}/chunked")
        assert client.open_connections == 0  # the stalled stream was not read to its end

    async with sse_client(max_connections=1, pool=5.0) as client:
        async with client.stream(f"{base}/chunked", b"", {}) as first:
            waiting = asyncio.create_task(read_events(client, f"{base}/length"))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert await all_events(first) == EVENTS
        assert await waiting == EVENTS
        assert client.open_connections == 1


async def test_an_idle_connection_the_peer_closed_is_not_reused(server: Server) -> None:
    async with sse_client() as client:
        await read_events(client, f"http://127.0.0.1:{server.port}/chunked")
        server.writers[0].transport.abort()
        await asyncio.sleep(0.1)  # the close reaches the client while the connection idles
        assert await read_events(client, f"http://127.0.0.1:{server.port}/chunked") == EVENTS
    assert server.connections == 2


async def test_an_expired_idle_connection_is_not_reused(server: Server) -> None:
    async with sse_client(keepalive_expiry=0.1) as client:
        await read_events(client, f"http://127.0.0.1:{server.port}/chunked")
        await asyncio.sleep(0.2)
        await read_events(client, f"http://127.0.0.1:{server.port}/chunked")
        assert client.open_connections == 1
    assert server.connections == 2


async def test_tls(server: Server, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_tls)
    port = listener.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=pki.ca_file)
    async with listener, sse_client(tls=trusting) as client:
        for _ in range(2):
            assert await read_events(client, f"https://127.0.0.1:{port}/chunked") == EVENTS
        assert server.connections == 1
        async with sse_client() as untrusting:  # the system's CAs do not know this one
            with pytest.raises(httpx.ConnectError):
                await read_events(untrusting, f"https://127.0.0.1:{port}/chunked")


async def test_connection_refused(server: Server) -> None:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with sse_client() as client:
        with pytest.raises(httpx.ConnectError):
            await read_events(client, f"http://127.0.0.1:{port}/chunked")
        assert client.open_connections == 0


async def test_malformed_responses_and_events(server: Server) -> None:
    async with sse_client(max_event_bytes=1024) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_events(client, f"http://127.0.0.1:{server.port}/garbage")
        with pytest.raises(SSEProtocolError):
            await read_events(client, f"http://127.0.0.1:{server.port}/huge-event")
        assert client.open_connections == 0


async def test_requests_that_cannot_be_sent_as_asked(server: Server) -> None:
    async with sse_client() as client:
        with pytest.raises(httpx.LocalProtocolError):  # a header must not smuggle another
            async with client.stream(
                f"http://127.0.0.1:{server.port}/x", b"", {"X-A": "1\r\nX-B: 2"}
            ):
                pass
        with pytest.raises(httpx.UnsupportedProtocol):
            await read_events(client, "ftp://127.0.0.1/x")

"""The upstream clients as `create_server` builds them, against a real HTTP/1.1 server over
loopback: TLS trusting what the environment names (both clients), no proxy from the
environment, the read timeout, and the sharded pools' spill-over and overall cap."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from healthagent_service.upstream.http_clients import ShardedHttpClient
from tests.support.loopback_server import listening
from tests.support.pki import Pki

EVENT = b'data: {"n": 1}\n\n'


@dataclass
class Server:
    """A small HTTP/1.1 server: `/ok`, `/sse` and `/stall` (a body that never ends)."""

    port: int = 0
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, _, headers = head.partition(b"\r\n")
                for line in headers.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        await reader.readexactly(int(value))
                path = request_line.split(b" ", 2)[1]
                if path == b"/sse":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(EVENT), EVENT)
                    )
                elif path == b"/stall":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                    await writer.drain()
                    await reader.read()  # until the client closes
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    async with listening(state):
        yield state


def clients(*, read: float = 5.0, max_connections: int = 4, shards: int = 2) -> ShardedHttpClient:
    return ShardedHttpClient(
        timeout=httpx.Timeout(5.0, read=read, pool=0.5),
        max_connections=max_connections,
        shards=shards,
    )


async def read_sse(upstream: ShardedHttpClient, url: str) -> bytes:
    async with upstream.streams.stream(url, b"{}", {"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        return b"".join(await response.receive_events())


async def test_tls_trusts_the_ca_the_environment_names(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_tls)
    base = f"https://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        # without it, a certificate from an unknown CA is refused as a connection error
        untrusting = clients()
        try:
            with pytest.raises(httpx.ConnectError):
                await untrusting.for_key("alice").get(f"{base}/ok")
            with pytest.raises(httpx.ConnectError):
                await read_sse(untrusting, f"{base}/sse")
        finally:
            await untrusting.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
        trusting = clients()
        try:
            for _ in range(2):
                assert (await trusting.for_key("alice").get(f"{base}/ok")).content == b"ok"
            assert server.connections == 1  # kept alive (the refused ones never got this far)
            assert await read_sse(trusting, f"{base}/sse") == b'{"n": 1}'  # the event's data
        finally:
            await trusting.aclose()


async def test_no_proxy_from_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # the discard port: nothing listens
    upstream = clients()
    try:
        response = await upstream.for_key("alice").get(f"http://127.0.0.1:{server.port}/ok")
        assert response.content == b"ok"
        assert server.connections == 1
    finally:
        await upstream.aclose()


async def test_read_timeout(server: Server) -> None:
    upstream = clients(read=0.3)
    try:
        with pytest.raises(httpx.ReadTimeout):
            await upstream.first.get(f"http://127.0.0.1:{server.port}/stall")
    finally:
        await upstream.aclose()


async def test_a_full_pool_spills_over_and_the_overall_cap_holds(server: Server) -> None:
    # two pools of one connection each; one user's requests all prefer the same pool
    upstream = clients(max_connections=2, shards=2)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with upstream.for_key("busy-user").stream("GET", f"{base}/stall"):
            # the user's pool is taken by the stalled stream: the next request goes elsewhere
            response = await upstream.for_key("busy-user").get(f"{base}/ok")
            assert response.content == b"ok"
            async with upstream.for_key("busy-user").stream("GET", f"{base}/stall"):
                # both pools busy: a third request queues, and times out as the pool says
                with pytest.raises(httpx.PoolTimeout):
                    await upstream.for_key("busy-user").get(f"{base}/ok")
    finally:
        await upstream.aclose()

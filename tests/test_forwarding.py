"""The HTTP listener's gRPC client (`web/forwarding.py`) against a real grpc.aio server on an
abstract Unix socket, as `serve` runs it: metadata and status both ways, messages past every
flow-control window, backpressure, deadlines, cancellation, GOAWAY and a server that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from healthagent_service.web.forwarding import (
    HIGH_WATER,
    STREAM_WINDOW,
    ForwardingChannel,
    grpc_timeout,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="abstract Unix sockets")

ECHO = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"
SLEEP = "/test.Echo/Sleep"
BIG_STREAM_MESSAGE = 64 * 1024


class _Echo:
    """What the handlers saw, for the tests to check."""

    def __init__(self) -> None:
        self.metadata: dict[str, str | bytes] = {}
        self.written = 0
        self.cancelled = asyncio.Event()
        self.deadline: float | None = None

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        await context.send_initial_metadata((("x-initial", "hello"),))
        if request.startswith(b"fail"):
            context.set_trailing_metadata((("x-why-bin", b"\x00\xff"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nope: 100% / é")
        if request.startswith(b"size:"):
            return b"r" * int(request.removeprefix(b"size:"))
        context.set_trailing_metadata((("x-trailer", "bye"), ("x-raw-bin", b"\x01\x02\x03")))
        return request

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        count = int(request)
        try:
            for index in range(count):
                yield index.to_bytes(4, "big") * (BIG_STREAM_MESSAGE // 4)
                self.written = index + 1
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def sleep(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.deadline = context.time_remaining()
        try:
            await asyncio.sleep(float(request))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"slept"


async def _server(echo: _Echo, address: str, **options: int) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            *options.items(),
        ]
    )
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
        "Sleep": grpc.unary_unary_rpc_method_handler(echo.sleep),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port(address)
    await server.start()
    return server


@contextlib.asynccontextmanager
async def _running(
    max_message_bytes: int, **options: int
) -> AsyncIterator[tuple[_Echo, str, ForwardingChannel]]:
    """A test server on a fresh abstract socket, and a channel to it."""
    echo, address = _Echo(), _address()
    server = await _server(echo, address, **options)
    channel = ForwardingChannel(address, max_message_bytes=max_message_bytes)
    try:
        yield echo, address, channel
    finally:
        await channel.close()
        await server.stop(None)


def _address() -> str:
    return f"unix-abstract:healthagent-forwarding-test-{secrets.token_hex(6)}"


async def test_metadata_messages_and_status_come_through_both_ways() -> None:
    async with _running(8 * 1024 * 1024) as (echo, _, channel):
        call = await channel.call(ECHO, b"ping", [("x-plain", "a b"), ("x-id-bin", b"\x00\x01")])
        assert await call.read() == b"ping"
        assert await call.read() is None
        assert echo.metadata["x-plain"] == "a b" and echo.metadata["x-id-bin"] == b"\x00\x01"
        assert ("x-initial", "hello") in call.initial_metadata()
        trailing = dict(call.trailing_metadata())
        assert trailing["x-trailer"] == "bye" and trailing["x-raw-bin"] == b"\x01\x02\x03"

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary(ECHO, b"fail")
        assert failed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert failed.value.details() == "nope: 100% / é"
        assert dict(failed.value.trailing_metadata())["x-why-bin"] == b"\x00\xff"


async def test_metadata_http2_cannot_carry_is_refused_without_quoting_it() -> None:
    async with _running(1024) as (_, _, channel):
        in_flight = asyncio.ensure_future(channel.unary(SLEEP, b"0.5"))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary(ECHO, b"x", [("te", "sk-secret-token")])  # only "trailers"
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "sk-secret-token" not in str(refused.value)  # h2's own words quote it
        assert await channel.unary(ECHO, b"still") == b"still"  # a new connection
        assert await asyncio.wait_for(in_flight, 5) == b"slept"  # the old one's call goes on


async def test_messages_past_every_window_arrive_whole() -> None:
    """A 3 MiB request (the server's first window is 64 KiB) and a 6 MiB answer (the stream
    window is 1 MiB): partial messages earn credit, or neither could ever finish."""
    async with _running(8 * 1024 * 1024) as (_, address, channel):
        request = secrets.token_bytes(3 * 1024 * 1024)
        assert await asyncio.wait_for(channel.unary(ECHO, request), 20) == request
        answer = await asyncio.wait_for(channel.unary(ECHO, b"size:%d" % (6 * 1024 * 1024)), 20)
        assert answer == b"r" * (6 * 1024 * 1024)

        small = ForwardingChannel(address, max_message_bytes=1024)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await small.unary(ECHO, b"size:4096")
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        await small.close()


async def test_a_reader_that_stops_stalls_the_servers_writes() -> None:
    """Nothing is read ahead of a slow HTTP client: with no reads, the server can write about
    one stream window plus the high-water mark, and no more; reading again takes the rest."""
    total = 200  # 12.5 MiB in 64 KiB messages
    async with _running(8 * 1024 * 1024) as (echo, _, channel):
        call = await channel.call(STREAM, str(total).encode())
        await asyncio.sleep(1.5)
        ceiling = (STREAM_WINDOW + HIGH_WATER) // BIG_STREAM_MESSAGE + 8  # + gRPC's own buffers
        assert 0 < echo.written <= ceiling, echo.written
        received = 0
        while (message := await asyncio.wait_for(call.read(), 10)) is not None:
            assert message[:4] == received.to_bytes(4, "big")
            received += 1
        assert received == total == echo.written


async def test_deadline_and_cancel_reach_the_server() -> None:
    async with _running(1024) as (echo, _, channel):
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await asyncio.wait_for(channel.unary(SLEEP, b"30", timeout=0.5), 10)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert echo.deadline is not None and 0 < echo.deadline <= 0.5
        await asyncio.wait_for(echo.cancelled.wait(), 5)

        echo.cancelled.clear()
        call = await channel.call(SLEEP, b"30")
        reading = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as cancelled:
            await asyncio.wait_for(reading, 5)
        assert cancelled.value.code() is grpc.StatusCode.CANCELLED
        await asyncio.wait_for(echo.cancelled.wait(), 5)  # the handler was cancelled too


async def test_calls_go_on_across_the_servers_goaway() -> None:
    """A server with a maximum connection age sends GOAWAY every half second: calls started
    after it go on a new connection, and none fails."""
    age = {"grpc.max_connection_age_ms": 300, "grpc.max_connection_age_grace_ms": 5000}
    async with _running(1024, **age) as (_, _, channel):
        loop = asyncio.get_running_loop()
        finish = loop.time() + 2.0
        answered = 0
        while loop.time() < finish:
            replies = await asyncio.gather(*(channel.unary(ECHO, b"x%d" % i) for i in range(20)))
            assert replies == [b"x%d" % i for i in range(20)]
            answered += 20
            await asyncio.sleep(0.05)
        assert answered >= 200


async def test_a_server_that_goes_away_fails_calls_unavailable_then_is_reached_again() -> None:
    echo, address = _Echo(), _address()
    server = await _server(echo, address)
    channel = ForwardingChannel(address, max_message_bytes=1024)
    try:
        call = await channel.call(SLEEP, b"30")
        reading = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.2)
        await server.stop(None)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await asyncio.wait_for(reading, 5)
        assert gone.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await asyncio.wait_for(channel.unary(ECHO, b"hi"), 5)
        assert nobody.value.code() is grpc.StatusCode.UNAVAILABLE

        server = await _server(echo, address)
        assert await asyncio.wait_for(channel.unary(ECHO, b"back"), 5) == b"back"
    finally:
        await channel.close()
        await server.stop(None)


def test_grpc_timeout_keeps_to_eight_digits() -> None:
    assert grpc_timeout(1.5) == "1500m"
    assert grpc_timeout(0.0001) == "1m"
    assert grpc_timeout(300_000.0) == "300000S"
    assert grpc_timeout(10.0**9) == "16666667M"
    assert grpc_timeout(10.0**12) == "99999999H"  # past what the header can say: its most

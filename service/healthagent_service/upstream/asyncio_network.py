"""An httpcore network backend on plain asyncio protocols, for the upstream HTTP clients.

httpx's default backend reads through anyio: every read arms and cancels a cancel scope for
its timeout and resumes, then pauses, the transport (two `epoll_ctl` calls). Under streaming
load that was about a fifth of the event loop's time per relayed chunk (docs/benchmarks.md).
Here the transport reads freely into a buffer (paused only above `_HIGH_WATER` bytes, so a slow
reader still applies TCP backpressure), a read that finds data returns at once, and a read that
waits sets one timer. httpx, httpcore and h11 still do all of HTTP; this is only the socket.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import threading
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httpcore
import httpx

_HIGH_WATER = 256 * 1024  # buffered bytes above which the socket stops being read
_LOW_WATER = 64 * 1024
_RECEIVE_BUFFER_BYTES = 64 * 1024  # at most this much per read, as httpcore asks for
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying the next address, as RFC 8305 suggests


class _ReadTimeoutError(Exception):
    """Set on a read's waiter by its timer."""


class _ReceiveBuffer(threading.local):
    """One receive buffer per thread (an event loop runs in one thread), shared by its
    connections: asyncio calls `get_buffer` and `buffer_updated` back to back, so no two
    reads ever overlap in it."""

    def __init__(self) -> None:
        self.memory = memoryview(bytearray(_RECEIVE_BUFFER_BYTES))


_receive_buffer = _ReceiveBuffer()


def receive_buffer() -> memoryview:
    """This thread's receive buffer, for buffered protocols (see `_ReceiveBuffer`)."""
    return _receive_buffer.memory


class _StreamProtocol(asyncio.BufferedProtocol):
    """Buffers what the peer sends and wakes the one reader waiting for it.

    A buffered protocol: asyncio's plain `Protocol` receives into a fresh 256 KiB bytes object
    per read and shrinks it to what arrived, which under streaming load fragmented the malloc
    heap (docs/reliability.md); here each read lands in one shared buffer and is copied out at
    its real size."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_drain",
        "_eof",
        "_error",
        "_loop",
        "_paused",
        "_waiter",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    # -- callbacks from the transport -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not an asyncio.Transport subclass under every event loop (uvloop's is not)
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _receive_buffer.memory

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_receive_buffer.memory[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too: HTTP/1.1 has no use for a half-open socket

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        self.resume_writing()  # a writer waiting to drain sees the closed transport

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the stream -----------------------------------------------------------------

    @property
    def readable(self) -> bool:
        """Data or EOF is waiting, here or still in the socket: for an idle pooled connection
        this means it is not reusable."""
        if self._buffer or self._eof:
            return True
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return True
        poller = select.poll()  # not select(): descriptors above 1023 are common here
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        if not self._buffer and not self._eof:
            await self._wait_readable(timeout)
        if not self._buffer:  # end of stream: b"" as httpcore expects, or the reset
            if self._error is not None:
                raise httpcore.ReadError(str(self._error) or type(self._error).__name__)
            return b""
        data = self._buffer.popleft()
        if len(data) > max_bytes:
            self._buffer.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self._buffered -= len(data)
        if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def _wait_readable(self, timeout: float | None) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        timer = None
        if timeout is not None:
            timer = self._loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except _ReadTimeoutError:
            raise httpcore.ReadTimeout(f"no data for {timeout} s") from None
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def drain(self, timeout: float | None) -> None:
        """Wait while the transport's write buffer is over its limit."""
        if self._drain is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._drain), timeout)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"could not send for {timeout} s") from None


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_ReadTimeoutError())


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection, plain or TLS."""

    def __init__(self, protocol: _StreamProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._protocol.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("connection closed")
        self._transport.write(buffer)
        await self._protocol.drain(timeout)
        if self._transport.is_closing():
            raise httpcore.WriteError("connection closed while sending")

    async def aclose(self) -> None:
        # abort, not close: a cancelled stream's socket must be gone now, not after a flush
        self._transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                ),
                timeout,
            )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        if transport is None:  # pragma: no cover - only for transports that cannot do TLS
            raise httpcore.ConnectError("the transport does not support TLS")
        self._protocol.transport = transport
        return AsyncioStream(self._protocol, transport)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._protocol.readable
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info in {"ssl_object", "socket"}:
            return self._transport.get_extra_info(info)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connects with `loop.create_connection`; see the module docstring for why."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = _StreamProtocol(loop)
        local = (local_address, 0) if local_address else None
        # asyncio sets TCP_NODELAY on TCP connections itself. Happy eyeballs (RFC 8305), as
        # anyio does: a host with a dead IPv6 route must not spend the whole connect timeout
        # on its first address.
        connecting = loop.create_connection(
            lambda: protocol,
            host,
            port,
            local_addr=local,
            happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
        )
        return await _connected(protocol, connecting, timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = _StreamProtocol(loop)
        connecting = loop.create_unix_connection(lambda: protocol, path)
        return await _connected(protocol, connecting, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connected(
    protocol: _StreamProtocol,
    connecting: Coroutine[Any, Any, tuple[asyncio.BaseTransport, Any]],
    timeout: float | None,
    socket_options: Iterable[Any] | None,
) -> AsyncioStream:
    """The stream once `connecting` is done, with httpcore's errors for what went wrong."""
    try:
        transport, _ = await asyncio.wait_for(connecting, timeout)
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
    _apply_socket_options(transport, socket_options)
    # not an asyncio.Transport subclass under every event loop (uvloop's is not)
    return AsyncioStream(protocol, cast(asyncio.Transport, transport))


def _apply_socket_options(transport: asyncio.BaseTransport, options: Iterable[Any] | None) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or not options:
        return
    for option in options:
        sock.setsockopt(*option)


@dataclass(frozen=True, slots=True)
class PooledTransport:
    """An httpx transport and its connection pool (to see how full the pool is)."""

    transport: httpx.AsyncHTTPTransport
    pool: httpcore.AsyncConnectionPool


def asyncio_transport(*, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> PooledTransport:
    """An httpx transport whose connections use `AsyncioBackend` (no proxy, HTTP/1.1)."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, trust_env=False)
    # httpx 0.28 has no argument for the network backend; its transport is a thin wrapper
    # around this pool (request conversion and exception mapping), so swap the pool for one
    # built with the same settings and ours. Pinned in constraints.txt; a test reads a
    # response through it.
    pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    transport._pool = pool
    return PooledTransport(transport, pool)
